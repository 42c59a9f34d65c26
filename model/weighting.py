"""Uncertainty weighting of the six losses (Kendall et al. 2018; paper eq. 10; METHOD.md sec. 6).

    L = sum_i w_i * (0.5 * exp(-s_i) * L_i + 0.5 * s_i),   s_i = log sigma_i^2 learned, init 0

with static w_i = 1 except w_cap = 2. The static weight multiplies the whole term: at the
optimum of s_i, exp(s_i) = L_i and the effective weight is w_i / (2 L_i), so w_cap = 2 keeps
the caption loss at twice the weight for good. Inside the exponential term alone
(0.5 exp(-s_i) w_i L_i + 0.5 s_i) it would cancel once s_i settles: exp(s_i) = w_i L_i and an
effective weight 1 / (2 L_i) whatever w_i.

A task absent from a batch (no VQA pairs, decoder off) contributes no term at all: leave it out
of `losses`, or pass `present[name]` = False (a tensor, so the step needs no host sync).
`uniform=True` is the paper's ablation: L = sum_i L_i.
"""

import torch
from torch import nn

from .config import WeightingConfig

LOSS_NAMES = ("ret", "cap", "ref", "grd", "vqa", "sd")


class UncertaintyWeighting(nn.Module):
    def __init__(self, config: WeightingConfig, names: tuple[str, ...] = LOSS_NAMES):
        super().__init__()
        unknown = sorted(set(config.static_weights) - set(LOSS_NAMES))
        if unknown:
            raise ValueError(f"static_weights for unknown losses {unknown}; valid: {LOSS_NAMES}")
        self.uniform = config.uniform
        self.static_weights = {name: config.static_weights.get(name, 1.0) for name in names}
        # Only the losses the model computes get an s_i, so DDP never sees an unused parameter.
        self.log_vars = nn.ParameterDict({name: nn.Parameter(torch.zeros(())) for name in names})

    def forward(self, losses: dict[str, torch.Tensor],
                present: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and, for logging, every loss, log-variance s_i and effective weight."""
        present = present or {}
        total = torch.zeros((), device=next(iter(losses.values())).device)
        metrics = {}
        for name, loss in losses.items():
            s = self.log_vars[name]
            if self.uniform:
                weight, regulariser = torch.ones_like(s), torch.zeros_like(s)
            else:
                static = self.static_weights[name]
                weight, regulariser = static * 0.5 * torch.exp(-s), static * 0.5 * s
            term = weight * loss + regulariser
            if name in present:
                term = torch.where(present[name], term, torch.zeros_like(term))
            total = total + term
            metrics[f"loss/{name}"] = loss.detach()
            metrics[f"log_var/{name}"] = s.detach()
            metrics[f"weight/{name}"] = weight.detach()
        metrics["loss/total"] = total.detach()
        return total, metrics
