"""What the requested stages need from storage, checked in seconds before any flow starts.

The config model catches what a value says about itself (types, ranges, unknown keys);
this catches what only a look at storage can: a dataset root that cannot be reached or
created, no ``sources`` for download, no ``captions.dreamlip_csvs`` for captions, and a
URL list or caption CSV that is missing, a directory, unreadable or not the format it
is named as. Each problem is a ``ConfigError`` of one line that names the key and the
path. Nothing is written anywhere; every storage call is bounded by ``ANSWER_TIMEOUT_S``.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs
from fsspec.utils import infer_compression

from tasks.config import ConfigError, PipelineConfig
from tasks.download.url_lists import read_url_list

T = TypeVar("T")

ANSWER_TIMEOUT_S = 10.0
# A list's format is judged on its first bytes (decompressed): enough for thousands of rows.
SAMPLE_BYTES = 2**20
# One quick attempt per call: an unreachable endpoint fails in about a second, not minutes.
QUICK_OPTIONS: dict[str, dict[str, Any]] = {
    "s3": {"config_kwargs": {"connect_timeout": 5, "read_timeout": 5, "retries": {"max_attempts": 1}}},
}
LIST_KINDS = {"cc3m": "CC3M TSV", "cc12m": "CC12M TSV", "yfcc15m": "YFCC15M list", "dreamlip": "DreamLIP CSV"}


def preflight(config: PipelineConfig, stages: list[str]) -> None:
    """Raise ``ConfigError`` (one line) on the first thing that would stop ``stages`` on this config."""
    check_root(config.dataset.root)
    if "download" in stages:
        if not config.sources:
            raise ConfigError("sources: empty; the download stage needs at least one URL list")
        for i, source in enumerate(config.sources):
            for j, path in enumerate(source.paths):
                check_list(f"sources.{i}.paths.{j}", path, source.format)
    if "captions" in stages:
        if not config.captions.dreamlip_csvs:
            raise ConfigError("captions.dreamlip_csvs: empty; the captions stage joins the DreamLIP caption CSVs")
        for j, path in enumerate(config.captions.dreamlip_csvs):
            check_list(f"captions.dreamlip_csvs.{j}", path, "dreamlip")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _answer(what: str, fn: Callable[[], T]) -> T:
    """``fn()``, or a ConfigError when storage gives no answer in time (a daemon thread: a hung
    call cannot keep the process alive)."""
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(ANSWER_TIMEOUT_S)
    if thread.is_alive():
        raise ConfigError(f"{what}: no answer within {ANSWER_TIMEOUT_S:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _open_fs(key: str, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    try:
        return url_to_fs(url, **QUICK_OPTIONS.get(protocol, {}))
    except ImportError as e:
        raise ConfigError(f"{key}: {url} needs a package that is not installed ({_first_line(e)})") from None
    except ValueError as e:
        raise ConfigError(f"{key}: {url}: {_first_line(e)}") from None


def check_root(root: str) -> None:
    """The root is a directory (or can become one) this process can write to, or a reachable store."""
    key = "dataset.root"
    fs, path = _open_fs(key, root)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    if "file" in protocols:
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise ConfigError(f"{key}: {root} is a file, not a directory")
        existing = next(a for a in (p, *p.parents) if a.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}: {root} cannot be created: {existing} is not a writable directory")
        return
    try:
        _answer(f"{key}: {root}", lambda: fs.exists(path))
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{key}: {root} cannot be reached: {_first_line(e)}") from None


def check_list(key: str, url: str, fmt: str) -> None:
    """``url`` is a readable file whose first rows hold a URL in format ``fmt``."""
    kind = LIST_KINDS[fmt]
    fs, path = _open_fs(key, url)
    try:
        info = _answer(f"{key}: {url}", lambda: fs.info(path))
    except ConfigError:
        raise
    except FileNotFoundError:
        raise ConfigError(f"{key}: {url} does not exist") from None
    except Exception as e:
        raise ConfigError(f"{key}: {url} cannot be reached: {_first_line(e)}") from None
    if info.get("type") == "directory":
        raise ConfigError(f"{key}: {url} is a directory, not a {kind}")
    if not info.get("size"):
        raise ConfigError(f"{key}: {url} is empty")
    counts: Counter = Counter()
    try:
        found = _answer(f"{key}: {url}", lambda: _first_url(url, fmt, counts))
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{key}: {url} cannot be read as a {kind}: {_first_line(e)}") from None
    if not found:
        seen = ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "no rows"
        raise ConfigError(f"{key}: {url} holds no URL in its first rows ({seen}); is it a {kind}?")


def _first_url(url: str, fmt: str, counts: Counter) -> bool:
    """Whether the list's first ``SAMPLE_BYTES`` (a parquet file: its first batch) hold a URL."""
    if fmt == "yfcc15m" and url.lower().rstrip("/").endswith((".parquet", ".pq")):
        return next(iter(read_url_list(url, fmt, "preflight", counts=counts)), None) is not None
    with fsspec.open(url, "rb", compression="infer") as f:
        sample = f.read(SAMPLE_BYTES)
    if len(sample) == SAMPLE_BYTES and b"\n" in sample:
        sample = sample[: sample.rindex(b"\n") + 1]  # whole rows only
    # The readers take a path: the sample goes to memory:// under the list's name minus any
    # compression suffix (the yfcc15m reader picks its delimiter from the name).
    name = url.rsplit("/", 1)[-1]
    if infer_compression(name):
        name = name.rsplit(".", 1)[0]
    sample_url = f"memory://goldiclip-preflight/{uuid.uuid4().hex}/{name}"
    memory = fsspec.filesystem("memory")
    memory.pipe_file(sample_url, sample)
    try:
        return next(iter(read_url_list(sample_url, fmt, "preflight", counts=counts)), None) is not None
    except ValueError as e:  # the reader names the file it was given: the sample's stand-in name
        raise ValueError(str(e).replace(f"{sample_url}: ", "").replace(sample_url, url)) from None
    finally:
        memory.rm(sample_url)


__all__ = ["ANSWER_TIMEOUT_S", "check_list", "check_root", "preflight"]
