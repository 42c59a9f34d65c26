"""Tiny randomly initialised stand-ins for OWLv2 and Phi-3.5, saved like real checkpoints.

This sandbox (and the demo) cannot download weights, so the demo and the tests
build tiny models from configs and save them, with a tokenizer trained here and
the processor / chat template the real checkpoints carry, into a directory.
The stages then load that directory through the very same ``from_pretrained``
path as ``google/owlv2-base-patch16-ensemble`` or
``microsoft/Phi-3.5-mini-instruct`` (and ``vllm serve <dir>`` can serve the Phi3
one). Their outputs are random: they prove plumbing, never quality.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# Words the stand-in tokenizers learn merges from (any other text still encodes:
# both tokenizers are byte-level).
_CORPUS = (
    "a red circle on a blue background. the green square next to a yellow triangle. "
    "a small purple star above a large orange rectangle. a white dog, a black cat, a person and a car. "
    "Given the following image caption: Please generate five short questions and corresponding short "
    "answers that someone might ask about this image. The questions should be relevant to the content "
    "of the caption, and the answers be very short, concise, and factual based on the caption. "
    'What colour is the circle? {"qa": [{"question": "What is it?", "answer": "a shape"}]} Q: A: yes no'
)

STANDIN_NOTE = "tiny randomly initialised stand-in (goldiclip-pipeline tests/demo); its outputs are meaningless"


def _byte_level_bpe_merges(texts: Iterable[str], vocab_size: int, *, clip_style: bool) -> Tokenizer:
    """Train a byte-level BPE: every byte stays encodable, merges come from ``texts``."""
    suffix = {"end_of_word_suffix": "</w>"} if clip_style else {}
    tokenizer = Tokenizer(models.BPE(**suffix))
    if clip_style:
        tokenizer.normalizer = normalizers.Lowercase()
        # CLIP's pre-tokenizer: words, digits and punctuation runs, then bytes -> unicode.
        split = pre_tokenizers.Split(Regex(r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"), behavior="removed", invert=True)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False, **suffix
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _merges(tokenizer: Tokenizer) -> list[tuple[str, str]]:
    raw = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in raw]


def build_clip_tokenizer(texts: Iterable[str] = (_CORPUS,), vocab_size: int = 1000):
    """A CLIP-format tokenizer (byte-level BPE, ``</w>`` word ends, ``!`` padding at id 0, EOT the highest id).

    OWLv2's text tower pools the arg-max token id, which must be the end-of-text
    token, and treats a query whose first id is 0 as padding: the vocabulary is
    laid out as CLIP's is (256 bytes, 256 bytes + ``</w>``, merges, then the two
    special tokens) so both hold.
    """
    merges = _merges(_byte_level_bpe_merges(texts, vocab_size, clip_style=True))
    return clip_tokenizer_from_merges(merges, pad_token="!", model_max_length=16)


def clip_tokenizer_from_merges(merges: list[tuple[str, str]], *, pad_token: str, model_max_length: int):
    """A ``CLIPTokenizer`` whose vocabulary is laid out as OpenAI's: the 256 byte characters, the
    same with ``</w>``, one token per merge in order, then <|startoftext|> and <|endoftext|>.
    With OpenAI's merge list this is CLIP's own tokenizer, id for id (bench/clip_tokenizer.py)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in [*byte_chars, *(c + "</w>" for c in byte_chars), *("".join(m) for m in merges),
                  "<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(token, len(vocab))
    # transformers 5: vocab and merges as objects (file arguments are ignored; ../shared/ENVIRONMENT.md).
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=model_max_length)


CLIP_VOCAB_SIZE = 49408


def clip_tokenizer_from_bpe_file(bpe_path: str | Path, model_max_length: int = 77):
    """CLIP's own tokenizer from OpenAI's `bpe_simple_vocab_16e6.txt.gz` (as open_clip ships it).

    The merges are read as OpenAI's `SimpleTokenizer` reads them, so the ids are CLIP's.
    """
    import gzip

    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : CLIP_VOCAB_SIZE - 256 * 2 - 2 + 1]]
    tokenizer = clip_tokenizer_from_merges(merges, pad_token="<|endoftext|>", model_max_length=model_max_length)
    assert len(tokenizer) == CLIP_VOCAB_SIZE, len(tokenizer)
    return tokenizer


# google/owlv2-base-patch16-ensemble's architecture (its config.json): ViT-B/16 at 960 px
# and a 12-layer, 512-wide text tower reading 16-token queries.
OWLV2_BASE_PATCH16 = {
    "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "image_size": 960, "patch_size": 16},
    "text": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8,
             "max_position_embeddings": 16},
    "projection_dim": 512,
}


def save_tiny_owlv2(out_dir: str | Path, *, image_size: int = 64, seed: int = 0) -> Path:
    """Save a tiny random OWLv2 (hidden 32, 2 layers, ``image_size`` px, patch 16) + processor to ``out_dir``."""
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    return _save_random_owlv2(out_dir, vision={**tower, "image_size": image_size, "patch_size": 16},
                              text={**tower, "max_position_embeddings": 16}, projection_dim=32, seed=seed)


def save_random_owlv2_base(out_dir: str | Path, *, seed: int = 0) -> Path:
    """OWLv2 B/16 at 960 px with random weights: the real model's shapes and FLOPs, for benchmarks only.

    Speed does not depend on the weights, so ``bench/boxes.py --random-weights``
    times the real architecture on a machine that cannot download the checkpoint.
    """
    note = ("B/16 at 960 px (google/owlv2-base-patch16-ensemble's architecture), randomly initialised for "
            "bench/boxes.py; its outputs are meaningless")
    return _save_random_owlv2(out_dir, **OWLV2_BASE_PATCH16, seed=seed, note=note)


def _save_random_owlv2(out_dir: str | Path, *, vision: dict, text: dict, projection_dim: int, seed: int,
                       note: str = STANDIN_NOTE) -> Path:
    import torch
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2Processor
    from transformers.models.owlv2 import Owlv2ImageProcessorPil

    out = Path(out_dir)
    tokenizer = build_clip_tokenizer()
    config = Owlv2Config(
        text_config={**text, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": 0},
        vision_config=vision,
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = Owlv2ForObjectDetection(config).eval()
    with torch.no_grad():
        # Random heads saturate: every box collapses to a point and scores to 0 or 1.
        # Quiet them so boxes start as OWLv2's per-patch prior boxes and scores
        # (cosine logits shifted by -1.5) spread around the 0.1 and 0.3 thresholds.
        model.box_head.dense2.weight.mul_(0.01)
        model.box_head.dense2.bias.zero_()
        for head in (model.class_head.logit_shift, model.class_head.logit_scale):
            head.weight.zero_()
        model.class_head.logit_shift.bias.fill_(-1.5)
        model.class_head.logit_scale.bias.zero_()
    size = vision["image_size"]
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessorPil(size={"height": size, "width": size}), tokenizer=tokenizer
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "README.md").write_text(f"OWLv2 {note}.\n")
    return out


# Phi-3's chat format: <|user|>\n...<|end|>\n<|assistant|>\n
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
PHI3_SPECIAL_TOKENS = ("<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>")


def save_tiny_phi3(out_dir: str | Path, *, vocab_size: int = 1024, max_positions: int = 2048, seed: int = 0) -> Path:
    """Save a tiny random Phi3 (hidden 128, 2 heads of 64, 2 layers) with a byte-level BPE and chat template.

    head_dim 64 because vLLM's CPU attention backend does not take 16 (ENVIRONMENT.md);
    ``max_positions`` covers the VQA prompt plus 500 new tokens.
    """
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    bpe = _byte_level_bpe_merges([_CORPUS], vocab_size - len(PHI3_SPECIAL_TOKENS), clip_style=False)
    bpe.add_special_tokens(list(PHI3_SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=None, eos_token="<|end|>", pad_token="<|endoftext|>",
        unk_token=None, model_max_length=max_positions, padding_side="left",
    )
    tokenizer.chat_template = PHI3_CHAT_TEMPLATE
    end_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|end|>", "<|endoftext|>")]
    config = Phi3Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=max_positions,
        original_max_position_embeddings=max_positions, pad_token_id=end_ids[1], bos_token_id=end_ids[1],
        eos_token_id=end_ids[0], tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=end_ids, pad_token_id=end_ids[1], do_sample=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(f"Phi-3 {STANDIN_NOTE}.\n")
    return out
