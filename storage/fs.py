"""fsspec helpers: a dataset root is a local path or any fsspec URL (``s3://``, ``memory://``).

Atomicity: every file is written under a temporary sibling name and renamed into
place only once complete, so a run killed mid-write never leaves a partial file
under a name a reader would take as complete (DESIGN.md, stage contract).
On object stores a rename is a copy + delete; the final name still appears only
after the whole object is written.

Object stores (``s3://``): credentials and the endpoint come from the usual environment, never
from the config: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (or a profile, an instance role),
``AWS_ENDPOINT_URL`` for an S3 API other than AWS (MinIO, Ceph, a test server),
``AWS_DEFAULT_REGION``; s3fs, boto3 and pyarrow (Ray Train's checkpoints) all read them. Other
s3fs options may be set as ``FSSPEC_S3_<OPTION>`` variables (fsspec's own configuration; pyarrow,
and so Ray Train, does not read those: keep the endpoint in ``AWS_ENDPOINT_URL``). Ray workers
see them through ``tasks.ray_actors.forwarded_env``.

Listings are never cached (``open_fs``): other processes write under the same prefixes (Ray
Train workers write checkpoints, download processes write shards, a second run takes leases),
and s3fs would otherwise answer ``ls``/``exists`` from its first listing of a directory, so a
checkpoint or shard written since by another process would be missed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

TMP_MARKER = ".tmp-"


PUBLIC_URL_ENV = "GOLDICLIP_STORAGE_PUBLIC_URL"


def open_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for ``url``; its listings are not cached (module docstring)."""
    return url_to_fs(url, use_listings_cache=False)


def join(root: str, *parts: str) -> str:
    """Join path parts onto a local path or URL with ``/`` (fsspec's separator everywhere)."""
    out = root.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def exists(url: str) -> bool:
    fs, path = open_fs(url)
    return fs.exists(path)


def is_temporary(name: str) -> bool:
    """Whether ``name`` is an unfinished write that readers must ignore."""
    return TMP_MARKER in os.path.basename(name)


@contextlib.contextmanager
def atomic_write(url: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open ``url`` for writing under a temporary name; rename into place on success.

    On an exception the temporary file is removed and nothing appears at ``url``.
    """
    fs, path = open_fs(url)
    parent = os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}{TMP_MARKER}{uuid.uuid4().hex[:12]}"
    try:
        with fs.open(tmp, mode) as f:
            yield f
        fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError, OSError):
            fs.rm(tmp)
        raise


def atomic_write_bytes(url: str, data: bytes) -> None:
    with atomic_write(url, "wb") as f:
        f.write(data)


def read_bytes(url: str) -> bytes:
    """The whole file, in one request on an object store: s3fs's ``open`` + ``read`` is a HEAD then
    a GET pinned to its ETag, which fails (FileExpired) when another process rewrites the file in between."""
    fs, path = open_fs(url)
    return fs.cat_file(path)


def write_json(url: str, obj: Any) -> None:
    atomic_write_bytes(url, json.dumps(obj, indent=1, sort_keys=True).encode())


def read_json(url: str, default: Any = None) -> Any:
    """The JSON at ``url``, or ``default`` when there is none; read whole (``read_bytes``): a record or
    lease another run rewrites meanwhile gives its old or its new content."""
    fs, path = open_fs(url)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return default
    return json.loads(data)


def remove_stale_temporaries(url_dir: str, in_flight: Callable[[str], bool] | None = None) -> int:
    """Delete leftovers of killed writers under ``url_dir``; returns how many.

    ``in_flight(path)`` says whether the temporary at ``path`` may belong to a writer still at work
    (e.g. another run holding its shard's lease): those are kept. It is asked after the listing, so a
    writer must hold what it answers from (the lease) from before its temporary appears until after
    the rename. Without it every temporary is removed: only right for a directory no other process
    writes into.
    """
    fs, path = open_fs(url_dir)
    if not fs.exists(path):
        return 0
    stale = [p for p in fs.ls(path, detail=False) if is_temporary(p) and not (in_flight and in_flight(p))]
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(p)
    return len(stale)


def local_path(url: str) -> str | None:
    """The absolute local path of ``url``, or None when it lives on another filesystem."""
    fs, path = open_fs(url)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return path if "file" in protocols else None


def put_dir(local_dir: str, url: str, *, last: str | None = None) -> None:
    """Copy the files of ``local_dir`` under ``url``, each atomically; ``last`` (a file name
    readers take as the completion marker) is written after every other file."""
    names = sorted(os.path.relpath(os.path.join(directory, name), local_dir)
                   for directory, _, files in os.walk(local_dir) for name in files)
    for name in sorted(names, key=lambda n: n == last):  # stable: only `last` moves to the end
        with open(os.path.join(local_dir, name), "rb") as src, atomic_write(join(url, name)) as dst:
            shutil.copyfileobj(src, dst)


@contextlib.contextmanager
def local_copy(url: str) -> Iterator[str]:
    """A local directory holding what ``url`` holds: ``url`` itself when local, else a temporary
    download removed on exit (for readers that only take local paths, e.g. ``from_pretrained``)."""
    if (path := local_path(url)) is not None:
        yield path
        return
    fs, root = open_fs(url)
    if not fs.isdir(root):
        raise FileNotFoundError(f"no directory at {url}")
    with tempfile.TemporaryDirectory(prefix="goldiclip-copy-") as tmp:
        for remote in fs.find(root):
            local = os.path.join(tmp, os.path.relpath(remote, root))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            fs.get_file(remote, local)
        yield tmp


@contextlib.contextmanager
def staged_dir(url: str) -> Iterator[str]:
    """A local directory to write into that becomes ``url``: ``url`` itself when local, else a
    temporary directory uploaded (file by file, atomically) only when the block succeeds."""
    if (path := local_path(url)) is not None:
        os.makedirs(path, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="goldiclip-stage-") as tmp:
        yield tmp
        put_dir(tmp, url)


def public_url(url: str) -> str | None:
    """An address a person can open in a browser for ``url`` on an object store, or None.

    Only when ``GOLDICLIP_STORAGE_PUBLIC_URL`` says where the store is served: a template with
    ``{bucket}`` and ``{key}`` (e.g. ``https://{bucket}.s3.amazonaws.com/{key}``, or a console or
    CDN address), or a base URL that ``<bucket>/<key>`` is appended to (path-style, e.g.
    ``https://minio.example.org``). Not derived from ``AWS_ENDPOINT_URL``: objects are private by
    default, so an endpoint URL would answer 403 to a browser, and a presigned URL expires while
    a Prefect artifact stays. Local paths get none (a browser does not open ``file://`` links
    from the Prefect UI).
    """
    template = os.environ.get(PUBLIC_URL_ENV, "").strip()
    if not template or "://" not in url or local_path(url) is not None:
        return None
    bucket, _, key = url.split("://", 1)[1].partition("/")
    if "{bucket}" in template or "{key}" in template:
        return template.format(bucket=bucket, key=key)
    return f"{template.rstrip('/')}/{bucket}/{key}"


def markdown_link(url: str) -> str:
    """``url`` for a Prefect artifact (markdown): the path or URI as code, which a person copies into
    ``aws s3 cp``/``s3fs``/a file browser, plus an ``[open](...)`` link when ``public_url`` has one."""
    link = public_url(url)
    return f"`{url}`" + (f" ([open]({link}))" if link else "")
