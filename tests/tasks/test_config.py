import pytest

from tasks.config import ConfigError, PipelineConfig, fingerprint, load_config


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_presets_load_and_validate():
    demo = load_config(preset="demo")
    real = load_config(preset="open30m")
    assert demo.download.allow_private_addresses is True
    assert real.download.allow_private_addresses is False  # only the demo and tests turn it on
    assert {s.format for s in real.sources} == {"cc3m", "cc12m", "yfcc15m"}
    assert real.download.shard_size == 5000


def test_unknown_key_names_its_path(tmp_path):
    p = _write(tmp_path, "dataset: {root: /x}\ndownload:\n  shard_sise: 10\n")
    with pytest.raises(ConfigError, match=r"download\.shard_sise: unknown key"):
        load_config(p)


def test_unknown_nested_key_in_a_list(tmp_path):
    p = _write(tmp_path, "dataset: {root: /x}\nsources:\n  - {name: a, format: cc3m, paths: [x], colour: red}\n")
    with pytest.raises(ConfigError, match=r"sources\.0\.colour"):
        load_config(p)


@pytest.mark.parametrize(
    "text,where",
    [
        ("dataset: {root: /x}\ndownload: {shard_size: 0}\n", "download.shard_size"),
        ("dataset: {root: /x}\ndownload: {shard_size: 20000}\n", "download.shard_size"),
        ("dataset: {root: /x}\nsources: [{name: a, format: laion, paths: [x]}]\n", "sources.0.format"),
        ("download: {}\n", "dataset"),
        ("dataset: {root: /x}\nsources: [{name: a, format: cc3m, paths: [x]}, {name: a, format: cc3m, paths: [y]}]\n",
         "unique"),
    ],
)
def test_bad_values_fail_with_a_clear_message(tmp_path, text, where):
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        load_config(_write(tmp_path, text))


def test_yaml_is_safe_loaded(tmp_path):
    p = _write(tmp_path, "dataset: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_overrides_apply_with_yaml_values():
    cfg = load_config(preset="demo", overrides=["download.shard_size=7", "dataset.root=/tmp/r",
                                                "sources.0.max_urls=3", "download.allow_private_addresses=false"])
    assert cfg.download.shard_size == 7
    assert cfg.dataset.root == "/tmp/r"
    assert cfg.sources[0].max_urls == 3
    assert cfg.download.allow_private_addresses is False
    with pytest.raises(ConfigError, match="download.nope"):
        load_config(preset="demo", overrides=["download.nope=1"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(preset="demo", overrides=["download.shard_size"])


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match="demo"):
        load_config(preset="nope")


def test_config_is_frozen():
    cfg = load_config(preset="demo")
    with pytest.raises(Exception):
        cfg.download.shard_size = 3  # type: ignore[misc]


def test_speed_knobs_stay_out_of_the_fingerprint():
    a = PipelineConfig.model_validate({"dataset": {"root": "/x"}, "download": {"processes": 1, "concurrency": 8}})
    b = PipelineConfig.model_validate({"dataset": {"root": "/x"}, "download": {"processes": 8, "concurrency": 256}})
    c = PipelineConfig.model_validate({"dataset": {"root": "/x"}, "download": {"short_side": 224}})
    fp = lambda cfg: fingerprint(cfg.download.fingerprint_payload())  # noqa: E731
    assert fp(a) == fp(b)
    assert fp(a) != fp(c)


def test_train_memory_options_are_the_models_and_stay_out_of_the_fingerprint():
    import dataclasses

    from model import MemoryConfig, get_preset
    from tasks.config import TrainMemoryConfig

    defaults = TrainMemoryConfig().model_dump()
    assert defaults == dataclasses.asdict(MemoryConfig())  # same names, all off
    options = {"checkpoint_vision": True, "pooling_chunk_size": 32, "head_chunk_size": 64}
    train = PipelineConfig.model_validate({"dataset": {"root": "/x"}, "train": {"memory": options}}).train
    assert get_preset(train.preset, **train.model_overrides_with_memory()).memory == MemoryConfig(**options)
    plain = PipelineConfig.model_validate({"dataset": {"root": "/x"}}).train
    assert fingerprint(train.fingerprint_payload()) == fingerprint(plain.fingerprint_payload())
    with pytest.raises(ConfigError, match="train.memory"):
        load_config(preset="demo", overrides={"train.model_overrides.memory.head_chunk_size": 8})
    with pytest.raises(ConfigError, match="pooling_chunk_size"):
        load_config(preset="demo", overrides={"train.memory.pooling_chunk_size": 0})


def test_the_80gb_preset_is_open30m_with_more_memory_options():
    big, small = load_config(preset="open30m"), load_config(preset="open30m-80gb")
    assert big.model_dump(exclude={"train"}) == small.model_dump(exclude={"train"})
    assert big.train.model_dump(exclude={"memory"}) == small.train.model_dump(exclude={"memory"})
    assert small.train.memory.checkpoint_decoder and not big.train.memory.checkpoint_decoder
