"""Memory options of the training step (`MemoryConfig`): nothing here changes a loss or a gradient.

- `in_image_chunks`: a computation over a batch of images, `chunk_size` images at a time under
  activation checkpointing; for the text-conditioned pooling (METHOD.md sec. 2-4: every image is
  pooled with K + B_global - 1 texts, in L_ret and in each distillation view) and the DINO heads'
  65,536-prototype logits (sec. 4).
- `checkpoint_blocks`: activation checkpointing of every transformer block of a tower.
"""

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel


def in_image_chunks(fn: Callable[..., torch.Tensor], chunk_size: int | None, *per_image: torch.Tensor) -> torch.Tensor:
    """`fn(*per_image)` computed `chunk_size` images at a time, outputs concatenated along dim 0.

    Each tensor holds a whole number of rows per image, grouped by image (caption index rows
    (B, N), view tokens (B*V, P, D)); the first holds one row per image. With gradients on, each
    chunk runs under activation checkpointing (non-reentrant), so only one chunk's intermediates
    exist at a time, in forward and, recomputed, in backward; `fn` must be pure. None: one call.
    """
    if chunk_size is None:
        return fn(*per_image)
    run = (lambda *chunk: checkpoint(fn, *chunk, use_reentrant=False)) if torch.is_grad_enabled() else fn
    num_images = per_image[0].shape[0]
    outputs = []
    for start in range(0, num_images, chunk_size):
        stop = min(start + chunk_size, num_images)
        outputs.append(run(*(t[start * len(t) // num_images:stop * len(t) // num_images] for t in per_image)))
    return torch.cat(outputs)


def checkpoint_blocks(model: PreTrainedModel) -> None:
    """Activation checkpointing (non-reentrant) of every encoder layer of a transformers model.

    transformers 5.2x renamed `gradient_checkpointing_enable` to `activation_checkpointing_enable`
    (5.17, the GPU image's, has only the old name); both take the checkpoint kwargs first.
    """
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
