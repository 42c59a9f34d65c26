"""Vision and text encoders (paper sec. 3.1; METHOD.md sec. 1), built from transformers' CLIP classes.

The vision tower is a ViT whose post-LayerNorm is applied to every token, then one shared
bias-free projection maps the global token `v_g` and every patch token (`V_loc`) to the
embedding space, as in FLAIR. The text tower is CLIP's causal transformer; its sentence
embedding is the first EOT token's output, projected. Attribute names match `CLIPModel`
(`vision_model`, `visual_projection`, `text_model`, `text_projection`) so the trained towers
export to a standard Hugging Face CLIP checkpoint (`export_hf_clip`). `checkpoint_layers`
(`MemoryConfig.checkpoint_vision` / `checkpoint_text`) recomputes each transformer block in the
backward pass instead of keeping its activations.
"""

from pathlib import Path

import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

from .config import GoldiCLIPConfig, TextConfig, VisionConfig
from .memory import checkpoint_blocks


def hf_vision_config(config: VisionConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=config.width,
        intermediate_size=config.mlp_dim,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        hidden_act=config.activation,
        attn_implementation="sdpa",
    )


def hf_text_config(config: TextConfig, projection_dim: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.width,
        intermediate_size=config.mlp_dim,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        max_position_embeddings=config.context_length,
        hidden_act=config.activation,
        projection_dim=projection_dim,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        attn_implementation="sdpa",
    )


class VisionTower(nn.Module):
    def __init__(self, config: VisionConfig, embed_dim: int, checkpoint_layers: bool = False):
        super().__init__()
        self.image_size = config.image_size
        self.vision_model = CLIPVisionModel(hf_vision_config(config))
        if checkpoint_layers:
            checkpoint_blocks(self.vision_model)
        self.visual_projection = nn.Linear(config.width, embed_dim, bias=False)
        # The model's pixel statistics on the 0-255 scale, for uint8 input (not saved: they come from the config).
        self.register_buffer("pixel_mean", 255 * torch.tensor(config.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", 255 * torch.tensor(config.image_std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (0-255) -> (x - mean) / std with the config's statistics; float input is taken as normalised.

        The training loader ships uint8 views: a quarter of the bytes through pinned memory and
        the host-to-device copy, and the normalisation runs here, on the device, fused by compile.
        """
        if pixels.dtype != torch.uint8:
            return pixels
        return (pixels.float() - self.pixel_mean) / self.pixel_std

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels (B, 3, H, W) uint8 or normalised float, any H = W multiple of the patch size -> v_g (B, D), V_loc (B, P, D)."""
        pixels = self.normalize(pixels)
        resized = pixels.shape[-1] != self.image_size
        hidden = self.vision_model(pixel_values=pixels, interpolate_pos_encoding=resized).last_hidden_state
        tokens = self.visual_projection(self.vision_model.post_layernorm(hidden))  # (B, 1+P, W) -> (B, 1+P, D)
        return tokens[:, 0], tokens[:, 1:]


class TextTower(nn.Module):
    def __init__(self, config: TextConfig, embed_dim: int, checkpoint_layers: bool = False):
        super().__init__()
        self.eos_token_id = config.eos_token_id
        self.text_model = CLIPTextModel(hf_text_config(config, embed_dim))
        if checkpoint_layers:
            checkpoint_blocks(self.text_model)
        self.text_projection = nn.Linear(config.width, embed_dim, bias=False)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.text_model.embeddings.token_embedding

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids (N, T), right-padded, each holding an EOT -> t_g (N, D), token states (N, T, W).

        No attention mask is passed: attention is causal, so padding after a token never
        reaches it, and SDPA keeps its mask-free causal kernel.
        """
        hidden = self.text_model(input_ids=input_ids).last_hidden_state  # (N, T, W), final LayerNorm applied
        eot_index = (input_ids == self.eos_token_id).int().argmax(dim=-1)  # first EOT; pad may equal EOT
        sentence = hidden[torch.arange(hidden.shape[0], device=hidden.device), eot_index]  # (N, W)
        return self.text_projection(sentence), hidden


def hf_clip_config(config: GoldiCLIPConfig) -> CLIPConfig:
    return CLIPConfig(
        text_config=hf_text_config(config.text, config.embed_dim).to_dict(),
        vision_config=hf_vision_config(config.vision).to_dict(),
        projection_dim=config.embed_dim,
    )


def export_hf_clip(vision: VisionTower, text: TextTower, log_scale: torch.Tensor, config: GoldiCLIPConfig,
                   out_dir: str | Path) -> CLIPModel:
    """Write the towers as a standard `CLIPModel` checkpoint (`CLIPModel.from_pretrained(out_dir)`)."""
    clip = CLIPModel(hf_clip_config(config))
    state = {**vision.state_dict(), **text.state_dict(), "logit_scale": log_scale.detach().reshape(())}
    clip.load_state_dict(state, strict=True)
    clip.save_pretrained(out_dir)
    return clip


def load_hf_clip_towers(name_or_path: str | Path, vision: VisionTower, text: TextTower) -> torch.Tensor:
    """Copy a Hugging Face CLIP checkpoint (hub id or local dir) into the towers, in place, and
    return its log logit scale.

    The towers' shapes must match the checkpoint; build them from a config whose widths,
    depths and vocabulary follow it (the `B/16` preset matches openai/clip-vit-base-patch16).
    """
    state = CLIPModel.from_pretrained(str(name_or_path)).state_dict()
    vision.load_state_dict({k: v for k, v in state.items() if k.split(".")[0] in ("vision_model", "visual_projection")})
    text.load_state_dict({k: v for k, v in state.items() if k.split(".")[0] in ("text_model", "text_projection")})
    return state["logit_scale"]
