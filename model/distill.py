"""Text-conditioned self-distillation L_sd (paper sec. 3.2, eqs. 3-8; METHOD.md sec. 4; DINO).

- `EMATeacher`: a frozen deep copy of the student's modules, moved after each optimiser step
  by p_t <- m p_t + (1 - m) p_s (m = 0.996, optionally cosine-scheduled to 1).
- `DINOHead` (eq. 3): 3-layer MLP (GELU) -> bottleneck -> L2-normalise -> weight-normalised
  linear to the prototypes, the norm of each prototype fixed at 1 (DINO's frozen weight_g).
- `DistillationLoss` (eqs. 4-8) per branch (text-agnostic TA, text-conditioned TC):
  P_t = softmax((z_t - c) / tau_t) on the G global views, log P_s = log_softmax(z_s / tau_s)
  on all V = G + L views, L = mean over images and pairs (g, v != g) of CE(P_t(g), P_s(v));
  centers c <- 0.9 c + 0.1 mean(z_t), all-reduced.
- `distillation_health`: per branch, the teacher's mean entropy as a fraction of ln P, the entropy
  of its batch-mean distribution (how evenly the batch uses the prototypes), KL(P_t || P_s) and
  the center's norm; uniform collapse shows as entropy -> 1 (L_sd -> ln P, KL -> 0), one-prototype
  collapse as both entropies -> 0; healthy is a low entropy with a high batch entropy.
- `DINOHead.prototypes` is DINO's `last_layer`: `GoldiCLIP.drop_frozen_gradients` leaves it
  untouched for the first `freeze_last_layer_steps` steps (DINO's `freeze_last_layer`).

The prototype layer is the big one (65,536 outputs for every view): with
`MemoryConfig.head_chunk_size` set, the student's cross-entropy runs in chunks of images under
activation checkpointing (only one chunk's (c, V, P) logits exist at a time, in forward and in
backward) and the teacher's probabilities are computed chunk by chunk.
"""

import copy
import math
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import DistillConfig
from .memory import in_image_chunks
from .retrieval import world_info


class EMATeacher(nn.Module):
    """Deep copy of `student`, never trained; `update(student, momentum)` applies the EMA rule."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(student).requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: torch.Tensor | float) -> None:
        teacher_params = list(self.model.parameters())
        student_params = list(student.parameters())
        assert len(teacher_params) == len(student_params)
        # p_t + (1 - m)(p_s - p_t) = m p_t + (1 - m) p_s. foreach ops take a tensor factor only in
        # mul (lerp would call .item() on it), which keeps a device-side schedule free of host syncs.
        step = torch._foreach_sub([p.detach() for p in student_params], teacher_params)
        torch._foreach_mul_(step, torch.as_tensor(1 - momentum, device=teacher_params[0].device))
        torch._foreach_add_(teacher_params, step)


class DINOHead(nn.Module):
    def __init__(self, config: DistillConfig, in_dim: int):
        super().__init__()
        hidden, bottleneck = config.head_hidden_dim, config.head_bottleneck_dim
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, bottleneck)
        )
        self.prototypes = nn.Parameter(torch.empty(config.num_prototypes, bottleneck))
        # DINO initialises only the MLP with trunc_normal(0.02); its last layer keeps nn.Linear's init,
        # uniform in +-1/sqrt(bottleneck). Only the direction of a prototype enters the logits, but
        # AdamW moves each entry by ~lr whatever its size, so the raw norm sets how fast prototypes
        # turn: 0.02-std rows would turn 1/(0.02 sqrt(3 bottleneck)) times faster (5x in the debug head).
        nn.init.kaiming_uniform_(self.prototypes, a=math.sqrt(5))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """features (..., D) -> unit bottleneck vectors (..., bottleneck)."""
        return F.normalize(self.mlp(features), dim=-1)

    def prototype_weight(self) -> torch.Tensor:
        """(P, bottleneck): weight norm with g fixed at 1 is a row-wise L2 normalisation."""
        return F.normalize(self.prototypes, dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (..., D) -> prototype logits (..., P); the losses take `embed` and `prototype_weight`."""
        return self.embed(features) @ self.prototype_weight().T


def _cross_entropy(student_embed: torch.Tensor, teacher_probs: torch.Tensor, *, weight: torch.Tensor,
                   student_temp: float) -> torch.Tensor:
    """Per image, the sum over (g, v != g) pairs of -P_t(g) . log P_s(v).

    student_embed (c, V, E), teacher_probs (c, G, P), weight (P, E) -> (c,); the G global views
    are the first G of the V student views.
    """
    num_global = teacher_probs.shape[1]
    log_probs = F.log_softmax((student_embed @ weight.T).float() / student_temp, dim=-1)  # (c, V, P)
    # Student view v is paired with every teacher global view except itself: the summed teacher
    # distributions minus v's own when v is a global view.
    targets = teacher_probs.sum(1, keepdim=True) - F.pad(teacher_probs, (0, 0, 0, log_probs.shape[1] - num_global))
    return -(targets * log_probs).sum(dim=(1, 2))  # (c, V, P) -> (c,)


class DistillationLoss(nn.Module):
    """Centers, temperatures and the cross-entropy of one distillation branch; `chunk_size`
    images at a time (`MemoryConfig.head_chunk_size`, None: all at once)."""

    def __init__(self, config: DistillConfig, chunk_size: int | None = None):
        super().__init__()
        self.config = config
        self.chunk_size = chunk_size
        self.register_buffer("center", torch.zeros(1, config.num_prototypes))

    def teacher_temp(self, step: torch.Tensor) -> torch.Tensor:
        config = self.config
        progress = (step / max(config.teacher_temp_warmup_steps, 1)).clamp(max=1.0)
        return config.teacher_temp + (config.teacher_temp_final - config.teacher_temp) * progress

    @torch.no_grad()
    def teacher_probs(self, *, teacher_embed: torch.Tensor, weight: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """teacher_embed (B, G, E) unit vectors, weight (P, E) -> centred, sharpened probabilities
        (B, G, P); then moves the center to the batch's mean logits."""
        num_images, num_global = teacher_embed.shape[:2]
        temp, chunk = self.teacher_temp(step), self.chunk_size or num_images
        probs, logit_sum = [], 0.0
        for start in range(0, num_images, chunk):
            logits = (teacher_embed[start:start + chunk] @ weight.T).float()  # (c, G, P)
            probs.append(F.softmax((logits - self.center) / temp, dim=-1))
            logit_sum = logit_sum + logits.sum(dim=(0, 1))
        batch_center = logit_sum[None] / (num_images * num_global)  # (1, P)
        if world_info()[1] > 1:
            dist.all_reduce(batch_center)
            batch_center /= world_info()[1]
        self.center.lerp_(batch_center, 1 - self.config.center_momentum)
        return torch.cat(probs)

    def forward(self, *, student_embed: torch.Tensor, weight: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        """student_embed (B, V, E) unit vectors, weight (P, E), teacher_probs (B, G, P) -> scalar."""
        num_images, num_views = student_embed.shape[:2]
        num_pairs = teacher_probs.shape[1] * (num_views - 1)
        per_image = in_image_chunks(partial(_cross_entropy, weight=weight, student_temp=self.config.student_temp),
                                    self.chunk_size, student_embed, teacher_probs)  # (B,)
        return per_image.sum() / (num_images * num_pairs)


@torch.no_grad()
def distillation_health(*, teacher_probs: torch.Tensor, loss: torch.Tensor, center: torch.Tensor
                        ) -> dict[str, torch.Tensor]:
    """Collapse diagnostics of one branch (METHOD.md sec. 4), detached scalars.

    teacher_probs (B, G, P), loss: the branch's L_sd (mean CE over the (g, v != g) pairs), center (1, P).
    Every teacher view meets the same number of student views, so the mean KL over pairs is the
    mean CE minus the teacher's mean entropy.
    """
    log_prototypes = math.log(teacher_probs.shape[-1])
    entropy = -torch.special.xlogy(teacher_probs, teacher_probs).sum(-1).mean()
    batch_probs = teacher_probs.flatten(0, 1).mean(0)  # (P,)
    batch_entropy = -torch.special.xlogy(batch_probs, batch_probs).sum()
    return {"teacher_entropy_frac": entropy / log_prototypes, "teacher_batch_entropy_frac": batch_entropy / log_prototypes,
            "kl": loss.detach() - entropy, "center_norm": center.norm()}


def ema_momentum(config: DistillConfig, step: torch.Tensor) -> torch.Tensor:
    """m at `step`: constant, or cosine from `ema_momentum` to 1 over `ema_cosine_steps`."""
    if config.ema_cosine_steps <= 0:
        return torch.full_like(step, config.ema_momentum, dtype=torch.float32)
    progress = (step.float() / config.ema_cosine_steps).clamp(max=1.0)
    return 1 - (1 - config.ema_momentum) * (torch.cos(math.pi * progress) + 1) / 2
