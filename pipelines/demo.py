"""``goldiclip demo``: the whole pipeline on the embedded synthetic set, offline, on CPU.

Generates coloured shapes with DreamLIP-style captions (tasks/demo/source.py),
serves them on a loopback HTTP server so the download stage downloads for real,
and runs the DAG through Prefect on the ``demo`` preset with its paths pointed
into ``WORKDIR``. Everything it writes stays under ``WORKDIR``: the source set,
the dataset root, and the Prefect database (so ``prefect server start`` with the
same ``PREFECT_HOME`` shows the runs). A second run skips every finished shard.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import typer

from tasks.config import load_config

PORT_FILE = "server-port"
DEMO_EVAL_SET = "demo_pairs"


@contextlib.contextmanager
def _serve_on_a_stable_port(source_dir: Path):
    """Serve the source, reusing the last run's port so URLs, and so fingerprints, stay the same."""
    from tasks.demo.source import serve_directory

    port_file = source_dir / PORT_FILE
    port = int(port_file.read_text()) if port_file.exists() else 0
    try:
        server = serve_directory(source_dir, port=port)
        base_url = server.__enter__()
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            raise
        server = serve_directory(source_dir, port=0)
        base_url = server.__enter__()
    port_file.write_text(base_url.rsplit(":", 1)[1])
    try:
        yield base_url
    finally:
        server.__exit__(None, None, None)


def save_stand_in_owlv2(models_dir: Path) -> Path:
    """A tiny RANDOMLY initialised OWLv2 in the real checkpoint format (once).

    It stands in for OWLv2 B/16, which cannot be downloaded offline; the boxes stage loads
    it through the same ``from_pretrained`` path as real weights. Its boxes are meaningless.
    """
    from tasks.demo.standin_models import save_tiny_owlv2

    path = models_dir / "owlv2-tiny-random"
    if not (path / "config.json").exists():
        save_tiny_owlv2(path)
    return path


@contextlib.contextmanager
def _serve_vqa_stand_in():
    """The rule-based Phi-3.5 stand-in as an OpenAI-compatible server on loopback; yields its base URL."""
    from tasks.demo.openai_server import OpenAIServer
    from tasks.demo.vqa_standin import scene_answers

    with OpenAIServer(answer_fn=scene_answers) as server:
        yield server.base_url


def demo_config(workdir: Path, source, owlv2: Path, vqa_url: str):
    """The ``demo`` preset with every path inside ``workdir`` and the stand-in servers' URLs."""
    return load_config(
        preset="demo",
        overrides={
            "dataset.root": str(workdir / "data"),
            "sources.0.paths": [str(source.url_list)],
            "captions.dreamlip_csvs": [str(p) for p in source.dreamlip_csvs],
            "boxes.model": str(owlv2),
            "vqa.openai.base_urls": [vqa_url],
            # Held-out images (never in the URL list) with one caption each.
            "evaluate.datasets": [{"name": DEMO_EVAL_SET, "format": "jsonl", "path": str(source.eval_pairs)}],
        },
    )


def run_demo(workdir: Path, *, num_images: int = 400) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(workdir / "prefect"))
    from pipelines.cli import print_summaries
    from pipelines.dag import goldiclip_pipeline
    from tasks.demo.source import generate_demo_source, write_url_lists

    source_dir = workdir / "source"
    typer.secho(f"[demo] generating {num_images} synthetic images in {source_dir}", bold=True)
    generate_demo_source(source_dir, num_images=num_images)
    owlv2 = save_stand_in_owlv2(workdir / "models")
    typer.secho(f"[demo] STAND-INS: boxes come from a tiny RANDOM OWLv2 ({owlv2}), meaningless; vqa from a "
                "rule-based server answering the paper's prompt from the synthetic scene's words "
                "(tasks/demo/vqa_standin.py), not Phi-3.5", bold=True, fg="yellow")
    with _serve_on_a_stable_port(source_dir) as base_url, _serve_vqa_stand_in() as vqa_url:
        source = write_url_lists(source_dir, base_url)
        typer.secho(f"[demo] serving them at {base_url}, the vqa stand-in at {vqa_url} (loopback; stopped when "
                    "the demo ends)", bold=True)
        config = demo_config(workdir, source, owlv2, vqa_url)
        summaries = goldiclip_pipeline(config)
    typer.secho("\n[demo] per-stage counts (failures are counted and skipped, never fatal):", bold=True)
    print_summaries(summaries)
    metrics = summaries.get("evaluate", {}).get("metrics", {})
    if metrics:
        from tasks.evaluate.stage import metrics_path

        typer.secho(f"\n[demo] held-out retrieval ({summaries['evaluate']['counts'][f'{DEMO_EVAL_SET}/images']} "
                    f"images never seen in training; {metrics_path(config)}):", bold=True)
        for mode in ("conditioned", "agnostic"):
            value, chance = metrics[f"{DEMO_EVAL_SET}/{mode}/t2i_R@1"], metrics[f"{DEMO_EVAL_SET}/chance/t2i_R@1"]
            typer.echo(f"       text-{mode} T2I R@1 = {value:.3f} (chance {chance:.3f}, {value / chance:.1f}x chance)")
    typer.echo(
        f"\n[demo] dataset: {config.dataset.root}  (images/, annotations/, _stages/<stage>.json)\n"
        f"[demo] run it again: finished shards are skipped. Redo one stage: "
        f"goldiclip captions --config <file> --force\n"
        f"[demo] see the runs in the Prefect UI:\n"
        f"       PREFECT_HOME={os.environ['PREFECT_HOME']} prefect server start   # then open http://127.0.0.1:4200\n"
        f"       (Runs -> goldiclip-pipeline -> subflows per stage, per-shard task runs; Artifacts -> *-counts)"
    )
    return summaries
