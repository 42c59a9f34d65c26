"""The ``goldiclip`` command line: one command per stage, ``run`` for the DAG, ``demo``.

CLI flags only pick the config (a file or a preset) and overrides
(``--set download.shard_size=1000``); everything else is in the config file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

import pipelines  # noqa: F401 - sets Prefect's environment defaults before Prefect loads
from pipelines.common import resolve_config
from pipelines.dag import STAGE_FLOWS, goldiclip_pipeline
from tasks.config import ConfigError, PipelineConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

ConfigOpt = typer.Option(None, "--config", "-c", help="Config YAML file.")
PresetOpt = typer.Option(None, "--preset", "-p", help="A shipped preset (demo, open30m) instead of a file.")
SetOpt = typer.Option([], "--set", "-s", help="Override a config key: dotted.key=value (repeatable).")
ForceOpt = typer.Option(False, "--force", help="Redo shards already done with the same config.")


def _config_ref(config: Path | None, preset: str | None) -> str:
    if (config is None) == (preset is None):
        raise typer.BadParameter("give exactly one of --config FILE or --preset NAME")
    return str(config) if config is not None else f"preset:{preset}"


def _load(config: Path | None, preset: str | None, overrides: list[str]) -> tuple[str, PipelineConfig]:
    """Validate before Prefect starts, so a bad config fails in a second with a clear message."""
    ref = _config_ref(config, preset)
    try:
        return ref, resolve_config(ref, overrides)
    except ConfigError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2) from None


def print_summaries(summaries: dict[str, dict]) -> None:
    """Per-stage counts as a small table on stdout."""
    for name, s in summaries.items():
        failures = ", ".join(f"{k}={v}" for k, v in sorted(s["failures"].items())) or "none"
        counts = ", ".join(f"{k}={v}" for k, v in sorted(s["counts"].items()))
        run = s.get("last_run", {})
        typer.echo(
            f"  {name:<10} shards done {s['num_shards_done']:>4} "
            f"(processed {len(run.get('processed', []))}, skipped {len(run.get('skipped', []))}) | "
            f"{counts} | failures: {failures}"
        )
        # Problems found before any shard: in the URL lists and the caption CSVs.
        list_counts = s.get("url_lists", {}).get("list_counts") or s.get("csv_counts")
        if list_counts:
            typer.echo(f"  {'':<10} input files: " + ", ".join(f"{k}={v}" for k, v in sorted(list_counts.items())))
        if s.get("checkpoint"):
            plots = f"  (plots: {s['run_dir']}/plots)" if s.get("run_dir") else ""
            typer.echo(f"  {'':<10} checkpoint: {s['checkpoint']}{plots}")
        if s.get("metrics"):
            from tasks.evaluate.stage import describe_retrieval

            for line in describe_retrieval(s["metrics"]):
                typer.echo(f"  {'':<10} {line}")


def _stage_command(stage: str):
    def command(config: Path | None = ConfigOpt, preset: str | None = PresetOpt,
                set_: list[str] = SetOpt, force: bool = ForceOpt) -> None:
        ref, _ = _load(config, preset, set_)
        summary = STAGE_FLOWS[stage](ref, overrides=set_, force=force)
        print_summaries({stage: summary})

    command.__doc__ = f"Run the {stage} stage (skips shards already done)."
    return command


for _stage in STAGE_FLOWS:
    app.command(_stage)(_stage_command(_stage))


@app.command()
def run(config: Path | None = ConfigOpt, preset: str | None = PresetOpt, set_: list[str] = SetOpt,
        stages: str | None = typer.Option(None, help="Comma-separated subset of stages, in DAG order."),
        force: str | None = typer.Option(None, help="Comma-separated stages to redo.")) -> None:
    """Run the whole DAG (or a subset) as the parent flow goldiclip-pipeline."""
    ref, _ = _load(config, preset, set_)
    summaries = goldiclip_pipeline(
        ref, overrides=set_, stages=stages.split(",") if stages else None, force=force.split(",") if force else None
    )
    print_summaries(summaries)


@app.command()
def demo(workdir: Path = typer.Option(Path("demo-run"), help="Where the demo's source, dataset and outputs go."),
         num_images: int = typer.Option(400, help="Synthetic training images to generate.")) -> None:
    """Generate the synthetic set, serve it on loopback, run the pipeline on it."""
    from pipelines.demo import run_demo

    run_demo(workdir.resolve(), num_images=num_images)


@app.command("export")
def export(checkpoint: Path = typer.Argument(..., help="A training checkpoint directory (or its checkpoint.pt)."),
           out_dir: Path = typer.Argument(..., help="Where to write the Hugging Face CLIP checkpoint.")) -> None:
    """Write the student's towers as a Hugging Face CLIP checkpoint plus the pooling block."""
    from tasks.evaluate.export import export_checkpoint

    try:
        written = export_checkpoint(checkpoint, out_dir)
    except ValueError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"exported to {written}: CLIPModel.from_pretrained('{written}'); tasks.evaluate.export.load_exported for scoring")


@app.command("status")
def status(config: Path | None = ConfigOpt, preset: str | None = PresetOpt, set_: list[str] = SetOpt,
           as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON (for scripts).")) -> None:
    """Where the pipeline stands: a row per stage, read from the dataset root (no Prefect server needed)."""
    from tasks.overview import overview_json, overview_table, pipeline_overview

    _, cfg = _load(config, preset, set_)
    rows = pipeline_overview(cfg)
    if as_json:
        json.dump(overview_json(rows), sys.stdout, indent=2)
        typer.echo()
        return
    table = overview_table(rows)
    columns = [c for c in table[0] if c != "artifacts"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in table)) for c in columns}
    typer.echo(f"dataset root: {cfg.dataset.root}")
    typer.echo("  ".join(c.ljust(widths[c]) for c in columns))
    for r in table:
        typer.echo("  ".join(str(r[c]).ljust(widths[c]) for c in columns))


@app.command("config")
def show_config(config: Path | None = ConfigOpt, preset: str | None = PresetOpt, set_: list[str] = SetOpt) -> None:
    """Validate a config and print it with every default filled in."""
    _, cfg = _load(config, preset, set_)
    json.dump(cfg.model_dump(mode="json"), sys.stdout, indent=2)
    typer.echo()


if __name__ == "__main__":
    app()
