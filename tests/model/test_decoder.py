import random

import pytest
import torch
import torch.nn.functional as F

from model import IGNORE_INDEX, TASKS, DecoderConfig, GoldiCLIP, MultiTaskDecoder, build_decoder_batch, replace_config
from model import task_prompt_and_target, token_nll

from .helpers import synthetic_annotation


def test_prompts_follow_the_task_table():
    rng = random.Random(0)
    annotation = {"short_captions": ["a red square"],
                  "boxes": [{"phrase": "the red square", "sentence": "a red square on blue", "box": (0.1, 0.2, 0.5, 1.0)}],
                  "qa": [{"question": "what colour is the square?", "answer": "red"}]}
    assert task_prompt_and_target("cap", annotation, rng) == ("caption is", "a red square")
    assert task_prompt_and_target("ref", annotation, rng) == ("REF the red square, box is", "100 200 500 999")
    assert task_prompt_and_target("grd", annotation, rng) == ("OBGR 100 200 500 999, grounded caption is",
                                                               "a red square on blue")
    assert task_prompt_and_target("vqa", annotation, rng) == ("VQA what colour is the square?, answer is", "red")
    assert task_prompt_and_target("vqa", {"qa": []}, rng) is None
    with pytest.raises(ValueError, match="cap"):
        task_prompt_and_target("ocr", annotation, rng)


def test_batch_has_one_sample_per_task_per_image_and_skips_missing_data(tokenizer):
    rng = random.Random(0)
    full, captions_only = synthetic_annotation(rng), {"short_captions": ["a blue star"]}
    batch = build_decoder_batch([full, captions_only, {}], tokenizer, max_length=32, rng=rng)
    assert batch["decoder_image_index"].tolist() == [0, 0, 0, 0, 1]
    assert batch["decoder_task"].tolist() == [0, 1, 2, 3, 0]
    assert [TASKS[t] for t in batch["decoder_task"][:4]] == ["cap", "ref", "grd", "vqa"]


def test_labels_cover_target_tokens_only(tokenizer):
    rng = random.Random(0)
    batch = build_decoder_batch([{"short_captions": ["a red square"]}, {"qa": [{"question": "what colour?",
                                                                             "answer": "green"}]}],
                                tokenizer, max_length=32, rng=rng)
    ids, labels = batch["decoder_input_ids"], batch["decoder_labels"]
    for row, (prompt, target) in enumerate([("caption is", "a red square"), ("VQA what colour?, answer is", "green")]):
        prompt_ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        length = len(prompt_ids) + len(target_ids)
        assert ids[row, :length].tolist() == prompt_ids + target_ids
        assert (ids[row, length:] == tokenizer.pad_token_id).all()
        # Position t predicts token t + 1: prompt positions before the last, and padding, carry no label.
        assert (labels[row, :len(prompt_ids) - 1] == IGNORE_INDEX).all()
        assert labels[row, len(prompt_ids) - 1:length - 1].tolist() == target_ids
        assert (labels[row, length - 1:] == IGNORE_INDEX).all()


def test_long_targets_are_cut_keeping_eos(tokenizer):
    batch = build_decoder_batch([{"short_captions": ["a red square " * 40]}], tokenizer, max_length=16,
                                rng=random.Random(0))
    assert batch["decoder_input_ids"].shape == (1, 16)
    assert batch["decoder_input_ids"][0, -1] == tokenizer.eos_token_id == batch["decoder_labels"][0, -2]


def test_chunked_nll_matches_cross_entropy():
    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 7, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7))
    labels[:, :2] = IGNORE_INDEX
    nll = token_nll(hidden=hidden, weight=weight, labels=labels, chunk_size=4)
    expected = F.cross_entropy((hidden @ weight.T).transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    assert torch.allclose(nll, expected, atol=1e-5)
    assert (nll[:, :2] == 0).all()
    grads = torch.autograd.grad(nll.sum(), (hidden, weight))
    expected_grads = torch.autograd.grad(expected.sum(), (hidden, weight))
    for grad, expected_grad in zip(grads, expected_grads):
        assert torch.allclose(grad, expected_grad, atol=1e-5)


def per_position_nll(model: GoldiCLIP, input_ids, labels, images):
    image_global, image_patches = model.encode_image(images)
    visual = torch.cat([image_global[:, None], image_patches], dim=1)
    hidden = model.decoder(model.text(input_ids)[1], visual)
    return token_nll(hidden=hidden, weight=model.decoder.head_weight(model.text.token_embedding), labels=labels,
                     chunk_size=5)


def test_decoder_cannot_see_future_tokens(debug_config):
    torch.manual_seed(0)
    model = GoldiCLIP(replace_config(debug_config, distill={"enabled": False})).eval()
    vocab = debug_config.text.vocab_size
    input_ids = torch.randint(1, vocab - 2, (2, 10))
    labels = torch.cat([input_ids[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = per_position_nll(model, input_ids, labels, images)
        changed_ids = input_ids.clone()
        changed_ids[:, 6] = (changed_ids[:, 6] + 1) % (vocab - 2)  # change token 6 (predicted at position 5)
        changed_labels = labels.clone()
        changed_labels[:, 5] = changed_ids[:, 6]
        after = per_position_nll(model, changed_ids, changed_labels, images)
    assert torch.allclose(before[:, :5], after[:, :5], atol=1e-5)
    assert not torch.allclose(before[:, 5:], after[:, 5:], atol=1e-4)


def test_prompt_and_padding_tokens_carry_no_loss(debug_config, tokenizer):
    torch.manual_seed(0)
    model = GoldiCLIP(replace_config(debug_config, distill={"enabled": False})).eval()
    batch = build_decoder_batch([{"short_captions": ["a red square"]}, {"qa": [{"question": "what colour is it?",
                                                                             "answer": "a very green colour"}]}],
                                tokenizer, max_length=32, rng=random.Random(0))
    images = torch.randn(2, 3, 32, 32)
    ids, labels = batch["decoder_input_ids"], batch["decoder_labels"]
    with torch.no_grad():
        nll = per_position_nll(model, ids, labels, images)
        assert (nll[labels == IGNORE_INDEX] == 0).all() and (nll[labels != IGNORE_INDEX] > 0).all()
        padded = ids.clone()
        padded[ids == tokenizer.pad_token_id] = 5  # padding content cannot change the loss
        assert torch.allclose(per_position_nll(model, padded, labels, images), nll, atol=1e-5)


def test_decoder_widths_project_when_they_differ():
    decoder = MultiTaskDecoder(DecoderConfig(width=16, num_layers=1, num_heads=2, mlp_dim=32, tie_embeddings=False),
                               text_width=24, visual_dim=20, vocab_size=30)
    out = decoder(torch.randn(2, 5, 24), torch.randn(2, 7, 20))
    assert out.shape == (2, 5, 24)
    assert decoder.head_weight(torch.nn.Embedding(30, 24)).shape == (30, 24)


def _static_decoder_batch(config, tokenizer, annotations, seed):
    from .helpers import make_batch

    batch = {k: v for k, v in make_batch(config, tokenizer, seed=seed).items() if not k.startswith("decoder_")}
    return batch | build_decoder_batch(annotations, tokenizer, max_length=config.text.context_length,
                                       rng=random.Random(seed), length_multiple=16, static_rows=True)


def test_padding_rows_carry_no_loss_and_count_for_no_task(debug_config, tokenizer):
    config = replace_config(debug_config, distill={"enabled": False})
    rng = random.Random(0)
    annotations = [synthetic_annotation(rng) for _ in range(4)]
    for annotation in annotations[2:]:
        annotation["qa"] = []  # two images without VQA: two padding rows
    padded = _static_decoder_batch(config, tokenizer, annotations, seed=0)
    has_target = (padded["decoder_labels"] != IGNORE_INDEX).any(1)
    assert padded["decoder_task"].shape == (4 * len(TASKS),) and int(has_target.sum()) == 4 * len(TASKS) - 2
    assert padded["decoder_input_ids"].shape[1] % 16 == 0
    compact = dict(padded)
    for key in ("decoder_input_ids", "decoder_labels", "decoder_image_index", "decoder_task"):
        compact[key] = padded[key][has_target]
    torch.manual_seed(0)
    model = GoldiCLIP(config)
    losses = []
    for batch in (padded, compact):
        torch.manual_seed(1)  # the same negative captions
        losses.append(model(batch)[1])
    for name in ("loss/cap", "loss/ref", "loss/grd", "loss/vqa", "loss/total"):
        assert torch.allclose(losses[0][name], losses[1][name], atol=1e-5), name


def test_static_decoder_shapes_compile_one_graph(debug_config, tokenizer):
    # The loader's decoder batches vary in which tasks each image has; with static rows and
    # bucketed lengths torch.compile traces one graph, not one per batch (a recompile per
    # step would make the compiled trainer slower than eager).
    config = replace_config(debug_config, distill={"enabled": False})
    rng = random.Random(1)
    first = [synthetic_annotation(rng) for _ in range(4)]
    second = [synthetic_annotation(rng) for _ in range(4)]
    for annotation in second[1:]:
        annotation["qa"], annotation["boxes"] = [], []
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch.manual_seed(0)
    model = torch.compile(GoldiCLIP(config), backend=counting_backend)
    for seed, annotations in enumerate((first, second)):
        batch = _static_decoder_batch(config, tokenizer, annotations, seed)
        loss, _ = model(batch)
        loss.backward()
    assert len(graphs) == 1
