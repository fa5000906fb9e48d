"""One attention tile on CUDA through PyTorch's fused kernels (private SDPA ops).

``_kernels.attn_fwd`` / ``attn_bwd`` call :func:`forward` / :func:`backward` for a CUDA
tile in float32, bfloat16 or float16 (float64 stays on the exact blockwise path). Which
kernel runs (:func:`kernel_for`):

- **flash** (FlashAttention-2 as built into PyTorch): bf16/fp16, no bias, one head size
  <= 256 after padding to a multiple of 8, and a causal tile only when it is square (the
  kernel aligns causal masks bottom-right when Lq != Lk; ours are top-left);
- **efficient** (the memory-efficient kernel): every other float32/bf16/fp16 tile,
  including tiles with an additive bias (top-left causal).

Contracts of the kernels that this file bridges (PyTorch 2.11-2.13):

- both return the lse in float32, natural log; flash as (B, G, Lq), efficient padded to
  (B, G, ceil(Lq / 32) * 32). The efficient backward reads the lse through its strides,
  so it is handed one padded the same way;
- a row with no visible key: flash reports lse = +inf, longctx uses -inf (``_kernels``
  also fixes out and lse of rows a bias empties). The backwards are handed +inf for such
  rows, which makes every probability of the row exp(s - inf) = 0;
- head sizes must be multiples of 8 with aligned rows: inputs are zero-padded (scores
  and outputs do not change; the scale is passed explicitly) and misaligned views copied;
- a bias must have q's dtype, a contiguous last dimension and rows aligned to 16
  elements: it is copied into a buffer whose last dimension is padded to 16;
- the backward takes the global (out, lse) of the rows, so merged tiles get exact
  gradients; a gradient on lse is folded in as one more value column
  (``_kernels.folded_bwd``); dropout is 0, so the random-state arguments are not read.

The kernels' 65,535 limit on the batch and head grid axes is handled one level up
(``_kernels`` splits those axes for every device).
"""

from __future__ import annotations

import torch
from torch import Tensor

_aten = torch.ops.aten
FLASH_DTYPES = (torch.bfloat16, torch.float16)
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLASH_MAX_HEAD = 256
_HEAD_ALIGN = 8  # head sizes the kernels take
_LSE_ALIGN = 32  # the efficient kernel's lse padding
_BIAS_ALIGN = 16  # the efficient kernel's bias row alignment
_BYTE_ALIGN = 16  # vectorised loads


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def kernel_for(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, bias: Tensor | None, extra: int = 0
) -> str:
    """'flash' or 'efficient' for a CUDA tile in a fused dtype (module docstring);
    ``extra``: value columns the backward adds (1 when an lse gradient is folded in)."""
    width = round_up(max(q.shape[-1], v.shape[-1] + extra), _HEAD_ALIGN)
    square = q.shape[2] == k.shape[2]
    if (
        bias is None
        and q.dtype in FLASH_DTYPES
        and width <= FLASH_MAX_HEAD
        and (square or not causal)
    ):
        return "flash"
    return "efficient"


def _aligned(t: Tensor) -> Tensor:
    """t itself when the kernels can read it in place (last dim contiguous, rows and the
    start aligned to 16 bytes), else a contiguous copy."""
    unit = max(1, _BYTE_ALIGN // t.element_size())
    ok = (
        t.stride(-1) == 1
        and t.data_ptr() % _BYTE_ALIGN == 0
        and all(s % unit == 0 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)
    )
    return t if ok else t.contiguous()


def pad_head(t: Tensor, width: int, column: Tensor | float | None = None) -> Tensor:
    """t (..., d) zero-padded to (..., width); ``column`` (if given) fills column d."""
    d = t.shape[-1]
    if d == width and column is None:
        return t
    out = t.new_zeros(*t.shape[:-1], width)
    out[..., :d] = t
    if column is not None:
        out[..., d] = column
    return out


def backward_lse(lse: Tensor) -> Tensor:
    """The lse as the fused backwards read it: +inf (not -inf) for a row that sees no
    key, so that every probability of the row is exp(s - inf) = 0."""
    return lse.masked_fill(torch.isneginf(lse), float("inf"))


def _kernel_bias(bias: Tensor, shape: tuple[int, int, int, int], dtype: torch.dtype) -> Tensor:
    """The additive bias as the efficient kernel reads it: q's dtype, 4-d, rows padded to
    a multiple of 16 elements (a sliced view), expanded to (B, G, Lq, Lk)."""
    b4 = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    lk = shape[-1]
    buf = b4.new_zeros(*b4.shape[:-1], round_up(lk, _BIAS_ALIGN), dtype=dtype)
    buf[..., :lk] = b4
    return buf[..., :lk].expand(shape)


def forward(
    q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(out, lse) of one CUDA tile with a fused kernel (module docstring)."""
    B, G, Lq, D = q.shape
    Lk, Dv = k.shape[2], v.shape[-1]
    if kernel_for(q, k, v, causal, bias) == "flash":
        width = round_up(max(D, Dv), _HEAD_ALIGN)
        qp, kp, vp = (_aligned(pad_head(t, width)) for t in (q, k, v))
        res = _aten._scaled_dot_product_flash_attention(qp, kp, vp, 0.0, causal, False, scale=scale)
        out, lse = res[0], res[1]
        lse = lse.masked_fill(torch.isposinf(lse), float("-inf"))  # a row with no key
    else:
        wq, wv = round_up(D, _HEAD_ALIGN), round_up(Dv, _HEAD_ALIGN)
        if wq != wv:  # one head size for q, k and v
            wq = wv = max(wq, wv)
        qp, kp = (pad_head(t, wq).contiguous() for t in (q, k))
        vp = pad_head(v, wv).contiguous()
        kb = None if bias is None else _kernel_bias(bias, (B, G, Lq, Lk), q.dtype)
        res = _aten._scaled_dot_product_efficient_attention(
            qp, kp, vp, kb, True, 0.0, causal, scale=scale
        )
        out, lse = res[0], res[1][..., :Lq]  # lse padded to a multiple of 32
    return out[..., :Dv], lse


def backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dout: Tensor,
    scale: float,
    causal: bool,
    bias: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The fused backward of one CUDA tile against the global (out, lse), for inputs that
    already have one head size, a multiple of 8 (``_kernels`` pads and folds)."""
    B, G, Lq, _ = q.shape
    Lk = k.shape[2]
    out, dout = out.to(q.dtype), dout.to(q.dtype)
    # (B, G, Lq) in the compute dtype (float32 for the kernels' dtypes), +inf for empty rows
    lse_b = backward_lse(lse).contiguous()
    rng = q.new_empty(0, dtype=torch.int64)  # not read: dropout is 0
    if kernel_for(q, k, v, causal, bias) == "flash":
        qp, kp, vp, op, dop = (_aligned(t) for t in (q, k, v, out, dout))
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_backward(
            dop, qp, kp, vp, op, lse_b, None, None, Lq, Lk, 0.0, causal, rng, rng, scale=scale
        )
        return dq, dk, dv
    padded = lse_b.new_full((B, G, round_up(Lq, _LSE_ALIGN)), float("inf"))
    padded[..., :Lq] = lse_b
    kb = None if bias is None else _kernel_bias(bias, (B, G, Lq, Lk), q.dtype)
    dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
        dout.contiguous(),
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        kb,
        out.contiguous(),
        padded,
        rng,
        rng,
        0.0,
        [True, True, True, False],
        causal,
        scale=scale,
    )
    return dq, dk, dv
