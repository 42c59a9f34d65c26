"""`goldiclip export CHECKPOINT OUT_DIR`: ship the student (METHOD.md sec. 8).

Writes the student's vision and text towers as a Hugging Face CLIP checkpoint
(`transformers.CLIPModel.from_pretrained(OUT_DIR)` loads it), the text-conditioned pooling
block and logit bias (`text_conditioned_pooling.pt`), the GoldiCLIP config as JSON, and the
tokenizer; teacher, decoder and loss weights stay behind (`GoldiCLIP.export_pretrained`).
`load_exported(OUT_DIR)` gives back a GoldiCLIP whose `score(...)` is the project's scorer.
"""

from __future__ import annotations

import json
from pathlib import Path

from model import GoldiCLIP, GoldiCLIPConfig, load_tokenizer, replace_config
from tasks.train.loop import CHECKPOINT_FILE, MODEL_CONFIG_FILE, load_checkpoint


def _scoring_only(config: GoldiCLIPConfig) -> GoldiCLIPConfig:
    return replace_config(config, distill={"enabled": False}, decoder={"enabled": False})


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """A training checkpoint (its directory or its `checkpoint.pt`) -> an export directory."""
    checkpoint = Path(checkpoint)
    path = checkpoint / CHECKPOINT_FILE if checkpoint.is_dir() else checkpoint
    if not path.exists():
        raise ValueError(f"no {CHECKPOINT_FILE} at {checkpoint}")
    state = load_checkpoint(path)
    config = replace_config(GoldiCLIPConfig(), **json.loads(state["model_config"]))
    model = GoldiCLIP(config)
    model.load_state_dict(state["model"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.export_pretrained(out_dir)
    if state.get("tokenizer"):
        load_tokenizer(state["tokenizer"]).save_pretrained(str(out_dir))
    return out_dir


def load_exported(out_dir: str | Path) -> GoldiCLIP:
    """The exported towers and pooling as a GoldiCLIP (teacher and decoder off), for scoring."""
    out_dir = Path(out_dir)
    config = replace_config(GoldiCLIPConfig(), **json.loads((out_dir / MODEL_CONFIG_FILE).read_text()))
    return GoldiCLIP.from_pretrained_towers(out_dir, _scoring_only(config)).eval()
