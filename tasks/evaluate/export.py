"""`goldiclip export CHECKPOINT OUT_DIR`: ship the student (METHOD.md sec. 8).

Writes the student's vision and text towers as a Hugging Face CLIP checkpoint
(`transformers.CLIPModel.from_pretrained(OUT_DIR)` loads it), the text-conditioned pooling
block and logit bias, the GoldiCLIP config as JSON, and the tokenizer; teacher, decoder and loss
weights stay behind (`GoldiCLIP.export_pretrained`). Both paths may be local or any fsspec URL
(the export is written locally, then copied). `load_exported(OUT_DIR)` gives back a GoldiCLIP
whose `score(...)` is the project's scorer.
"""

from __future__ import annotations

from model import GoldiCLIP
from storage.fs import staged_dir
from tasks.train.checkpoint import load_checkpoint, load_scoring_model, model_config_from_json, open_tokenizer


def export_checkpoint(checkpoint: str, out_dir: str) -> str:
    """A training checkpoint (its directory or its checkpoint file) -> an export directory."""
    state = load_checkpoint(checkpoint)
    model = GoldiCLIP(model_config_from_json(state["model_config"]))
    model.load_state_dict(state["model"])
    with staged_dir(out_dir) as local:
        model.export_pretrained(local)
        if state.get("tokenizer"):
            open_tokenizer(state["tokenizer"]).save_pretrained(local)
    return out_dir


def load_exported(out_dir: str) -> GoldiCLIP:
    """The exported towers and pooling as a GoldiCLIP (teacher and decoder off), for scoring."""
    model, _ = load_scoring_model(out_dir)
    return model.eval()
