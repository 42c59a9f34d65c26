"""The once-per-stage passes at scale: download's URL split and the DreamLIP caption partition (issue 12).

Both run once, in the flow's process, before a stage's shards go to the actors:

- the URL split (``tasks.download.stage.split_sources``: stream the lists, drop duplicate URLs
  by a 64-bit hash, write ``sources/shards/*.parquet``), on a synthetic CC3M-style TSV of
  ``--urls`` URLs (one per size);
- the caption partition (``CaptionsStage.prepare`` -> ``storage.caption_partitions.partition_by_shard``:
  one pass over the DreamLIP CSVs sending each row to its image shard), on a synthetic DreamLIP
  CSV whose rows are the split's URLs with seven captions each (raw, short and long from each
  captioner; about 1.7 KB a row, as 50 GB for 30M images).

Each pass runs in a fresh process per size (seconds, and its peak RSS from ``ru_maxrss``); the
30M-URL / 50 GB figure is a straight line through the measured sizes (both passes stream: time
grows with the input, memory with the URL index and the hash set). The comparison: the download
of 30M URLs on the sizing's cluster (docs/cluster.md) takes hours, so a pass of minutes is not
the bottleneck.

    python bench/prepare_passes.py                    # print the table
    python bench/prepare_passes.py --write            # and write it into BENCHMARKS.md ("## cluster")
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

TARGET_URLS = 30_000_000
TARGET_CSV_GB = 50.0
# Partition buffer: small, so the measured runs flush as a 50 GB pass does (the default 1 GiB
# budget adds up to that much more memory at scale).
FLUSH_BYTES = 64 * 2**20
WORDS = ("a photo of a red car parked near a tall building with many windows and a small tree on the left side "
         "of the street while people walk by under a clear blue sky in the afternoon light").split()


def caption(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def write_inputs(work: Path, urls: int, seed: int = 0) -> tuple[Path, Path]:
    """A CC3M TSV (caption<TAB>url) and a DreamLIP CSV over the same URLs."""
    import csv

    from storage.tables import CAPTIONERS

    rng = random.Random(seed)
    tsv, dreamlip = work / "urls.tsv", work / "dreamlip.csv"
    header = ["Image Path", "raw_caption"] + [f"{k}{c}_captions" for c in CAPTIONERS for k in ("short", "long")]
    # A few hundred caption texts reused: generating 1.7 KB of random words per row would take
    # longer than the pass measured; the parser's work does not depend on repetition.
    shorts = [caption(rng, 12) for _ in range(257)]
    longs = [caption(rng, 100) for _ in range(263)]
    with tsv.open("w") as t, dreamlip.open("w", newline="") as d:
        writer = csv.writer(d)
        writer.writerow(header)
        for i in range(urls):
            url = f"https://img{i % 97}.example.com/photos/{i:09d}/{(i * 2654435761) % 4294967296:010d}.jpg"
            raw = shorts[i % 257]
            t.write(f"{raw}\t{url}\n")
            row = [url, raw]
            for j, _ in enumerate(CAPTIONERS):
                row += [shorts[(i + j) % 257], longs[(i * 7 + j) % 263]]
            writer.writerow(row)
    return tsv, dreamlip


def child(args: argparse.Namespace) -> None:
    """One pass in this fresh process; prints a JSON line with seconds and peak RSS."""
    from tasks.config import PipelineConfig

    config = PipelineConfig.model_validate({
        "dataset": {"root": args.root},
        "sources": [{"name": "synthetic", "format": "cc3m", "paths": [args.tsv]}],
        "download": {"shard_size": 5000},
        "captions": {"dreamlip_csvs": [args.csv], "flush_bytes": FLUSH_BYTES},
    })
    start = time.perf_counter()
    if args.child == "split":
        from tasks.download.stage import split_sources

        manifest = split_sources(config)
        result = {"shards": manifest["num_shards"]}
    else:
        from tasks.captions.stage import CaptionsStage

        stage = CaptionsStage(config)
        stage.prepare()
        result = {"counts": stage.partition["counts"]}
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"seconds": seconds, "peak_mb": peak_mb, **result}), flush=True)


def run_child(kind: str, root: Path, tsv: Path, csv_path: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", kind, "--root", str(root), "--tsv", str(tsv),
                           "--csv", str(csv_path)], capture_output=True, text=True, cwd=REPO)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"{kind} failed: {done.stdout[-2000:]} {done.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def fit(xs: list[float], ys: list[float], at: float) -> float:
    """The straight line through the measured points (least squares), at ``at``."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return my + slope * (at - mx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--urls", type=int, nargs="+", default=[250_000, 1_000_000])
    ap.add_argument("--work", default=None, help="where the synthetic inputs go (default: a temp dir)")
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    ap.add_argument("--child", choices=["split", "partition"], help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--tsv", help=argparse.SUPPRESS)
    ap.add_argument("--csv", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    import report  # bench/report.py
    from orchestration import MACHINE, load, write_cluster_part

    load_before = load()
    rows = []
    for urls in args.urls:
        work = Path(tempfile.mkdtemp(prefix="bench-passes-", dir=args.work))
        try:
            start = time.perf_counter()
            tsv, dreamlip = write_inputs(work, urls)
            print(f"{urls:,} URLs: inputs written in {time.perf_counter() - start:.0f} s", flush=True)
            root = work / "root"
            split = run_child("split", root, tsv, dreamlip)
            partition = run_child("partition", root, tsv, dreamlip)
            row = {"urls": urls, "tsv_mb": tsv.stat().st_size / 2**20, "csv_gb": dreamlip.stat().st_size / 2**30,
                   "split": split, "partition": partition}
            print(row, flush=True)
            rows.append(row)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    load_after = load()

    xs = [r["urls"] for r in rows]
    csv_bytes_per_row = sum(r["csv_gb"] for r in rows) / sum(xs) * 2**30
    target_csv_rows = TARGET_CSV_GB * 2**30 / csv_bytes_per_row
    extrapolated = {
        "split_s": fit(xs, [r["split"]["seconds"] for r in rows], TARGET_URLS),
        "split_mb": fit(xs, [r["split"]["peak_mb"] for r in rows], TARGET_URLS),
        "partition_s": fit(xs, [r["partition"]["seconds"] for r in rows], target_csv_rows),
        # memory follows the URL index (30M URLs), not the CSV bytes (streamed)
        "partition_mb": fit(xs, [r["partition"]["peak_mb"] for r in rows], TARGET_URLS),
    }
    command = report.command_line()
    lines = [
        "### once-per-stage passes at 30M URLs / 50 GB of CSVs",
        "",
        "`bench/prepare_passes.py`: the two passes a stage runs once, in the flow's process, before its "
        "shards go to the actors, each in a fresh process per size (seconds; peak RSS = `ru_maxrss`, the "
        "interpreter and imports included): the URL split of download (`split_sources`: stream the lists, "
        "drop duplicates by a 64-bit hash, write 5,000-URL shards) on a synthetic CC3M TSV, and the DreamLIP "
        "caption partition (`CaptionsStage.prepare`: index of the split's URLs, one pass over the CSV, rows "
        f"to their shard's parts) on a synthetic DreamLIP CSV of the same URLs ({csv_bytes_per_row:,.0f} bytes "
        "a row: raw + 3 short + 3 long captions, as 50 GB / 30M), with `captions.flush_bytes` "
        f"{FLUSH_BYTES // 2**20} MiB so that the measured runs flush their buffers as a 50 GB pass does (the "
        "default 1 GiB budget adds up to about that much to the partition's memory). The last row is a straight line through "
        "the measured ones (both passes stream; memory follows the URL index and the hash set). "
        f"One-minute load average {load_before} before, {load_after} after (a shared 2-core sandbox).",
        "",
        "| URLs | input | URL split s | URL split peak MB | caption partition s | caption partition peak MB | command | machine | date |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['urls']:,} | TSV {r['tsv_mb']:,.0f} MB, CSV {r['csv_gb']:.2f} GB | "
                     f"{r['split']['seconds']:.1f} | {r['split']['peak_mb']:,.0f} | "
                     f"{r['partition']['seconds']:.1f} | {r['partition']['peak_mb']:,.0f} | `{command}` | "
                     f"{MACHINE} | {report.today()} |")
    lines.append(f"| {TARGET_URLS:,} (extrapolated) | CSV {TARGET_CSV_GB:.0f} GB ({target_csv_rows / 1e6:.0f}M rows) | "
                 f"{extrapolated['split_s']:,.0f} ({extrapolated['split_s'] / 60:.0f} min) | "
                 f"{extrapolated['split_mb']:,.0f} | {extrapolated['partition_s']:,.0f} "
                 f"({extrapolated['partition_s'] / 3600:.1f} h) | {extrapolated['partition_mb']:,.0f} | "
                 f"`{command}` | {MACHINE} | {report.today()} |")
    table = "\n".join(lines)
    print(table)
    print(json.dumps(extrapolated))
    if args.write:
        write_cluster_part("once-per-stage passes at 30M URLs / 50 GB of CSVs", table)


if __name__ == "__main__":
    main()
