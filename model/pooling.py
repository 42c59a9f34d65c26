"""Text-conditioned pooling (FLAIR eq. 1; paper eq. 1; METHOD.md sec. 2).

    v_tc = MHA(q = LN_q(t_g), k = LN_k(V_loc), v = LN_v(V_loc))

with no residual and no MLP. The optional attention sink appends one zero vector to the
keys and values after their projections (`nn.MultiheadAttention(add_zero_attn=True)`): a
text can then attend to "nothing" instead of being forced onto some patch. It is on during
training and left out for zero-shot segmentation (paper sec. 4.6).

In training every image is pooled with N = K + B - 1 texts of the global batch (METHOD.md
sec. 3), so `project_texts` runs LN_q and the query projection once over the B*K texts (both
act row by row, so projecting then picking rows equals picking then projecting), `attend`
takes the picked rows, and `memory.in_image_chunks` bounds the (images x N x D) intermediates.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .config import PoolingConfig


class TextConditionedPooling(nn.Module):
    def __init__(self, config: PoolingConfig, embed_dim: int):
        super().__init__()
        self.num_heads = config.num_heads
        self.attention_sink = config.attention_sink
        self.norm_query = nn.LayerNorm(embed_dim)
        self.norm_key = nn.LayerNorm(embed_dim)
        self.norm_value = nn.LayerNorm(embed_dim)
        self.query_proj = nn.Linear(embed_dim, embed_dim)
        self.key_proj = nn.Linear(embed_dim, embed_dim)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(-3, -2)  # (..., L, D) -> (..., h, L, D/h)

    def project_texts(self, texts: torch.Tensor) -> torch.Tensor:
        """texts (..., D) -> queries (..., D): LN_q then the query projection."""
        return self.query_proj(self.norm_query(texts))

    def forward(self, texts: torch.Tensor, tokens: torch.Tensor, attention_sink: bool | None = None) -> torch.Tensor:
        """Pool each image's tokens once per text.

        texts (N, D) shared by all images, or (B, N, D) one list per image; tokens (B, P, D), or
        (B*V, P, D) for V views per image grouped by image (rows b*V .. b*V+V-1 are image b's).
        Returns (rows of tokens, N, D): image (view) b pooled with text n (of its own list).
        """
        return self.attend(self.project_texts(texts), tokens, attention_sink)

    def attend(self, queries: torch.Tensor, tokens: torch.Tensor, attention_sink: bool | None = None) -> torch.Tensor:
        """`forward` on texts already through `project_texts`: queries (N, D) or (B, N, D)."""
        sink = self.attention_sink if attention_sink is None else attention_sink
        query = self._heads(queries)  # (B?, h, N, d)
        key = self.key_proj(self.norm_key(tokens))  # (B, P, D)
        value = self.value_proj(self.norm_value(tokens))  # (B, P, D)
        if sink:
            zeros = key.new_zeros(key.shape[0], 1, key.shape[2])
            key = torch.cat([key, zeros], dim=1)  # (B, P+1, D)
            value = torch.cat([value, zeros], dim=1)  # (B, P+1, D)
        if query.dim() == 3:
            query = query.unsqueeze(0).expand(key.shape[0], -1, -1, -1)  # (B, h, N, d) without a copy
        elif query.shape[0] != key.shape[0]:
            query = query.repeat_interleave(key.shape[0] // query.shape[0], dim=0)  # (B*V, h, N, d)
        pooled = F.scaled_dot_product_attention(query, self._heads(key), self._heads(value))  # (B, h, N, d)
        return self.out_proj(pooled.transpose(1, 2).flatten(2))  # (B, N, D)

