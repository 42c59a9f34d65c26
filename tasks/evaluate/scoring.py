"""Scoring texts against images with GoldiCLIP (METHOD.md sec. 9, FLAIR protocol).

- agnostic: cos(v_g, t), one matrix product;
- conditioned: every (text, image) pair scored with cos(pool(t, V_loc), t), tiled over chunks of
  images x chunks of texts on the device (it is O(images x texts));
- rerank (two-stage): the agnostic top-k per query re-scored with conditioned scores, so only
  about k x (texts + images) pairs go through the pooling.

The model sits behind a small `Scorer` interface, so the metrics are testable with a hand-made
scorer; images and texts are encoded in batches, image decoding one batch ahead on threads.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from tasks.config import EvaluateConfig
from tasks.devices import resolve_device, resolve_dtype
from tasks.evaluate.data import CLIP_MEAN, CLIP_STD, load_image
from tasks.evaluate.metrics import i2t_ranks, recall_at, reranked, t2i_ranks, top_k_masks
from tasks.train.checkpoint import find_tokenizer, load_scoring_model, open_tokenizer


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

    def patch_embeddings(self, images: ImageFeatures) -> torch.Tensor:
        """(I, P, D) each patch in the text space, for zero-shot segmentation (tasks/evaluate/sets/segmentation.py)."""


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


    @torch.no_grad()
    def patch_embeddings(self, images: ImageFeatures) -> torch.Tensor:
        """Each patch pooled alone by the text-conditioned pooling without the attention sink (FLAIR's
        `visualize_patchwise_sim`, paper sec. 4.6): one key takes all the attention whatever the text,
        so the pooled patch is out_proj(W_v LN_v(p)) for every text. (I, P, D)."""
        pooling = self.model.pooling
        with self._autocast():
            return pooling.out_proj(pooling.value_proj(pooling.norm_value(images.patches))).float()


def build_scorer(config: EvaluateConfig, checkpoint: str) -> GoldiCLIPScorer:
    """The checkpoint's scoring parts and its tokenizer (tasks/train/checkpoint.py) on the configured device."""
    model, named_tokenizer = load_scoring_model(checkpoint)
    tokenizer = open_tokenizer(config.tokenizer or find_tokenizer(checkpoint, model.config, named_tokenizer))
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


# ---- scores -----------------------------------------------------------------------------------


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
