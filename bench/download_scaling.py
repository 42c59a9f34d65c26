"""Download scaling over Ray nodes: URLs/s on 1, 2 and 3 nodes of a local cluster (issue 12).

One Ray cluster on this machine (``tests.cluster.LocalCluster``: a head with no CPUs for
work and three ``ray start`` worker nodes of 1 CPU each, all on 127.0.0.2). The download
stage runs through its Prefect flow with ``download.actors`` on Ray: ``num_actors`` = the
number of nodes, 1 CPU each, so every actor has a node of its own; each actor runs one
download process with a fixed ``concurrency``, so a node's throughput is capped at about
concurrency / latency and the figure shows the engine spreading shards over nodes, not
this machine's 2 cores. The URLs (``--urls``, 24,000 by default: 24 shards of 1,000, which
1, 2 and 3 divide) point at a loopback HTTP server in its own process
(``tasks.demo.http_server.LoopbackServer``) that waits 50-200 ms before each answer and
serves a small JPEG (96x64, so decode and re-encode cost little CPU).

Throughput is the URLs over the shard window (the first shard's start to the last one's
end, from the shard records, so the actors' start and the URL split are left out) and
over the whole flow run. Scaling efficiency = URLs/s on n nodes / (n x URLs/s on 1 node).
Target (issue 12): >= 0.9 per added node.

    python bench/download_scaling.py                 # print the table
    python bench/download_scaling.py --write         # and write it into BENCHMARKS.md ("## cluster")
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import report  # noqa: E402  (bench/report.py)

report.quiet_flow_env()  # before anything imports Prefect
from orchestration import MACHINE, load, write_cluster_part  # noqa: E402

LATENCY = (0.05, 0.2)
TARGET = 0.9

SERVER = """
import sys, time
from tasks.demo.http_server import LoopbackServer, Reply, image_bytes
n, low, high = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
body = image_bytes(96, 64)
server = LoopbackServer({f"/{i:06d}.jpg": Reply(body=body) for i in range(n)}, latency_s=(low, high)).start()
print(server.base_url, flush=True)
while True:
    time.sleep(3600)
"""


def start_server(n: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(n), str(LATENCY[0]), str(LATENCY[1])], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if not line.startswith("http://"):
        proc.kill()
        raise RuntimeError(f"loopback server did not start: {line!r}")
    return proc, line


def run(nodes: int, url_list: Path, urls: int, shard_size: int, concurrency: int, address: str) -> dict:
    from pipelines.download import download_flow
    from storage import read_json

    root = tempfile.mkdtemp(prefix=f"bench-scaling-{nodes}-")
    config = {
        "dataset": {"root": root},
        "sources": [{"name": "bench", "format": "cc3m", "paths": [str(url_list)]}],
        "download": {"shard_size": shard_size, "processes": 1, "concurrency": concurrency, "retries": 1,
                     "timeout_s": 30, "allow_private_addresses": True,
                     "actors": {"executor": "ray", "num_actors": nodes, "num_cpus_per_actor": 1,
                                "num_gpus_per_actor": 0}},
        "ray": {"address": address, "node_ip_address": "127.0.0.2"},
    }
    try:
        start = time.perf_counter()
        summary = download_flow(config)
        wall = time.perf_counter() - start
        shards = read_json(os.path.join(root, "_stages", "download.json"))["shards"]
        window = max(r["finished_at"] for r in shards.values()) - min(r["finished_at"] - r["seconds"]
                                                                      for r in shards.values())
        ok = summary["counts"].get("ok", 0)
        node_ids = {r["node"]["node_id"] for r in shards.values()}
        row = {"nodes": nodes, "ok": ok, "failed": sum(summary["failures"].values()), "window_s": window,
               "wall_s": wall, "urls_per_s": urls / window, "urls_per_s_wall": urls / wall,
               "nodes_used": len(node_ids)}
        print(row, flush=True)
        return row
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--urls", type=int, default=24_000)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16, help="concurrent requests per actor (one per node)")
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args()

    import ray
    from prefect.testing.utilities import prefect_test_harness

    from tests.cluster import LocalCluster

    work = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    server, base = start_server(args.urls)
    url_list = work / "urls.tsv"
    url_list.write_text("".join(f"image {i}\t{base}/{i:06d}.jpg\n" for i in range(args.urls)))
    load_before = load()
    rows = []
    try:
        workers = {f"node_{chr(ord('a') + i)}": 1 for i in range(max(args.nodes))}
        with prefect_test_harness(server_startup_timeout=120), \
                LocalCluster(head_cpus=0, workers=workers) as cluster:
            for nodes in args.nodes:
                rows.append(run(nodes, url_list, args.urls, args.shard_size, args.concurrency, cluster.address))
                ray.shutdown()
    finally:
        server.kill()
        shutil.rmtree(work, ignore_errors=True)
    load_after = load()

    base_rate = next((r["urls_per_s"] for r in rows if r["nodes"] == 1), None)
    ideal = args.concurrency / (sum(LATENCY) / 2)
    command = report.command_line()
    lines = [
        "### download scaling over Ray nodes",
        "",
        f"`bench/download_scaling.py`: {args.urls:,} URLs ({args.urls // args.shard_size} shards of "
        f"{args.shard_size:,}) through the download flow (Prefect, `download.actors` on Ray) on a cluster of "
        "`ray start` nodes on this machine (`tests.cluster.LocalCluster`: a head with no CPUs for work and "
        "worker nodes of 1 CPU each, 127.0.0.2), one actor per node (1 CPU each), each actor one download "
        f"process with concurrency {args.concurrency}; a loopback HTTP server in its own process waits "
        f"{LATENCY[0] * 1000:.0f}-{LATENCY[1] * 1000:.0f} ms before each answer (a 96x64 JPEG, so CPU is not "
        f"the limit). A node's ceiling is about concurrency / mean latency = {ideal:.0f} URLs/s. URLs/s over "
        "the shard window (first shard's start to last shard's end, from the records: actor start and the "
        "URL split left out) and over the whole flow run. Efficiency = URLs/s on n nodes / (n x URLs/s on "
        f"1 node); target (issue 12) >= {TARGET}. One-minute load average {load_before} before, {load_after} "
        "after (a shared 2-core sandbox).",
        "",
        "| nodes | URLs ok / failed | URLs/s (shard window) | URLs/s per node | scaling efficiency | seconds (window / whole flow) | URLs/s whole flow | command | machine | date |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        eff = f"{r['urls_per_s'] / (r['nodes'] * base_rate):.2f}" if base_rate else "-"
        lines.append(f"| {r['nodes']} ({r['nodes_used']} used) | {r['ok']:,} / {r['failed']:,} | "
                     f"{r['urls_per_s']:.0f} | {r['urls_per_s'] / r['nodes']:.0f} | {eff} | "
                     f"{r['window_s']:.1f} / {r['wall_s']:.1f} | {r['urls_per_s_wall']:.0f} | `{command}` | "
                     f"{MACHINE} | {report.today()} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_cluster_part("download scaling over Ray nodes", table)


if __name__ == "__main__":
    main()
