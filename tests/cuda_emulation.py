"""A CPU stand-in for the four private CUDA attention ops that ``longctx.ops._cuda`` calls.

Each function computes its op in float64 by the definition and enforces the contract the
real kernel has (PyTorch 2.11-2.13 source): head sizes that are multiples of 8 (flash:
one size <= 256), contiguous last dimensions, flash's bottom-right causal alignment and
+inf lse for a row with no key, the efficient kernel's lse padded to a multiple of 32
(garbage past Lq) and read back padded, its bias in q's dtype with rows aligned to 16
elements, and NaN for a row a bias empties. Tests swap it in for ``_cuda._aten`` so the
padding, folding, lse mapping and grid splitting of the CUDA path run on a CPU; the
kernels themselves run only on a GPU (the ``gpu`` tests).
"""

from __future__ import annotations

import torch
from torch import Tensor

INF = float("inf")


def _check_heads(*ts: Tensor, same: bool, max_head: int | None = None) -> None:
    for t in ts:
        assert t.stride(-1) == 1, "last dimension must be contiguous"
        assert t.shape[-1] % 8 == 0, f"head size {t.shape[-1]} is not a multiple of 8"
        if max_head is not None:
            assert t.shape[-1] <= max_head
    if same:
        assert len({t.shape[-1] for t in ts}) == 1, "one head size for q, k and v"


def _scores(q, k, scale, causal, bottom_right, bias):
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale  # (B, G, Lq, Lk)
    Lq, Lk = s.shape[-2:]
    if causal:
        shift = Lk - Lq if bottom_right else 0
        t = torch.arange(Lq).unsqueeze(-1)
        j = torch.arange(Lk)
        s = s.masked_fill(j > t + shift, -INF)
    if bias is not None:
        s = s + bias.double()
    return s


def _check_bias(bias: Tensor, q: Tensor, k: Tensor) -> None:
    assert bias.dtype == q.dtype, "bias must have q's dtype"
    assert bias.dim() == 4 and tuple(bias.shape) == (*q.shape[:3], k.shape[2])
    assert bias.stride(-1) == 1 and bias.stride(2) % 16 == 0, "attn_bias is not aligned"


def _lse_dtype(q: Tensor) -> torch.dtype:
    # the real kernels return float32; float64 here lets tests compare to 1e-12
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _attend(q, k, v, scale, causal, bottom_right, bias):
    s = _scores(q, k, scale, causal, bottom_right, bias)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    return torch.matmul(p, v.double()), lse


def _grads(dout, q, k, v, out, lse, scale, causal, bottom_right, bias):
    s = _scores(q, k, scale, causal, bottom_right, bias)
    p = torch.exp(s - lse.double().unsqueeze(-1))  # lse = +inf gives 0 for an empty row
    do, vd = dout.double(), v.double()
    delta = (do * out.double()).sum(-1, keepdim=True)
    dv = torch.matmul(p.transpose(-1, -2), do)
    ds = p * (torch.matmul(do, vd.transpose(-1, -2)) - delta) * scale
    dq = torch.matmul(ds, k.double())
    dk = torch.matmul(ds.transpose(-1, -2), q.double())
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def flash_forward(q, k, v, dropout_p, is_causal, return_debug_mask, *, scale):
    _check_heads(q, k, v, same=True, max_head=256)
    assert dropout_p == 0.0 and not return_debug_mask
    out, lse = _attend(q, k, v, scale, is_causal, True, None)
    empty = torch.isneginf(lse)
    out = out.masked_fill(empty.unsqueeze(-1), 0.0)
    lse = lse.masked_fill(empty, INF)  # FlashAttention-2 writes +inf for a row with no key
    seed = torch.zeros(2, dtype=torch.int64)
    Lq, Lk = q.shape[2], k.shape[2]
    return out.to(q.dtype), lse.to(_lse_dtype(q)), None, None, Lq, Lk, seed, seed[0], None


def flash_backward(
    dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, dropout_p, is_causal, seed, offset,
    *, scale,
):  # fmt: skip
    _check_heads(q, k, v, out, dout, same=True, max_head=256)
    assert cum_q is None and cum_k is None and dropout_p == 0.0
    assert (max_q, max_k) == (q.shape[2], k.shape[2])
    assert out.dtype == dout.dtype == q.dtype
    assert lse.is_contiguous() and tuple(lse.shape) == tuple(q.shape[:3])
    assert not torch.isneginf(lse).any(), "flash reads an empty row's lse as +inf"
    return _grads(dout, q, k, v, out, lse, scale, is_causal, True, None)


def efficient_forward(q, k, v, bias, compute_log_sumexp, dropout_p, is_causal, *, scale):
    _check_heads(q, k, v, same=False)
    assert q.shape[-1] == k.shape[-1] and compute_log_sumexp and dropout_p == 0.0
    if bias is not None:
        _check_bias(bias, q, k)
    out, lse = _attend(q, k, v, scale, is_causal, False, bias)
    empty = torch.isneginf(lse)
    out = out.masked_fill(empty.unsqueeze(-1), float("nan"))
    lse = lse.masked_fill(empty, float("nan"))
    Lq = q.shape[2]
    padded = torch.full((*q.shape[:2], -(-Lq // 32) * 32), float("nan"), dtype=_lse_dtype(q))
    padded[..., :Lq] = lse
    seed = torch.zeros((), dtype=torch.int64)
    return out.to(q.dtype), padded, seed, seed


def efficient_backward(
    dout, q, k, v, bias, out, lse, seed, offset, dropout_p, grad_input_mask, is_causal,
    *, scale,
):  # fmt: skip
    _check_heads(q, k, v, same=False)
    assert q.shape[-1] == k.shape[-1] and v.shape[-1] == dout.shape[-1] == out.shape[-1]
    assert dropout_p == 0.0 and list(grad_input_mask[:3]) == [True, True, True]
    Lq = q.shape[2]
    assert lse.shape[-1] % 32 == 0 and lse.shape[-1] >= Lq and lse.stride(1) % 8 == 0
    if bias is not None:
        _check_bias(bias, q, k)
    lse = lse[..., :Lq]
    assert not torch.isneginf(lse).any() and not torch.isnan(lse).any()
    return (*_grads(dout, q, k, v, out, lse, scale, is_causal, False, bias), None)


class EmulatedAten:
    """Stands in for ``torch.ops.aten`` in ``longctx.ops._cuda``."""

    _scaled_dot_product_flash_attention = staticmethod(flash_forward)
    _scaled_dot_product_flash_attention_backward = staticmethod(flash_backward)
    _scaled_dot_product_efficient_attention = staticmethod(efficient_forward)
    _scaled_dot_product_efficient_attention_backward = staticmethod(efficient_backward)
