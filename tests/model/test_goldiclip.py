import time

import pytest
import torch
import torch.nn.functional as F

from model import GoldiCLIP, LOSS_NAMES, replace_config, tokenize

from .helpers import make_batch


def test_debug_forward_backward_runs_in_seconds(debug_config, tokenizer):
    torch.manual_seed(0)
    model = GoldiCLIP(debug_config)
    batch = make_batch(debug_config, tokenizer)
    start = time.perf_counter()
    loss, metrics = model(batch)
    loss.backward()
    assert time.perf_counter() - start < 20  # seconds, on 2 shared CPU cores
    assert torch.isfinite(loss)
    for name in LOSS_NAMES:
        assert {f"loss/{name}", f"weight/{name}", f"log_var/{name}"} <= set(metrics)
    assert {"loss/total", "loss/ret_tc", "loss/ret_ta", "loss/sd_ta", "loss/sd_tc", "logit_scale"} <= set(metrics)
    assert all(not value.requires_grad and value.dim() == 0 for value in metrics.values())
    untouched = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not untouched


@pytest.mark.parametrize("overrides,expected_losses", [
    ({"distill": {"enabled": False}}, {"ret", "cap", "ref", "grd", "vqa"}),
    ({"decoder": {"enabled": False}}, {"ret", "sd"}),
    ({"distill": {"enabled": False}, "decoder": {"enabled": False}}, {"ret"}),
    ({"pooling": {"attention_sink": False}, "weighting": {"uniform": True}}, set(LOSS_NAMES)),
])
def test_components_switch_off(debug_config, tokenizer, overrides, expected_losses):
    config = replace_config(debug_config, **overrides)
    torch.manual_seed(0)
    model = GoldiCLIP(config)
    batch = make_batch(config, tokenizer)
    if not config.distill.enabled:
        batch = {k: v for k, v in batch.items() if not k.endswith("_views")}
        assert not hasattr(model, "teacher")
    loss, metrics = model(batch)
    loss.backward()
    assert {k.split("/")[1] for k in metrics if k.startswith("log_var/")} == expected_losses
    assert set(model.weighting.log_vars) == expected_losses
    model.update_teacher()


def test_absent_decoder_task_gets_no_term(debug_config, tokenizer):
    torch.manual_seed(0)
    model = GoldiCLIP(replace_config(debug_config, distill={"enabled": False}))
    batch = make_batch(debug_config, tokenizer)
    keep = batch["decoder_task"] != 3  # drop every VQA sample
    for key in ("decoder_input_ids", "decoder_labels", "decoder_image_index", "decoder_task"):
        batch[key] = batch[key][keep]
    with torch.no_grad():
        model.weighting.log_vars["vqa"].fill_(2.0)
    loss, metrics = model(batch)
    expected = sum(metrics[f"weight/{n}"] * metrics[f"loss/{n}"] + 0.5 * metrics[f"log_var/{n}"]
                   for n in ("ret", "cap", "ref", "grd"))
    assert metrics["loss/vqa"] == 0
    assert torch.allclose(loss, expected, atol=1e-5)


def test_no_decoder_sample_adds_no_term_but_every_parameter_gets_a_gradient(debug_config, tokenizer):
    # A process whose batch has no decoder sample must still give every parameter a gradient:
    # DDP then runs without find_unused_parameters (and under torch.compile).
    torch.manual_seed(0)
    model = GoldiCLIP(debug_config)
    batch = {k: v for k, v in make_batch(debug_config, tokenizer).items() if not k.startswith("decoder_")}
    loss, metrics = model(batch)
    loss.backward()
    expected = sum(metrics[f"weight/{n}"] * metrics[f"loss/{n}"] + 0.5 * metrics[f"log_var/{n}"] for n in ("ret", "sd"))
    assert torch.allclose(loss, expected, atol=1e-5)
    assert all(metrics[f"loss/{n}"] == 0 for n in ("cap", "ref", "grd", "vqa"))
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all((p.grad == 0).all() for p in model.decoder.parameters())
    assert all(model.weighting.log_vars[n].grad == 0 for n in ("cap", "ref", "grd", "vqa"))


def test_score_matches_a_loop_over_pairs(debug_config, tokenizer):
    torch.manual_seed(0)
    model = GoldiCLIP(replace_config(debug_config, score_image_chunk_size=2)).eval()
    ids = tokenize(tokenizer, ["a red square", "a blue circle", "a green star"], debug_config.text.context_length)
    images = torch.randn(5, 3, 32, 32)
    conditioned, agnostic = model.score(ids, images), model.score(ids, images, mode="agnostic")
    assert conditioned.shape == agnostic.shape == (3, 5)
    with torch.no_grad():
        texts = model.encode_text(ids)
        image_global, image_patches = model.encode_image(images)
        for t in range(3):
            for i in range(5):
                pooled = model.pooling(texts[t][None], image_patches[i][None])[0, 0]
                assert torch.isclose(conditioned[t, i], F.cosine_similarity(pooled, texts[t], dim=0), atol=1e-5)
                assert torch.isclose(agnostic[t, i], F.cosine_similarity(image_global[i], texts[t], dim=0), atol=1e-5)
    no_sink = model.score(ids, images, attention_sink=False)
    assert not torch.allclose(no_sink, conditioned, atol=1e-4)
    with pytest.raises(ValueError, match="agnostic"):
        model.score(ids, images, mode="both")


def test_bf16_autocast_step_is_finite(debug_config, tokenizer):
    torch.manual_seed(0)
    model = GoldiCLIP(debug_config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = model(make_batch(debug_config, tokenizer))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())


def test_total_loss_falls_on_a_fixed_batch(debug_config, tokenizer):
    torch.manual_seed(0)
    model = GoldiCLIP(debug_config)
    batch = make_batch(debug_config, tokenizer, num_images=4, num_captions=2, num_global=2, num_local=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    totals = []
    for _ in range(40):
        loss, _ = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.update_teacher()
        totals.append(loss.item())
    assert sum(totals[-5:]) / 5 < 0.5 * totals[0]


def test_distillation_with_no_local_views(debug_config, tokenizer):
    """`train.num_local_views: 0` (the loader then leaves `local_views` out): the students are the G global
    views, each paired with the teacher's other globals, as DINO allows; forward and backward run."""
    from model.distill import _cross_entropy

    torch.manual_seed(0)
    model = GoldiCLIP(debug_config)
    batch = make_batch(debug_config, tokenizer, num_global=2)
    del batch["local_views"]
    center = model.distill_losses["ta"].center.clone()
    loss, metrics = model(batch)
    loss.backward()
    assert torch.isfinite(loss) and metrics["loss/sd_ta"] > 0 and metrics["loss/sd_tc"] > 0
    untouched = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not untouched
    # L_sd is the mean over the G (G - 1) = 2 (global, other global) pairs: recompute branch `ta` by hand.
    with torch.no_grad():
        model.distill_losses["ta"].center.copy_(center)
        queries = model.pooling.project_texts(model.text(batch["caption_ids"].flatten(0, 1))[0])
        caption_index = torch.arange(12).view(4, 3)
        student = model._view_features(model.vision, model.pooling, (batch["global_views"],), queries, caption_index)[0]
        teacher = model.teacher.model
        teacher_queries = teacher["pooling"].project_texts(teacher["text"](batch["caption_ids"].flatten(0, 1))[0])
        teacher_features = model._view_features(teacher["vision"], teacher["pooling"], (batch["global_views"],),
                                                teacher_queries, caption_index)[0]
        probs = model.distill_losses["ta"].teacher_probs(
            teacher_embed=teacher["heads"]["ta"].embed(teacher_features),
            weight=teacher["heads"]["ta"].prototype_weight(), step=model.distill_step)
        head = model.distill_heads["ta"]
        by_hand = -sum((probs[:, 1 - v] * F.log_softmax(head(student[:, v]) / debug_config.distill.student_temp, -1)
                        ).sum(-1) for v in range(2)).mean() / 2
        pairs = _cross_entropy(head.embed(student), probs, weight=head.prototype_weight(),
                               student_temp=debug_config.distill.student_temp).mean() / 2
    assert torch.allclose(by_hand, metrics["loss/sd_ta"], atol=1e-5) and torch.allclose(pairs, by_hand, atol=1e-5)

    # An empty local group is the same as none; one global view and no local one has no pair at all.
    batch["local_views"] = torch.zeros(4, 0, 3, debug_config.vision.local_image_size,
                                       debug_config.vision.local_image_size)
    assert torch.isfinite(model(batch)[0])
    with pytest.raises(ValueError, match="at least 2 views"):
        model({**batch, "global_views": batch["global_views"][:, :1]})


def test_train_config_needs_two_views_to_distill():
    from tasks.config import TrainConfig

    assert TrainConfig(num_local_views=0).num_global_views == 2
    assert TrainConfig(num_global_views=1, num_local_views=1).num_local_views == 1
    with pytest.raises(ValueError, match="num_global_views \\+ num_local_views must be at least 2"):
        TrainConfig(num_global_views=1, num_local_views=0)
