"""The ``goldiclip`` command line: one command per stage, ``run`` for the DAG, ``demo``, ``verify``.

CLI flags only pick the config (a file or a preset) and overrides
(``--set download.shard_size=1000``); everything else is in the config file.

A bad config, or a missing input the requested stages need (``tasks.preflight``), is one
line on stderr and exit code 2 within seconds: the config is checked before the flows,
Prefect and Ray are even imported, and nothing is written to the dataset root.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

import pipelines  # noqa: F401 - sets Prefect's environment defaults before Prefect loads
from pipelines.common import resolve_config
from tasks.config import ConfigError, PipelineConfig
from tasks.overview import STAGE_ORDER

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

ConfigOpt = typer.Option(None, "--config", "-c", help="Config YAML file.")
PresetOpt = typer.Option(None, "--preset", "-p", help="A shipped preset (demo, open30m, open30m-80gb) instead of a file.")
SetOpt = typer.Option([], "--set", "-s", help="Override a config key: dotted.key=value (repeatable).")
ForceOpt = typer.Option(False, "--force", help="Redo shards already done with the same config.")


def _fail(message: str) -> typer.Exit:
    """One line on stderr; the caller raises the returned exit (code 2: the user's mistake)."""
    typer.secho(" ".join(message.split()), fg="red", err=True)
    return typer.Exit(2)


def _stage_list(option: str, value: str | None) -> list[str] | None:
    if not value:
        return None
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in STAGE_ORDER]
    if unknown:
        raise _fail(f"{option}: unknown stage(s) {unknown}; stages are {list(STAGE_ORDER)}")
    return names


def _load(config: Path | None, preset: str | None, overrides: list[str],
          stages: list[str] | None = None) -> tuple[str, PipelineConfig]:
    """The validated config, and the pre-flight checks of ``stages`` (None: none), before Prefect or
    Ray load, so a mistake fails in a second with a clear message."""
    if (config is None) == (preset is None):
        raise _fail("give exactly one of --config FILE or --preset NAME")
    ref = str(config) if config is not None else f"preset:{preset}"
    try:
        cfg = resolve_config(ref, overrides)
        if stages is not None:
            from tasks.preflight import preflight

            preflight(cfg, stages)
    except ConfigError as e:
        raise _fail(str(e)) from None
    return ref, cfg


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
        ref, _ = _load(config, preset, set_, stages=[stage])
        from pipelines.dag import STAGE_FLOWS

        summary = STAGE_FLOWS[stage](ref, overrides=set_, force=force)
        print_summaries({stage: summary})

    command.__doc__ = f"Run the {stage} stage (skips shards already done)."
    return command


for _stage in STAGE_ORDER:
    app.command(_stage)(_stage_command(_stage))


@app.command()
def run(config: Path | None = ConfigOpt, preset: str | None = PresetOpt, set_: list[str] = SetOpt,
        stages: str | None = typer.Option(None, help="Comma-separated subset of stages, in DAG order."),
        force: str | None = typer.Option(None, help="Comma-separated stages to redo.")) -> None:
    """Run the whole DAG (or a subset) as the parent flow goldiclip-pipeline."""
    wanted, redo = _stage_list("--stages", stages), _stage_list("--force", force)
    ref, _ = _load(config, preset, set_, stages=wanted or list(STAGE_ORDER))
    from pipelines.dag import goldiclip_pipeline

    summaries = goldiclip_pipeline(ref, overrides=set_, stages=wanted, force=redo)
    print_summaries(summaries)


@app.command()
def verify(config: Path | None = ConfigOpt, preset: str | None = PresetOpt, set_: list[str] = SetOpt,
           stages: str | None = typer.Option(None, help="Comma-separated stages to check (default: all on the root)."),
           mark: bool = typer.Option(False, "--mark", help="Mark each damaged shard to be redone by its stage's "
                                     "next run (a wrong size or a missing file is redone without it).")) -> None:
    """Check every finished shard's output files (size and checksum) against its record; redo nothing.

    Exit code 1 when anything is damaged.
    """
    from storage import DatasetLayout, exists
    from tasks.verify import stages_on_root, verify_root

    wanted = _stage_list("--stages", stages)
    _, cfg = _load(config, preset, set_, stages=[])  # no stage runs: the root's pre-flight only
    layout = DatasetLayout(cfg.dataset.root)
    if not exists(layout.root):
        raise _fail(f"dataset.root: {layout.root} does not exist; nothing to verify")
    report = verify_root(layout, wanted or stages_on_root(layout), mark=mark)
    for d in report.damaged:
        typer.echo(f"DAMAGED {d.stage} shard {d.shard}: " + "; ".join(d.problems))
    for stage, checked in report.checked.items():
        damaged = sum(d.stage == stage for d in report.damaged)
        old = report.unverifiable.get(stage, 0)
        note = f", {old} without recorded outputs (written before checksums; not checked)" if old else ""
        typer.echo(f"  {stage:<10} {checked} shard(s) checked, {damaged} damaged{note}")
    if report.damaged:
        stages_hit = ",".join(dict.fromkeys(d.stage for d in report.damaged))
        what = "damaged, now marked to be redone" if mark else "damaged (--mark marks them to be redone)"
        typer.echo(f"{len(report.damaged)} shard(s) {what}; rerun {stages_hit} and the stages after them")
        raise typer.Exit(1)
    typer.echo(f"verified {sum(report.checked.values())} shard(s) under {layout.root}: no damage")


@app.command()
def demo(workdir: Path = typer.Option(Path("demo-run"), help="Where the demo's source, dataset and outputs go."),
         num_images: int = typer.Option(400, help="Synthetic training images to generate.")) -> None:
    """Generate the synthetic set, serve it on loopback, run the pipeline on it."""
    from pipelines.demo import run_demo

    run_demo(workdir.resolve(), num_images=num_images)


@app.command("export")
def export(checkpoint: str = typer.Argument(..., help="A training checkpoint directory (or its checkpoint file); "
                                               "a local path or an fsspec URL such as s3://..."),
           out_dir: str = typer.Argument(..., help="Where to write the Hugging Face CLIP checkpoint (path or URL).")
           ) -> None:
    """Write the student as a Hugging Face CLIP checkpoint (towers, image processor, tokenizer) plus the pooling block."""
    from tasks.evaluate.export import export_checkpoint

    try:
        written = export_checkpoint(checkpoint, out_dir)
    except ValueError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"exported to {written}: pipeline('zero-shot-image-classification', model='{written}') and "
               f"CLIPProcessor/CLIPModel.from_pretrained score text-agnostically; "
               f"tasks.evaluate.export.load_exported('{written}') for text-conditioned scores")


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
