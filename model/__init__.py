"""GoldiCLIP in PyTorch (arXiv 2603.24804): one file per paper component.

config.py     presets and component configs          towers.py     encoders (sec. 3.1)
pooling.py    text-conditioned pooling (eq. 1)       retrieval.py  L_ret (eq. 2)
distill.py    L_sd, EMA teacher (sec. 3.2)           decoder.py    decoder, NLL (sec. 3.3, eq. 9)
tasks.py      decoder prompts and batches            weighting.py  uncertainty weighting (eq. 10)
tokenizer.py  tokenizers and box text                goldiclip.py  the composed model
memory.py     memory options of the training step (chunks, block checkpointing)
"""

from .config import (
    PRESETS,
    DecoderConfig,
    DistillConfig,
    GoldiCLIPConfig,
    MemoryConfig,
    PoolingConfig,
    RetrievalConfig,
    TextConfig,
    VisionConfig,
    WeightingConfig,
    config_for_tokenizer,
    get_preset,
    replace_config,
)
from .decoder import IGNORE_INDEX, MultiTaskDecoder, token_nll
from .distill import DINOHead, DistillationLoss, EMATeacher, ema_momentum
from .goldiclip import GoldiCLIP
from .memory import in_image_chunks
from .pooling import TextConditionedPooling
from .retrieval import SigmoidRetrievalLoss, gather_with_grad, sample_caption_index
from .tasks import TASKS, build_decoder_batch, task_prompt_and_target
from .tokenizer import (
    DEFAULT_TOKENIZER,
    build_local_tokenizer,
    dequantize_box,
    format_box,
    load_tokenizer,
    parse_box,
    quantize_box,
    tokenize,
)
from .towers import TextTower, VisionTower, export_hf_clip, load_hf_clip_towers
from .weighting import LOSS_NAMES, UncertaintyWeighting

__all__ = [
    "DEFAULT_TOKENIZER", "IGNORE_INDEX", "LOSS_NAMES", "PRESETS", "TASKS",
    "DINOHead", "DecoderConfig", "DistillConfig", "DistillationLoss", "EMATeacher", "GoldiCLIP", "GoldiCLIPConfig",
    "MemoryConfig", "MultiTaskDecoder", "PoolingConfig", "RetrievalConfig", "SigmoidRetrievalLoss", "TextConditionedPooling",
    "TextConfig", "TextTower", "UncertaintyWeighting", "VisionConfig", "VisionTower", "WeightingConfig",
    "build_decoder_batch", "build_local_tokenizer", "config_for_tokenizer", "dequantize_box", "ema_momentum",
    "export_hf_clip", "format_box", "gather_with_grad", "get_preset", "in_image_chunks", "load_hf_clip_towers",
    "load_tokenizer",
    "parse_box", "quantize_box", "replace_config", "sample_caption_index", "task_prompt_and_target", "token_nll",
    "tokenize",
]
