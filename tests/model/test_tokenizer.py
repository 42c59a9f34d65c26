import pytest
import torch
from transformers import AutoTokenizer

from model import dequantize_box, format_box, parse_box, quantize_box, tokenize


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
