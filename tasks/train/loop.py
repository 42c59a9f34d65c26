"""The train stage: GoldiCLIP on `train/*.tar` with Ray Train (METHOD.md sec. 8; DESIGN.md, Ray).

`build_trainer` makes a `TorchTrainer` whose run lives at `<root>/runs/<run name>`; the name is
a fingerprint of the training config and of the shards, so starting the same config again
resumes that run. `train_loop_per_worker` is what every Ray worker runs, in named pieces:

    setup (device, backend, model, DDP, AdamW, warm-up + cosine) -> restore (latest checkpoint)
    -> loop: load batch, forward + loss (bf16 autocast on GPUs), backward, clip, optimiser step,
       EMA teacher, log, checkpoint

Devices: `ray.train.torch.get_device()` gives the worker's accelerator when it has one
(`torch.cuda` is also ROCm's interface) and the CPU otherwise; the collective backend is
`nccl` with GPUs (RCCL on ROCm answers to the same name) and `gloo` on CPUs.

Checkpoints (`checkpoint.pt` plus `goldiclip_config.json` in each Ray checkpoint directory) hold only tensors and plain
containers, so `torch.load(path, weights_only=True)` reads them: the model state (student,
EMA teacher, distillation centers, loss log-variances), optimiser, scheduler, step, and the
data position {step, samples_seen, seed, error counts}. Resume: Ray Train V2 reloads
`<run>/checkpoint_manager_snapshot.json` on a new `fit()` with the same name and
`ray.train.get_checkpoint()` returns the latest checkpoint; if the driver died between writing
a checkpoint and the snapshot, the newest complete `checkpoint_*/checkpoint.pt` on storage is used.
The loader restarts its streams at the restored step (tasks/train/data.py, "resume").

Metrics: rank 0 writes one row every `log_every` steps to `<run>/metrics.jsonl` (the whole
file, atomically, so it works on object stores too; rows past the restored step are dropped
on resume); the flow tails it for progress and plots it at the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections import Counter
from functools import partial
from pathlib import Path

import torch
from torch import nn

from model import GoldiCLIP, config_for_tokenizer, get_preset, load_tokenizer
from model.config import GoldiCLIPConfig
from storage.fs import atomic_write_bytes, exists, join, open_fs, read_bytes, read_json, write_json
from tasks.config import PipelineConfig, TrainConfig, fingerprint
from tasks.train.data import SampleTransform, TrainSamples, iter_texts, make_loader, train_shard_urls

CHECKPOINT_FILE = "checkpoint.pt"
MODEL_CONFIG_FILE = "goldiclip_config.json"
DATA_POSITION_FILE = "data_position.json"  # beside it, as tasks/evaluate/stage.py and model export expect
METRICS_FILE = "metrics.jsonl"
STARTS_FILE = "starts.json"
ERROR_REASONS = ("missing_file", "bad_json", "bad_image", "no_captions", "bad_tar", "bad_sample")
# Test-only hook: rank 1 raises once at this step, to exercise FailureConfig. Never set it in production.
TEST_FAIL_ONCE_ENV = "GOLDICLIP_TEST_FAIL_RANK1_ONCE_AT_STEP"
TEST_FAILURE_MARKER = "_test_failure_injected"


# ---- naming, tokenizer, model ------------------------------------------------------------------


def run_name(config: PipelineConfig, shard_urls: list[str]) -> str:
    """Deterministic from what decides the trained weights: same config and shards, same run."""
    shards = [u.rsplit("/", 1)[-1] for u in shard_urls]
    slug = re.sub(r"[^a-z0-9]+", "", config.train.preset.lower())
    return f"goldiclip-{slug}-{fingerprint('train', config.train.fingerprint_payload(), shards)}"


def runs_dir(root: str) -> str:
    """`<root>/runs`, absolute when local (Ray's storage_path must be)."""
    fs, _ = open_fs(root)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return str(Path(root.removeprefix("file://")).resolve() / "runs")
    return join(root, "runs")


def prepare_tokenizer(config: PipelineConfig, shard_urls: list[str]) -> str:
    """The tokenizer's id or directory; `local` trains one on the captions into <root>/tokenizer once."""
    train = config.train
    if train.tokenizer != "local":
        return train.tokenizer
    out_dir = Path(config.dataset.root.removeprefix("file://")) / "tokenizer"
    if (out_dir / "tokenizer.json").exists():
        return str(out_dir)
    from model.tokenizer import build_local_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix=".tmp-tokenizer-", dir=out_dir.parent))
    build_local_tokenizer(iter_texts(shard_urls), tmp, vocab_size=train.local_tokenizer_vocab_size,
                          model_max_length=get_preset(train.preset).text.context_length)
    try:
        tmp.rename(out_dir)  # atomic: a concurrent builder's copy wins, ours is dropped
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out_dir)


def model_config(train: TrainConfig, tokenizer) -> GoldiCLIPConfig:
    return config_for_tokenizer(get_preset(train.preset, **train.model_overrides), tokenizer)


# ---- optimisation (METHOD.md sec. 8) -------------------------------------------------------------


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on >= 2-D weights only: biases, norms, logit scale/bias, log-variances and
    every other 1-D/0-D parameter go without; the frozen EMA teacher is left out."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, train: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.lr, betas=tuple(train.betas),
                             eps=train.eps, fused=device.type == "cuda")


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up from 0, then cosine decay to `min_ratio` of the peak."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_factor, warmup_steps=train.warmup_steps, total_steps=train.steps, min_ratio=train.min_lr / train.lr))


# ---- checkpoints -------------------------------------------------------------------------------


def save_checkpoint(directory: str | Path, *, model: GoldiCLIP, optimizer, scheduler, step: int, data: dict,
                    tokenizer: str = "") -> Path:
    """`checkpoint.pt` (tensors and plain containers only) and the model config as JSON."""
    path = Path(directory) / CHECKPOINT_FILE
    model_json = json.dumps(dataclasses.asdict(model.config))
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "data": data,
                "model_config": model_json, "tokenizer": tokenizer}, path)
    (Path(directory) / MODEL_CONFIG_FILE).write_text(model_json)
    (Path(directory) / DATA_POSITION_FILE).write_text(json.dumps(data))  # readable without loading the weights
    return path


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint is data, never code: tensors and plain containers only."""
    with open_fs(str(path))[0].open(str(path), "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def checkpoint_step(checkpoint_dir: str) -> int:
    """The step of a `checkpoint_<step>` directory, from its name (no need to read the file)."""
    return int(re.fullmatch(r"checkpoint_(\d+)", checkpoint_dir.rstrip("/").rsplit("/", 1)[-1])[1])


def _is_complete(fs, checkpoint_dir: str) -> bool:
    """Both files there and the zip's central directory (written last) readable: a checkpoint
    being uploaded when its run was killed is skipped. Reads only the end of the file."""
    if not (fs.exists(f"{checkpoint_dir}/{CHECKPOINT_FILE}") and fs.exists(f"{checkpoint_dir}/{MODEL_CONFIG_FILE}")):
        return False
    try:
        with fs.open(f"{checkpoint_dir}/{CHECKPOINT_FILE}", "rb") as f, zipfile.ZipFile(f):
            return True
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def latest_checkpoint_on_storage(run_dir: str) -> str | None:
    """The newest complete `checkpoint_<step>` directory of a run (by step), or None."""
    fs, path = open_fs(run_dir)
    if not fs.exists(path):
        return None
    names = [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False)]
    for name in sorted((n for n in names if re.fullmatch(r"checkpoint_\d+", n)), key=checkpoint_step, reverse=True):
        if _is_complete(fs, f"{path}/{name}"):
            return join(run_dir, name)
    return None


# ---- metrics -----------------------------------------------------------------------------------


def read_metrics(run_dir: str) -> list[dict]:
    url = join(run_dir, METRICS_FILE)
    if not exists(url):
        return []
    return [json.loads(line) for line in read_bytes(url).decode().splitlines() if line.strip()]


def _write_metrics(run_dir: str, rows: list[dict]) -> None:
    atomic_write_bytes(join(run_dir, METRICS_FILE), "".join(json.dumps(r) + "\n" for r in rows).encode())


# ---- the worker's loop -----------------------------------------------------------------------------


def _setup(loop_config: dict):
    import ray.train
    import ray.train.torch

    config = PipelineConfig.model_validate(loop_config["config"])
    train = config.train
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(loop_config.get("cpus_per_worker", 1))))
    tokenizer = load_tokenizer(loop_config["tokenizer"])
    torch.manual_seed(train.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = GoldiCLIP(model_config(train, tokenizer))
    return config, train, rank, world_size, device, tokenizer, model


def _restore(loop_config: dict, model: GoldiCLIP) -> tuple[dict | None, str | None]:
    """The latest checkpoint state (Ray's, or a newer one on storage) loaded into `model`, or None."""
    import ray.train

    found = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            found.append((load_checkpoint(Path(directory) / CHECKPOINT_FILE), checkpoint.path))
    on_storage = latest_checkpoint_on_storage(loop_config["run_dir"])
    if on_storage is not None and (not found or not on_storage.endswith(found[0][1].rstrip("/"))):
        found.append((load_checkpoint(join(on_storage, CHECKPOINT_FILE)), on_storage))
    if not found:
        return None, None
    state, path = max(found, key=lambda item: item[0]["step"])
    model.load_state_dict(state["model"])
    return state, path


def train_loop_per_worker(loop_config: dict) -> None:
    """Run on every Ray Train worker; see the module docstring for the pieces."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    config, train, rank, world_size, device, tokenizer, model = _setup(loop_config)
    run_dir = loop_config["run_dir"]
    state, restored_from = _restore(loop_config, model)
    step = state["step"] if state else 0
    data = dict(state["data"]) if state else {"step": 0, "samples_seen": 0, "seed": train.seed,
                                              "errors": dict.fromkeys(ERROR_REASONS, 0), "samples_read": 0}
    assert data["step"] == step

    # Every parameter gets a gradient each step (GoldiCLIP.absent_decoder_losses), so DDP needs no
    # unused-parameter search; compiled on accelerators (DDPOptimizer splits the graph at buckets).
    ddp = ray.train.torch.prepare_model(model)
    compiled = train.compile and device.type == "cuda"
    forward = torch.compile(ddp) if compiled else ddp
    optimizer = build_optimizer(model, train, device)
    scheduler = build_scheduler(optimizer, train)
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    del state

    rows = [r for r in read_metrics(run_dir) if r["step"] <= step] if rank == 0 else []
    if rank == 0:
        starts = (read_json(join(run_dir, STARTS_FILE)) or []) + [
            {"step": step, "samples_seen": data["samples_seen"], "restored_from": restored_from,
             "world_size": world_size, "time": time.time()}]
        write_json(join(run_dir, STARTS_FILE), starts)

    dataset = TrainSamples(
        loop_config["shard_urls"], SampleTransform.from_config(train, model.config), tokenizer,
        batch_size=train.batch_size_per_worker, context_length=model.config.text.context_length,
        num_batches=train.steps - step, seed=train.seed, start_step=step, rank=rank, world_size=world_size,
        shuffle_buffer=train.shuffle_buffer, resampled=train.resampled, static_shapes=compiled,
    )
    loader = iter(make_loader(dataset, num_workers=train.loader_workers, prefetch_factor=train.prefetch_factor,
                              pin_memory=device.type == "cuda"))
    global_batch = train.batch_size_per_worker * world_size
    params = [p for p in model.parameters() if p.requires_grad]
    fail_at = loop_config.get("test_fail_once_at_step")
    local_errors, local_read = Counter(), 0
    window_start, window_steps = time.perf_counter(), 0

    while step < train.steps:
        # -- load batch
        batch, stats = next(loader)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        local_errors.update(stats.errors)
        local_read += stats.samples
        # -- forward + loss
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, metrics = forward(batch)
        # -- backward, clip, optimiser step, EMA teacher
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, train.grad_clip) if train.grad_clip
                     else torch.zeros((), device=device))
        optimizer.step()
        scheduler.step()
        model.update_teacher()
        step += 1
        window_steps += 1
        if fail_at is not None and step == int(fail_at) and rank == 1:
            marker = join(run_dir, TEST_FAILURE_MARKER)
            if not exists(marker):
                atomic_write_bytes(marker, b"1")
                raise RuntimeError(f"test-only failure injected at step {step} on rank 1 ({TEST_FAIL_ONCE_ENV})")

        # -- log
        last = step == train.steps
        if step % train.log_every == 0 or step % train.checkpoint_every == 0 or last:
            counts = torch.tensor([local_read] + [local_errors[r] for r in ERROR_REASONS], device=device)
            if dist.is_initialized():
                dist.all_reduce(counts)  # data counts of every rank
            counts = counts.cpu()
            local_errors, local_read = Counter(), 0
            data["samples_read"] += int(counts[0])
            for reason, n in zip(ERROR_REASONS, counts[1:].tolist()):
                data["errors"][reason] = data["errors"].get(reason, 0) + n
            data["step"], data["samples_seen"] = step, step * global_batch
            seconds = time.perf_counter() - window_start
            row = {"step": step, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                   "images_per_s": window_steps * global_batch / max(seconds, 1e-9),
                   "samples_seen": data["samples_seen"], "corrupt_samples": sum(data["errors"].values()),
                   **{k: float(v) for k, v in metrics.items()}}
            window_start, window_steps = time.perf_counter(), 0
            if rank == 0:
                rows.append(row)
                _write_metrics(run_dir, rows)
            # -- checkpoint
            if step % train.checkpoint_every == 0 or last:
                _report(row, model, optimizer, scheduler, step, data, rank, loop_config["tokenizer"])


def _report(row: dict, model, optimizer, scheduler, step: int, data: dict, rank: int, tokenizer: str) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(row, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, model=model, optimizer=optimizer, scheduler=scheduler, step=step,
                        data=json.loads(json.dumps(data)), tokenizer=tokenizer)
        ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{step:08d}")


# ---- the driver side ------------------------------------------------------------------------------


def build_trainer(config: PipelineConfig, *, name: str, tokenizer: str, shard_urls: list[str]):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    train = config.train
    storage = runs_dir(config.dataset.root)
    resources = dict(train.resources_per_worker) or None
    fail_at = os.environ.get(TEST_FAIL_ONCE_ENV)
    loop_config = {
        "config": config.model_dump(mode="json"), "tokenizer": tokenizer, "shard_urls": shard_urls,
        "run_dir": join(storage, name), "cpus_per_worker": (resources or {}).get("CPU", 1),
        "test_fail_once_at_step": int(fail_at) if fail_at else None,
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=train.num_to_keep),
            failure_config=FailureConfig(max_failures=train.max_failures),
        ),
    )


def validate_train_config(config: PipelineConfig) -> None:
    """Fail fast, before Ray starts, on a preset or override the model does not know."""
    train = config.train
    get_preset(train.preset, **train.model_overrides)
    if train.warmup_steps >= train.steps and train.steps > 1:
        raise ValueError(f"train.warmup_steps ({train.warmup_steps}) must be below train.steps ({train.steps})")
    if train.num_workers * train.batch_size_per_worker < 2:
        raise ValueError("the sigmoid loss needs at least 2 images per global batch")


__all__ = ["CHECKPOINT_FILE", "ERROR_REASONS", "METRICS_FILE", "STARTS_FILE", "TEST_FAIL_ONCE_ENV",
           "DATA_POSITION_FILE", "MODEL_CONFIG_FILE", "build_optimizer", "checkpoint_step", "build_scheduler", "build_trainer", "latest_checkpoint_on_storage", "load_checkpoint",
           "lr_factor", "model_config", "param_groups", "prepare_tokenizer", "read_metrics", "run_name",
           "runs_dir", "save_checkpoint", "train_loop_per_worker", "train_shard_urls",
           "validate_train_config"]
