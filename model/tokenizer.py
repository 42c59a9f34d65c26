"""Tokenizers and the text form of boxes (paper sec. 3.3; METHOD.md sec. 1 and 5).

`load_tokenizer` takes any Hugging Face tokenizer id or directory (default: CLIP's BPE).
`build_local_tokenizer` trains a small CLIP-like BPE with the `tokenizers` library, offline,
for tests and the demo: lower-cased, whitespace/punctuation split, `</w>` word ends, `<pad>`
at id 0 and the start/end tokens as the two highest ids (as in CLIP, so the EOT is also the
arg-max id). Boxes are four integers in [0, 999] of the image size, written "x0 y0 x1 y1".

Text is cleaned as CLIP cleans it before tokenizing (`clean_text`: ftfy's fixes, HTML entities
unescaped twice, white space collapsed), so web alt-text such as `&amp;` or a `\ufb01` ligature gets
the ids open_clip's `SimpleTokenizer` gives it (tests/model/test_tokenizer.py checks 300 strings
against ids computed with open_clip itself).
"""

import html
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import ftfy
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

DEFAULT_TOKENIZER = "openai/clip-vit-base-patch16"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
NUM_BOX_BINS = 1000


def load_tokenizer(name_or_path: str | Path = DEFAULT_TOKENIZER) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer {name_or_path} needs bos, eos and pad tokens")
    return tokenizer


def build_local_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512,
                          model_max_length: int = 77) -> PreTrainedTokenizerFast:
    """Train a CLIP-like BPE on `texts`, save it to `out_dir` (reloadable with AutoTokenizer)."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN, end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.BPEDecoder(suffix="</w>")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2, special_tokens=[PAD_TOKEN, UNK_TOKEN], end_of_word_suffix="</w>",
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_special_tokens([BOS_TOKEN, EOS_TOKEN])  # appended: the two highest ids
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, tokenizer.token_to_id(BOS_TOKEN)), (EOS_TOKEN, tokenizer.token_to_id(EOS_TOKEN))],
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
    )
    wrapped.save_pretrained(str(out_dir))
    return wrapped


_LITERAL_SPECIAL = re.compile(r"<\|(startoftext|endoftext)\|>", re.IGNORECASE)


def clean_text(text: str) -> str:
    """CLIP's text cleaning (open_clip's `basic_clean` + `whitespace_clean`), applied before tokenizing.

    A caption that spells out `<|startoftext|>` must not get the special token: open_clip's
    split pattern has no alternative for it, while the Hugging Face CLIP tokenizer's (like
    OpenAI's original) does. Spacing the word apart gives that pattern exactly the pieces
    open_clip's finds ("<|", "startoftext", "|>..."), so the ids equal open_clip's.
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    text = " ".join(text.split())
    return _LITERAL_SPECIAL.sub(r"<| \1 |>", text)


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], context_length: int) -> torch.Tensor:
    """texts -> (N, context_length) ids: BOS cleaned-text EOS, truncated keeping the EOS, right-padded."""
    return tokenizer(
        [clean_text(t) for t in texts], padding="max_length", truncation=True, max_length=context_length,
        return_tensors="pt",
    )["input_ids"]


def quantize_box(box: Sequence[float], width: float = 1.0, height: float = 1.0) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) in pixels of a width x height image -> four bins in [0, 999]."""
    sizes = (width, height, width, height)
    return tuple(min(NUM_BOX_BINS - 1, max(0, int(value / size * NUM_BOX_BINS))) for value, size in zip(box, sizes))


def dequantize_box(bins: Sequence[int], width: float = 1.0, height: float = 1.0) -> tuple[float, ...]:
    """Bin centres back to pixel coordinates (error at most half a bin)."""
    sizes = (width, height, width, height)
    return tuple((b + 0.5) / NUM_BOX_BINS * size for b, size in zip(bins, sizes))


def format_box(bins: Sequence[int]) -> str:
    return " ".join(str(int(b)) for b in bins)


def parse_box(text: str) -> tuple[int, int, int, int] | None:
    """The first four integers in `text` (e.g. a decoded REF answer), or None."""
    numbers = [int(n) for n in re.findall(r"\d+", text)[:4]]
    if len(numbers) < 4 or any(n >= NUM_BOX_BINS for n in numbers):
        return None
    return tuple(numbers)
