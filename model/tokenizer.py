"""Tokenizers and the text form of boxes (paper sec. 3.3; METHOD.md sec. 1 and 5).

`load_tokenizer` takes any Hugging Face tokenizer id or directory (default: CLIP's BPE).
`build_local_tokenizer` trains a small CLIP-like BPE offline, for tests and the demo:
lower-cased, whitespace/punctuation split, `</w>` word ends, `<pad>` at id 0 and the start/end
tokens as the two highest ids (as in CLIP, so the EOT is also the arg-max id). The merges are
learnt here (`train_bpe`), not by the `tokenizers` library's `BpeTrainer`, whose ids and merges
differ from process to process for the same texts (it numbers the `</w>` symbols in the order of
a randomly seeded hash map, and breaks ties between equally frequent pairs by those ids;
huggingface/tokenizers#1794): ours are a function of the texts alone, so a tokenizer built again
by another process or a resumed run gives the same ids.

Boxes are four integers in [0, 999] of the image size, written "x0 y0 x1 y1".

Text is cleaned as CLIP cleans it before tokenizing (`clean_text`: ftfy's fixes, HTML entities
unescaped twice, white space collapsed), so web alt-text such as `&amp;` or a `\ufb01` ligature gets
the ids open_clip's `SimpleTokenizer` gives it (tests/model/test_tokenizer.py checks 300 strings
against ids computed with open_clip itself).
"""

import heapq
import html
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import ftfy
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
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


def train_bpe(word_counts: dict[str, int], vocab_size: int, special_tokens: Sequence[str] = (),
              suffix: str = "</w>") -> tuple[list[str], list[tuple[str, str]]]:
    """BPE merges learnt from ``word_counts`` (pre-tokenized words -> counts), deterministically.

    Returns the vocabulary (special tokens, then every character, with and without ``suffix``,
    sorted, then the merged tokens in merge order) and the merges. Each step merges the most
    frequent adjacent pair, ties broken by the pair's strings (smallest first), until the vocabulary
    holds ``vocab_size`` tokens or no pair is left: the semantics of the ``tokenizers`` library's
    ``BpeTrainer`` with ``min_frequency`` 0 and no alphabet limit, without its run-dependent ties.
    """
    words = sorted(w for w in word_counts if w)
    freqs = [word_counts[w] for w in words]
    symbols = [[*w[:-1], w[-1] + suffix] for w in words]
    alphabet = sorted({c for w in words for c in w} | {s for syms in symbols for s in syms})
    vocab = list(dict.fromkeys([*special_tokens, *alphabet]))
    known = set(vocab)

    counts: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, syms in enumerate(symbols):
        for pair in zip(syms, syms[1:]):
            counts[pair] += freqs[i]
            where.setdefault(pair, set()).add(i)
    heap = [(-n, pair) for pair, n in counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size and heap:
        negative, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -negative or negative == 0:
            continue  # an outdated entry: the pair's current count was pushed since
        merged = pair[0] + pair[1]
        merges.append(pair)
        if merged not in known:  # two pairs can spell one token ("a"+"bc", "ab"+"c"): one id
            known.add(merged)
            vocab.append(merged)
        changed: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair, ())):
            syms = symbols[i]
            old = list(zip(syms, syms[1:]))
            out, j = [], 0
            while j < len(syms):
                if j + 1 < len(syms) and (syms[j], syms[j + 1]) == pair:
                    out.append(merged)
                    j += 2
                else:
                    out.append(syms[j])
                    j += 1
            if len(out) == len(syms):
                continue  # a stale entry of `where`: the pair left this word in an earlier merge
            symbols[i] = out
            for p in old:
                counts[p] -= freqs[i]
                changed.add(p)
            for p in zip(out, out[1:]):
                counts[p] += freqs[i]
                where.setdefault(p, set()).add(i)
                changed.add(p)
        counts.pop(pair, None)
        changed.discard(pair)
        for p in changed:
            if counts[p] > 0:
                heapq.heappush(heap, (-counts[p], p))
            else:
                del counts[p]
    return vocab, merges


def build_local_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512,
                          model_max_length: int = 77) -> PreTrainedTokenizerFast:
    """Train a CLIP-like BPE on `texts`, save it to `out_dir` (reloadable with AutoTokenizer).

    The same texts give the same files and ids in any process (`train_bpe`); the order of the
    texts does not matter either."""
    normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    word_counts: Counter = Counter()
    for text in texts:
        word_counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    vocab, merges = train_bpe(word_counts, vocab_size - 2, special_tokens=[PAD_TOKEN, UNK_TOKEN])
    tokenizer = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(vocab)}, merges=merges,
                                     unk_token=UNK_TOKEN, end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.BPEDecoder(suffix="</w>")
    tokenizer.add_special_tokens([PAD_TOKEN, UNK_TOKEN])  # never split, as the trainer's special tokens
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
