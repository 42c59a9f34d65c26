"""`goldiclip export CHECKPOINT OUT_DIR`: ship the student (METHOD.md sec. 8) in a form the
Hugging Face tools run.

Writes the student's vision and text towers as a Hugging Face CLIP checkpoint
(`transformers.CLIPModel.from_pretrained(OUT_DIR)` loads it), the image processor config
(`preprocessor_config.json`: CLIP's resize-shortest-edge + centre-crop to the model's image size,
bicubic, and the model's own pixel mean/std) and the tokenizer the checkpoint was trained with, so
`transformers.pipeline("zero-shot-image-classification", model=OUT_DIR)` and
`CLIPProcessor.from_pretrained(OUT_DIR)` work and score text-agnostically (the CLS embedding, as
`GoldiCLIP.score(..., mode="agnostic")`). Beside them: the text-conditioned pooling block and logit
bias, and the GoldiCLIP config as JSON; teacher, decoder and loss weights stay behind
(`GoldiCLIP.export_pretrained`). `load_exported(OUT_DIR)` gives back a GoldiCLIP whose
`score(..., mode="conditioned")` is the paper's text-conditioned scorer.

The image processor is written as `CLIPImageProcessor` (the name every transformers version
knows); transformers 5 loads it with its PIL backend (`CLIPImageProcessorPil`) where torchvision
is absent, as here. Its pixels equal the evaluation's (`tasks.evaluate.data.preprocess_image`)
where the two centre crops agree (tests/tasks/evaluate/test_export.py). Both paths may be local or
any fsspec URL (the export is written locally, then copied).
"""

from __future__ import annotations

from transformers import CLIPImageProcessorPil
from transformers.image_utils import PILImageResampling

from model import GoldiCLIP
from model.config import VisionConfig
from storage.fs import staged_dir
from tasks.train.checkpoint import (
    find_tokenizer,
    load_checkpoint,
    load_scoring_model,
    model_config_from_json,
    open_tokenizer,
)


def image_processor(vision: VisionConfig) -> CLIPImageProcessorPil:
    """CLIP's evaluation preprocessing at the model's image size with the model's own normalisation."""
    size = vision.image_size
    return CLIPImageProcessorPil(
        do_resize=True, size={"shortest_edge": size}, resample=PILImageResampling.BICUBIC,
        do_center_crop=True, crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(vision.image_mean), image_std=list(vision.image_std), do_convert_rgb=True,
    )


def export_checkpoint(checkpoint: str, out_dir: str) -> str:
    """A training checkpoint (its directory or its checkpoint file) -> an export directory.

    The tokenizer is the one the checkpoint names, else one saved with it (`find_tokenizer`): an
    export without one would not run in `pipeline(...)`, so none found is a `ValueError`.
    """
    state = load_checkpoint(checkpoint)
    config = model_config_from_json(state["model_config"])
    tokenizer = open_tokenizer(find_tokenizer(checkpoint, config, state.get("tokenizer")))
    model = GoldiCLIP(config)
    model.load_state_dict(state["model"])
    with staged_dir(out_dir) as local:
        model.export_pretrained(local)
        image_processor(config.vision).save_pretrained(local)
        tokenizer.save_pretrained(local)
    return out_dir


def load_exported(out_dir: str) -> GoldiCLIP:
    """The exported towers and pooling as a GoldiCLIP (teacher and decoder off), for scoring."""
    model, _ = load_scoring_model(out_dir)
    return model.eval()
