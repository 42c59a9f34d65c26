import dataclasses

import pytest

from model import PRESETS, GoldiCLIPConfig, get_preset


def test_presets_exist_and_b16_matches_the_paper():
    assert set(PRESETS) == {"debug", "B/16"}
    config = get_preset("B/16")
    assert (config.vision.width, config.vision.num_layers, config.vision.patch_size, config.vision.image_size) == (
        768, 12, 16, 224)
    assert (config.text.width, config.text.num_layers, config.text.context_length, config.text.vocab_size) == (
        512, 12, 77, 49408)
    assert config.embed_dim == 512 and config.distill.num_prototypes == 65536
    assert (config.decoder.num_layers, config.decoder.num_heads, config.decoder.width) == (8, 8, 512)
    assert config.weighting.static_weights["cap"] == 2.0


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="B/16"):
        get_preset("L/14")


def test_nested_overrides_and_unknown_keys():
    config = get_preset("debug", distill={"enabled": False}, embed_dim=32, pooling={"num_heads": 2})
    assert not config.distill.enabled and config.embed_dim == 32 and config.pooling.num_heads == 2
    assert PRESETS["debug"].distill.enabled  # presets are not mutated
    with pytest.raises(ValueError, match="unknown"):
        get_preset("debug", distil={"enabled": False})
    with pytest.raises(ValueError, match="unknown"):
        get_preset("debug", decoder={"layers": 3})


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        GoldiCLIPConfig().embed_dim = 3


def test_inconsistent_sizes_fail_loudly():
    with pytest.raises(ValueError, match="patch size"):
        get_preset("debug", vision={"local_image_size": 20})
    with pytest.raises(ValueError, match="heads"):
        get_preset("debug", pooling={"num_heads": 5})
    hash(get_preset("B/16"))
