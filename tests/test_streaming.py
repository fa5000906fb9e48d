"""ops.StreamingAttention: the online-softmax state over key chunks equals attention."""

import pytest
import torch

from conftest import make_qkv
from longctx import ops
from longctx.ops import reference as ref


def _stream(q, k, v, chunk, order=None, mask=None):
    state = ops.StreamingAttention(q, scale=0.4)
    starts = list(range(0, k.shape[2], chunk))
    for s in order(starts) if order else starts:
        part = None if mask is None else mask[..., s : s + chunk]
        state.update(k[:, :, s : s + chunk], v[:, :, s : s + chunk], part)
    return state.read()


def _shuffled(xs):
    g = torch.Generator().manual_seed(0)
    return [xs[i] for i in torch.randperm(len(xs), generator=g)]


@pytest.mark.parametrize("chunk", [1, 7, 23])
@pytest.mark.parametrize("order", [None, _shuffled], ids=["in-order", "shuffled"])
def test_streaming_equals_attention_forward_and_backward(chunk, order):
    q, k, v = make_qkv(2, 3, 5, 23, 8, dv=6)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    g = torch.Generator().manual_seed(1)
    g_out, g_lse = (
        torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64),
        torch.randn(2, 3, 5, generator=g, dtype=torch.float64),
    )
    results = []
    for fn in (
        lambda: _stream(q, k, v, chunk, order),
        lambda: ops.attention(q, k, v, scale=0.4, return_lse=True),
    ):
        out, lse = fn()
        grads = torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), (q, k, v))
        results.append((out, lse, *grads))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("chunk", [1, 7, 19])
def test_streaming_with_a_causal_mask_and_with_multiplicities(chunk):
    q, k, v = make_qkv(1, 2, 19, 19, 8)
    causal = ref.causal_mask(19, 19)
    out, lse = _stream(q, k, v, chunk, _shuffled, causal)
    want_out, want_lse = ref.attention(q, k, v, causal=True, scale=0.4)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=1e-12)
    # dilated attention is softmax over keys counted once per branch that sees them
    m = ref.dilated_multiplicity(19, 2, [4, 8], [1, 2], causal=True)
    out, lse = _stream(q, k, v, chunk, None, m.unsqueeze(0))
    want_out, want_lse = ref.masked_attention(q, k, v, m, scale=0.4)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=1e-12)


def test_streaming_before_any_visible_key_and_bad_input():
    q, k, v = make_qkv(1, 1, 3, 4, 8, dv=5)
    state = ops.StreamingAttention(q)
    out, lse = state.read()
    assert out.shape == (1, 1, 3, 8) and torch.isneginf(lse).all() and (out == 0).all()
    state.update(k, v, torch.zeros(3, 4, dtype=torch.bool))
    out, lse = state.read()
    assert out.shape == (1, 1, 3, 5) and torch.isneginf(lse).all()
    with pytest.raises(TypeError, match="bool or integer"):
        state.update(k, v, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="q must be"):
        ops.StreamingAttention(torch.zeros(3, 4))
