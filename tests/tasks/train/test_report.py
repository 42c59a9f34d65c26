"""The train report: plots inline as PNG data URIs, the health curves found by name, the size bound."""

from __future__ import annotations

import base64
import io
import math
import random
import re

import pytest
from PIL import Image

from tasks.train.report import (
    HEALTH,
    MAX_POINTS,
    MAX_REPORT_BYTES,
    PLOTS_DIR,
    downsample,
    is_health_metric,
    progress_line,
    read_plots,
    render_plots,
    report_markdown,
    write_plots,
)

DATA_URI = re.compile(r"!\[(\w+)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")
TASKS = ("ret", "sd", "cap", "ref", "gro", "vqa")


def history(num_steps: int, log_every: int, *, health: bool = True, seed: int = 0) -> list[dict]:
    """Metric rows as the loop writes them, every value noisy (noise is what makes PNGs big)."""
    rng = random.Random(seed)
    rows = []
    for step in range(log_every, num_steps + 1, log_every):
        row = {"step": step, "lr": 5e-4 * 0.5 * (1 + math.cos(math.pi * step / num_steps)), "grad_norm": rng.random(),
               "images_per_s": 400.0 + rng.random(), "samples_seen": step * 6400, "corrupt_samples": 3}
        for name in ("total", "ret_ta", "ret_tc", "sd_ta", "sd_tc", *TASKS):
            row[f"loss/{name}"] = 5 * math.exp(-step / num_steps) + rng.gauss(0, 0.5)
        for name in TASKS:
            row[f"log_var/{name}"], row[f"weight/{name}"] = rng.gauss(0, 1), rng.random()
        if health:
            for branch in ("ta", "tc"):
                for name in ("teacher_entropy_frac", "kl", "center_norm", "student_entropy", "max_prob", "a", "b"):
                    row[f"sd_{branch}/{name}"] = rng.random()
        rows.append(row)
    return rows


def inline_images(markdown: str) -> dict[str, Image.Image]:
    return {name: Image.open(io.BytesIO(base64.b64decode(data))) for name, data in DATA_URI.findall(markdown)}


def test_health_metrics_are_found_by_name():
    for name in ("sd_ta/teacher_entropy_frac", "sd_tc/kl", "sd_ta/center_norm", "distill/ta/entropy", "sd/tc/kl"):
        assert is_health_metric(name), name
    for name in ("loss/sd_ta", "loss/sd", "weight/sd", "log_var/sd", "lr", "grad_norm", "logit_scale"):
        assert not is_health_metric(name), name


def test_downsample_keeps_the_bound_the_ends_and_a_spike():
    points = [(float(s), 1.0) for s in range(100_000)]
    points[54_321] = (54_321.0, 1000.0)
    reduced = downsample(points)
    assert len(reduced) <= MAX_POINTS
    assert reduced[0][0] < 200 and reduced[-1][0] > 99_800
    assert max(v for _, v in reduced) > 2  # the spike is damped by its bucket, not dropped
    assert downsample(points[:10]) == points[:10]


def test_report_embeds_every_plot_as_a_decodable_png(tmp_path):
    rows = history(550, 10)
    rows[-1]["images_per_s"] = 400.0
    run_dir = str(tmp_path / "run")
    plots = write_plots(rows, run_dir)
    assert list(plots) == ["losses", "log_vars", "weights", "schedule", HEALTH]
    assert read_plots(run_dir) == plots  # the same PNGs on storage
    markdown = report_markdown(run_dir=run_dir, rows=rows, plots=plots, total_steps=1000, live=True)
    images = inline_images(markdown)
    assert list(images) == list(plots)
    for group, image in images.items():
        image.load()
        assert image.format == "PNG" and image.width <= 720 and image.height <= 400, group
        assert f"{run_dir}/{PLOTS_DIR}/{group}.png" in markdown
    assert images["losses"].size == (560, 280)
    assert "training: step 550 of 1000" in markdown and "| loss/total |" in markdown
    # 450 steps left at 400 images/s over a 6,400-image global batch: 450 / 0.0625 s = 2h00m
    assert "about 2h00m left" in markdown


def test_no_health_plot_without_health_metrics_and_a_finished_report():
    rows = history(100, 10, health=False)
    plots = render_plots(rows)
    assert HEALTH not in plots and "losses" in plots
    markdown = report_markdown(run_dir="memory://x/runs/r", rows=rows, plots=plots, total_steps=100,
                               checkpoint="memory://x/runs/r/checkpoint_00000100")
    assert "finished: step 100 of 100" in markdown and "checkpoint_00000100" in markdown


@pytest.mark.parametrize(("num_steps", "log_every"), [(550, 10), (150_000, 50)])
def test_report_size_is_bounded(num_steps, log_every):
    """The bound of the module docstring, on the noisiest histories: every series noise, every group."""
    rows = history(num_steps, log_every)
    plots = render_plots(rows)
    markdown = report_markdown(run_dir="/data/runs/goldiclip-b16-0123", rows=rows, plots=plots,
                               total_steps=num_steps, live=True)
    assert len(inline_images(markdown)) == len(plots) == 5  # nothing left out
    assert len(markdown.encode()) < MAX_REPORT_BYTES


def test_report_leaves_out_plots_past_the_bound():
    rows = history(100, 10)
    noise = Image.effect_noise((1200, 800), 100)  # incompressible: a PNG far over the bound
    buffer = io.BytesIO()
    noise.save(buffer, format="png")
    plots = {**render_plots(rows), "weights": buffer.getvalue()}
    markdown = report_markdown(run_dir="/r", rows=rows, plots=plots, total_steps=100)
    assert len(markdown.encode()) < MAX_REPORT_BYTES
    assert "weights" not in inline_images(markdown) and "left out to keep the report under 512 KiB" in markdown


def test_progress_line_says_step_loss_rate_and_time_left():
    row = {"step": 1200, "lr": 4.99e-4, "images_per_s": 6400.0, "samples_seen": 1200 * 6400, "corrupt_samples": 2,
           "loss/total": 3.21451, "loss/ret": 0.8123}
    line = progress_line(row, 150_000)
    # one step per second: 148,800 s left
    assert line == ("step 1200/150000 (0.8%)  loss 3.2145  ret 0.8123  lr 4.99e-04  6,400.0 img/s  1d17h left  "
                    "corrupt 2")
