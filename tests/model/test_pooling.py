import pytest
import torch
from torch import nn

from model import PoolingConfig, TextConditionedPooling

D, HEADS = 32, 4


@pytest.fixture
def pooling():
    torch.manual_seed(0)
    module = TextConditionedPooling(PoolingConfig(num_heads=HEADS, attention_sink=True), D)
    with torch.no_grad():  # non-trivial LayerNorm parameters, so the test sees each one used
        for norm in (module.norm_query, module.norm_key, module.norm_value):
            norm.weight.normal_(1, 0.2)
            norm.bias.normal_(0, 0.2)
    return module


def reference_mha(pooling: TextConditionedPooling, add_zero_attn: bool) -> nn.MultiheadAttention:
    mha = nn.MultiheadAttention(D, HEADS, add_zero_attn=add_zero_attn, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([pooling.query_proj.weight, pooling.key_proj.weight,
                                            pooling.value_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([pooling.query_proj.bias, pooling.key_proj.bias, pooling.value_proj.bias]))
        mha.out_proj.load_state_dict(pooling.out_proj.state_dict())
    return mha


@pytest.mark.parametrize("sink", [True, False])
def test_matches_torch_multihead_attention_with_zero_attn(pooling, sink):
    texts, tokens = torch.randn(3, 5, D), torch.randn(3, 7, D)
    mha = reference_mha(pooling, add_zero_attn=sink)
    expected = mha(pooling.norm_query(texts), pooling.norm_key(tokens), pooling.norm_value(tokens))[0]
    assert torch.allclose(pooling(texts, tokens, attention_sink=sink), expected, atol=1e-5)


def test_sink_changes_outputs_and_switches_off(pooling):
    texts, tokens = torch.randn(3, 5, D), torch.randn(3, 7, D)
    with_sink = pooling(texts, tokens)
    without = pooling(texts, tokens, attention_sink=False)
    assert not torch.allclose(with_sink, without, atol=1e-4)
    no_sink_config = TextConditionedPooling(PoolingConfig(num_heads=HEADS, attention_sink=False), D)
    no_sink_config.load_state_dict(pooling.state_dict())
    assert torch.allclose(no_sink_config(texts, tokens), without, atol=1e-6)


def test_shared_texts_match_a_loop_over_images_and_texts(pooling):
    texts, tokens = torch.randn(6, D), torch.randn(4, 9, D)
    batched = pooling(texts, tokens)  # (4, 6, D)
    for image in range(4):
        for text in range(6):
            single = pooling(texts[text][None, None], tokens[image][None])[0, 0]
            assert torch.allclose(batched[image, text], single, atol=1e-5)


def test_views_grouped_by_image_use_their_images_texts(pooling):
    texts, views = torch.randn(2, 5, D), torch.randn(2 * 3, 4, D)  # 2 images x 3 views
    pooled = pooling(texts, views)
    assert pooled.shape == (6, 5, D)
    for row in range(6):
        assert torch.allclose(pooled[row], pooling(texts[row // 3][None], views[row][None])[0], atol=1e-5)
