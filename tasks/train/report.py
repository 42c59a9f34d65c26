"""Training curves: PNG plots of every loss and every learned task weight over steps (paper fig. 4).

Reads the metric rows rank 0 writes (`<run>/metrics.jsonl`, tasks/train/loop.py) and draws, with
matplotlib's Agg backend, one figure of the losses (`loss/*`), one of the log-variances s_i
(`log_var/*`) and one of the effective weights (`weight/*`), saved under `<run>/plots/` (a local
path or any fsspec URL: drawn locally, then copied).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from storage.fs import exists, join, staged_dir  # noqa: E402

PLOTS_DIR = "plots"
PLOT_GROUPS = {
    "losses": ("loss/", "Losses (each term before weighting; total = weighted sum)"),
    "log_vars": ("log_var/", "Learned log-variances s_i = log sigma_i^2 (Kendall et al.)"),
    "weights": ("weight/", "Effective task weights 0.5 exp(-s_i) w_i"),
    "schedule": ("lr", "Learning rate"),
}


def plot_metrics(rows: list[dict], out_dir: str | Path) -> dict[str, Path]:
    """One PNG per group of series; returns {group: path} for the groups that have data."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for group, (prefix, title) in PLOT_GROUPS.items():
        names = sorted({k for r in rows for k in r if k.startswith(prefix)})
        if not names:
            continue
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for name in names:
            points = [(r["step"], r[name]) for r in rows if name in r]
            ax.plot([p[0] for p in points], [p[1] for p in points], label=name.removeprefix(prefix) or name)
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out_dir / f"{group}.png"
        fig.savefig(path)
        plt.close(fig)
        paths[group] = path
    return paths


def write_plots(rows: list[dict], run_dir: str) -> None:
    """The plots of `rows` under `<run_dir>/plots/` (`plot_files` lists them)."""
    with staged_dir(join(run_dir, PLOTS_DIR)) as local:
        plot_metrics(rows, local)


def plot_files(run_dir: str) -> dict[str, str]:
    """{group: URL} of the plots a run has on storage."""
    urls = {group: join(run_dir, PLOTS_DIR, f"{group}.png") for group in PLOT_GROUPS}
    return {group: url for group, url in urls.items() if exists(url)}


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
