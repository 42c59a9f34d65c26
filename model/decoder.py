"""Multi-task decoder (paper sec. 3.3, eq. 9; METHOD.md sec. 5; CoCa, LocCa).

Text enters through the causal text encoder (CoCa style): the encoder's per-token outputs
of `prompt + target` are the decoder's input sequence. Each pre-LN layer is causal
self-attention, cross-attention to the projected visual tokens, and an MLP. The output head
is tied to the text token embedding; the loss is next-token NLL on target tokens only.

The vocabulary head is the decoder's big tensor (M x S positions x 49,408 words), so
`token_nll` computes logits in chunks of positions under activation checkpointing.
`checkpoint_layers` (`MemoryConfig.checkpoint_decoder`) recomputes each layer in the backward pass.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import DecoderConfig

IGNORE_INDEX = -100


class Attention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(width, width)
        self.key_value = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor, causal: bool) -> torch.Tensor:
        """x (M, S, W) attends to context (M, C, W) -> (M, S, W)."""
        q = self.query(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (M, h, S, d)
        k, v = self.key_value(context).unflatten(-1, (2, self.num_heads, -1)).permute(2, 0, 3, 1, 4)  # (M, h, C, d)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (M, h, S, d)
        return self.out(y.transpose(1, 2).flatten(2))  # (M, S, W)


class DecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.norm_self = nn.LayerNorm(config.width)
        self.self_attention = Attention(config.width, config.num_heads)
        self.norm_cross = nn.LayerNorm(config.width)
        self.cross_attention = Attention(config.width, config.num_heads)
        self.norm_mlp = nn.LayerNorm(config.width)
        self.mlp = nn.Sequential(nn.Linear(config.width, config.mlp_dim), nn.GELU(), nn.Linear(config.mlp_dim, config.width))

    def forward(self, x: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        h = self.norm_self(x)
        x = x + self.self_attention(h, h, causal=True)
        x = x + self.cross_attention(self.norm_cross(x), visual, causal=False)
        return x + self.mlp(self.norm_mlp(x))


class MultiTaskDecoder(nn.Module):
    """Decoder over text-encoder token states; `forward` returns hidden states in text width."""

    def __init__(self, config: DecoderConfig, text_width: int, visual_dim: int, vocab_size: int,
                 checkpoint_layers: bool = False):
        super().__init__()
        self.config = config
        self.checkpoint_layers = checkpoint_layers
        self.input_proj = nn.Identity() if text_width == config.width else nn.Linear(text_width, config.width)
        self.visual_proj = nn.Identity() if visual_dim == config.width else nn.Linear(visual_dim, config.width)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.width)
        self.output_proj = nn.Identity() if text_width == config.width else nn.Linear(config.width, text_width)
        self.untied_head = None if config.tie_embeddings else nn.Linear(text_width, vocab_size, bias=False)

    def forward(self, text_tokens: torch.Tensor, visual_tokens: torch.Tensor) -> torch.Tensor:
        """text_tokens (M, S, W_text), visual_tokens (M, C, D) -> (M, S, W_text)."""
        x = self.input_proj(text_tokens)  # (M, S, W)
        visual = self.visual_proj(visual_tokens)  # (M, C, W)
        recompute = self.checkpoint_layers and torch.is_grad_enabled()
        for layer in self.layers:
            x = checkpoint(layer, x, visual, use_reentrant=False) if recompute else layer(x, visual)
        return self.output_proj(self.norm(x))

    def head_weight(self, token_embedding: nn.Embedding) -> torch.Tensor:
        """(V, W_text): the text token embedding when tied (paper choice), else an own head."""
        return token_embedding.weight if self.untied_head is None else self.untied_head.weight


def _chunk_nll(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.T).float()  # (n, V)
    return F.cross_entropy(logits, labels.clamp(min=0), reduction="none") * (labels != IGNORE_INDEX)  # (n,)


def token_nll(*, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Per-position next-token NLL (M, S), zero where labels == IGNORE_INDEX.

    hidden (M, S, W): decoder output at each position; labels (M, S): the token each position
    predicts. Only `chunk_size` positions' logits exist at a time.
    """
    flat_hidden, flat_labels = hidden.flatten(0, 1), labels.flatten()  # (M*S, W), (M*S,)
    losses = [
        checkpoint(_chunk_nll, flat_hidden[start:start + chunk_size], weight, flat_labels[start:start + chunk_size],
                   use_reentrant=False)
        for start in range(0, flat_labels.shape[0], chunk_size)
    ]
    return torch.cat(losses).view_as(labels)
