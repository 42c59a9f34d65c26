"""Where everything lives under a dataset root (DESIGN.md, "The dataset on storage").

```
<root>/sources/<source>.parquet
<root>/images/{shard:05d}.tar          webdataset: <key>.jpg + <key>.json
<root>/images/{shard:05d}.parquet      one row per URL tried
<root>/annotations/<kind>/{shard:05d}.parquet
<root>/train/{shard:05d}.tar
<root>/_stages/<stage>.json            summary of the stage (written by the flow)
<root>/_stages/<stage>/{shard:05d}.json one record per finished shard
```
Per-shard records are separate files so concurrent workers never
read-modify-write a shared file; ``<stage>.json`` is their summary.
"""

from __future__ import annotations

from dataclasses import dataclass

from storage.fs import join, open_fs

ANNOTATION_KINDS = ("captions", "phrases", "boxes", "vqa")


def shard_name(shard: int | str) -> str:
    """``7 -> "00007"``; shard names are zero-padded to five digits."""
    return f"{int(shard):05d}"


@dataclass(frozen=True)
class DatasetLayout:
    root: str

    def source(self, name: str) -> str:
        return join(self.root, "sources", f"{name}.parquet")

    @property
    def images_dir(self) -> str:
        return join(self.root, "images")

    def images_tar(self, shard: int | str) -> str:
        return join(self.images_dir, f"{shard_name(shard)}.tar")

    def images_table(self, shard: int | str) -> str:
        return join(self.images_dir, f"{shard_name(shard)}.parquet")

    def url_shard(self, shard: int | str) -> str:
        """The URLs assigned to one download shard (written once by the split step)."""
        return join(self.root, "sources", "shards", f"{shard_name(shard)}.parquet")

    def annotation(self, kind: str, shard: int | str) -> str:
        if kind not in ANNOTATION_KINDS:
            raise ValueError(f"unknown annotation kind {kind!r}; expected one of {ANNOTATION_KINDS}")
        return join(self.root, "annotations", kind, f"{shard_name(shard)}.parquet")

    @property
    def train_dir(self) -> str:
        return join(self.root, "train")

    def train_tar(self, shard: int | str) -> str:
        return join(self.train_dir, f"{shard_name(shard)}.tar")

    def relative(self, url: str) -> str:
        """``url`` as a path under the root (what records keep, so a root can be moved or copied)."""
        prefix = self.root.rstrip("/") + "/"
        if not url.startswith(prefix):
            raise ValueError(f"{url} is not under the dataset root {self.root}")
        return url[len(prefix):]

    def absolute(self, path: str) -> str:
        """The URL of ``path`` under the root (the inverse of ``relative``)."""
        return join(self.root, path)

    def stage_summary(self, stage: str) -> str:
        return join(self.root, "_stages", f"{stage}.json")

    def stage_shard_record(self, stage: str, shard: int | str) -> str:
        return join(self.root, "_stages", stage, f"{shard_name(shard)}.json")

    def stage_dir(self, stage: str) -> str:
        return join(self.root, "_stages", stage)

    def work_dir(self, name: str) -> str:
        """Scratch space a stage owns (e.g. the partitioned caption index)."""
        return join(self.root, "_work", name)

    def list_shards(self, directory: str, suffix: str) -> list[str]:
        """Shard names of the complete files ``NNNNN<suffix>`` in ``directory`` (temporaries ignored)."""
        fs, path = open_fs(directory)
        if not fs.exists(path):
            return []
        names = []
        for p in fs.ls(path, detail=False):
            base = p.rstrip("/").rsplit("/", 1)[-1]
            stem = base[: -len(suffix)] if base.endswith(suffix) else None
            if stem is not None and stem.isdigit() and len(stem) == 5:
                names.append(stem)
        return sorted(names)
