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


def save_stand_in_models(models_dir: Path) -> dict[str, Path]:
    """Tiny RANDOMLY initialised OWLv2 and Phi3 in the real checkpoint format (once).

    They stand in for OWLv2 B/16 and Phi-3.5-mini, which cannot be downloaded
    offline; the stages load them through the same ``from_pretrained`` path as
    real weights. Their boxes and answers are meaningless.
    """
    from tasks.demo.standin_models import save_tiny_owlv2, save_tiny_phi3

    paths = {"owlv2": models_dir / "owlv2-tiny-random", "phi3": models_dir / "phi3-tiny-random"}
    for name, save in (("owlv2", save_tiny_owlv2), ("phi3", save_tiny_phi3)):
        if not (paths[name] / "config.json").exists():
            save(paths[name])
    return paths


def demo_config(workdir: Path, source, models: dict[str, Path]):
    """The ``demo`` preset with every path inside ``workdir``."""
    return load_config(
        preset="demo",
        overrides={
            "dataset.root": str(workdir / "data"),
            "sources.0.paths": [str(source.url_list)],
            "captions.dreamlip_csvs": [str(p) for p in source.dreamlip_csvs],
            "boxes.model": str(models["owlv2"]),
            "vqa.model": str(models["phi3"]),
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
    models = save_stand_in_models(workdir / "models")
    typer.secho(f"[demo] boxes and vqa use tiny RANDOM stand-ins of OWLv2 and Phi-3.5 ({workdir / 'models'}): "
                "their outputs exercise the pipeline but mean nothing", bold=True, fg="yellow")
    with _serve_on_a_stable_port(source_dir) as base_url:
        source = write_url_lists(source_dir, base_url)
        typer.secho(f"[demo] serving them at {base_url} (loopback; stopped when the demo ends)", bold=True)
        config = demo_config(workdir, source, models)
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
