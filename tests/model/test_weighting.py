import math

import pytest
import torch

from model import LOSS_NAMES, UncertaintyWeighting, WeightingConfig


def test_matches_kendall_formula():
    weighting = UncertaintyWeighting(WeightingConfig())
    log_vars = {name: 0.3 * i - 0.5 for i, name in enumerate(LOSS_NAMES)}
    with torch.no_grad():
        for name, value in log_vars.items():
            weighting.log_vars[name].fill_(value)
    losses = {name: torch.tensor(1.0 + i) for i, name in enumerate(LOSS_NAMES)}
    total, metrics = weighting(losses)
    expected = 0.0
    for name in LOSS_NAMES:
        w = 2.0 if name == "cap" else 1.0
        expected += w * (0.5 * math.exp(-log_vars[name]) * losses[name].item() + 0.5 * log_vars[name])
        assert math.isclose(metrics[f"weight/{name}"].item(), 0.5 * math.exp(-log_vars[name]) * w, rel_tol=1e-6)
        assert math.isclose(metrics[f"log_var/{name}"].item(), log_vars[name], rel_tol=1e-6)
        assert metrics[f"loss/{name}"].item() == losses[name].item()
    assert math.isclose(total.item(), expected, rel_tol=1e-6)
    assert math.isclose(metrics["loss/total"].item(), expected, rel_tol=1e-6)


def optimise_log_vars(weighting: UncertaintyWeighting, losses: dict[str, torch.Tensor], steps: int = 1500) -> None:
    """Adam on the log-variances alone, the losses held fixed."""
    optimizer = torch.optim.Adam(weighting.parameters(), lr=0.05)
    for _ in range(steps):
        total, _ = weighting(losses)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()


def test_optimising_drives_log_variances_to_log_losses():
    weighting = UncertaintyWeighting(WeightingConfig())  # w_cap = 2: s_i* = log L_i whatever w_i
    losses = {name: torch.tensor(value) for name, value in zip(LOSS_NAMES, (0.2, 1.0, 3.0, 7.0, 0.05, 12.0))}
    optimise_log_vars(weighting, losses)
    for name, loss in losses.items():
        assert math.isclose(weighting.log_vars[name].item(), math.log(loss.item()), abs_tol=0.02), name


def settled_weights(static_weights: dict[str, float], loss: float) -> dict[str, float]:
    """Effective weights 0.5 exp(-s_i) w_i once every s_i has been optimised for `loss`."""
    weighting = UncertaintyWeighting(WeightingConfig(static_weights=static_weights), names=("ret", "cap"))
    losses = {"ret": torch.tensor(loss), "cap": torch.tensor(loss)}
    optimise_log_vars(weighting, losses)
    _, metrics = weighting(losses)
    return {name: metrics[f"weight/{name}"].item() for name in losses}


@pytest.mark.parametrize("loss", [0.3, 4.0])
def test_static_weight_survives_the_optimum_of_s(loss):
    """METHOD.md sec. 6: the static weight multiplies the whole term, so at the optimum of s the
    task with w = 2 weighs twice the task with w = 1 on the same loss (w / (2 L) each); with w
    inside the exponential term alone both would settle at 1 / (2 L)."""
    weights = settled_weights({"ret": 1.0, "cap": 2.0}, loss)
    assert math.isclose(weights["cap"] / weights["ret"], 2.0, rel_tol=1e-3)
    assert math.isclose(weights["ret"], 1 / (2 * loss), rel_tol=1e-3)
    # The gradient the loss itself gets is the effective weight: d total / d L_i.
    weighting = UncertaintyWeighting(WeightingConfig(static_weights={"ret": 1.0, "cap": 2.0}), names=("ret", "cap"))
    with torch.no_grad():
        for log_var in weighting.log_vars.values():
            log_var.fill_(math.log(loss))
    losses = {name: torch.tensor(loss, requires_grad=True) for name in ("ret", "cap")}
    weighting(losses)[0].backward()
    assert math.isclose(losses["cap"].grad.item(), 2 * losses["ret"].grad.item(), rel_tol=1e-6)
    assert all(log_var.grad.abs().item() < 1e-6 for log_var in weighting.log_vars.values())  # s at its optimum


def test_missing_and_absent_losses_contribute_nothing():
    weighting = UncertaintyWeighting(WeightingConfig())
    with torch.no_grad():
        weighting.log_vars["vqa"].fill_(1.0)
    losses = {"ret": torch.tensor(2.0), "cap": torch.tensor(3.0)}
    total, metrics = weighting(losses)
    assert math.isclose(total.item(), 0.5 * 2.0 + 0.5 * 2 * 3.0, rel_tol=1e-6)
    assert "loss/vqa" not in metrics
    vqa = torch.tensor(5.0)
    masked, _ = weighting({**losses, "vqa": vqa}, present={"vqa": torch.tensor(False)})
    assert math.isclose(masked.item(), total.item(), rel_tol=1e-6)
    masked.backward()
    assert weighting.log_vars["vqa"].grad.item() == 0.0
    present, _ = weighting({**losses, "vqa": vqa}, present={"vqa": torch.tensor(True)})
    assert math.isclose(present.item(), total.item() + 0.5 * math.exp(-1.0) * 5.0 + 0.5, rel_tol=1e-6)


def test_uniform_weights_are_a_plain_sum():
    weighting = UncertaintyWeighting(WeightingConfig(uniform=True))
    losses = {name: torch.tensor(1.0 + i) for i, name in enumerate(LOSS_NAMES)}
    total, metrics = weighting(losses)
    assert math.isclose(total.item(), sum(v.item() for v in losses.values()), rel_tol=1e-6)
    assert all(metrics[f"weight/{name}"].item() == 1.0 for name in LOSS_NAMES)


def test_unknown_static_weight_fails_loudly():
    with pytest.raises(ValueError, match="unknown"):
        UncertaintyWeighting(WeightingConfig(static_weights={"caption": 2.0}))
