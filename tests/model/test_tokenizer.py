import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from model import dequantize_box, format_box, parse_box, quantize_box, tokenize
from model.tokenizer import clean_text, train_bpe


def test_local_tokenizer_reloads_with_autotokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "a red square on a blue background"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.decode(reloaded(text)["input_ids"], skip_special_tokens=True) == text
    # CLIP's layout: start/end are the two highest ids, so the EOT is also the arg-max id.
    assert (reloaded.bos_token_id, reloaded.eos_token_id) == (len(reloaded) - 2, len(reloaded) - 1)
    assert reloaded.pad_token_id == 0


def test_tokenize_pads_and_keeps_eos_when_truncating(tokenizer):
    ids = tokenize(tokenizer, ["a red square", "a red square " * 30], context_length=16)
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    assert (ids[:, 0] == tokenizer.bos_token_id).all()
    assert ids[1, -1] == tokenizer.eos_token_id
    eos = (ids[0] == tokenizer.eos_token_id).nonzero().item()
    assert (ids[0, eos + 1:] == tokenizer.pad_token_id).all()


@pytest.mark.parametrize("box,size", [((0.0, 0.0, 1.0, 1.0), (1.0, 1.0)), ((12.3, 40.0, 300.7, 199.9), (320, 200)),
                                      ((0.25, 0.5, 0.75, 0.999), (1.0, 1.0))])
def test_box_quantisation_round_trips(box, size):
    bins = quantize_box(box, *size)
    assert all(isinstance(b, int) and 0 <= b <= 999 for b in bins)
    text = format_box(bins)
    assert text == " ".join(str(b) for b in bins)
    assert parse_box(text) == bins
    back = dequantize_box(bins, *size)
    for value, recovered, extent in zip(box, back, size * 2):
        assert abs(value - recovered) <= extent / 1000
    assert quantize_box(back, *size) == bins


def test_box_text_survives_the_tokenizer(tokenizer):
    text = format_box((3, 517, 999, 42))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert parse_box(tokenizer.decode(ids)) == (3, 517, 999, 42)
    assert parse_box("no box here") is None and parse_box("1 2 3 1000") is None


ASSETS = Path(__file__).resolve().parents[1] / "assets"


@pytest.fixture(scope="module")
def clip_tokenizer():
    """CLIP's real 49,408-token BPE, from OpenAI's vocabulary file (tests/assets, as open_clip ships it)."""
    from tasks.demo.standin_models import clip_tokenizer_from_bpe_file

    return clip_tokenizer_from_bpe_file(ASSETS / "bpe_simple_vocab_16e6.txt.gz")


def test_clip_ids_equal_open_clip_simple_tokenizer(clip_tokenizer):
    """300 web-like strings (HTML entities, ligatures, mojibake, literal special tokens, long captions):
    ids equal those open_clip's SimpleTokenizer gave (tests/assets/clip_golden_ids.json, its source
    and command inside; made by bench/clip_golden_ids.py)."""
    golden = json.loads((ASSETS / "clip_golden_ids.json").read_text())
    ids = tokenize(clip_tokenizer, [c["text"] for c in golden["cases"]], context_length=77).tolist()
    eot = clip_tokenizer.eos_token_id
    mismatched = [c["text"] for c, row in zip(golden["cases"], ids) if row[: row.index(eot) + 1] != c["ids"]]
    assert len(golden["cases"]) == 300 and mismatched == []


def test_clean_text_is_clips_cleaning():
    assert clean_text("  Fish &amp;amp; chips\n\tat the \ufb01re  ") == "Fish & chips at the fire"
    assert clean_text("&lt;b&gt;caf\u00c3\u00a9&lt;/b&gt;") == "<b>caf\u00e9</b>"
    assert clean_text("<|startoftext|>a cat<|EndOfText|>") == "<| startoftext |>a cat<| EndOfText |>"


BUILD_IN_A_PROCESS = """
import hashlib, json, os, sys
from model import build_local_tokenizer
from tests.model.helpers import corpus
results = []
for order, texts in (("forward", corpus()), ("reversed", corpus()[::-1])):
    out = os.path.join(sys.argv[1], order)
    tokenizer = build_local_tokenizer(texts, out, vocab_size=400)
    files = {name: hashlib.sha256(open(os.path.join(out, name), "rb").read()).hexdigest()
             for name in sorted(os.listdir(out))}
    ids = tokenizer(["a purple hexagon on a white background.", "VQA , answer is 517 42", "the star is orange."])
    results.append({"files": files, "ids": ids["input_ids"]})
print(json.dumps(results))
"""


def test_local_tokenizer_is_the_same_in_every_process(tmp_path, tokenizer):
    """The same texts give byte-identical files and the same ids in two fresh processes under different
    hash seeds (the `tokenizers` library's own trainer gave different ids in each), in any text order."""
    repo = Path(__file__).resolve().parents[2]
    runs = [subprocess.Popen([sys.executable, "-c", BUILD_IN_A_PROCESS, str(tmp_path / seed)], cwd=repo,
                             env={**os.environ, "PYTHONHASHSEED": seed}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for seed in ("1", "2")]
    results = []
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-3000:]
        results += json.loads(out.strip().splitlines()[-1])
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(results[0]["files"])
    assert all(r == results[0] for r in results[1:]), results
    # ...and the same ids as this process's tokenizer, trained on the same corpus
    texts = ["a purple hexagon on a white background.", "VQA , answer is 517 42", "the star is orange."]
    assert tokenizer(texts)["input_ids"] == results[0]["ids"]


def naive_bpe(word_counts: dict[str, int], size: int) -> tuple[list[str], list[tuple[str, str]]]:
    """BPE by its definition: recount every pair at every step, merge the most frequent (smallest on ties)."""
    words = sorted(word_counts)
    symbols = [[*w[:-1], w[-1] + "</w>"] for w in words]
    vocab = list(dict.fromkeys(["<pad>", *sorted({c for w in words for c in w} | {s for x in symbols for s in x})]))
    merges = []
    while len(vocab) < size:
        counts = Counter()
        for word, syms in zip(words, symbols):
            for pair in zip(syms, syms[1:]):
                counts[pair] += word_counts[word]
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        if best[0] + best[1] not in vocab:
            vocab.append(best[0] + best[1])
        for i, syms in enumerate(symbols):
            out, j = [], 0
            while j < len(syms):
                if (syms[j], syms[j + 1] if j + 1 < len(syms) else None) == best:
                    out.append(best[0] + best[1])
                    j += 2
                else:
                    out.append(syms[j])
                    j += 1
            symbols[i] = out
    return vocab, merges


@pytest.mark.parametrize("seed", range(12))
def test_train_bpe_equals_bpe_by_definition(seed):
    """The incremental trainer (pair counts updated per merge) equals recounting from scratch, on words
    with repeated letters ("aaa": overlapping pairs) and many ties."""
    rng = random.Random(seed)
    word_counts = {"".join(rng.choice("abcab") for _ in range(rng.randint(1, 7))): rng.randint(1, 4)
                   for _ in range(50)}
    for size in (8, 25, 80):
        assert train_bpe(word_counts, size, ["<pad>"]) == naive_bpe(word_counts, size)
