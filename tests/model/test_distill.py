import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from .helpers import make_batch

from model import DINOHead, DistillConfig, DistillationLoss, EMATeacher, GoldiCLIP, ema_momentum, replace_config
from model.distill import distillation_health

CONFIG = DistillConfig(head_hidden_dim=32, head_bottleneck_dim=8, num_prototypes=64)


def reference_distillation(student_logits, teacher_logits, center, student_temp, teacher_temp):
    """CE(P_t(g), P_s(v)) averaged over images and pairs (g global, v != g), one pair at a time."""
    num_images, num_views = student_logits.shape[:2]
    num_global = teacher_logits.shape[1]
    total, pairs = 0.0, 0
    for b in range(num_images):
        for g in range(num_global):
            target = torch.softmax((teacher_logits[b, g] - center) / teacher_temp, dim=-1)
            for v in range(num_views):
                if v == g:
                    continue
                total = total - (target * torch.log_softmax(student_logits[b, v] / student_temp, dim=-1)).sum()
                pairs += 1
    return total / pairs


@pytest.mark.parametrize("chunk_size", [None, 2, 5, 7])
def test_loss_in_chunks_matches_the_pairwise_formula(chunk_size):
    torch.manual_seed(0)
    head, loss_fn = DINOHead(CONFIG, 16), DistillationLoss(CONFIG, chunk_size)
    with torch.no_grad():
        loss_fn.center.normal_()
    student_features, teacher_features = torch.randn(5, 6, 16), torch.randn(5, 2, 16)
    center = loss_fn.center.clone()
    teacher_logits = head(teacher_features).detach()
    probs = loss_fn.teacher_probs(teacher_embed=head.embed(teacher_features).detach(),
                                  weight=head.prototype_weight().detach(), step=torch.tensor(0))
    loss = loss_fn(student_embed=head.embed(student_features), weight=head.prototype_weight(), teacher_probs=probs)
    expected = reference_distillation(head(student_features), teacher_logits, center, 0.1, 0.04)
    assert torch.allclose(loss, expected, atol=1e-4)
    grads = torch.autograd.grad(loss, head.prototypes)[0]
    expected_grads = torch.autograd.grad(expected, head.prototypes)[0]
    assert torch.allclose(grads, expected_grads, atol=1e-5)


def test_prototypes_have_unit_norm_and_embeddings_are_normalised():
    head = DINOHead(CONFIG, 16)
    assert torch.allclose(head.prototype_weight().norm(dim=-1), torch.ones(64))
    assert torch.allclose(head.embed(torch.randn(3, 16)).norm(dim=-1), torch.ones(3))
    assert head(torch.randn(3, 16)).shape == (3, 64)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_center_moves_by_its_ema_rule(chunk_size):
    loss_fn = DistillationLoss(CONFIG, chunk_size)
    old = torch.randn(1, 64)
    loss_fn.center.copy_(old)
    embed, weight = torch.randn(4, 2, 8), torch.randn(64, 8)
    probs = loss_fn.teacher_probs(teacher_embed=embed, weight=weight, step=torch.tensor(0))
    teacher_logits = embed @ weight.T
    assert torch.allclose(probs, torch.softmax((teacher_logits - old) / 0.04, dim=-1), atol=1e-6)
    expected = 0.9 * old + 0.1 * teacher_logits.mean(dim=(0, 1))
    assert torch.allclose(loss_fn.center, expected, atol=1e-5)


def test_teacher_temperature_warms_up():
    loss_fn = DistillationLoss(DistillConfig(teacher_temp=0.04, teacher_temp_final=0.07, teacher_temp_warmup_steps=10))
    assert math.isclose(loss_fn.teacher_temp(torch.tensor(0)), 0.04, rel_tol=1e-6)
    assert math.isclose(loss_fn.teacher_temp(torch.tensor(5)), 0.055, rel_tol=1e-6)
    assert math.isclose(loss_fn.teacher_temp(torch.tensor(50)), 0.07, rel_tol=1e-6)


def test_ema_momentum_schedule():
    assert math.isclose(ema_momentum(DistillConfig(), torch.tensor(123)), 0.996, rel_tol=1e-6)
    cosine = DistillConfig(ema_cosine_steps=100)
    assert math.isclose(ema_momentum(cosine, torch.tensor(0)), 0.996, rel_tol=1e-6)
    assert math.isclose(ema_momentum(cosine, torch.tensor(50)), 0.998, rel_tol=1e-6)
    assert math.isclose(ema_momentum(cosine, torch.tensor(100)), 1.0, rel_tol=1e-6)


def test_teacher_moves_by_exactly_the_ema_rule():
    student = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    teacher = EMATeacher(student)
    before = [p.clone() for p in teacher.model.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    teacher.update(student, torch.tensor(0.9))
    for old, new, s in zip(before, teacher.model.parameters(), student.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * s, atol=1e-6)


@pytest.mark.parametrize("shared_head", [False, True])
def test_model_teacher_gets_no_gradients_and_follows_the_student(debug_config, tokenizer, shared_head):
    config = replace_config(debug_config, distill={"shared_head": shared_head})
    torch.manual_seed(0)
    model = GoldiCLIP(config)
    assert all(not p.requires_grad for p in model.teacher.parameters())
    loss, _ = model(make_batch(config, tokenizer))
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.distill_heads["ta"].prototypes.grad is not None
    student = model.distilled_student()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1)
    before = [p.clone() for p in model.teacher.model.parameters()]
    model.update_teacher()
    for old, new, s in zip(before, model.teacher.model.parameters(), student.parameters()):
        assert torch.allclose(new, 0.996 * old + 0.004 * s, atol=1e-6)
    assert model.distill_step.item() == 1
    assert (model.distill_heads["ta"] is model.distill_heads["tc"]) == shared_head


def test_health_reads_uniform_and_one_hot_teachers_and_kl_matches_pairwise():
    torch.manual_seed(0)
    num_prototypes = 64
    uniform = torch.full((3, 2, num_prototypes), 1 / num_prototypes)
    one_prototype = F.one_hot(torch.full((3, 2), 5), num_prototypes).float()  # every view on prototype 5
    eight_prototypes = F.one_hot(torch.arange(8).view(4, 2), num_prototypes).float()  # sharp, each on its own
    center = torch.randn(1, num_prototypes)
    for probs, fraction, batch_fraction in ((uniform, 1.0, 1.0), (one_prototype, 0.0, 0.0),
                                            (eight_prototypes, 0.0, math.log(8) / math.log(num_prototypes))):
        health = distillation_health(teacher_probs=probs, loss=torch.tensor(5.0), center=center)
        assert math.isclose(health["teacher_entropy_frac"].item(), fraction, abs_tol=1e-6)
        assert math.isclose(health["teacher_batch_entropy_frac"].item(), batch_fraction, abs_tol=1e-6)
        assert math.isclose(health["center_norm"].item(), center.norm().item(), rel_tol=1e-6)
    # KL(P_t || P_s) over the (g, v != g) pairs, one pair at a time, against L_sd - H(P_t).
    head, loss_fn = DINOHead(CONFIG, 16), DistillationLoss(CONFIG)
    student_features, teacher_features = torch.randn(5, 6, 16), torch.randn(5, 2, 16)
    with torch.no_grad():
        probs = loss_fn.teacher_probs(teacher_embed=head.embed(teacher_features), weight=head.prototype_weight(),
                                      step=torch.tensor(0))
        loss = loss_fn(student_embed=head.embed(student_features), weight=head.prototype_weight(), teacher_probs=probs)
        log_student = torch.log_softmax(head(student_features) / CONFIG.student_temp, dim=-1)
    kls = [F.kl_div(log_student[b, v], probs[b, g], reduction="sum")
           for b in range(5) for g in range(2) for v in range(6) if v != g]
    health = distillation_health(teacher_probs=probs, loss=loss, center=loss_fn.center)
    assert math.isclose(health["kl"].item(), (sum(kls) / len(kls)).item(), rel_tol=1e-4)


def test_model_logs_the_health_of_both_branches(debug_config, tokenizer):
    torch.manual_seed(0)
    model = GoldiCLIP(debug_config)
    _, metrics = model(make_batch(debug_config, tokenizer))
    for branch in ("ta", "tc"):
        names = {f"sd_{branch}/{name}" for name in ("teacher_entropy_frac", "teacher_batch_entropy_frac", "kl",
                                                        "center_norm")}
        assert names <= set(metrics)
        assert 0.0 < metrics[f"sd_{branch}/teacher_entropy_frac"].item() <= 1.0
        assert metrics[f"sd_{branch}/teacher_entropy_frac"] <= metrics[f"sd_{branch}/teacher_batch_entropy_frac"] + 1e-6
        assert metrics[f"sd_{branch}/kl"].item() >= -1e-5
        assert torch.isclose(metrics[f"sd_{branch}/center_norm"], model.distill_losses[branch].center.norm())


@pytest.mark.parametrize("shared_head", [False, True])
def test_prototypes_stay_frozen_for_the_first_steps(debug_config, tokenizer, shared_head):
    """DINO's freeze_last_layer: before step `freeze_last_layer_steps` the prototype layers get no update,
    weight decay included (their gradients are dropped, as DINO's cancel_gradients_last_layer); the
    MLP below them trains; from that step on the prototypes train too."""
    config = replace_config(debug_config, distill={"freeze_last_layer_steps": 2, "shared_head": shared_head})
    torch.manual_seed(0)
    model = GoldiCLIP(config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.5)
    batch = make_batch(config, tokenizer)
    heads = model.distill_heads.values()
    for step in range(3):
        prototypes = [head.prototypes.detach().clone() for head in heads]
        mlp = [head.mlp[0].weight.detach().clone() for head in heads]
        loss, _ = model(batch)
        optimizer.zero_grad()
        loss.backward()
        assert all(head.prototypes.grad is not None and head.prototypes.grad.abs().sum() > 0 for head in heads)
        model.drop_frozen_gradients(step)
        assert all((head.prototypes.grad is None) == (step < 2) for head in heads)
        optimizer.step()
        model.update_teacher()
        for head, before, mlp_before in zip(heads, prototypes, mlp):
            assert torch.equal(head.prototypes, before) == (step < 2), step
            assert not torch.equal(head.mlp[0].weight, mlp_before)


def test_head_init_follows_dino():
    """DINO's DINOHead: trunc_normal(0.02) on the MLP's linears (zero biases); the last layer keeps
    nn.Linear's default init (uniform in +-1/sqrt(bottleneck)) under weight norm with g = 1."""
    torch.manual_seed(0)
    config = DistillConfig(head_hidden_dim=256, head_bottleneck_dim=64, num_prototypes=4096)
    head = DINOHead(config, 32)
    bound = 1 / math.sqrt(64)
    assert head.prototypes.abs().max().item() <= bound
    assert math.isclose(head.prototypes.std().item(), bound / math.sqrt(3), rel_tol=0.02)
    for layer in (head.mlp[0], head.mlp[2], head.mlp[4]):
        assert math.isclose(layer.weight.std().item(), 0.02, rel_tol=0.1)
        assert torch.all(layer.bias == 0)
