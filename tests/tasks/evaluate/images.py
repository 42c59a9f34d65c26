"""Tiny image folders for the evaluate tests."""

from __future__ import annotations

from pathlib import Path

from PIL import Image


def write_images(directory: Path, names, size=(12, 10)) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", size, (20 * i % 255, 100, 200)).save(directory / name)
