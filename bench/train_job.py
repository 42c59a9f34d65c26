"""One short, real Ray Train run of the GoldiCLIP job: images/s of the whole job against bench/train_step.py.

Issue 5's check: the train stage's own `build_trainer` (TorchTrainer, one worker per GPU, the
trainer's loader processes decoding and augmenting 340x256 JPEGs from generated training shards,
host-to-device copies, torch.compile, AdamW, clipping, EMA teacher, metric rows, a checkpoint
at the end) for `--steps` steps. The job's images/s is the median of its metric rows after the
first (which holds compilation and the loaders' start); `--step-json` reads a
`bench/train_step.py --out` report of the same batch to compare with (target: >= 90%).

The tokenizer is CLIP's own 49,408-token BPE built from the vocabulary file in open_clip's
wheel (bench/clip_tokenizer.py), so the embedding and decoder head have the real size; without
open_clip (a CPU smoke run) a small local BPE stands in and the run says so.

    python bench/train_job.py --step-json bench/out/step.json --write          # GPU machine
    python bench/train_job.py --smoke                                          # anywhere, CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import report  # noqa: E402  (bench/report.py)
from clip_tokenizer import save_clip_tokenizer  # noqa: E402  (bench/clip_tokenizer.py)
from tasks.config import PipelineConfig  # noqa: E402
from tasks.ray_actors import start_ray  # noqa: E402
from tasks.train.checkpoint import runs_dir  # noqa: E402
from tasks.train.loop import read_metrics  # noqa: E402
from tasks.train.stage import build_trainer, validate_train_config  # noqa: E402
from tasks.train.data import iter_texts  # noqa: E402
from tasks.demo.train_shards import write_train_shards  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="B/16")
    parser.add_argument("--batch", type=int, default=128, help="images per GPU per step")
    parser.add_argument("--captions", type=int, default=8)
    parser.add_argument("--local-views", type=int, default=6)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--loader-workers", type=int, default=None, help="per GPU worker (default: cores - 2)")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--per-shard", type=int, default=128)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--step-json", type=Path, default=None)
    parser.add_argument("--root", type=Path, default=None, help="dataset root (default: a temporary directory)")
    parser.add_argument("--smoke", action="store_true", help="CPU, debug preset, a few steps: checks the plumbing")
    parser.add_argument("--write", action="store_true", help="(re)write the train job section of BENCHMARKS.md")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.batch, args.captions, args.local_views = "debug", 4, 2, 2
        args.steps, args.log_every, args.shards, args.per_shard = 6, 2, 2, 16
        args.loader_workers = 1 if args.loader_workers is None else args.loader_workers
    return args


def job_config(args, root: Path, tokenizer: str, gpus: int) -> PipelineConfig:
    loader_workers = args.loader_workers if args.loader_workers is not None else max(1, os.cpu_count() // max(gpus, 1) - 2)
    cpus = os.cpu_count()
    return PipelineConfig.model_validate({
        "dataset": {"root": str(root)},
        "train": {
            "preset": args.preset, "tokenizer": tokenizer, "batch_size_per_worker": args.batch,
            "captions_per_image": args.captions, "num_local_views": args.local_views, "steps": args.steps,
            "warmup_steps": min(10, args.steps - 1), "log_every": args.log_every, "checkpoint_every": args.steps,
            "num_workers": max(gpus, 1), "use_gpu": gpus > 0, "compile": not args.no_compile,
            "resources_per_worker": {"CPU": max(1, cpus // max(gpus, 1) - 1), **({"GPU": 1} if gpus else {})},
            "loader_workers": loader_workers, "shuffle_buffer": 256,
        },
        "ray": {"num_cpus": cpus},
    })


def main() -> None:
    args = parse_args()
    gpus = 0 if args.smoke else torch.cuda.device_count()
    if not gpus and not args.smoke:
        raise SystemExit("no GPU here: run with --smoke for a CPU plumbing check")
    with tempfile.TemporaryDirectory(prefix="goldiclip-train-job-") as tmp:
        root = args.root or Path(tmp)
        started = time.perf_counter()
        urls = write_train_shards(root / "train", num_shards=args.shards, per_shard=args.per_shard,
                                  width=340, height=256)
        tokenizer_dir = root / "tokenizer"
        try:
            save_clip_tokenizer(tokenizer_dir)
            tokenizer_kind = "CLIP BPE (49,408)"
        except FileNotFoundError as error:
            if not args.smoke:
                raise SystemExit(f"{error}; carry the open_clip wheel (bench/gpu/fetch_wheels.sh)") from None
            from model.tokenizer import build_local_tokenizer

            build_local_tokenizer(iter_texts(urls), tokenizer_dir, vocab_size=256)
            tokenizer_kind = "local BPE (256; smoke run)"
        config = job_config(args, root, str(tokenizer_dir), gpus)
        validate_train_config(config)
        print(f"{len(urls)} shards x {args.per_shard} samples in {time.perf_counter() - started:.1f}s; "
              f"{tokenizer_kind}; {config.train.num_workers} worker(s), {config.train.loader_workers} loader "
              f"processes each", flush=True)
        start_ray(config.ray)
        name = f"bench-train-job-{int(time.time())}"
        fit_start = time.perf_counter()
        result = build_trainer(config, name=name, tokenizer=str(tokenizer_dir), shard_urls=urls).fit()
        fit_seconds = time.perf_counter() - fit_start
        if result.error is not None:
            raise SystemExit(f"the Ray Train run failed: {result.error}")
        rows = read_metrics(f"{runs_dir(str(root))}/{name}")
    steady = [r["images_per_s"] for r in rows[1:]] or [rows[-1]["images_per_s"]]
    job = statistics.median(steady)
    step = report.step_images_per_second(args.step_json) * max(gpus, 1) if args.step_json else None
    summary = {"steps": rows[-1]["step"], "fit_seconds": fit_seconds, "images_per_s_rows": [r["images_per_s"] for r in rows],
               "job_images_per_s": job, "step_images_per_s": step, "tokenizer": tokenizer_kind,
               "loader_workers": config.train.loader_workers, "final_loss": rows[-1].get("loss/total")}
    print(json.dumps(summary), flush=True)
    if step:
        print(f"job {job:,.0f} images/s = {job / step:.0%} of bench/train_step.py's {step:,.0f} (target >= 90%)")
    if args.write:
        if args.smoke:
            raise SystemExit("--write records GPU runs only; this was a smoke run")
        write_section(args, config, summary)


def write_section(args, config: PipelineConfig, summary: dict) -> None:
    step, job = summary["step_images_per_s"], summary["job_images_per_s"]
    ratio = f"{job / step:.0%}" if step else "-"
    rows = ", ".join(f"{x:,.0f}" for x in summary["images_per_s_rows"])
    lines = [
        "## train job", "",
        f"One real Ray Train run of the train stage's `build_trainer` (`bench/train_job.py`): preset {args.preset}, "
        f"{args.batch} images per GPU, K = {args.captions}, 2 global + {args.local_views} local views, all four "
        f"decoder tasks, {summary['tokenizer']} tokenizer, {config.train.num_workers} GPU worker(s) with "
        f"{summary['loader_workers']} loader processes each over {args.shards} generated shards of 340x256 JPEGs, "
        f"torch.compile {'off' if args.no_compile else 'on'}, bf16 autocast, fused AdamW, clipping, EMA, a checkpoint "
        f"at the end. Job images/s: the median of the metric rows (every {args.log_every} steps) after the first; "
        f"all rows: {rows}. Anchor: `bench/train_step.py`'s full GoldiCLIP step on synthetic device-resident "
        "batches of the same shape. Target: >= 90%.", "",
        "| steps | job images/s | step images/s (anchor) | job / step | fit wall s | command | machine | date |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {summary['steps']} | {job:,.0f} | {f'{step:,.0f}' if step else '-'} | {ratio} | "
        f"{summary['fit_seconds']:.0f} | `{report.command_line()}` | {report.machine()} | {report.today()} |",
    ]
    report.write_section("\n".join(lines))


if __name__ == "__main__":
    main()
