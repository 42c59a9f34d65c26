"""Device and dtype choice for the model stages, vendor-neutral (DESIGN.md, GPUs).

``torch.cuda`` is also how PyTorch's ROCm build exposes AMD GPUs, so "auto" picks
``cuda`` on NVIDIA and AMD alike and the CPU otherwise; nothing names a vendor.
"""

from __future__ import annotations

import torch


def resolve_device(spec: str) -> torch.device:
    if spec != "auto":
        return torch.device(spec)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on an accelerator, float32 on the CPU (bf16 matmuls are slow there)."""
    if spec == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return getattr(torch, spec)
