"""Training data loader throughput: samples/s per CPU core, and with N loader processes, every augmentation on.

Builds a few training shards of 340x256 JPEGs in the shards stage's format, then runs the
trainer's own loader (``make_loader``: forkserver processes, prefetch) with the `debug` and
`B/16` view sizes: the L_ret view, G = 2 global crops, L local crops, K captions tokenised,
decoder samples. ``--loader-workers 0`` runs it in this process (the per-core figure);
``--loader-workers 14`` is what one B/16 GPU worker gets on a 16-core GPU machine.
``--step-json`` reads a `bench/train_step.py --out` report and says whether the loader
keeps up with the full GoldiCLIP step (loader samples/s >= step images/s).

    python bench/train_data.py --samples 256 --write                      # CPU sandbox, per core
    python bench/train_data.py --samples 256 --loader-workers 0 14 --cases B/16 \
        --step-json bench/out/step.json --write                            # GPU machine
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import report  # noqa: E402  (bench/report.py)
from model import get_preset  # noqa: E402
from model.tokenizer import build_local_tokenizer  # noqa: E402
from storage import ShardWriter, make_key  # noqa: E402
from tasks.config import TrainConfig  # noqa: E402
from tasks.train.data import SampleTransform, TrainSamples, iter_texts, make_loader  # noqa: E402
from tasks.demo.train_shards import sample_record  # noqa: E402

# preset -> (train overrides, what the views are)
CASES = {
    "debug": (dict(captions_per_image=4, num_local_views=2), "debug (32 px + 2x32 + 2x16, K=4)"),
    "B/16": (dict(captions_per_image=8, num_local_views=6), "B/16 (224 px + 2x224 + 6x96, K=8)"),
}


def write_shards(directory: Path, num_shards: int, per_shard: int) -> list[str]:
    rng = random.Random(0)
    urls = []
    for shard in range(num_shards):
        url = f"{directory}/{shard:05d}.tar"
        with ShardWriter(url) as writer:
            for i in range(per_shard):
                jpg, meta = sample_record(make_key(shard, i), rng, width=340, height=256)
                writer.write(make_key(shard, i), {"jpg": jpg, "json": meta})
        urls.append(url)
    return urls


def measure(urls, tokenizer, preset: str, overrides: dict, samples: int, loader_workers: int,
            batch: int = 32) -> float:
    """Samples/s of the trainer's loader after its first batch (process start-up, buffer fill) is out."""
    train = TrainConfig(preset=preset, batch_size_per_worker=batch, **overrides)
    model_config = get_preset(preset)
    transform = SampleTransform.from_config(train, model_config)
    # Every loader process yields one untimed batch first, then `samples` timed samples.
    processes = max(1, loader_workers)
    num_batches = processes * (max(1, samples // batch) + 1)
    dataset = TrainSamples(urls, transform, tokenizer, batch_size=batch,
                           context_length=model_config.text.context_length, num_batches=num_batches,
                           shuffle_buffer=64)
    batches = iter(make_loader(dataset, num_workers=loader_workers, prefetch_factor=2, pin_memory=False))
    for _ in range(max(1, loader_workers)):
        next(batches)
    start = time.perf_counter()
    timed = 0
    for _ in batches:
        timed += 1
    return timed * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256, help="timed samples per loader process")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="presets to measure")
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[0],
                        help="loader processes (0 = in this process, i.e. one core)")
    parser.add_argument("--step-json", type=Path, default=None, help="bench/train_step.py --out report to compare with")
    parser.add_argument("--write", action="store_true", help="(re)write the train data loader section of BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    step = report.step_images_per_second(args.step_json) if args.step_json else None
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = max(2, max(args.loader_workers))  # every loader process needs a shard of its own
        urls = write_shards(Path(tmp), num_shards=shards, per_shard=max(64, args.samples))
        tokenizer = build_local_tokenizer(iter_texts(urls), Path(tmp) / "tok", vocab_size=512, model_max_length=77)
        for preset in args.cases:
            overrides, name = CASES[preset]
            for workers in args.loader_workers:
                rate = measure(urls, tokenizer, preset, overrides, args.samples, workers)
                per_core = rate / max(1, workers)
                rows.append((name, workers, rate, per_core))
                print(f"{name:36s} loader processes {workers:>2}: {rate:8.1f} samples/s, {per_core:6.1f} per core",
                      flush=True)
    if args.write:
        write_section(rows, args, step, (load_before, os.getloadavg()[0]))


def write_section(rows: list[tuple], args, step: float | None, load: tuple[float, float]) -> None:
    compare = (f" The B/16 rows are compared with the full GoldiCLIP step on this machine's GPU from "
               f"`{args.step_json}`: {step:,.0f} images/s." if step else
               " No GPU step in this run: the comparison with the B/16 step is `bench/gpu/run.sh job`'s.")
    lines = [
        "## train data loader", "",
        "The trainer's loader (`make_loader`: forkserver processes, prefetch 2; 0 processes = in the "
        "measuring process, i.e. one core) over 340x256 JPEGs in the shards stage's format, every augmentation "
        "on (DINO crops, flip, jitter, grayscale, blur, solarize), captions sampled and tokenised, decoder "
        f"samples built; the first batch of each process untimed. Load average {load[0]:.1f} before, "
        f"{load[1]:.1f} after.{compare}", "",
        "| views | loader processes | samples/s | samples/s per core | vs GoldiCLIP step | command | machine | date |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, workers, rate, per_core in rows:
        versus = f"{rate / step:.2f}x" if step and name.startswith("B/16") else "-"
        lines.append(f"| {name} | {workers} | {rate:,.1f} | {per_core:,.1f} | {versus} | `{report.command_line()}` "
                     f"| {report.machine()} | {report.today()} |")
    report.write_section("\n".join(lines))


if __name__ == "__main__":
    main()
