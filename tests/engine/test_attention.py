"""The attention core: the explicit short-sequence path on CPU equals torch's kernel, and stays finite."""
import pytest
import torch
import torch.nn.functional as F

from engine.model.common import SHORT_ATTENTION, attention, padding_bias


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t", [1, 16, SHORT_ATTENTION])
def test_short_path_equals_sdpa(causal, t):
    g = torch.Generator().manual_seed(t)
    q = torch.randn(3, 4, t, 8, generator=g)
    k, v = torch.randn(3, 2, t, 8, generator=g), torch.randn(3, 2, t, 8, generator=g)  # GQA: 2 kv heads
    mask = torch.ones(3, t, dtype=torch.long)
    mask[1, t // 2 + 1:] = 0
    mask[2, :t // 3] = 0  # left padding: with causal, its first queries see no key
    if t == 1:
        mask[2] = 1
    bias = padding_bias(mask, torch.float32, causal)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=bias)
    torch.testing.assert_close(attention(q, k, v, bias), want, atol=2e-6, rtol=1e-5)


def test_half_precision_fully_masked_rows_stay_finite():
    """Queries that may attend to no key (left padding, causal): the sum in fp16 would overflow to -inf."""
    q, k, v = torch.full((1, 1, 4, 16), 2.0), torch.full((1, 1, 4, 16), -2.0), torch.randn(1, 1, 4, 16)
    bias = padding_bias(torch.tensor([[0, 1, 1, 1]]), torch.float16, causal=True)
    out = attention(q.half(), k.half(), v.half(), bias)
    assert torch.isfinite(out).all()
