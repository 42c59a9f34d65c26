"""Memory options (`MemoryConfig`): each one leaves every loss and gradient as it was.

Parity tests in the manner of open_clip's tests/test_siglip_chunked_loss.py: the chunked or
checkpointed path against the plain one, forward and backward.
"""

import pytest
import torch
from transformers.models.clip.modeling_clip import CLIPAttention

from model.decoder import Attention
from model import GoldiCLIP, PoolingConfig, TextConditionedPooling, in_image_chunks, replace_config

from .helpers import make_batch

ALL_ON = {"checkpoint_vision": True, "checkpoint_text": True, "checkpoint_decoder": True,
          "pooling_chunk_size": 3, "head_chunk_size": 3}


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 3, 5, 8])
def test_image_chunks_match_one_call_forward_and_backward(chunk_size):
    torch.manual_seed(0)
    weight = torch.randn(6, 6, requires_grad=True)
    rows = torch.randn(5, 4, 6, requires_grad=True)  # one row per image
    views = torch.randn(5 * 3, 2, 6, requires_grad=True)  # three rows per image, grouped by image

    def fn(rows, views):  # (c, 4, 6), (3c, 2, 6) -> (3c,)
        mixed = (views @ weight).tanh().sum(1) * rows.repeat_interleave(3, 0).sum(1)  # (3c, 6)
        return mixed.logsumexp(-1)

    expected = fn(rows, views)
    expected_grads = torch.autograd.grad(expected.square().sum(), (weight, rows, views))
    out = in_image_chunks(fn, chunk_size, rows, views)
    grads = torch.autograd.grad(out.square().sum(), (weight, rows, views))
    assert torch.allclose(out, expected, atol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads):
        assert torch.allclose(grad, expected_grad, atol=1e-5)


def test_picked_projected_queries_equal_pooling_the_picked_texts():
    torch.manual_seed(0)
    pooling = TextConditionedPooling(PoolingConfig(num_heads=4), 16)
    texts, tokens = torch.randn(9, 16), torch.randn(3 * 2, 5, 16)  # 3 images x 2 views
    index = torch.randint(0, 9, (3, 4))
    expected = pooling(texts[index], tokens)
    assert torch.allclose(pooling.attend(pooling.project_texts(texts)[index], tokens), expected, atol=1e-6)


def run_step(config, batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Metrics, parameter gradients and buffers (distillation centers) of one forward + backward."""
    torch.manual_seed(0)
    model = GoldiCLIP(config)
    torch.manual_seed(1)  # the same negative captions in every run
    loss, metrics = model(batch)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return metrics, grads, dict(model.named_buffers())


@pytest.mark.parametrize("memory", [{"checkpoint_vision": True}, {"checkpoint_text": True},
                                    {"checkpoint_decoder": True}, {"pooling_chunk_size": 3},
                                    {"pooling_chunk_size": 1}, {"head_chunk_size": 3}, ALL_ON])
def test_every_memory_option_keeps_losses_gradients_and_centers(debug_config, tokenizer, memory):
    batch = make_batch(debug_config, tokenizer, num_images=5)
    metrics, grads, buffers = run_step(debug_config, batch)
    metrics_opt, grads_opt, buffers_opt = run_step(replace_config(debug_config, memory=memory), batch)
    assert metrics.keys() == metrics_opt.keys()
    for name, value in metrics.items():
        assert torch.allclose(metrics_opt[name], value, atol=1e-5), name
    assert grads.keys() == grads_opt.keys()
    for name, grad in grads.items():
        assert torch.allclose(grads_opt[name], grad, atol=1e-5, rtol=1e-4), name
    for name, buffer in buffers.items():
        assert torch.allclose(buffers_opt[name], buffer, atol=1e-6), name


def test_checkpointing_recomputes_blocks_in_backward(debug_config, tokenizer):
    """The options are live: with every block checkpointed, the backward pass runs the blocks again (counted at
    their attention modules' starts: a recompute stops once it has what the backward needs)."""
    calls = {"plain": 0, "checkpointed": 0}
    batch = make_batch(debug_config, tokenizer)
    for name, config in (("plain", debug_config), ("checkpointed", replace_config(debug_config, memory=ALL_ON))):
        torch.manual_seed(0)
        model = GoldiCLIP(config)
        for layer in model.modules():
            if isinstance(layer, (CLIPAttention, Attention)):
                layer.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        model(batch)[0].backward()
    teacher_calls = 2 * 2  # one vision and one text forward of 2 layers each, without gradient: never recomputed
    assert calls["checkpointed"] == 2 * calls["plain"] - teacher_calls
