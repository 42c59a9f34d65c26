"""GoldiCLIP configuration: one frozen dataclass per component, composed in `GoldiCLIPConfig`.

Values follow METHOD.md sections 1-6 (paper sec. 3 and 4.1); the `B/16` preset is the
paper's model, `debug` is a CPU-sized model of the same structure for tests and the demo.
Components take their whole config (`TextConditionedPooling(config.pooling, ...)`).
Unknown preset names and unknown override keys raise `ValueError`.
"""

import dataclasses
import math
from dataclasses import dataclass, field

# CLIP's pixel normalisation (open_clip OPENAI_DATASET_MEAN/STD), per RGB channel in [0, 1]:
# the default of every model, and what evaluation and the loader fall back to.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    """ViT tower (paper sec. 3.1): CLS after the final LayerNorm plus every patch token."""

    image_size: int = 224
    local_image_size: int = 96
    patch_size: int = 16
    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    activation: str = "gelu"
    # Pixel normalisation, (x - mean) / std per RGB channel in [0, 1]: part of the model, so
    # training and evaluation read the same values. CLIP's (the exported towers are CLIP
    # checkpoints); a set far from natural-image statistics may need its own (the demo's).
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD


@dataclass(frozen=True)
class TextConfig:
    """Causal CLIP text transformer (paper sec. 3.1 and 3.3); the sentence token is the first EOT."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    num_layers: int = 12
    num_heads: int = 8
    mlp_dim: int = 2048
    activation: str = "gelu"
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 49407


@dataclass(frozen=True)
class PoolingConfig:
    """Text-conditioned cross-attention pooling (FLAIR eq. 1, paper eq. 1)."""

    num_heads: int = 8
    attention_sink: bool = True


@dataclass(frozen=True)
class RetrievalConfig:
    """FLAIR sigmoid loss L_ret (paper eq. 2): learnable log-scale and bias."""

    init_log_scale: float = math.log(1 / 0.07)
    max_log_scale: float = math.log(100.0)
    init_bias: float = -10.0


@dataclass(frozen=True)
class DistillConfig:
    """Text-conditioned self-distillation L_sd (paper sec. 3.2, eqs. 3-8; DINO recipe)."""

    enabled: bool = True
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    num_prototypes: int = 65536
    shared_head: bool = False
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    teacher_temp_final: float = 0.04
    teacher_temp_warmup_steps: int = 0
    center_momentum: float = 0.9
    ema_momentum: float = 0.996
    ema_cosine_steps: int = 0  # > 0: cosine schedule of the EMA momentum to 1 over this many steps
    # DINO's freeze_last_layer (1 epoch): the prototype layers stay fixed for this many steps;
    # ~1 epoch of the 30M set at 6,400 images per step.
    freeze_last_layer_steps: int = 4700


@dataclass(frozen=True)
class DecoderConfig:
    """CoCa-style multi-task decoder (paper sec. 3.3): text enters through the text encoder."""

    enabled: bool = True
    width: int = 512
    num_layers: int = 8
    num_heads: int = 8
    mlp_dim: int = 2048
    tie_embeddings: bool = True
    token_chunk_size: int = 4096  # positions per chunk of the vocabulary cross-entropy


@dataclass(frozen=True)
class WeightingConfig:
    """Uncertainty weighting (Kendall et al. 2018, paper eq. 10); `uniform` is the ablation."""

    uniform: bool = False
    static_weights: dict[str, float] = field(
        default_factory=lambda: {"ret": 1.0, "cap": 2.0, "ref": 1.0, "grd": 1.0, "vqa": 1.0, "sd": 1.0}, hash=False
    )


@dataclass(frozen=True)
class MemoryConfig:
    """How the training step trades compute for memory; no option changes a loss or a gradient.

    checkpoint_*: activation checkpointing (torch.utils.checkpoint, non-reentrant) of every
    transformer block of the vision tower, of the text tower (captions and decoder inputs) and
    of the decoder: a block keeps only its input and is recomputed in the backward pass.
    pooling_chunk_size: images per chunk of the training-time text-conditioned pooling. Each
    image is pooled with N = K + B_global - 1 texts (METHOD.md sec. 3), in L_ret and in every
    distillation view, so its (views x N x D) outputs grow with the global batch; a chunk is
    pooled and reduced (to its logits, or to its caption mean) under checkpointing, so only one
    chunk's exist, in forward and in backward.
    head_chunk_size: images per chunk of the 65,536-prototype logits of the DINO heads (the
    student's cross-entropy under checkpointing, the teacher's probabilities).
    None: all images at once, nothing recomputed.
    """

    checkpoint_vision: bool = False
    checkpoint_text: bool = False
    checkpoint_decoder: bool = False
    pooling_chunk_size: int | None = None
    head_chunk_size: int | None = None


@dataclass(frozen=True)
class GoldiCLIPConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 512
    pooling: PoolingConfig = field(default_factory=PoolingConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    score_image_chunk_size: int = 256  # images per chunk in text-conditioned scoring

    def __post_init__(self):
        for size in (self.vision.image_size, self.vision.local_image_size):
            if size % self.vision.patch_size:
                raise ValueError(f"image size {size} is not a multiple of the patch size {self.vision.patch_size}")
        if self.embed_dim % self.pooling.num_heads or self.decoder.width % self.decoder.num_heads:
            raise ValueError("embed_dim and decoder width must be multiples of their numbers of heads")


PRESETS: dict[str, GoldiCLIPConfig] = {
    "B/16": GoldiCLIPConfig(),
    "debug": GoldiCLIPConfig(
        vision=VisionConfig(
            image_size=32, local_image_size=16, patch_size=8, width=64, num_layers=2, num_heads=4, mlp_dim=128
        ),
        text=TextConfig(
            vocab_size=512,
            context_length=32,
            width=64,
            num_layers=2,
            num_heads=4,
            mlp_dim=128,
            bos_token_id=510,
            eos_token_id=511,
            pad_token_id=0,
        ),
        embed_dim=64,
        pooling=PoolingConfig(num_heads=4),
        distill=DistillConfig(head_hidden_dim=128, head_bottleneck_dim=32, num_prototypes=256,
                              freeze_last_layer_steps=50),
        decoder=DecoderConfig(width=64, num_layers=2, num_heads=4, mlp_dim=128, token_chunk_size=64),
        score_image_chunk_size=8,
    ),
}


def replace_config(config, **overrides):
    """`dataclasses.replace` that also takes dicts for nested component configs.

    `replace_config(cfg, distill={"enabled": False}, embed_dim=32)`; unknown keys raise ValueError.
    """
    names = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown {type(config).__name__} field(s) {unknown}; valid: {sorted(names)}")
    changes = {}
    for name, value in overrides.items():
        current = getattr(config, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = replace_config(current, **value)
        changes[name] = value
    return dataclasses.replace(config, **changes)


def get_preset(name: str, **overrides) -> GoldiCLIPConfig:
    """A named preset with optional overrides (`get_preset("debug", decoder={"enabled": False})`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choices: {sorted(PRESETS)}")
    return replace_config(PRESETS[name], **overrides)


def config_for_tokenizer(config: GoldiCLIPConfig, tokenizer) -> GoldiCLIPConfig:
    """Copy of `config` whose text vocabulary and special token ids match `tokenizer`."""
    return replace_config(
        config,
        text={
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
    )
