"""The evaluate stage: zero-shot retrieval and classification of a checkpoint (METHOD.md sec. 9).

Retrieval modes (FLAIR protocol):
- conditioned: every (text, image) pair scored with cos(pool(t, V_loc), t), tiled over
  chunks of images x chunks of texts on the device (it is O(images x texts));
- agnostic: cos(v_g, t), one matrix product;
- rerank (two-stage): the agnostic top-k per query re-scored with conditioned scores, so
  only about k x (texts + images) pairs go through the pooling.
Classification: class names through the templates, the mean of the normalised template
embeddings per class, scored text-agnostically; top-1 / top-5.

Results go to ``<root>/eval/metrics.json`` with flat names that say what they are
(``coco/conditioned/t2i_R@1``) and the chance level of each (``coco/chance/t2i_R@1``).
The model sits behind a small `Scorer` interface, so the metrics are testable with a
hand-made scorer.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from storage import DatasetLayout, join, read_json, write_json
from tasks.config import EvalDatasetConfig, EvaluateConfig, PipelineConfig, fingerprint
from tasks.devices import resolve_device, resolve_dtype
from tasks.evaluate.data import CLIP_MEAN, CLIP_STD, ClassificationSet, RetrievalSet, load_image, read_eval_set
from tasks.evaluate.metrics import (
    chance_recalls,
    classification_accuracy,
    i2t_ranks,
    recall_at,
    reranked,
    retrieval_recalls,
    t2i_ranks,
    top_k_masks,
)

CHECKPOINT_FILE = "checkpoint.pt"  # what the train stage writes (tasks/train/loop.py)
MODEL_FILES = (CHECKPOINT_FILE, "model.safetensors", "model.pt", "state_dict.pt")
MODEL_CONFIG_FILE = "goldiclip_config.json"
HF_CONFIG_FILE = "config.json"
# The parts of GoldiCLIP that scoring needs; the teacher, decoder and loss weights stay out.
SCORING_PREFIXES = ("vision.", "text.", "pooling.", "retrieval_loss.")


@dataclass
class ImageFeatures:
    global_: torch.Tensor  # (I, D) v_g
    patches: torch.Tensor  # (I, P, D) V_loc

    def __getitem__(self, index) -> ImageFeatures:
        return ImageFeatures(self.global_[index], self.patches[index])

    def __len__(self) -> int:
        return self.global_.shape[0]


class Scorer(Protocol):
    image_size: int
    device: torch.device

    def encode_images(self, pixels: torch.Tensor) -> ImageFeatures: ...

    def encode_texts(self, texts: list[str]) -> torch.Tensor: ...

    def score(self, texts: torch.Tensor, images: ImageFeatures, mode: str) -> torch.Tensor:
        """(num_texts, num_images) cosine similarities, mode conditioned or agnostic."""

    def score_pairs(self, texts: torch.Tensor, images: ImageFeatures) -> torch.Tensor:
        """(M,) conditioned similarity of text m with image m."""


class GoldiCLIPScorer:
    """A GoldiCLIP and its tokenizer behind the `Scorer` interface, autocast on the device."""

    def __init__(self, model, tokenizer, *, device: torch.device, dtype: torch.dtype,
                 attention_sink: bool | None = None):
        from model import tokenize

        self.model = model.to(device).eval()
        self.tokenizer, self._tokenize = tokenizer, tokenize
        self.device, self.dtype, self.attention_sink = device, dtype, attention_sink
        self.image_size = model.config.vision.image_size
        self.image_mean, self.image_std = tuple(model.config.vision.image_mean), tuple(model.config.vision.image_std)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> ImageFeatures:
        with self._autocast():
            image_global, patches = self.model.encode_image(pixels.to(self.device, non_blocking=True))
        return ImageFeatures(image_global, patches)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        ids = self._tokenize(self.tokenizer, texts, self.model.config.text.context_length)
        with self._autocast():
            return self.model.encode_text(ids.to(self.device))

    @torch.no_grad()
    def score(self, texts: torch.Tensor, images: ImageFeatures, mode: str) -> torch.Tensor:
        with self._autocast():
            sims = self.model.score_features(texts, images.global_, images.patches, mode=mode,
                                             attention_sink=self.attention_sink)
        return sims.float()

    @torch.no_grad()
    def score_pairs(self, texts: torch.Tensor, images: ImageFeatures) -> torch.Tensor:
        # As `GoldiCLIP.score_features`, for one image per text: the pooling reads t_g as in
        # training, the cosine uses it normalised.
        with self._autocast():
            pooled = self.model.pooling(texts[:, None], images.patches, self.attention_sink)[:, 0]  # (M, D)
        return (F.normalize(pooled.float(), dim=-1) * F.normalize(texts.float(), dim=-1)).sum(-1)  # (M,)


# ---- checkpoints ------------------------------------------------------------------------------


def _model_config(directory: Path):
    from model import GoldiCLIPConfig, replace_config

    path = directory / MODEL_CONFIG_FILE
    if not path.exists():
        raise ValueError(f"no {MODEL_CONFIG_FILE} in {directory}: it says which GoldiCLIP the weights belong to")
    config = replace_config(GoldiCLIPConfig(), **json.loads(path.read_text()))
    # Scoring needs neither the teacher nor the decoder: leave them out of memory.
    return replace_config(config, distill={"enabled": False}, decoder={"enabled": False})


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Weights only: a checkpoint file is data, never code."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_checkpoint(path: str | Path):
    """A GoldiCLIP (scoring parts) from a state_dict file, a directory holding one, or an export."""
    from model import GoldiCLIP

    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    directory = path if path.is_dir() else path.parent
    config = _model_config(directory)
    if path.is_dir() and (path / HF_CONFIG_FILE).exists():
        return GoldiCLIP.from_pretrained_towers(path, config)
    if path.is_dir():
        found = [path / name for name in MODEL_FILES if (path / name).exists()]
        if not found:
            raise ValueError(f"{path} holds none of {MODEL_FILES} and is not a `goldiclip export` directory")
        path = found[0]
    model = GoldiCLIP(config)
    state = {k: v for k, v in _read_state_dict(path).items() if k.startswith(SCORING_PREFIXES)}
    missing, _ = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.startswith(SCORING_PREFIXES)]
    if missing:
        raise ValueError(f"{path} does not fit its {MODEL_CONFIG_FILE}: missing {missing[:5]}")
    return model


def latest_checkpoint(runs_dir: str | Path) -> Path:
    """The most recently written checkpoint under ``runs_dir`` (a directory with a model config)."""
    runs_dir = Path(runs_dir)
    candidates = [p.parent for p in runs_dir.rglob(MODEL_CONFIG_FILE)] if runs_dir.exists() else []
    if not candidates:
        raise ValueError(f"no checkpoint under {runs_dir}; train first or set evaluate.checkpoint")
    return max(candidates, key=lambda p: (p.stat().st_mtime, str(p)))


def resolve_checkpoint(config: PipelineConfig) -> Path:
    """evaluate.checkpoint; else the latest checkpoint of the configured train run (the run the
    train stage would resume: same train config, same shards); else the newest under runs/."""
    from tasks.train.loop import latest_checkpoint_on_storage, run_name, runs_dir
    from tasks.train.data import train_shard_urls

    if config.evaluate.checkpoint:
        return Path(config.evaluate.checkpoint)
    shard_urls = train_shard_urls(DatasetLayout(config.dataset.root).train_dir)
    if shard_urls and (found := latest_checkpoint_on_storage(join(runs_dir(config.dataset.root),
                                                                  run_name(config, shard_urls)))):
        return Path(found)
    return latest_checkpoint(runs_dir(config.dataset.root))


def find_tokenizer(checkpoint: Path, model_config) -> str:
    """The tokenizer a training checkpoint names, or one saved with the checkpoint (its directory
    or a parent, in place or as tokenizer/)."""
    from model import DEFAULT_TOKENIZER

    start = checkpoint if checkpoint.is_dir() else checkpoint.parent
    if (start / CHECKPOINT_FILE).exists():
        named = torch.load(start / CHECKPOINT_FILE, map_location="cpu", weights_only=True).get("tokenizer")
        if named and (not Path(named).is_absolute() or Path(named).exists()):
            return named
    for directory in [start, *start.parents][:4]:
        for candidate in (directory, directory / "tokenizer"):
            if (candidate / "tokenizer_config.json").exists():
                return str(candidate)
    if model_config.text.vocab_size == 49408:
        return DEFAULT_TOKENIZER
    raise ValueError(f"no tokenizer saved with {checkpoint} (looked for tokenizer_config.json in it, "
                     "its parents and their tokenizer/ folders); set evaluate.tokenizer")


def build_scorer(config: EvaluateConfig, checkpoint: Path) -> GoldiCLIPScorer:
    from model import load_tokenizer

    model = load_checkpoint(checkpoint)
    tokenizer = load_tokenizer(config.tokenizer or find_tokenizer(checkpoint, model.config))
    text = model.config.text
    if len(tokenizer) > text.vocab_size or tokenizer.eos_token_id != text.eos_token_id:
        raise ValueError(f"tokenizer (vocabulary {len(tokenizer)}, EOS id {tokenizer.eos_token_id}) does not match "
                         f"the model (vocabulary {text.vocab_size}, EOS id {text.eos_token_id})")
    device = resolve_device(config.device)
    return GoldiCLIPScorer(model, tokenizer, device=device, dtype=resolve_dtype(config.dtype, device),
                           attention_sink=config.attention_sink)


# ---- encoding ---------------------------------------------------------------------------------


def encode_image_set(scorer: Scorer, paths: list[str], *, batch_size: int, threads: int,
                     resize_mode: str = "center_crop") -> tuple[ImageFeatures, list[int], Counter]:
    """Features of the readable images, their indices into `paths`, and failures by reason.

    Decoding runs on `threads` threads one batch ahead of the model.
    """
    failures, kept, parts = Counter(), [], []
    batches = [range(s, min(s + batch_size, len(paths))) for s in range(0, len(paths), batch_size)]

    # The model's own pixel normalisation (training used it); CLIP's for scorers that name none.
    mean, std = getattr(scorer, "image_mean", CLIP_MEAN), getattr(scorer, "image_std", CLIP_STD)

    def decode(batch):
        return [(i, load_image(paths[i], scorer.image_size, mean, std, resize_mode)) for i in batch]

    with ThreadPoolExecutor(threads) as pool:
        for decoded in pool.map(decode, batches):
            good = [(i, pixels) for i, pixels in decoded if isinstance(pixels, torch.Tensor)]
            failures.update(reason for _, reason in decoded if isinstance(reason, str))
            if good:
                kept += [i for i, _ in good]
                parts.append(scorer.encode_images(torch.stack([p for _, p in good])))
    if not parts:
        raise ValueError(f"none of the {len(paths)} images could be read ({dict(failures)})")
    return ImageFeatures(torch.cat([p.global_ for p in parts]), torch.cat([p.patches for p in parts])), kept, failures


def encode_text_set(scorer: Scorer, texts: list[str], *, batch_size: int) -> torch.Tensor:
    return torch.cat([scorer.encode_texts(texts[s:s + batch_size]) for s in range(0, len(texts), batch_size)])


def conditioned_matrix(scorer: Scorer, texts: torch.Tensor, images: ImageFeatures, *, image_chunk: int,
                       text_chunk: int) -> torch.Tensor:
    """(N, I) text-conditioned similarities, one (text chunk x image chunk) tile at a time."""
    sims = torch.empty(texts.shape[0], len(images), device=texts.device)
    for i0 in range(0, len(images), image_chunk):
        tile_images = images[i0:i0 + image_chunk]
        for t0 in range(0, texts.shape[0], text_chunk):
            sims[t0:t0 + text_chunk, i0:i0 + image_chunk] = scorer.score(texts[t0:t0 + text_chunk], tile_images,
                                                                        "conditioned")
    return sims


def pair_scores(scorer: Scorer, texts: torch.Tensor, images: ImageFeatures, pairs: torch.Tensor, *,
                chunk: int) -> torch.Tensor:
    """(M,) conditioned similarities of the (text, image) index pairs (M, 2)."""
    out = [scorer.score_pairs(texts[p[:, 0]], images[p[:, 1]]) for p in pairs.split(chunk)]
    return torch.cat(out) if out else texts.new_zeros(0)


# ---- evaluation -------------------------------------------------------------------------------


def encode_readable_images(scorer: Scorer, data, config: EvaluateConfig):
    """(features of the readable images, the set narrowed to them, every failure so far) of a dataset."""
    images, kept, failures = encode_image_set(scorer, data.image_paths, batch_size=config.image_batch_size,
                                              threads=config.loader_threads, resize_mode=config.resize_mode)
    data = data.select_images(kept)
    return images, data, failures + data.failures


def evaluate_retrieval(scorer: Scorer, data: RetrievalSet, config: EvaluateConfig
                       ) -> tuple[dict[str, float], dict[str, int], Counter]:
    """Metrics (named ``<set>/<mode>/<direction>_R@k``), counts and failures of one retrieval set."""
    images, data, failures = encode_readable_images(scorer, data, config)
    texts = encode_text_set(scorer, data.texts, batch_size=config.text_batch_size)
    text_image = torch.tensor(data.text_image, device=texts.device)

    metrics = {f"{data.name}/chance/{k}": v for k, v in chance_recalls(text_image, len(images)).items()}
    agnostic = scorer.score(texts, images, "agnostic")  # (N, I)
    if "agnostic" in config.modes:
        metrics |= {f"{data.name}/agnostic/{k}": v for k, v in retrieval_recalls(agnostic, text_image).items()}
    if "conditioned" in config.modes:
        conditioned = conditioned_matrix(scorer, texts, images, image_chunk=config.score_image_chunk,
                                         text_chunk=config.score_text_chunk)
        metrics |= {f"{data.name}/conditioned/{k}": v for k, v in retrieval_recalls(conditioned, text_image).items()}
    if "rerank" in config.modes:
        metrics |= {f"{data.name}/rerank_top{config.rerank_top_k}/{k}": v for k, v in
                    rerank_recalls(scorer, texts, images, agnostic, text_image, config).items()}
    counts = {f"{data.name}/images": len(images), f"{data.name}/texts": len(data.texts)}
    return metrics, counts, failures


def rerank_recalls(scorer: Scorer, texts: torch.Tensor, images: ImageFeatures, agnostic: torch.Tensor,
                   text_image: torch.Tensor, config: EvaluateConfig) -> dict[str, float]:
    """Two-stage retrieval: each query's agnostic top-k re-ranked by conditioned scores."""
    t2i_candidates, i2t_candidates = top_k_masks(agnostic, config.rerank_top_k)
    pairs = (t2i_candidates | i2t_candidates).nonzero()  # (M, 2) text, image
    conditioned = torch.full_like(agnostic, float("nan"))
    conditioned[pairs[:, 0], pairs[:, 1]] = pair_scores(scorer, texts, images, pairs, chunk=config.score_text_chunk)
    t2i = recall_at(t2i_ranks(reranked(agnostic, t2i_candidates, conditioned), text_image))
    i2t = recall_at(i2t_ranks(reranked(agnostic, i2t_candidates, conditioned), text_image))
    return {**{f"t2i_R@{k}": v for k, v in t2i.items()}, **{f"i2t_R@{k}": v for k, v in i2t.items()}}


def evaluate_classification(scorer: Scorer, data: ClassificationSet, config: EvaluateConfig
                            ) -> tuple[dict[str, float], dict[str, int], Counter]:
    images, data, failures = encode_readable_images(scorer, data, config)
    prompts = [t.format(name) for name in data.class_names for t in data.templates]
    embeddings = F.normalize(encode_text_set(scorer, prompts, batch_size=config.text_batch_size).float(), dim=-1)
    classes = embeddings.view(len(data.class_names), len(data.templates), -1).mean(1)  # (C, D)
    logits = scorer.score(classes, images, "agnostic").T  # (I, C)
    labels = torch.tensor(data.labels, device=logits.device)
    metrics = {f"{data.name}/agnostic/{k}": v for k, v in classification_accuracy(logits, labels).items()}
    num_classes = len(data.class_names)
    metrics |= {f"{data.name}/chance/top{k}": min(k, num_classes) / num_classes for k in (1, 5)}
    return metrics, {f"{data.name}/images": len(images), f"{data.name}/classes": num_classes}, failures


def evaluate_set(scorer: Scorer, data: RetrievalSet | ClassificationSet, config: EvaluateConfig):
    if isinstance(data, ClassificationSet):
        return evaluate_classification(scorer, data, config)
    return evaluate_retrieval(scorer, data, config)


# ---- the stage ----------------------------------------------------------------------------------


def metrics_path(config: PipelineConfig) -> str:
    return join(config.dataset.root, "eval", "metrics.json")


def checkpoint_identity(checkpoint: Path) -> list:
    """What decides the checkpoint's weights: its files' names, sizes and modification times."""
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file()) if checkpoint.is_dir() else [checkpoint]
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def evaluation_fingerprint(config: PipelineConfig, checkpoint: Path) -> str:
    return fingerprint("evaluate", config.evaluate.fingerprint_payload(), checkpoint_identity(checkpoint))


def previous_result(config: PipelineConfig, checkpoint: Path) -> dict | None:
    """The metrics.json of an identical earlier run (same config and checkpoint files), if any."""
    previous = read_json(metrics_path(config))
    if previous and previous.get("fingerprint") == evaluation_fingerprint(config, checkpoint):
        return previous
    return None


def write_result(config: PipelineConfig, checkpoint: Path, metrics: dict[str, float], counts: dict[str, int],
                 failures: Counter, seconds: float) -> dict:
    result = {"checkpoint": str(checkpoint), "fingerprint": evaluation_fingerprint(config, checkpoint),
              "metrics": {name: round(value, 6) for name, value in metrics.items()}, "counts": counts, "failures": dict(failures), "seconds": round(seconds, 3)}
    write_json(metrics_path(config), result)
    return result


def evaluate_one_set(scorer: Scorer, dataset: EvalDatasetConfig, config: EvaluateConfig):
    return evaluate_set(scorer, read_eval_set(dataset), config)


def run_evaluation(config: PipelineConfig, *, force: bool = False, evaluate_one=evaluate_one_set) -> dict:
    """Evaluate every configured set; returns what it wrote to metrics.json.

    An identical earlier run (same config and checkpoint files) is returned, marked
    ``skipped``, unless `force`. `evaluate_one(scorer, dataset, config)` lets the flow run
    each set as a Prefect task.
    """
    checkpoint = resolve_checkpoint(config)
    if not force and (previous := previous_result(config, checkpoint)):
        return previous | {"skipped": True}
    start = time.perf_counter()
    scorer = build_scorer(config.evaluate, checkpoint)
    metrics, counts, failures = {}, {}, Counter()
    for dataset in config.evaluate.datasets:
        set_metrics, set_counts, set_failures = evaluate_one(scorer, dataset, config.evaluate)
        metrics |= set_metrics
        counts |= set_counts
        failures.update({f"{dataset.name}/{k}": v for k, v in set_failures.items()})
    return write_result(config, checkpoint, metrics, counts, failures, time.perf_counter() - start)


def stage_summary(result: dict, datasets: list[str]) -> dict:
    """The shape every stage flow returns (what the CLI prints), plus the metrics."""
    skipped = result.get("skipped", False)
    return {"counts": result["counts"], "failures": result["failures"], "num_shards_done": len(datasets),
            "last_run": {"processed": [] if skipped else datasets, "skipped": datasets if skipped else []},
            "seconds": result["seconds"], "checkpoint": result["checkpoint"], "metrics": result["metrics"]}


def describe_retrieval(metrics: dict[str, float], k: int = 1) -> list[str]:
    """One line per (set, mode, direction): R@k against chance, e.g. for the demo's output."""
    lines = []
    for name, value in metrics.items():
        set_name, mode, metric = name.split("/")
        if mode == "chance" or not metric.endswith(f"_R@{k}"):
            continue
        chance = metrics[f"{set_name}/chance/{metric}"]
        lines.append(f"{set_name} {mode} {metric.split('_')[0].upper()} R@{k} = {value:.3f} "
                     f"(chance {chance:.3f}, {value / chance:.1f}x chance)")
    return lines

