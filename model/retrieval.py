"""FLAIR's sigmoid retrieval loss L_ret (paper eq. 2; METHOD.md sec. 3).

    logit(x, t) = s * cos(x, t) + b,  s = exp(log_scale), log_scale kept in [0, ln 100]
    L_tc = -sum_{i, c in S_i} log sigmoid(y_ic logit(v_tc[i, c], t_c)) / (B + K - 1)
    L_ta = -sum_{i, j}        log sigmoid(y_ij logit(v_g[i], t_j))      / (B * K)
    L_ret = (L_tc + L_ta) / 2

S_i (negative downsampling) is image i's own K captions plus one random caption of every other
image; y = +1 for i's own captions, -1 otherwise. B, and the B*K texts, are those of the global
batch. Across processes the text features are all-gathered with gradient (`gather_with_grad`)
and each process scores its own images against every text, so texts of other ranks enter as
negative-only terms. Each process returns world_size x its share of the global sums, so the
mean over processes (what DDP's gradient averaging optimises) is exactly the single-process
loss on the concatenated batch.

The log-scale is clamped to [0, ln 100] as a parameter after each optimiser step
(`clamp_parameters`, as FLAIR's and open_clip's train loops do), never in the forward: a clamp
in the forward has zero gradient past the bound, so a log-scale that stepped past it could
never come back.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import RetrievalConfig


def world_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums every rank's gradient of our slice.

    The backward uses all_reduce (which every backend has, gloo included) rather than
    reduce_scatter.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        rank, world_size = world_info()
        ctx.rank, ctx.size = rank, local.shape[0]
        parts = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size]


def gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """(n, ...) on each rank -> (world * n, ...) in rank order; identity outside distributed runs."""
    if world_info()[1] == 1:
        return local
    return _GatherWithGrad.apply(local)


@torch.no_grad()
def gather_no_grad(local: torch.Tensor) -> torch.Tensor:
    if world_info()[1] == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world_info()[1])]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)


def sample_caption_index(*, num_images: int, num_captions: int, first_image: int = 0, num_rows: int | None = None,
                         device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
    """The downsampled caption sets S_i: (rows, K + B - 1) flat caption indices.

    B = num_images of the global batch; caption k of image j sits at j * K + k. Row r is image
    i = first_image + r: its own K captions first, then one random caption of each other
    image, in image order. A process asks only for the rows of its own images.
    """
    B, K = num_images, num_captions
    rows = B - first_image if num_rows is None else num_rows
    image = torch.arange(first_image, first_image + rows, device=device)  # (rows,)
    own = image[:, None] * K + torch.arange(K, device=device)  # (rows, K)
    others = torch.arange(B - 1, device=device).expand(rows, B - 1)  # (rows, B-1)
    others = others + (others >= image[:, None]).long()  # skip image i itself
    offsets = torch.randint(0, K, (rows, B - 1), device=device, generator=generator)  # (rows, B-1)
    return torch.cat([own, others * K + offsets], dim=1)  # (rows, K + B - 1)


def pooled_cosine(pooled: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """cos(v_tc, t) row by row: pooled (..., N, D) from texts (..., N, D) -> (..., N)."""
    return (F.normalize(pooled, dim=-1) * F.normalize(texts, dim=-1)).sum(-1)


def sigmoid_pair_loss(*, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-sum log sigmoid(y * logit) over all pairs (unnormalised)."""
    return -F.logsigmoid(labels * logits).sum()


class SigmoidRetrievalLoss(nn.Module):
    """L_ret with its learnable log-scale and bias (FLAIR, paper eq. 2)."""

    def __init__(self, config: RetrievalConfig):
        super().__init__()
        self.max_log_scale = config.max_log_scale
        self.log_scale = nn.Parameter(torch.tensor(config.init_log_scale))
        self.bias = nn.Parameter(torch.tensor(config.init_bias))

    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    @torch.no_grad()
    def clamp_parameters(self) -> None:
        """Log-scale back into [0, ln 100]; call after each optimiser step."""
        self.log_scale.clamp_(0.0, self.max_log_scale)

    def forward(self, *, image_global: torch.Tensor, conditioned_cosine: torch.Tensor, texts: torch.Tensor,
                caption_index: torch.Tensor, num_captions: int, image_offset: int = 0,
                world_size: int = 1) -> dict[str, torch.Tensor]:
        """Both terms for this process's images against all texts.

        image_global (b, D): v_g of the local images; conditioned_cosine (b, N): cos(v_tc[i, c], t_c)
        for local image i pooled with each of its texts c = caption_index[i] (N = K + B - 1), as
        `pooled_cosine` computes it; texts (B*K, D): all texts of the global batch;
        caption_index (b, N) as from `sample_caption_index` (rows of the local images);
        image_offset: global index of the first local image.
        """
        num_local, num_texts = image_global.shape[0], texts.shape[0]
        num_images = num_texts // num_captions
        scale, bias = self.scale(), self.bias
        texts = F.normalize(texts, dim=-1)  # (B*K, D)
        image_global = F.normalize(image_global, dim=-1)  # (b, D)

        owner = torch.arange(num_texts, device=texts.device) // num_captions  # (B*K,) image of each text
        local_images = torch.arange(num_local, device=texts.device) + image_offset  # (b,)

        agnostic_logits = scale * image_global @ texts.T + bias  # (b, B*K)
        agnostic_labels = 2.0 * (owner[None, :] == local_images[:, None]) - 1.0  # (b, B*K)
        agnostic = sigmoid_pair_loss(logits=agnostic_logits, labels=agnostic_labels) / num_texts

        conditioned_logits = scale * conditioned_cosine + bias  # (b, N)
        conditioned_labels = 2.0 * (owner[caption_index] == local_images[:, None]) - 1.0  # (b, N)
        conditioned = sigmoid_pair_loss(logits=conditioned_logits, labels=conditioned_labels)
        conditioned = conditioned / (num_images + num_captions - 1)

        return {
            "ret": world_size * (conditioned + agnostic) / 2,
            "ret_tc": world_size * conditioned,
            "ret_ta": world_size * agnostic,
        }
