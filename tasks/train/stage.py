"""The train stage: one unit, the Ray Train run of this config on `train/*.tar` (METHOD.md sec. 8;
DESIGN.md, Ray).

It follows the stage contract (tasks/stage.py) with a single unit: the unit is done when its
record holds this config's fingerprint, so rerunning a finished run skips it. The run lives at
`<root>/runs/<run name>`, the name a fingerprint of the training config and of the shards, so a
run stopped part-way (driver killed, node lost) resumes from its last checkpoint when the stage
runs again; `force` deletes the run and starts over (`discard`).

`process` starts (or joins) Ray, builds a `TorchTrainer` whose workers run
`tasks.train.loop.train_loop_per_worker`, and runs `fit()` in a thread while it tails the run's
`metrics.jsonl`, handing each new row to `on_metrics` (the flow's progress). At the end it draws
the curves under `<run>/plots/` and counts steps, samples and corrupt samples from the last
checkpoint's data position.
"""

from __future__ import annotations

import re
import tempfile
import threading
from collections import Counter
from collections.abc import Callable

from model import get_preset
from model.tokenizer import build_local_tokenizer
from storage.fs import exists, join, open_fs
from tasks.config import ConfigError, PipelineConfig, TrainConfig, fingerprint
from tasks.ray_actors import forwarded_env, start_ray
from tasks.stage import SINGLE_UNIT, ShardOutcome, Stage
from tasks.train.checkpoint import (
    CHECKPOINT_FILE,
    RUNS_DIR,
    TOKENIZER_MARKER,
    checkpoint_step,
    latest_checkpoint,
    read_data_position,
    runs_dir,
    save_tokenizer,
    tokenizer_dir,
)
from tasks.train.data import iter_texts, train_shard_urls
from tasks.train.loop import StepHook, read_metrics, train_loop_per_worker
from tasks.train.report import plot_files, write_plots

POLL_SECONDS = 2.0


def run_name(config: PipelineConfig, inputs: dict) -> str:
    """Deterministic from what decides the trained weights: the training config and the shards it
    reads (``Stage.upstream_fingerprint``: each tar's size and checksum as the shards stage recorded
    them), so rewritten shards with other bytes start a new run and identical ones resume this one."""
    slug = re.sub(r"[^a-z0-9]+", "", config.train.preset.lower())
    return f"goldiclip-{slug}-{fingerprint('train', config.train.fingerprint_payload(), inputs)}"


def planned_run(config: PipelineConfig) -> str | None:
    """The run the train stage would train or resume now (None: no training shards yet)."""
    stage = TrainStage(config)
    stage.shard_urls = train_shard_urls(stage.layout.train_dir)
    return run_name(config, stage.upstream_fingerprint(SINGLE_UNIT)) if stage.shard_urls else None


def prepare_tokenizer(config: PipelineConfig, shard_urls: list[str]) -> str:
    """The tokenizer's id or directory; `local` trains one on the captions into <root>/tokenizer once.

    It is built in a local temporary directory and copied to the root, its marker file last, so
    the root may be any fsspec URL and a reader never sees half a tokenizer.
    """
    train = config.train
    if train.tokenizer != "local":
        return train.tokenizer
    out = tokenizer_dir(config.dataset.root)
    if not exists(join(out, TOKENIZER_MARKER)):
        with tempfile.TemporaryDirectory(prefix="goldiclip-tokenizer-") as tmp:
            build_local_tokenizer(iter_texts(shard_urls), tmp, vocab_size=train.local_tokenizer_vocab_size,
                                  model_max_length=get_preset(train.preset).text.context_length)
            save_tokenizer(tmp, out)
    return out


def validate_train_config(config: PipelineConfig) -> None:
    """Fail fast, before Ray starts, on a preset or override the model does not know."""
    train = config.train
    get_preset(train.preset, **train.model_overrides)
    if train.warmup_steps >= train.steps and train.steps > 1:
        raise ValueError(f"train.warmup_steps ({train.warmup_steps}) must be below train.steps ({train.steps})")
    if train.num_workers * train.batch_size_per_worker < 2:
        raise ValueError("the sigmoid loss needs at least 2 images per global batch")


def build_trainer(config: PipelineConfig, *, name: str, tokenizer: str, shard_urls: list[str],
                  on_step: StepHook | None = None):
    """A `TorchTrainer` for the run `name` under `<root>/runs`; `on_step(step, rank)` runs on every
    worker after each optimiser step (tests inject faults with it).

    On an object store the run's URI is Ray's `storage_path` (`s3://bucket/prefix/runs`): Ray
    Train's controller and workers open it with pyarrow, which, like s3fs in the loop, takes the
    credentials and `AWS_ENDPOINT_URL` from the environment. The workers get the driver's storage
    variables (`forwarded_env`: AWS_*, FSSPEC_*, ...) as `worker_runtime_env`, whatever the
    environment their node was started with; the controller runs on the driver's node with the
    job's environment (inherited by a local Ray, forwarded by `start_ray` when joining a cluster).
    Not a pyarrow filesystem object with the driver's keys: temporary credentials would expire in
    a long run, and nodes with their own (an instance role) would not use them."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    train = config.train
    storage = runs_dir(config.dataset.root)
    resources = dict(train.resources_per_worker) or None
    loop_config = {
        "config": config.model_dump(mode="json"), "tokenizer": tokenizer, "shard_urls": shard_urls,
        "run_dir": join(storage, name), "cpus_per_worker": (resources or {}).get("CPU", 1), "on_step": on_step,
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=storage, worker_runtime_env={"env_vars": forwarded_env()},
            checkpoint_config=CheckpointConfig(num_to_keep=train.num_to_keep),
            failure_config=FailureConfig(max_failures=train.max_failures),
        ),
    )


def fit_watching(trainer, run_dir: str, *, start_step: int, on_metrics: Callable[[dict], None] | None) -> None:
    """`trainer.fit()` in a thread; every metric row past `start_step` goes to `on_metrics` as it lands."""
    outcome: dict = {}

    def fit():
        try:
            trainer.fit()
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread below
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    last_step = start_step
    while thread.is_alive():
        thread.join(POLL_SECONDS)
        if on_metrics is None:
            continue
        try:
            rows = read_metrics(run_dir)
        except (OSError, ValueError):  # a file mid-replace on some stores: read it next time
            continue
        for row in (r for r in rows if r["step"] > last_step):
            on_metrics(row)
            last_step = row["step"]
    if "error" in outcome:
        raise outcome["error"]


class TrainStage(Stage):
    """Train GoldiCLIP on every training shard: one unit, `SINGLE_UNIT`, the run."""

    name = "train"
    task_name = "train_model"
    upstream = ("shards",)
    # The loader streams the tars epoch after epoch and counts an unreadable one (`bad_tar`); a
    # checksum pass before training would read every tar once more, so only sizes are checked.
    checked_while_reading = frozenset({("shards", "tar")})

    def __init__(self, config: PipelineConfig, *, on_metrics: Callable[[dict], None] | None = None,
                 on_step: StepHook | None = None):
        super().__init__(config)
        self.on_metrics, self.on_step = on_metrics, on_step
        self.shard_urls: list[str] = []
        self.tokenizer = ""
        self.run = ""

    @property
    def section(self) -> TrainConfig:
        return self.config.train

    @property
    def run_dir(self) -> str:
        return join(runs_dir(self.config.dataset.root), self.run)

    def prepare(self) -> None:
        """Validate the config, list the shards, build the `local` tokenizer, name the run."""
        try:
            validate_train_config(self.config)
        except ValueError as e:
            raise ConfigError(f"train: {e}") from None
        self.shard_urls = train_shard_urls(self.layout.train_dir)
        if not self.shard_urls:
            raise ValueError(f"no training shards in {self.layout.train_dir}: run the shards stage first")
        self.tokenizer = prepare_tokenizer(self.config, self.shard_urls)
        self.run = run_name(self.config, self.upstream_fingerprint(SINGLE_UNIT))

    def list_shards(self) -> list[str]:
        return [SINGLE_UNIT]

    def input_shards(self, shard: str) -> dict[str, list[str]]:
        """Every training tar (the shards stage's outputs), for the fingerprint and the size checks."""
        return {"shards": [url.rsplit("/", 1)[-1].removesuffix(".tar") for url in self.shard_urls]}

    def extra_fingerprint(self) -> str:
        return self.run  # which shards it trains on

    def output_files(self, shard: str) -> dict[str, str]:
        """The last checkpoint's weights: a skipped run whose checkpoint went missing is redone."""
        latest = latest_checkpoint(self.run_dir)
        if latest is None:
            return {}
        # Under the root as configured: `runs_dir` makes a relative local root absolute.
        return {"checkpoint": join(self.layout.root, RUNS_DIR, self.run, latest.rsplit("/", 1)[-1], CHECKPOINT_FILE)}

    def resume_step(self) -> int:
        """The step the run would resume at: its latest complete checkpoint's (0 for a new run)."""
        latest = latest_checkpoint(self.run_dir)
        return checkpoint_step(latest) if latest else 0

    def discard(self, shard: str) -> None:
        """The record, then the whole run (checkpoints, metrics, plots): `process` starts at step 0."""
        fs, record = open_fs(self.layout.stage_shard_record(self.name, shard))
        if fs.exists(record):
            fs.rm(record)
        fs, run = open_fs(self.run_dir)
        if fs.exists(run):
            fs.rm(run, recursive=True)

    def process(self, shard: str) -> ShardOutcome:
        start_step = self.resume_step()
        if start_step < self.section.steps:  # a run already at `steps` (record lost) is only counted
            start_ray(self.config.ray)
            trainer = build_trainer(self.config, name=self.run, tokenizer=self.tokenizer,
                                    shard_urls=self.shard_urls, on_step=self.on_step)
            fit_watching(trainer, self.run_dir, start_step=start_step, on_metrics=self.on_metrics)
        write_plots(read_metrics(self.run_dir), self.run_dir)
        checkpoint = latest_checkpoint(self.run_dir)
        data = read_data_position(checkpoint) if checkpoint else {}
        counts = Counter({"steps": data.get("step", 0), "samples_seen": data.get("samples_seen", 0),
                          "samples_read": data.get("samples_read", 0)})
        failures = Counter({f"corrupt_{k}": v for k, v in (data.get("errors") or {}).items() if v})
        return ShardOutcome(counts, failures)

    def summary_extra(self) -> dict:
        return {"run": self.run, "run_dir": self.run_dir, "checkpoint": latest_checkpoint(self.run_dir),
                "plots": plot_files(self.run_dir)}
