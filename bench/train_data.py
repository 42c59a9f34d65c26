"""Training data loader throughput: samples/s per CPU core with every augmentation on.

Builds a few training shards of 256-px JPEGs in the shards stage's format, then runs the
loader in one process (so the figure is per core) with the `debug` and `B/16` view sizes:
the L_ret view, G = 2 global crops, L local crops, K captions tokenised, decoder samples.
Prints a markdown table; `--write` appends it to BENCHMARKS.md under "Train data loader".

    python bench/train_data.py [--samples 256] [--write]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from model import get_preset  # noqa: E402
from model.tokenizer import build_local_tokenizer  # noqa: E402
from storage import ShardWriter, make_key  # noqa: E402
from tasks.config import TrainConfig  # noqa: E402
from tasks.train_data import SampleTransform, TrainSamples, iter_texts  # noqa: E402
from tests.train_fixtures import sample_record  # noqa: E402

CASES = {
    "debug (32 px + 2x32 + 2x16, K=4)": ("debug", dict(captions_per_image=4, num_local_views=2)),
    "B/16 (224 px + 2x224 + 6x96, K=10)": ("B/16", dict(captions_per_image=10, num_local_views=6)),
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


def measure(urls, tokenizer, preset: str, overrides: dict, samples: int, batch: int = 32) -> float:
    train = TrainConfig(preset=preset, batch_size_per_worker=batch, **overrides)
    model_config = get_preset(preset)
    transform = SampleTransform.from_config(train, model_config)
    num_batches = max(1, samples // batch)
    dataset = TrainSamples(urls, transform, tokenizer, batch_size=batch,
                           context_length=model_config.text.context_length, num_batches=num_batches + 1,
                           shuffle_buffer=64)
    batches = iter(dataset)
    next(batches)  # fill the shuffle buffer, warm PIL up
    start = time.perf_counter()
    for _ in range(num_batches):
        next(batches)
    return num_batches * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_shards(Path(tmp), num_shards=2, per_shard=200)
        tokenizer = build_local_tokenizer(iter_texts(urls), Path(tmp) / "tok", vocab_size=512, model_max_length=77)
        rows = [(name, measure(urls, tokenizer, preset, overrides, args.samples))
                for name, (preset, overrides) in CASES.items()]
    load = os.getloadavg()[0]
    lines = ["| views | samples/s per core |", "| --- | --- |"] + [f"| {n} | {v:.1f} |" for n, v in rows]
    table = "\n".join(lines)
    print(table)
    if args.write:
        text = (f"\n## Train data loader\n\n`python bench/train_data.py --samples {args.samples}` on "
                f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, one loader process "
                f"(so per core), 340x256 JPEGs, every augmentation on (DINO crops, flip, jitter, grayscale, "
                f"blur, solarize), captions sampled and tokenised, decoder samples built. Load average during "
                f"the run: {load:.1f} (the machine was shared).\n\n{table}\n")
        with open(REPO / "BENCHMARKS.md", "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
