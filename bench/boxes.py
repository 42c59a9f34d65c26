"""Boxes stage throughput: OWLv2 images/s end to end from a webdataset tar (decode included).

Issue 4's setup: OWLv2 B/16 at 960 px, 640x480 JPEGs, 16 text queries per image, bf16
on the GPU. The script writes a tar of photo-like 640x480 JPEGs (cached under
``bench/out/boxes/``), then times ``detect_shard`` -- the stage's own loop: tar read,
background decode + resize, query tokenisation, forward, per-query best box,
conversion to pixels -- after one warm-up batch, and separately the model alone on
one pre-decoded batch repeated (the anchor, ~275 images/s model-only in bf16 on an
H100, was measured that way).

    python bench/boxes.py                                  # GPU: google/owlv2-base-patch16-ensemble
    python bench/boxes.py --write                          # also (re)write the "boxes" section of BENCHMARKS.md
    python bench/boxes.py --random-weights --write         # GPU without the checkpoint: B/16 shapes, random weights
    python bench/boxes.py --tiny --device cpu --images 64  # smoke check anywhere: tiny random OWLv2, 64 px

Only figures from the B/16 architecture on a GPU belong in BENCHMARKS.md; ``--write``
refuses anything else. ``--random-weights`` builds google/owlv2-base-patch16-ensemble's
architecture from its config with random weights (the lent GPU machine cannot download
the checkpoint): the same shapes and FLOPs, so the same speed; only the boxes kept
differ, and the table says which weights ran.
"""

from __future__ import annotations

import argparse
import io
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import report  # noqa: E402  (bench/report.py)
from storage import ShardWriter  # noqa: E402
from tasks.annotate.boxes import OwlDetector, collate, decode_image, detect_shard  # noqa: E402
from tasks.config import BoxesConfig  # noqa: E402

OUT = REPO / "bench" / "out" / "boxes"
ANCHOR = "about 275 images/s model-only, OWLv2 B/16 bf16 at 960 px, 16 queries (issue 4, H100)"
QUERIES = ["a dog", "a red car", "a person riding a bicycle", "green trees", "a wooden table", "a white cup",
           "a street sign", "a cat on a sofa", "blue sky with clouds", "a child", "a laptop computer",
           "a plate of food", "a window", "a bus", "a brown horse", "a traffic light"]


def photo_jpeg(rng: np.random.Generator, width: int = 640, height: int = 480) -> bytes:
    """Smooth colour fields plus noise: decodes and compresses like a photo (~60-90 KB)."""
    coarse = rng.random((height // 32 + 1, width // 32 + 1, 3)) * 255
    img = Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    noisy = np.asarray(img, dtype=np.int16) + rng.normal(0, 12, (height, width, 3)).astype(np.int16)
    out = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def make_tar(num_images: int) -> Path:
    path = OUT / f"images-{num_images}.tar"
    if not path.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        with ShardWriter(str(path)) as w:
            for i in range(num_images):
                w.write(f"00000{i:04d}", {"jpg": photo_jpeg(rng), "json": {"key": f"00000{i:04d}"}})
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="google/owlv2-base-patch16-ensemble")
    ap.add_argument("--tiny", action="store_true", help="Use a tiny random OWLv2 (64 px) saved under bench/out.")
    ap.add_argument("--random-weights", action="store_true",
                    help="OWLv2 B/16 at 960 px built from its config with random weights (no download).")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    ap.add_argument("--images", type=int, default=2048, help="Images in the tar (at most 10,000).")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--loader-threads", type=int, default=12)
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--write", action="store_true", help="(re)write the boxes section of BENCHMARKS.md (GPU only)")
    args = ap.parse_args()

    model = args.model
    if args.tiny:
        from tasks.demo.standin_models import save_tiny_owlv2

        model = str(save_tiny_owlv2(OUT / "owlv2-tiny"))
    elif args.random_weights:
        from tasks.demo.standin_models import save_random_owlv2_base

        model = str(save_random_owlv2_base(OUT / "owlv2-b16-random"))
    cfg = BoxesConfig(model=model, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                      loader_threads=args.loader_threads, max_queries=args.queries)
    tar = make_tar(args.images)
    detector = OwlDetector(cfg)
    queries = QUERIES[: args.queries]
    phrases = {f"00000{i:04d}": queries for i in range(args.images)}
    device = detector.device
    print(f"{model} on {device} ({detector.dtype}), {detector.size} px, {len(queries)} queries, "
          f"batch {args.batch_size}, {args.loader_threads} loader threads; {args.images} 640x480 JPEGs in {tar}")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    jpg = photo_jpeg(np.random.default_rng(1))
    batch = collate([decode_image("k", jpg, queries, detector.size) for _ in range(args.batch_size)],
                    detector.size, device.type == "cuda")
    detector.predict(batch)  # warm-up: kernels, allocator
    sync()
    reps = max(3, 256 // args.batch_size)
    start = time.perf_counter()
    for _ in range(reps):
        detector.predict(batch)
    sync()
    model_only = reps * args.batch_size / (time.perf_counter() - start)

    start = time.perf_counter()
    rows, counts, failures = detect_shard(detector, str(tar), phrases, cfg)
    sync()
    seconds = time.perf_counter() - start
    end_to_end = counts["images"] / seconds
    print(f"model only: {model_only:,.1f} images/s; end to end from the tar: {end_to_end:,.1f} images/s "
          f"({counts['images']} images in {seconds:.1f}s, {counts['boxes']} boxes kept, failures {dict(failures)})")

    if args.write:
        if args.tiny or device.type == "cpu":
            raise SystemExit("--write records the real model on a GPU only; this was a smoke run")
        weights = "random (B/16 architecture)" if args.random_weights else args.model
        write_section(args, weights, detector, model_only, end_to_end)


def write_section(args, weights: str, detector: OwlDetector, model_only: float, end_to_end: float) -> None:
    gpu = torch.cuda.get_device_name(detector.device)
    lines = [
        "## boxes", "",
        f"`detect_shard` (the stage's loop: tar read, background decode + resize, tokenise, forward, best box "
        f"per query) on {args.images} 640x480 JPEGs, {args.queries} queries each, {detector.size} px. Anchor: "
        f"{ANCHOR}. Target: >= 250 images/s end to end.", "",
        "| weights | dtype | batch | loader threads | model-only images/s | end-to-end images/s | command | machine | date |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {weights} | {detector.dtype} | {args.batch_size} | {args.loader_threads} | {model_only:,.0f} | "
        f"{end_to_end:,.0f} | `{report.command_line()}` | {gpu}, {platform.node()} | {report.today()} |",
    ]
    report.write_section("\n".join(lines))


if __name__ == "__main__":
    main()
