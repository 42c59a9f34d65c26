"""Training curves and the train report: PNG plots of every loss, every learned task weight, the
learning-rate schedule and the self-distillation health metrics over steps (paper fig. 4), on
storage and inline in a markdown report a Prefect UI renders.

Reads the metric rows rank 0 writes (`<run>/metrics.jsonl`, tasks/train/loop.py) and draws, with
matplotlib's Agg backend, one figure per group of `PLOT_GROUPS`: the losses (`loss/*`), the
log-variances s_i (`log_var/*`), the effective weights (`weight/*`), the schedule (`lr`), and the
distillation health curves: every other metric whose name holds `sd_` (or starts with `sd/`,
`distill/`), one panel per metric with a line per branch (`ta`, `tc`), so metrics added to the
model's outputs later appear without a change here. The PNGs are saved under `<run>/plots/` (a
local path or any fsspec URL) and embedded in `report_markdown` as `data:image/png;base64,...`
images (Prefect 3.8's UI renders them; a file path on the training machine it cannot open). Files
on storage are named with `storage.fs.markdown_link`: the path or `s3://` URI as text, and an https
link when `GOLDICLIP_STORAGE_PUBLIC_URL` says where the store is served.

Size bound: each curve is reduced to at most `MAX_POINTS` points (means of consecutive rows), the
figures are `FIGSIZE` inches at `DPI` (560 x 280 px; the health figure at most 720 x 400 px for
up to `MAX_HEALTH_PANELS` panels), so the whole report stays under `MAX_REPORT_BYTES` (512 KiB)
whatever the run's length; tests/tasks/train/test_report.py checks it on a noisy 150k-step
history with every group. The flow re-publishes it while training runs (pipelines/train.py), each
version a new row in the Prefect database.
"""

from __future__ import annotations

import base64
import io
import math
import re
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from storage.fs import atomic_write_bytes, exists, join, markdown_link, read_bytes  # noqa: E402
from tasks.progress import format_duration, time_left  # noqa: E402

PLOTS_DIR = "plots"
MAX_POINTS = 500
DPI = 80
FIGSIZE = (7.0, 3.5)
MAX_HEALTH_PANELS = 6
MAX_REPORT_BYTES = 512 * 1024
HEALTH = "distill_health"
PLOT_GROUPS = {
    "losses": ("loss/", "Losses (each term before weighting; total = weighted sum)"),
    "log_vars": ("log_var/", "Learned log-variances s_i = log sigma_i^2 (Kendall et al.)"),
    "weights": ("weight/", "Effective task weights 0.5 exp(-s_i) w_i"),
    "schedule": ("lr", "Learning rate"),
    HEALTH: ("", "Self-distillation health, per branch (ta: text-agnostic, tc: text-conditioned)"),
}
_PREFIXED = tuple(prefix for group, (prefix, _) in PLOT_GROUPS.items() if prefix and group != "schedule")
_BRANCH = re.compile(r"(?<![a-z])(ta|tc)(?![a-z])")


def is_health_metric(name: str) -> bool:
    """A self-distillation diagnostic (teacher entropy, KL, center norm, ...), not a loss or weight."""
    return not name.startswith(_PREFIXED) and ("sd_" in name or name.startswith(("sd/", "distill/")))


def _columns(rows: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Every numeric metric as its (step, value) points, in one pass over the rows."""
    columns: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        step = row["step"]
        for name, value in row.items():
            if isinstance(value, (int, float)) and name != "step":
                columns.setdefault(name, []).append((step, value))
    return columns


def _series(names: list[str], group: str) -> list[str]:
    prefix = PLOT_GROUPS[group][0]
    if group == HEALTH:
        return sorted(n for n in names if is_health_metric(n))
    if group == "schedule":
        return sorted(n for n in names if n == prefix)
    return sorted(n for n in names if n.startswith(prefix))


def downsample(points: list[tuple[float, float]], max_points: int = MAX_POINTS) -> list[tuple[float, float]]:
    """At most `max_points` points: means of runs of consecutive points (a spike is damped, never dropped)."""
    if len(points) <= max_points:
        return points
    size = math.ceil(len(points) / max_points)
    out = []
    for start in range(0, len(points), size):
        chunk = points[start:start + size]
        out.append((sum(p[0] for p in chunk) / len(chunk), sum(p[1] for p in chunk) / len(chunk)))
    return out


def _curve(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    points = downsample(points)
    return [p[0] for p in points], [p[1] for p in points]


def _png(fig) -> bytes:
    """The figure as a 64-colour palette PNG: a third of the bytes of matplotlib's RGBA for line plots."""
    fig.canvas.draw()
    image = Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).convert("RGB")
    plt.close(fig)
    buffer = io.BytesIO()
    image.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(buffer, format="png", optimize=True)
    return buffer.getvalue()


def _plot_lines(columns: dict, group: str, names: list[str]) -> bytes:
    prefix, title = PLOT_GROUPS[group]
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    for name in names:
        ax.plot(*_curve(columns[name]), label=name.removeprefix(prefix) or name, linewidth=1)
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _png(fig)


def _plot_health(columns: dict, names: list[str]) -> bytes:
    """One panel per metric (its branches as lines): entropy, KL and norms live on different scales."""
    panels: dict[str, list[str]] = {}
    for name in names:
        panels.setdefault(_BRANCH.sub("*", name), []).append(name)
    shown = list(panels.items())[:MAX_HEALTH_PANELS]
    num_columns = min(3, len(shown))
    num_rows = math.ceil(len(shown) / num_columns)
    fig, axes = plt.subplots(num_rows, num_columns, figsize=(3.0 * num_columns, 2.5 * num_rows), dpi=DPI,
                             squeeze=False)
    for ax, (panel, members) in zip(axes.flat, shown):
        for name in members:
            branch = _BRANCH.search(name)
            ax.plot(*_curve(columns[name]), label=branch.group(1) if branch else name, linewidth=1)
        ax.set_title(panel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    more = f" (+{len(panels) - len(shown)} more in metrics.jsonl)" if len(panels) > len(shown) else ""
    fig.suptitle(PLOT_GROUPS[HEALTH][1] + more, fontsize=9)
    fig.tight_layout()
    return _png(fig)


def render_plots(rows: list[dict]) -> dict[str, bytes]:
    """{group: PNG bytes} for the groups of `PLOT_GROUPS` that have data, in that order."""
    columns = _columns(rows)
    plots = {}
    for group in PLOT_GROUPS:
        names = _series(list(columns), group)
        if names:
            plots[group] = _plot_health(columns, names) if group == HEALTH else _plot_lines(columns, group, names)
    return plots


def write_plots(rows: list[dict], run_dir: str) -> dict[str, bytes]:
    """Render the plots of `rows` and write them as `<run_dir>/plots/<group>.png`; returns them."""
    plots = render_plots(rows)
    for group, png in plots.items():
        atomic_write_bytes(join(run_dir, PLOTS_DIR, f"{group}.png"), png)
    return plots


def plot_files(run_dir: str) -> dict[str, str]:
    """{group: URL} of the plots a run has on storage."""
    urls = {group: join(run_dir, PLOTS_DIR, f"{group}.png") for group in PLOT_GROUPS}
    return {group: url for group, url in urls.items() if exists(url)}


def read_plots(run_dir: str) -> dict[str, bytes]:
    """{group: PNG bytes} of the plots a run has on storage."""
    return {group: read_bytes(url) for group, url in plot_files(run_dir).items()}


def final_table(rows: list[dict]) -> list[dict]:
    """One row per metric: first, last, min and max over the run (for a Prefect table artifact)."""
    if not rows:
        return []
    names = [k for k in rows[-1] if k != "step"]
    table = []
    for name in names:
        values = [r[name] for r in rows if isinstance(r.get(name), (int, float))]
        if values:
            table.append({"metric": name, "first": round(values[0], 5), "last": round(values[-1], 5),
                          "min": round(min(values), 5), "max": round(max(values), 5)})
    return table


def steps_per_second(row: dict) -> float | None:
    """The loop's pace over the row's logging window: images/s over the global batch."""
    step, seen, images_per_s = row.get("step"), row.get("samples_seen"), row.get("images_per_s")
    if not step or not seen or not images_per_s:
        return None
    return images_per_s / (seen / step)


def report_markdown(*, run_dir: str, rows: list[dict], plots: dict[str, bytes], total_steps: int,
                    checkpoint: str | None = None, live: bool = False) -> str:
    """The train report: where the run is, each plot inline (with its file on storage), the last values.

    Its size is bounded by `MAX_REPORT_BYTES` (module docstring): the plots make nearly all of it.
    """
    last = rows[-1] if rows else {}
    step = last.get("step", 0)
    if live:
        left = format_duration(time_left(step, total_steps, steps_per_second(last)))
        state = (f"training: step {step} of {total_steps}, {last.get('images_per_s', 0):,.1f} images/s, "
                 f"about {left} left (updated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())})")
    else:
        state = f"finished: step {step} of {total_steps}"
    lines = ["# GoldiCLIP training", "", f"_{state}_", "", f"- run: {markdown_link(run_dir)}",
             f"- checkpoint: {markdown_link(checkpoint) if checkpoint else '`none yet`'}",
             f"- samples seen: {last.get('samples_seen', 0):,}, corrupt samples skipped: {last.get('corrupt_samples', 0)}",
             f"- curves: at most {MAX_POINTS} points each (means of consecutive metric rows); "
             f"every row in {markdown_link(join(run_dir, 'metrics.jsonl'))}"]
    table = ["", "| metric | last |", "| --- | --- |"]
    table += [f"| {k} | {v:.5g} |" for k, v in last.items() if isinstance(v, float)]
    budget = MAX_REPORT_BYTES - len("\n".join(lines + table).encode())
    for group, png in plots.items():
        file = join(run_dir, PLOTS_DIR, f"{group}.png")
        section = ["", f"## {PLOT_GROUPS[group][1]}", "",
                   f"![{group}](data:image/png;base64,{base64.b64encode(png).decode()})", "", markdown_link(file)]
        if len("\n".join(section)) >= budget:  # not reached by our plots (see the tests); keeps the bound if it were
            section[3] = f"(left out to keep the report under {MAX_REPORT_BYTES // 1024} KiB; the file has it)"
        budget -= len("\n".join(section).encode()) + 1
        lines += section
    return "\n".join(lines + table)


def progress_line(row: dict, total_steps: int) -> str:
    """One metric row for a person: step of total, losses, lr, images/s and the time left at that pace."""
    step = row["step"]
    left = format_duration(time_left(step, total_steps, steps_per_second(row)))
    return (f"step {step}/{total_steps} ({100 * step / total_steps:.1f}%)  loss {row.get('loss/total', math.nan):.4f}  "
            f"ret {row.get('loss/ret', math.nan):.4f}  lr {row.get('lr', math.nan):.2e}  "
            f"{row.get('images_per_s', 0):,.1f} img/s  {left} left  corrupt {row.get('corrupt_samples', 0)}")
