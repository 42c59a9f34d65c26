"""What every Ray Train worker runs: the GoldiCLIP training loop (METHOD.md sec. 8), in named pieces.

    setup_worker: device, tokenizer, model, restore (latest checkpoint), DDP, AdamW, warm-up + cosine,
                  loader at the restored step
    each step:    load_batch -> forward_and_loss (bf16 autocast on GPUs) -> backward (clip)
                  -> optimizer_step (frozen prototypes early, logit scale clamped after)
                  -> update_ema (teacher) -> on_step hook
                  -> log_metrics every `log_every` -> save_and_report every `checkpoint_every`

Devices: `ray.train.torch.get_device()` gives the worker's accelerator when it has one
(`torch.cuda` is also ROCm's interface) and the CPU otherwise; the collective backend is
`nccl` with GPUs (RCCL on ROCm answers to the same name) and `gloo` on CPUs.

Resume: Ray Train V2 reloads `<run>/checkpoint_manager_snapshot.json` on a new `fit()` with the
same name and `ray.train.get_checkpoint()` returns the latest checkpoint; if the driver died
between writing a checkpoint and the snapshot, the newest complete checkpoint on storage is used
(tasks/train/checkpoint.py). The loader restarts its streams at the restored step
(tasks/train/data.py, "resume").

Metrics: rank 0 writes one row every `log_every` steps to `<run>/metrics.jsonl` (the whole file,
atomically, so it works on object stores too; rows past the restored step are dropped on resume);
the stage tails it for progress and plots it at the end. `<run>/starts.json` lists every start
(step, data position, the checkpoint restored from).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from model import GoldiCLIP, config_for_tokenizer, get_preset
from model.config import GoldiCLIPConfig
from storage.fs import atomic_write_bytes, exists, join, read_bytes, read_json, write_json
from tasks.config import PipelineConfig, TrainConfig
from tasks.train.checkpoint import (
    checkpoint_dir_name,
    latest_checkpoint,
    load_checkpoint,
    open_tokenizer,
    save_checkpoint,
)
from tasks.train.data import SampleTransform, TrainSamples, make_loader
from tasks.train.optim import build_optimizer, build_scheduler

METRICS_FILE = "metrics.jsonl"
STARTS_FILE = "starts.json"
ERROR_REASONS = ("missing_file", "bad_json", "bad_image", "no_captions", "bad_tar", "bad_sample")
# Called on every rank after each optimiser step as on_step(step, rank); it travels to the workers
# in the loop config, so it must pickle (a closure does: cloudpickle sends it by value).
StepHook = Callable[[int, int], None]


def model_config(train: TrainConfig, tokenizer) -> GoldiCLIPConfig:
    """The preset with its overrides and `train.memory` (the model's MemoryConfig), sized for the tokenizer."""
    return config_for_tokenizer(get_preset(train.preset, **train.model_overrides_with_memory()), tokenizer)


def read_metrics(run_dir: str) -> list[dict]:
    url = join(run_dir, METRICS_FILE)
    if not exists(url):
        return []
    return [json.loads(line) for line in read_bytes(url).decode().splitlines() if line.strip()]


def _write_metrics(run_dir: str, rows: list[dict]) -> None:
    atomic_write_bytes(join(run_dir, METRICS_FILE), "".join(json.dumps(r) + "\n" for r in rows).encode())


@dataclass
class Worker:
    """Everything one worker's loop reads and updates."""

    train: TrainConfig
    run_dir: str
    tokenizer: str  # as the checkpoint names it: an id, a directory or a URL
    rank: int
    world_size: int
    device: torch.device
    model: GoldiCLIP
    params: list[torch.nn.Parameter]  # the trained ones (the EMA teacher is not)
    forward: Callable  # the DDP wrapper, compiled on accelerators
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: Iterator
    step: int
    data: dict  # the data position saved with each checkpoint
    rows: list[dict]  # rank 0: the metric rows so far
    local_errors: Counter = field(default_factory=Counter)  # since the last log, this rank only
    local_read: int = 0
    window_start: float = field(default_factory=time.perf_counter)
    window_steps: int = 0

    @property
    def global_batch(self) -> int:
        return self.train.batch_size_per_worker * self.world_size


# ---- setup -------------------------------------------------------------------------------------


def restore(run_dir: str, model: GoldiCLIP) -> tuple[dict | None, str | None]:
    """The latest checkpoint state (Ray's, or a newer one on storage) loaded into `model`, or None."""
    import ray.train

    found = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            found.append((load_checkpoint(directory), checkpoint.path))
    on_storage = latest_checkpoint(run_dir)
    if on_storage is not None and (not found or not on_storage.endswith(found[0][1].rstrip("/"))):
        found.append((load_checkpoint(on_storage), on_storage))
    if not found:
        return None, None
    state, path = max(found, key=lambda item: item[0]["step"])
    model.load_state_dict(state["model"])
    return state, path


def record_start(run_dir: str, *, step: int, data: dict, restored_from: str | None, world_size: int) -> None:
    starts = read_json(join(run_dir, STARTS_FILE)) or []
    write_json(join(run_dir, STARTS_FILE), starts + [
        {"step": step, "samples_seen": data["samples_seen"], "restored_from": restored_from,
         "world_size": world_size, "time": time.time()}])


def setup_worker(loop_config: dict) -> Worker:
    import ray.train
    import ray.train.torch

    train = PipelineConfig.model_validate(loop_config["config"]).train
    run_dir = loop_config["run_dir"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(loop_config.get("cpus_per_worker", 1))))
    tokenizer = open_tokenizer(loop_config["tokenizer"])
    torch.manual_seed(train.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = GoldiCLIP(model_config(train, tokenizer))
    state, restored_from = restore(run_dir, model)
    step = state["step"] if state else 0
    data = dict(state["data"]) if state else {"step": 0, "samples_seen": 0, "seed": train.seed,
                                              "errors": dict.fromkeys(ERROR_REASONS, 0), "samples_read": 0}
    assert data["step"] == step

    # Every parameter gets a gradient each step (GoldiCLIP.absent_decoder_losses), so DDP needs no
    # unused-parameter search; compiled on accelerators (DDPOptimizer splits the graph at buckets).
    ddp = ray.train.torch.prepare_model(model)
    compiled = train.compile and device.type == "cuda"
    optimizer = build_optimizer(model, train, device)
    scheduler = build_scheduler(optimizer, train)
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    rows = []
    if rank == 0:
        rows = [r for r in read_metrics(run_dir) if r["step"] <= step]
        record_start(run_dir, step=step, data=data, restored_from=restored_from, world_size=world_size)

    dataset = TrainSamples(
        loop_config["shard_urls"], SampleTransform.from_config(train, model.config), tokenizer,
        batch_size=train.batch_size_per_worker, context_length=model.config.text.context_length,
        num_batches=train.steps - step, seed=train.seed, start_step=step, rank=rank, world_size=world_size,
        shuffle_buffer=train.shuffle_buffer, resampled=train.resampled, static_shapes=compiled,
    )
    loader = make_loader(dataset, num_workers=train.loader_workers, prefetch_factor=train.prefetch_factor,
                         pin_memory=device.type == "cuda")
    return Worker(train=train, run_dir=run_dir, tokenizer=loop_config["tokenizer"], rank=rank,
                  world_size=world_size, device=device, model=model,
                  params=[p for p in model.parameters() if p.requires_grad], forward=torch.compile(ddp) if compiled else ddp, optimizer=optimizer, scheduler=scheduler,
                  loader=iter(loader), step=step, data=data, rows=rows)


# ---- one step ----------------------------------------------------------------------------------


def load_batch(w: Worker) -> dict[str, torch.Tensor]:
    batch, stats = next(w.loader)
    w.local_errors.update(stats.errors)
    w.local_read += stats.samples
    return {k: v.to(w.device, non_blocking=True) for k, v in batch.items()}


def forward_and_loss(w: Worker, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with torch.autocast(w.device.type, dtype=torch.bfloat16, enabled=w.device.type == "cuda"):
        return w.forward(batch)


def backward(w: Worker, loss: torch.Tensor) -> torch.Tensor:
    """Gradients, clipped to `grad_clip`; returns the global norm before clipping."""
    w.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if not w.train.grad_clip:
        return torch.zeros((), device=w.device)
    return torch.nn.utils.clip_grad_norm_(w.params, w.train.grad_clip)


def optimizer_step(w: Worker) -> None:
    """The AdamW step, with DINO's frozen prototype layers early on and the logit scale kept in range
    after it (METHOD.md sec. 3 and 4)."""
    w.model.drop_frozen_gradients(w.step)
    w.optimizer.step()
    w.model.clamp_parameters()
    w.scheduler.step()


def update_ema(w: Worker) -> None:
    """The self-distillation teacher follows the student (METHOD.md sec. 3.2)."""
    w.model.update_teacher()


def log_metrics(w: Worker, grad_norm: torch.Tensor, metrics: dict[str, torch.Tensor]) -> dict:
    """Sum the data counts of every rank into the data position; rank 0 appends a metric row."""
    import torch.distributed as dist

    counts = torch.tensor([w.local_read] + [w.local_errors[r] for r in ERROR_REASONS], device=w.device)
    if dist.is_initialized():
        dist.all_reduce(counts)
    counts = counts.cpu()
    w.local_errors, w.local_read = Counter(), 0
    w.data["samples_read"] += int(counts[0])
    for reason, n in zip(ERROR_REASONS, counts[1:].tolist()):
        w.data["errors"][reason] = w.data["errors"].get(reason, 0) + n
    w.data["step"], w.data["samples_seen"] = w.step, w.step * w.global_batch
    seconds = time.perf_counter() - w.window_start
    row = {"step": w.step, "lr": w.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
           "images_per_s": w.window_steps * w.global_batch / max(seconds, 1e-9),
           "samples_seen": w.data["samples_seen"], "corrupt_samples": sum(w.data["errors"].values()),
           **{k: float(v) for k, v in metrics.items()}}
    w.window_start, w.window_steps = time.perf_counter(), 0
    if w.rank == 0:
        w.rows.append(row)
        _write_metrics(w.run_dir, w.rows)
    return row


def save_and_report(w: Worker, row: dict) -> None:
    """Every rank reports (Ray Train's barrier); rank 0 attaches the checkpoint."""
    import ray.train

    if w.rank != 0:
        ray.train.report(row, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, model=w.model, optimizer=w.optimizer, scheduler=w.scheduler, step=w.step,
                        data=w.data, tokenizer=w.tokenizer)
        ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=checkpoint_dir_name(w.step))


# ---- the loop ----------------------------------------------------------------------------------


def train_loop_per_worker(loop_config: dict) -> None:
    """Run on every Ray Train worker; `loop_config` comes from `tasks.train.stage.build_trainer`."""
    w = setup_worker(loop_config)
    on_step: StepHook | None = loop_config.get("on_step")
    train = w.train
    while w.step < train.steps:
        batch = load_batch(w)
        loss, metrics = forward_and_loss(w, batch)
        grad_norm = backward(w, loss)
        optimizer_step(w)
        update_ema(w)
        w.step += 1
        w.window_steps += 1
        if on_step is not None:
            on_step(w.step, w.rank)
        last = w.step == train.steps
        checkpoint_now = w.step % train.checkpoint_every == 0 or last
        if checkpoint_now or w.step % train.log_every == 0:
            row = log_metrics(w, grad_norm, metrics)
            if checkpoint_now:
                save_and_report(w, row)
