"""BENCHMARKS.md bookkeeping shared by the scripts in bench/.

Each script owns one ``## <title>`` section of BENCHMARKS.md and rewrites only
that section (atomically: temp file + rename), so figures measured on different
machines and days (the CPU sandbox, a lent GPU) live side by side.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\nMeasured figures against the anchors in the issues; one section per stage, "
    "each written by its script in `bench/`.\n"
)


def quiet_flow_env() -> None:
    """Defaults for a benchmark that runs Prefect flows and Ray: a throwaway Prefect home, no
    telemetry, quiet logs, the ephemeral server's long start-up. Call before importing Prefect."""
    import tempfile

    for name, value in {"PREFECT_HOME": tempfile.mkdtemp(prefix="bench-prefect-"),
                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
                        "PREFECT_LOGGING_LEVEL": "WARNING", "RAY_AUTH_MODE": "disabled"}.items():
        os.environ.setdefault(name, value)


def today() -> str:
    return datetime.date.today().isoformat()


def cpu_machine() -> str:
    """How a CPU-only run names its machine in a table row."""
    return f"{os.cpu_count()}-core CPU sandbox (no GPU), {platform.machine()}"


def machine() -> str:
    """The machine a row was measured on: the GPU (a lent device machine) or the CPU sandbox."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name()} via device, {os.cpu_count()} CPU cores"
    except ImportError:
        pass
    return cpu_machine()


def command_line() -> str:
    """The command that produced a table, as a user would retype it."""
    return " ".join(["python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


def step_images_per_second(path: Path) -> float:
    """The full GoldiCLIP step's images/s per GPU from a `bench/train_step.py --out` report."""
    results = json.loads(Path(path).read_text())["results"]
    return next(r["images_per_s"] for r in results if r["run"] == "goldiclip")


def write_section(section: str, path: Path = BENCHMARKS) -> None:
    """Replace the section that starts with ``section``'s first line (``## title``), or append it."""
    title = section.splitlines()[0]
    if not title.startswith("## "):
        raise ValueError(f"a benchmark section starts with '## title', not {title!r}")
    section = section.rstrip("\n") + "\n"
    text = path.read_text() if path.exists() else HEADER
    start = text.find(f"\n{title}\n")
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[: start + 1] + section + (text[end:] if end != -1 else "")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    print(f"wrote the {title[3:]!r} section of {path}")
