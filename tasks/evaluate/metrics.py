"""Recall@k from a similarity matrix, the two-stage re-rank, and chance levels (METHOD.md sec. 9).

Every function takes `sims` (num_texts, num_images), as `GoldiCLIP.score` returns it, and
`text_image` (num_texts,), the image each text describes (several texts may share one).

- T2I: a text's rank is the number of *other* images scoring at least as high as its own.
- I2T: FLAIR's rule, an image's rank is the best rank among its captions: the number of
  texts that are not its captions scoring at least as high as its best caption.
Ties count against the model ("at least as high"), so a constant scorer gets chance-level
recall instead of a perfect one.
"""

from __future__ import annotations

import math

import torch

RECALL_AT = (1, 5, 10)
# Cosine similarities lie in [-1, 1]; adding this puts every re-ranked candidate above the rest.
_CANDIDATE_OFFSET = 4.0


def t2i_ranks(sims: torch.Tensor, text_image: torch.Tensor, *, row_chunk: int = 4096) -> torch.Tensor:
    """(num_texts,) 0-based rank of each text's image among all images."""
    ranks = []
    for start in range(0, sims.shape[0], row_chunk):
        rows = sims[start:start + row_chunk]  # (n, I)
        own = rows.gather(1, text_image[start:start + row_chunk, None])  # (n, 1)
        ranks.append((rows >= own).sum(1) - 1)  # the own image always counts itself once
    return torch.cat(ranks)


def i2t_ranks(sims: torch.Tensor, text_image: torch.Tensor, *, col_chunk: int = 1024) -> torch.Tensor:
    """(num_images,) 0-based best rank among each image's captions; images without any get num_texts."""
    num_texts, num_images = sims.shape
    ranks = []
    for start in range(0, num_images, col_chunk):
        cols = sims[:, start:start + col_chunk].T  # (c, N)
        images = torch.arange(start, start + cols.shape[0], device=sims.device)  # (c,)
        is_caption = text_image[None, :] == images[:, None]  # (c, N)
        best = cols.masked_fill(~is_caption, -math.inf).max(1, keepdim=True).values  # (c, 1)
        rank = ((cols >= best) & ~is_caption).sum(1)  # (c,)
        ranks.append(torch.where(is_caption.any(1), rank, torch.full_like(rank, num_texts)))
    return torch.cat(ranks)


def recall_at(ranks: torch.Tensor, ks=RECALL_AT) -> dict[int, float]:
    return {k: (ranks < k).float().mean().item() for k in ks}


def retrieval_recalls(sims: torch.Tensor, text_image: torch.Tensor, ks=RECALL_AT) -> dict[str, float]:
    """{"t2i_R@1": ..., "i2t_R@1": ..., ...} for one similarity matrix."""
    t2i = recall_at(t2i_ranks(sims, text_image), ks)
    i2t = recall_at(i2t_ranks(sims, text_image), ks)
    return {**{f"t2i_R@{k}": v for k, v in t2i.items()}, **{f"i2t_R@{k}": v for k, v in i2t.items()}}


def chance_recalls(text_image: torch.Tensor, num_images: int, ks=RECALL_AT) -> dict[str, float]:
    """Expected recall of a random ordering.

    T2I: k / num_images. I2T: for an image with c of the N texts, 1 - C(N - c, k) / C(N, k),
    the chance that a random top k holds one of its captions, averaged over images.
    """
    num_texts = len(text_image)
    per_image = torch.bincount(text_image.cpu(), minlength=num_images).tolist()
    out = {f"t2i_R@{k}": min(k, num_images) / num_images for k in ks}
    for k in ks:
        k_texts = min(k, num_texts)
        misses = [math.comb(num_texts - c, k_texts) / math.comb(num_texts, k_texts) for c in per_image]
        out[f"i2t_R@{k}"] = sum(1.0 - m for m in misses) / num_images
    return out


def top_k_masks(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (num_texts, num_images) masks: each text's top-k images, each image's top-k texts."""
    num_texts, num_images = sims.shape
    t2i = torch.zeros_like(sims, dtype=torch.bool)
    t2i.scatter_(1, sims.topk(min(k, num_images), dim=1).indices, True)
    i2t = torch.zeros_like(sims, dtype=torch.bool)
    i2t.scatter_(0, sims.topk(min(k, num_texts), dim=0).indices, True)
    return t2i, i2t


def reranked(first_stage: torch.Tensor, candidates: torch.Tensor, second_stage: torch.Tensor) -> torch.Tensor:
    """Candidates first, ordered by `second_stage`; everything else after, by `first_stage`.

    second_stage only needs to be valid where `candidates` is True (NaN elsewhere is fine).
    """
    return torch.where(candidates, second_stage + _CANDIDATE_OFFSET, first_stage)


def classification_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Top-k accuracy of (num_images, num_classes) scores (k capped at the number of classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (I, kmax)
    hit = top == labels[:, None]  # (I, kmax)
    return {f"top{k}": hit[:, :k].any(1).float().mean().item() for k in ks}
