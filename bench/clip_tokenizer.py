"""CLIP's own BPE tokenizer (49,408 tokens), built offline from the vocabulary file open_clip ships.

The lent GPU machine cannot download `openai/clip-vit-base-patch16`, but the carried
open_clip wheel holds OpenAI's `bpe_simple_vocab_16e6.txt.gz`. The vocabulary is derived
from it exactly as OpenAI's `SimpleTokenizer` does (256 byte characters, the same with
`</w>`, one token per merge, then <|startoftext|> and <|endoftext|>), so ids match the Hub
tokenizer and the model gets the real 49,408-row embedding and decoder head, which matters
for speed. The file is read from the package directory without importing open_clip.

    python bench/clip_tokenizer.py OUT_DIR
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.demo.standin_models import clip_tokenizer_from_bpe_file  # noqa: E402


def open_clip_bpe_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip is not installed: its wheel carries CLIP's BPE vocabulary file")
    return Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


def save_clip_tokenizer(out_dir: str | Path, bpe_path: str | Path | None = None, model_max_length: int = 77):
    tokenizer = clip_tokenizer_from_bpe_file(bpe_path or open_clip_bpe_path(), model_max_length)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


if __name__ == "__main__":
    tok = save_clip_tokenizer(sys.argv[1])
    print(sys.argv[1], len(tok), tok("a photo of a cat")["input_ids"])
