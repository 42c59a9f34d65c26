"""Peak memory of one GoldiCLIP training step, estimated without a GPU, and the per-GPU plan (issue 16).

The step is the trainer's (tasks/train/loop.py) in its steady state (AdamW's state and the previous
step's gradients already there): forward under bf16 autocast (student and EMA teacher, K captions,
G global + L local views, the four decoder tasks, uncertainty weighting), zero_grad, backward,
gradient clipping, AdamW step, EMA update. The estimate runs it on fake tensors (FakeTensorMode:
shapes and dtypes, no storage) under MemTracker, which adds up every tensor alive at each moment,
rounded as the CUDA caching allocator rounds. On the CPU device every attention (towers, pooling,
decoder) runs SDPA's fused CPU kernel, which, like flash attention on a GPU, keeps no attention
maps. Not counted: the CUDA context, NCCL and cuBLAS workspaces, the caching allocator's
fragmentation, what torch.compile changes; the plan keeps 10% of each GPU for them (MARGIN).
DDP's gradient buckets (one more copy of the gradients: Ray's `prepare_model` leaves
`gradient_as_bucket_view` off) are added when there is more than one worker.

The global batch sets the text-conditioned pooling's size (each image is pooled with K + B_global - 1
texts) and L_ret's (each image meets all B_global * K texts), so the estimate runs rank 0 of
`workers`, the all-gathers returning stand-ins for the other ranks' text features (`emulated_world`).

    python bench/train_memory.py --plan [--config pipelines/configs/open30m.yaml ...] [--write]
        the (first) config's model, K, views and global batch; each memory option alone and all together at
        two per-GPU batches; peak = a * batch + b through the two (at a fixed global batch every term
        but the weights, gradients and optimizer state is per image); the largest per-GPU batch within
        90% of 80, 141 and 192 GB and the GPUs the global batch then needs; and each config's own
        batch and options estimated directly. An estimate takes 1-3 minutes on 2 cores, the plan of
        the two open30m presets about 30.
    python bench/train_memory.py --validate [--write]
        the estimate against a real step on this machine: on a CPU, the peak RSS of a step at small
        sizes (in a subprocess, malloc's mmap threshold fixed so that freed blocks leave the RSS); on
        a GPU, torch.cuda.max_memory_allocated and the step time with each option.
    python bench/train_memory.py --validate --preset debug --batch 4 --captions 2   # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.distributed._tools.mem_tracker import MemTracker  # noqa: E402

import report  # noqa: E402  (bench/report.py)
from model import GoldiCLIP, MemoryConfig, get_preset, replace_config  # noqa: E402
from model import goldiclip as goldiclip_module  # noqa: E402
from train_step import synthetic_batch  # noqa: E402  (bench/train_step.py)

GIB = 2**30
# The total memory torch reports on each GPU (its "total capacity" in an out-of-memory message),
# rounded down: H100 80 GB, H200 141 GB, MI300X 192 GB.
GPUS = {"80 GB": 79.0, "141 GB": 139.0, "192 GB": 191.0}
MARGIN = 0.9  # plan within 90% of a GPU's memory
PLAN_BATCHES = (200, 800)  # per-GPU batches of the plan's line (divisors of 6,400)


def option_sets(pooling_chunk: int, head_chunk: int) -> dict[str, dict]:
    """Each memory option alone, then all of them (`MemoryConfig` fields)."""
    singles = {
        "none": {},
        "checkpoint vision": {"checkpoint_vision": True},
        "checkpoint text": {"checkpoint_text": True},
        "checkpoint decoder": {"checkpoint_decoder": True},
        f"pooling chunks of {pooling_chunk}": {"pooling_chunk_size": pooling_chunk},
        f"head chunks of {head_chunk}": {"head_chunk_size": head_chunk},
    }
    every = {k: v for options in singles.values() for k, v in options.items()}
    off = dataclasses.asdict(MemoryConfig())
    return {name: off | options for name, options in (*singles.items(), ("all", every))}


def describe(memory: MemoryConfig) -> str:
    parts = [name.removeprefix("checkpoint_") for name in ("checkpoint_vision", "checkpoint_text", "checkpoint_decoder")
             if getattr(memory, name)]
    parts = [f"checkpoint {'+'.join(parts)}"] if parts else []
    parts += [f"{name.removesuffix('_chunk_size')} chunks of {getattr(memory, name)}"
              for name in ("pooling_chunk_size", "head_chunk_size") if getattr(memory, name)]
    return ", ".join(parts) or "none"


# ---- the step ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def emulated_world(workers: int):
    """Run as rank 0 of `workers`: the all-gathers return this rank's rows followed by stand-ins for the
    other ranks' (no collective runs); the teacher's center update stays local."""
    if workers == 1:
        yield
        return

    def gather(local: torch.Tensor) -> torch.Tensor:
        others = local.new_empty(((workers - 1) * local.shape[0], *local.shape[1:])).normal_()
        return torch.cat([local, others])

    with mock.patch.multiple(goldiclip_module, world_info=lambda: (0, workers), gather_with_grad=gather,
                             gather_no_grad=gather):
        yield


def prepare_step(model: GoldiCLIP, shape: SimpleNamespace, device: torch.device):
    """Optimizer, batch and a `step()` closure; AdamW's state and gradients exist as in the loop's steady state."""
    batch = synthetic_batch(model.config, shape, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=5e-4, betas=(0.9, 0.98), fused=device.type == "cuda")
    for param in trainable:
        param.grad = torch.zeros_like(param)
    optimizer.step()  # creates the state; the loop frees the gradients only after the next forward

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(batch)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        model.update_teacher()

    return optimizer, batch, step


class StepPeakTracker(MemTracker):
    """MemTracker without its per-module peaks: it updates every module seen so far on each
    allocation, which was three quarters of an estimate's time; the step's peak is all we read."""

    def _update_peak_stats(self, peak_state) -> None:
        for device, snapshot in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snapshot["Total"]:
                self._peak_mem[device] = snapshot["Total"]
                self._peak_mem_snap[device] = dict(snapshot)


def estimate(config, shape: SimpleNamespace) -> dict[str, float]:
    """Fake-tensor memory of one step, GiB: `peak` (DDP buckets included), `start` (before the step), `ddp`."""
    torch.manual_seed(0)
    model = GoldiCLIP(config)  # real: its initialisation reads values, which fake tensors refuse
    with FakeTensorMode(allow_non_fake_inputs=True), emulated_world(shape.workers):
        # Parameters and buffers become fake: a real tensor would get a fake copy, counted again, at each use.
        model.to_empty(device="cpu")
        optimizer, batch, step = prepare_step(model, shape, torch.device("cpu"))
        trainable_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        # MemTracker hooks every parameter, which needs requires_grad; the teacher runs under no_grad anyway.
        model.requires_grad_(True)
        tracker = StepPeakTracker()
        tracker.track_external(model, optimizer, *batch.values())
        with tracker:
            start = tracker.get_tracker_snapshot("current")[torch.device("cpu")]["Total"]
            step()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    ddp = trainable_bytes if shape.workers > 1 else 0
    return {"peak": (peak["Total"] + ddp) / GIB, "start": start / GIB, "ddp": ddp / GIB}


# ---- real steps (validation) ---------------------------------------------------------------------------


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def real_cpu_step(spec: dict) -> dict:
    """In this (fresh) process: a real step on the CPU after a warm-up one (which loads the kernels' code and
    libraries); RSS before it and its peak (VmHWM, reset first)."""
    shape = SimpleNamespace(**spec["shape"])
    torch.manual_seed(0)
    model = GoldiCLIP(spec_config(spec))
    with emulated_world(shape.workers):
        *_, step = prepare_step(model, shape, torch.device("cpu"))
        step()
        gc.collect()
        before = _rss_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        started = time.perf_counter()
        step()
        seconds = time.perf_counter() - started
        return {"before": before / GIB, "peak": _rss_bytes("VmHWM") / GIB, "seconds": seconds}


def real_gpu_step(config, shape: SimpleNamespace, steps: int = 3) -> dict:
    """max_memory_allocated of a step on the GPU (allocator figures) and its time, after a warm-up step."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = GoldiCLIP(config).to(device)
    with emulated_world(shape.workers):
        *_, step = prepare_step(model, shape, device)
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        result = {"before": before / GIB, "peak": torch.cuda.max_memory_allocated() / GIB,
                  "seconds": (time.perf_counter() - started) / steps}
    del model, step
    gc.collect()
    torch.cuda.empty_cache()
    return result


def spec_config(spec: dict):
    return get_preset(spec["preset"], memory=spec["memory"])


def validate(args) -> list[dict]:
    """Each option set (on a CPU: none and all): the estimate against a real step of the same shape on this
    machine; with --write, the section is rewritten after each row, so a run cut short keeps what it measured."""
    rows = []
    on_gpu = torch.cuda.is_available()
    shape = {"batch": args.batch, "captions": args.captions, "global_views": args.global_views,
             "local_views": args.local_views, "workers": args.workers, "decoder_length": args.decoder_length}
    names = list(option_sets(args.pooling_chunk, args.head_chunk).items())
    for name, memory in names if on_gpu else [names[0], names[-1]]:
        spec = {"preset": args.preset, "memory": memory, "shape": shape}
        fake = estimate(spec_config(spec), SimpleNamespace(**shape))
        if on_gpu:
            real = real_gpu_step(spec_config(spec), SimpleNamespace(**shape))
            measured, estimated = real["peak"], fake["peak"] - fake["ddp"]
        else:
            env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
            out = subprocess.run([sys.executable, __file__, "--real-cpu-step", json.dumps(spec)], env=env,
                                 check=True, capture_output=True, text=True).stdout
            real = json.loads(out.splitlines()[-1])
            measured, estimated = real["peak"] - real["before"], fake["peak"] - fake["ddp"] - fake["start"]
        row = {"options": name, "shape": shape, "preset": args.preset, "estimate": estimated, "measured": measured,
               "ratio": estimated / measured, "step_s": real["seconds"], "gpu": on_gpu}
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.write:
            write_validation(rows)
    return rows


# ---- the plan -------------------------------------------------------------------------------------------


def line_through(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(GiB per image, fixed GiB) of the line through two (batch, peak) points."""
    (b0, p0), (b1, p1) = points
    slope = (p1 - p0) / (b1 - b0)
    return slope, p0 - slope * b0


def largest_batch(slope: float, fixed: float, gib: float) -> int:
    """The most images per GPU whose estimate stays within MARGIN of `gib`."""
    return max(0, math.floor((MARGIN * gib - fixed) / slope))


def gpus_needed(global_batch: int, per_gpu: int) -> int | None:
    """Fewest GPUs that split the global batch evenly with at most `per_gpu` images each."""
    return next((n for n in range(1, global_batch + 1) if global_batch % n == 0 and global_batch // n <= per_gpu),
                None)


def plan(args) -> dict:
    """The option sets' lines and largest batches for the first config's step; each config's own request."""
    from tasks.config import load_config

    trains = [load_config(path).train for path in args.config]
    train = trains[0]
    global_batch = train.batch_size_per_worker * train.num_workers
    base = get_preset(train.preset, **train.model_overrides)
    views = {"captions": train.captions_per_image, "global_views": train.num_global_views,
             "local_views": train.num_local_views, "decoder_length": args.decoder_length}
    result = {"config": os.path.relpath(args.config[0], REPO), "preset": train.preset, "global_batch": global_batch,
              **views, "sets": [], "own": []}
    for name, memory in option_sets(args.pooling_chunk, args.head_chunk).items():
        points = []
        for batch in args.batches:
            shape = SimpleNamespace(batch=batch, workers=global_batch // batch, **views)
            points.append((batch, estimate(replace_config(base, memory=memory), shape)["peak"]))
            print(f"{name:24s} batch {batch:4d} x {global_batch // batch} workers: {points[-1][1]:6.1f} GiB", flush=True)
        slope, fixed = line_through(points)
        largest = {gpu: largest_batch(slope, fixed, gib) for gpu, gib in GPUS.items()}
        result["sets"].append({"options": name, "points": points, "slope": slope, "fixed": fixed, "largest": largest,
                               "gpus": {gpu: gpus_needed(global_batch, n) for gpu, n in largest.items()}})
        print(f"{'':24s} {slope:.3f} GiB/image + {fixed:.1f} GiB; largest per-GPU batch "
              + ", ".join(f"{gpu}: {n}" for gpu, n in largest.items()), flush=True)
    result["anchor"] = [(batch, estimate(get_preset("B/16"), SimpleNamespace(
        batch=batch, workers=1, captions=10, global_views=2, local_views=6, decoder_length=args.decoder_length))["peak"])
        for batch in (8, 16, 32)]
    print(f"anchor: {result['anchor']}", flush=True)
    for path, own in zip(args.config, trains):
        config = get_preset(own.preset, **own.model_overrides_with_memory())
        shape = SimpleNamespace(batch=own.batch_size_per_worker, workers=own.num_workers, captions=own.captions_per_image,
                                global_views=own.num_global_views, local_views=own.num_local_views,
                                decoder_length=args.decoder_length)
        peak = estimate(config, shape)["peak"]
        result["own"].append({"config": os.path.relpath(path, REPO), "options": describe(config.memory),
                              "batch": own.batch_size_per_worker, "workers": own.num_workers, "peak": peak,
                              "fits": {gpu: peak <= MARGIN * gib for gpu, gib in GPUS.items()}})
        print(json.dumps(result["own"][-1]), flush=True)
    return result


# ---- BENCHMARKS.md ---------------------------------------------------------------------------------------


def write_plan(result: dict) -> None:
    machine, date, command = report.machine(), report.today(), report.command_line()
    global_batch = result["global_batch"]
    lines = [
        f"## train memory: {result['preset']} step per GPU at a global batch of {global_batch:,}", "",
        f"`bench/train_memory.py --plan`: the peak memory of one training step of `{result['config']}` "
        f"({result['preset']}, K = {result['captions']}, {result['global_views']} global + {result['local_views']} "
        f"local views, the four decoder tasks at {result['decoder_length']} tokens, AdamW, EMA teacher) estimated on "
        "fake tensors (FakeTensorMode + MemTracker, CPU device, bf16 autocast, steady state: AdamW state and the "
        "previous gradients present until the backward), run as rank 0 of global batch / per-GPU batch workers "
        "(each image pooled with K + global batch - 1 texts), DDP's gradient buckets added. Attention runs "
        "SDPA's fused CPU kernel, which keeps no attention maps (as flash attention on a GPU); the CUDA context, "
        "NCCL buffers and allocator fragmentation are not counted, so a batch fits a GPU when its estimate is within "
        f"{MARGIN:.0%} of the memory torch reports for it ({', '.join(f'{g}: {v:.0f} GiB' for g, v in GPUS.items())}). "
        "The largest batch is read off the line through the estimates at "
        f"{' and '.join(str(b) for b, _ in result['sets'][0]['points'])} images per GPU (a fit, at a fixed global "
        "batch every term but the weights, gradients and optimizer state is per image; each estimate 1-3 minutes on "
        "2 cores). Anchor (issue 16): 6.8 / 11.4 / 20.6 GiB at 8 / 16 / 32 images on one process, no options, "
        "without AdamW's state and the previous gradients (2.6 GiB for B/16); this estimator, same step in its "
        f"steady state: {' / '.join(f'{p:.1f}' for _, p in result['anchor'])} GiB.", "",
        "| memory options | estimate GiB at " + " / ".join(f"{b}" for b, _ in result["sets"][0]["points"])
        + " images | GiB per image | fixed GiB | largest per-GPU batch 80 / 141 / 192 GB "
        f"| GPUs for {global_batch:,} on 80 / 141 / 192 GB | command | machine | date |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in result["sets"]:
        gpus = " / ".join(str(n) if n else "-" for n in s["gpus"].values())
        lines.append(f"| {s['options']} | {' / '.join(f'{p:.1f}' for _, p in s['points'])} | {s['slope']:.3f} | "
                     f"{s['fixed']:.1f} | {' / '.join(str(n) for n in s['largest'].values())} | {gpus} | "
                     f"`{command}` | {machine} | {date} |")
    lines += ["", "Each config's own request, estimated directly:", "",
              "| config | per-GPU batch x workers | memory options | estimate GiB | within "
              f"{MARGIN:.0%} of 80 / 141 / 192 GB |", "| --- | --- | --- | --- | --- |"]
    for own in result["own"]:
        fits = " / ".join("yes" if ok else "no" for ok in own["fits"].values())
        lines.append(f"| `{own['config']}` | {own['batch']} x {own['workers']} | {own['options']} | "
                     f"{own['peak']:.1f} | {fits} |")
    report.write_section("\n".join(lines))


def write_validation(rows: list[dict]) -> None:
    """The rows as a table; step times only from a GPU (a shared 2-core sandbox makes CPU times noise)."""
    machine, date, command = report.machine(), report.today(), report.command_line()
    gpu, shape = rows[0]["gpu"], rows[0]["shape"]
    what = ("torch.cuda.max_memory_allocated over 3 eager steps after a warm-up step, against the estimate's peak"
            if gpu else "the step's peak RSS above the RSS before it (a second step, VmHWM reset by "
            "/proc/self/clear_refs; a fresh process per row, MALLOC_MMAP_THRESHOLD_=65536 so that freed blocks "
            "leave the RSS), against the estimate's peak above its start")
    lines = [
        f"## train memory: estimate against a real step ({'GPU' if gpu else 'CPU'})", "",
        f"`bench/train_memory.py --validate`: the fake-tensor estimate of one steady-state step ({rows[0]['preset']}, "
        f"{shape['batch']} images per worker, K = {shape['captions']}, {shape['global_views']} global + "
        f"{shape['local_views']} local views, decoder at {shape['decoder_length']} tokens, rank 0 of "
        f"{shape['workers']} emulated worker{'s' if shape['workers'] > 1 else ''}) against {what}. DDP buckets are left out of both.", "",
        "| memory options | estimate GiB | measured GiB | estimate / measured |" + (" step s |" if gpu else "")
        + " command | machine | date |",
        "| --- | --- | --- | --- |" + (" --- |" if gpu else "") + " --- | --- | --- |",
    ]
    for r in rows:
        step = f" {r['step_s']:.2f} |" if gpu else ""
        lines.append(f"| {r['options']} | {r['estimate']:.2f} | {r['measured']:.2f} | {r['ratio']:.2f} |{step} "
                     f"`{command}` | {machine} | {date} |")
    report.write_section("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", action="store_true")
    parser.add_argument("--validate", action="store_true")
    parser.add_argument("--config", type=Path, nargs="+", default=[REPO / "pipelines/configs/open30m.yaml"],
                        help="--plan: configs (the first sets the step of the table; each gets its own row)")
    parser.add_argument("--batches", type=int, nargs=2, default=PLAN_BATCHES, help="--plan: the line's two batches")
    parser.add_argument("--pooling-chunk", type=int, default=8, help="images per pooling chunk, when on")
    parser.add_argument("--head-chunk", type=int, default=64, help="images per DINO-head chunk, when on")
    parser.add_argument("--decoder-length", type=int, default=48, help="tokens per decoder sequence")
    parser.add_argument("--preset", default="B/16", help="--validate: model preset")
    parser.add_argument("--batch", type=int, default=2, help="--validate: images per worker")
    parser.add_argument("--captions", type=int, default=4, help="--validate: K")
    parser.add_argument("--global-views", type=int, default=2, help="--validate")
    parser.add_argument("--local-views", type=int, default=2, help="--validate")
    parser.add_argument("--workers", type=int, default=1, help="--validate: emulated workers")
    parser.add_argument("--threads", type=int, default=2, help="--validate: CPU threads of the real step")
    parser.add_argument("--write", action="store_true", help="(re)write this run's section of BENCHMARKS.md")
    parser.add_argument("--real-cpu-step", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.real_cpu_step:
        print(json.dumps(real_cpu_step(json.loads(args.real_cpu_step))))
        return
    if not (args.plan or args.validate):
        parser.error("give --plan, --validate or both")
    if args.validate:
        validate(args)
    if args.plan:
        result = plan(args)
        if args.write:
            write_plan(result)


if __name__ == "__main__":
    main()
