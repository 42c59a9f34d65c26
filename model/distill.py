"""Text-conditioned self-distillation L_sd (paper sec. 3.2, eqs. 3-8; METHOD.md sec. 4; DINO).

- `EMATeacher`: a frozen deep copy of the student's modules, moved after each optimiser step
  by p_t <- m p_t + (1 - m) p_s (m = 0.996, optionally cosine-scheduled to 1).
- `DINOHead` (eq. 3): 3-layer MLP (GELU) -> bottleneck -> L2-normalise -> weight-normalised
  linear to the prototypes, the norm of each prototype fixed at 1 (DINO's frozen weight_g).
- `DistillationLoss` (eqs. 4-8) per branch (text-agnostic TA, text-conditioned TC):
  P_t = softmax((z_t - c) / tau_t) on the G global views, log P_s = log_softmax(z_s / tau_s)
  on all V = G + L views, L = mean over images and pairs (g, v != g) of CE(P_t(g), P_s(v));
  centers c <- 0.9 c + 0.1 mean(z_t), all-reduced.

The prototype layer is the big one (65,536 outputs for every view), so the student's
cross-entropy runs in chunks of images under activation checkpointing: only one chunk's
(c, V, P) logits exist at a time, in forward and in backward.
"""

import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import DistillConfig
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
        nn.init.trunc_normal_(self.prototypes, std=0.02)
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
        """features (..., D) -> prototype logits (..., P). Prefer the chunked loss for students."""
        return self.embed(features) @ self.prototype_weight().T


def _chunk_cross_entropy(student_embed: torch.Tensor, weight: torch.Tensor, teacher_probs: torch.Tensor,
                         student_temp: float) -> torch.Tensor:
    """Sum over images and (g, v != g) pairs of -P_t(g) . log P_s(v) for one chunk of images.

    student_embed (c, V, E), weight (P, E), teacher_probs (c, G, P); the G global views are
    the first G of the V student views.
    """
    num_global = teacher_probs.shape[1]
    log_probs = F.log_softmax((student_embed @ weight.T).float() / student_temp, dim=-1)  # (c, V, P)
    # Student view v is paired with every teacher global view except itself: the summed teacher
    # distributions minus v's own when v is a global view.
    targets = teacher_probs.sum(1, keepdim=True) - F.pad(teacher_probs, (0, 0, 0, log_probs.shape[1] - num_global))
    return -(targets * log_probs).sum()  # (c, V, P) -> ()


class DistillationLoss(nn.Module):
    """Centers, temperatures and the cross-entropy of one distillation branch."""

    def __init__(self, config: DistillConfig):
        super().__init__()
        self.config = config
        self.register_buffer("center", torch.zeros(1, config.num_prototypes))

    def teacher_temp(self, step: torch.Tensor) -> torch.Tensor:
        config = self.config
        progress = (step / max(config.teacher_temp_warmup_steps, 1)).clamp(max=1.0)
        return config.teacher_temp + (config.teacher_temp_final - config.teacher_temp) * progress

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """teacher_logits (B, G, P) -> centred, sharpened probabilities; then updates the center."""
        teacher_logits = teacher_logits.float()
        probs = F.softmax((teacher_logits - self.center) / self.teacher_temp(step), dim=-1)  # (B, G, P)
        batch_center = teacher_logits.mean(dim=(0, 1))[None]  # (1, P)
        if world_info()[1] > 1:
            dist.all_reduce(batch_center)
            batch_center /= world_info()[1]
        self.center.lerp_(batch_center, 1 - self.config.center_momentum)
        return probs

    def forward(self, *, student_embed: torch.Tensor, weight: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        """student_embed (B, V, E) unit vectors, weight (P, E), teacher_probs (B, G, P) -> scalar."""
        num_images, num_views = student_embed.shape[:2]
        num_global = teacher_probs.shape[1]
        chunk = self.config.image_chunk_size
        total = student_embed.new_zeros((), dtype=torch.float32)
        for start in range(0, num_images, chunk):
            total = total + checkpoint(
                _chunk_cross_entropy,
                student_embed[start:start + chunk],
                weight,
                teacher_probs[start:start + chunk],
                self.config.student_temp,
                use_reentrant=False,
            )
        num_pairs = num_global * (num_views - 1)
        return total / (num_images * num_pairs)


def ema_momentum(config: DistillConfig, step: torch.Tensor) -> torch.Tensor:
    """m at `step`: constant, or cosine from `ema_momentum` to 1 over `ema_cosine_steps`."""
    if config.ema_cosine_steps <= 0:
        return torch.full_like(step, config.ema_momentum, dtype=torch.float32)
    progress = (step.float() / config.ema_cosine_steps).clamp(max=1.0)
    return 1 - (1 - config.ema_momentum) * (torch.cos(math.pi * progress) + 1) / 2
