"""Reading evaluation datasets from a local directory or an fsspec URL, with errors that name the file.

A dataset missing a file it needs cannot be evaluated at all, so that is an error naming the file
and what it should hold; a bad entry inside a file is counted and skipped by the readers instead.
"""

from __future__ import annotations

import json
from typing import Any

from storage import join, open_fs, read_bytes


def read_required(url: str, what: str) -> bytes:
    """The bytes at `url`; FileNotFoundError naming it and `what` (the dataset's file it should be) if absent."""
    try:
        return read_bytes(url)
    except (FileNotFoundError, IsADirectoryError):
        raise FileNotFoundError(f"{what}: no file at {url} (README, 'Evaluation suite', says where to get it)"
                                ) from None


def read_required_json(url: str, what: str) -> Any:
    return json.loads(read_required(url, what))


def read_required_lines(url: str, what: str) -> list[str]:
    """The non-empty lines of a text file, stripped."""
    return [line.strip() for line in read_required(url, what).decode("utf-8").splitlines() if line.strip()]


def list_dir(url: str, what: str, *, dirs: bool = False) -> list[str]:
    """The files (or, with `dirs`, the subdirectories) directly under `url`, sorted, as URLs like `url`."""
    fs, path = open_fs(url)
    if not fs.isdir(path):
        raise FileNotFoundError(f"{what}: no directory at {url} (README, 'Evaluation suite', says where to get it)")
    entries = fs.ls(path, detail=True)
    names = sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if (e["type"] == "directory") == dirs)
    return [join(url, name) for name in names]


def basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]
