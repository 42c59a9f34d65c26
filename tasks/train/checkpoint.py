"""The checkpoint layout, in one place: what train writes, and what evaluate and export read.

On storage (a local path or any fsspec URL; Ray Train names the run's directories):

    <root>/tokenizer/                            train.tokenizer `local`: the BPE trained on the captions
    <root>/runs/<run name>/checkpoint_<step:08d>/
        checkpoint.pt            the training state (below)
        goldiclip_config.json    the model config, readable without loading the weights
        data_position.json       the data position, idem

`checkpoint.pt` holds tensors and plain containers only, so `torch.load(..., weights_only=True)`
reads it (a checkpoint is data, never code):

    model         state_dict: student, EMA teacher, distillation centres, loss log-variances
    optimizer     AdamW state            scheduler   warm-up + cosine state
    step          optimiser steps done   data        {step, samples_seen, samples_read, seed, errors}
    model_config  the GoldiCLIPConfig as JSON
    tokenizer     the tokenizer's Hugging Face id, directory or URL

Evaluation also reads a plain state_dict file (`.pt`, `.safetensors`) with `goldiclip_config.json`
beside it, and a `goldiclip export` directory (`GoldiCLIP.export_pretrained`: Hugging Face CLIP
towers, the pooling block and the same config file; METHOD.md sec. 8).
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import re
import zipfile

import torch

from model import GoldiCLIP, GoldiCLIPConfig, load_tokenizer, replace_config
from model.goldiclip import CONFIG_FILE as MODEL_CONFIG_FILE  # an export holds the same file
from storage.fs import atomic_write, exists, join, local_copy, local_path, open_fs, put_dir, read_bytes, read_json
from storage.fs import write_json

CHECKPOINT_FILE = "checkpoint.pt"
DATA_POSITION_FILE = "data_position.json"
STATE_DICT_FILES = (CHECKPOINT_FILE, "model.safetensors", "model.pt", "state_dict.pt")
HF_CONFIG_FILE = "config.json"  # marks a `goldiclip export` directory
RUNS_DIR = "runs"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_MARKER = "tokenizer_config.json"  # in every saved tokenizer; uploaded last
# The parts of GoldiCLIP that scoring needs; the teacher, decoder and loss weights stay out.
SCORING_PREFIXES = ("vision.", "text.", "pooling.", "retrieval_loss.")
_CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+)")


# ---- where ------------------------------------------------------------------------------------


def runs_dir(root: str) -> str:
    """`<root>/runs`, absolute when local (Ray's storage_path must be)."""
    return join(local_path(root) or root, RUNS_DIR)


def tokenizer_dir(root: str) -> str:
    """`<root>/tokenizer`, absolute when local (Ray workers may start in another directory)."""
    return join(local_path(root) or root, TOKENIZER_DIR)


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def checkpoint_step(checkpoint_dir: str) -> int:
    """The step of a `checkpoint_<step>` directory, from its name (no need to read the file)."""
    return int(_CHECKPOINT_DIR.fullmatch(_basename(checkpoint_dir))[1])


def _basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."


def is_complete(checkpoint_dir: str) -> bool:
    """Both files there and the zip's central directory (written last) readable: a checkpoint
    being uploaded when its run was killed is skipped. Reads only the end of the file."""
    fs, path = open_fs(checkpoint_dir)
    if not (fs.exists(f"{path}/{CHECKPOINT_FILE}") and fs.exists(f"{path}/{MODEL_CONFIG_FILE}")):
        return False
    try:
        with fs.open(f"{path}/{CHECKPOINT_FILE}", "rb") as f, zipfile.ZipFile(f):
            return True
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete `checkpoint_<step>` directory of a run (by step), or None."""
    fs, path = open_fs(run_dir)
    if not fs.exists(path):
        return None
    names = [_basename(p) for p in fs.ls(path, detail=False)]
    for name in sorted((n for n in names if _CHECKPOINT_DIR.fullmatch(n)), key=checkpoint_step, reverse=True):
        if is_complete(join(run_dir, name)):
            return join(run_dir, name)
    return None


def newest_checkpoint(runs: str) -> str:
    """The most recently written checkpoint anywhere under `runs` (a directory with a model config)."""
    fs, path = open_fs(runs)
    configs = [p for p in fs.find(path) if _basename(p) == MODEL_CONFIG_FILE] if fs.exists(path) else []
    if not configs:
        raise ValueError(f"no checkpoint under {runs}; train first or set evaluate.checkpoint")
    newest = max(configs, key=lambda p: (fs.modified(p), p))
    return join(runs, posixpath.relpath(posixpath.dirname(newest), path))


def checkpoint_identity(url: str) -> list:
    """What decides a checkpoint's weights, without reading them: each file's name and its
    filesystem's checksum of its metadata (size and modification time, or the object's ETag)."""
    fs, path = open_fs(url)
    files = sorted(fs.find(path)) if fs.isdir(path) else [path]
    return [url, *([posixpath.relpath(p, path), fs.checksum(p)] for p in files)]


# ---- saving -----------------------------------------------------------------------------------


def save_checkpoint(directory: str, *, model: GoldiCLIP, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, step: int, data: dict,
                    tokenizer: str = "") -> str:
    """Write the three files of a checkpoint into `directory`; returns the `checkpoint.pt` URL.

    `checkpoint.pt` is written last: `is_complete` takes its presence as the end of the checkpoint.
    """
    model_json = json.dumps(dataclasses.asdict(model.config))
    data = json.loads(json.dumps(data))  # plain containers only, as weights_only=True reads
    write_json(join(directory, DATA_POSITION_FILE), data)
    with atomic_write(join(directory, MODEL_CONFIG_FILE)) as f:
        f.write(model_json.encode())
    path = join(directory, CHECKPOINT_FILE)
    with atomic_write(path) as f:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "step": step, "data": data,
                    "model_config": model_json, "tokenizer": tokenizer}, f)
    return path


def save_tokenizer(local_dir: str, url: str) -> None:
    """A tokenizer saved in `local_dir` (`save_pretrained`) copied to `url`, its marker last."""
    put_dir(local_dir, url, last=TOKENIZER_MARKER)


# ---- loading ----------------------------------------------------------------------------------


def _torch_load(url: str) -> dict:
    fs, path = open_fs(url)
    with fs.open(path, "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def load_checkpoint(url: str) -> dict:
    """The training state (see the module docstring) of a checkpoint directory or its `checkpoint.pt`."""
    fs, path = open_fs(url)
    file = join(url, CHECKPOINT_FILE) if fs.isdir(path) else url
    if not exists(file):
        raise ValueError(f"no {CHECKPOINT_FILE} at {url}")
    return _torch_load(file)


def read_data_position(checkpoint_dir: str) -> dict:
    return read_json(join(checkpoint_dir, DATA_POSITION_FILE)) or {}


def model_config_from_json(text: str | bytes) -> GoldiCLIPConfig:
    return replace_config(GoldiCLIPConfig(), **json.loads(text))


def read_model_config(directory: str) -> GoldiCLIPConfig:
    url = join(directory, MODEL_CONFIG_FILE)
    if not exists(url):
        raise ValueError(f"no {MODEL_CONFIG_FILE} in {directory}: it says which GoldiCLIP the weights belong to")
    return model_config_from_json(read_bytes(url))


def scoring_config(config: GoldiCLIPConfig) -> GoldiCLIPConfig:
    """Scoring needs neither the teacher nor the decoder: leave them out of memory."""
    return replace_config(config, distill={"enabled": False}, decoder={"enabled": False})


def _read_state_dict(url: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """The model weights of a state_dict file or `checkpoint.pt`, and the tokenizer the latter names."""
    if url.endswith(".safetensors"):
        from safetensors.torch import load

        state, tokenizer = load(read_bytes(url)), None
    else:
        state = _torch_load(url)
        tokenizer = state.get("tokenizer") if isinstance(state.get("model"), dict) else None
        state = state["model"] if isinstance(state.get("model"), dict) else state
    return {k.removeprefix("module."): v for k, v in state.items()}, tokenizer


def load_scoring_model(url: str) -> tuple[GoldiCLIP, str | None]:
    """GoldiCLIP's scoring parts from any checkpoint format above, and the tokenizer a training
    checkpoint names (None for the other formats)."""
    fs, path = open_fs(url)
    if not fs.exists(path):
        raise ValueError(f"checkpoint {url} does not exist")
    is_dir = fs.isdir(path)
    config = scoring_config(read_model_config(url if is_dir else _parent(url)))
    if is_dir and fs.exists(f"{path}/{HF_CONFIG_FILE}"):
        with local_copy(url) as local:
            return GoldiCLIP.from_pretrained_towers(local, config), None
    if is_dir:
        found = [join(url, name) for name in STATE_DICT_FILES if fs.exists(f"{path}/{name}")]
        if not found:
            raise ValueError(f"{url} holds none of {STATE_DICT_FILES} and is not a `goldiclip export` directory")
        url = found[0]
    model = GoldiCLIP(config)
    weights, tokenizer = _read_state_dict(url)
    missing, _ = model.load_state_dict({k: v for k, v in weights.items() if k.startswith(SCORING_PREFIXES)},
                                       strict=False)
    missing = [k for k in missing if k.startswith(SCORING_PREFIXES)]
    if missing:
        raise ValueError(f"{url} does not fit its {MODEL_CONFIG_FILE}: missing {missing[:5]}")
    return model, tokenizer


def _is_path(name: str) -> bool:
    """A directory or URL rather than a Hugging Face id (ids are relative and never hold `://`)."""
    return "://" in name or name.startswith(("/", "."))


def find_tokenizer(checkpoint: str, model_config: GoldiCLIPConfig, named: str | None = None) -> str:
    """The tokenizer a training checkpoint names (`named`), or one saved with the checkpoint (its
    directory or up to three parents, in place or as tokenizer/), or CLIP's for CLIP's vocabulary."""
    from model import DEFAULT_TOKENIZER

    if named and (not _is_path(named) or exists(join(named, TOKENIZER_MARKER))):
        return named
    fs, path = open_fs(checkpoint)
    directory = checkpoint if fs.isdir(path) else _parent(checkpoint)
    for _ in range(4):
        for candidate in (directory, join(directory, TOKENIZER_DIR)):
            if exists(join(candidate, TOKENIZER_MARKER)):
                return candidate
        directory = _parent(directory)
    if model_config.text.vocab_size == 49408:
        return DEFAULT_TOKENIZER
    raise ValueError(f"no tokenizer saved with {checkpoint} (looked for {TOKENIZER_MARKER} in it, "
                     "its parents and their tokenizer/ folders); set evaluate.tokenizer")


def open_tokenizer(name_or_url: str):
    """A Hugging Face id, a local directory, or a directory on any fsspec filesystem (fetched first)."""
    if "://" not in name_or_url:
        return load_tokenizer(name_or_url)
    with local_copy(name_or_url) as local:
        return load_tokenizer(local)

