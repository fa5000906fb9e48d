"""Attention-with-lse kernels: one block of queries against one block of keys.

Everything above this file is built from two calls:

- ``attn_fwd(q, k, v, scale, causal, bias) -> (out, lse)``
- ``attn_bwd(q, k, v, out, lse, dout, dlse, scale, causal, bias) -> (dq, dk, dv)``

Layout (G batch-heads flattened into dims 0..1): q (B, G, Lq, D), k (B, G, Lk, D),
v (B, G, Lk, Dv). ``causal`` is top-left aligned (query t sees key s iff s <= t), like the
fused kernels. ``bias`` is an optional additive float mask broadcastable to (B, G, Lq, Lk)
with 0 (allowed) or -inf (forbidden). A query row with no allowed key has out = 0 and
lse = -inf.

``attn_bwd`` takes the *global* ``out`` and ``lse`` of the query rows (after merging with
other blocks), so that the gradient of a merged attention is the sum of per-block
gradients (the flash-attention backward with delta = rowsum(dout * out) - dlse).

CPU uses PyTorch's fused flash kernel, forward and backward; a gradient on lse (and a
value head size unlike the query's) is folded into the fused backward exactly
(``_folded_bwd``). CUDA uses the fused memory-efficient kernel for the forward when no
bias is needed; any other case uses an exact blockwise implementation in plain PyTorch
(``_manual_*``). ``last_backward_path`` names the backward that ran last ("fused",
"folded" or "manual").
"""

from __future__ import annotations

import torch
from torch import Tensor

_aten = torch.ops.aten
_FUSED_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_FUSED_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Elements of one score block in the blockwise fallback (keeps its memory bounded).
_MANUAL_BLOCK_ELEMS = 1 << 22

# Which implementation ran last (tests use it to check both paths are exercised).
last_backward_path: str = ""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype in which softmax statistics (lse) and merges are kept."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_rows(bias: Tensor | None) -> Tensor | None:
    """Bool mask broadcastable to (B, G, Lq) of rows whose keys are all forbidden (no
    host sync: the caller applies it whether or not any row is empty)."""
    if bias is None:
        return None
    return torch.isneginf(bias).all(dim=-1)


def attn_fwd(
    q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(out, lse) of one tile (module docstring)."""
    B, G, Lq, _ = q.shape
    Lk = k.shape[2]
    if Lk == 0 or Lq == 0:
        out = q.new_zeros(B, G, Lq, v.shape[-1])
        lse = q.new_full((B, G, Lq), float("-inf"), dtype=compute_dtype(q.dtype))
        return out, lse
    same_dim = v.shape[-1] == q.shape[-1]  # the fused kernels need one head size
    if q.device.type == "cpu" and q.dtype in _FUSED_CPU_DTYPES and same_dim:
        out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=bias, scale=scale
        )
    elif q.device.type == "cuda" and q.dtype in _FUSED_CUDA_DTYPES and bias is None and same_dim:
        # contiguous inputs: the CUDA kernel's stride requirements are stricter than the
        # CPU kernel's, and a copy on the GPU costs little next to the attention
        out, lse, _, _ = _aten._scaled_dot_product_efficient_attention(
            q.contiguous(), k.contiguous(), v.contiguous(), None, True, 0.0, causal, scale=scale
        )
        lse = lse[..., :Lq]  # some versions pad lse's last dim to a multiple of 32
    else:
        return _manual_fwd(q, k, v, scale, causal, bias)
    lse = lse.to(compute_dtype(q.dtype))
    empty = _empty_rows(bias)
    if empty is not None:
        # The fused kernels report lse = 0 for a fully masked row; the spec says -inf.
        empty = empty.expand(B, G, Lq)
        lse = lse.masked_fill(empty, float("-inf"))
        out = out.masked_fill(empty.unsqueeze(-1), 0.0)
    return out, lse


def attn_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dout: Tensor,
    dlse: Tensor | None,
    scale: float,
    causal: bool,
    bias: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of one tile against the global out and lse (module docstring)."""
    global last_backward_path
    if k.shape[2] == 0 or q.shape[2] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if not (q.device.type == "cpu" and q.dtype in _FUSED_CPU_DTYPES):
        last_backward_path = "manual"
        return _manual_bwd(q, k, v, out, lse, dout, dlse, scale, causal, bias)
    if dlse is None and v.shape[-1] == q.shape[-1]:
        last_backward_path = "fused"
        return _fused_cpu_bwd(q, k, v, out, lse, dout, scale, causal, bias)
    last_backward_path = "folded"
    return _folded_bwd(q, k, v, out, lse, dout, dlse, scale, causal, bias)


def _fused_cpu_bwd(q, k, v, out, lse, dout, scale, causal, bias):
    """PyTorch's fused CPU flash backward against the global (out, lse)."""
    # A row that sees no key at all has lse = -inf; +inf makes its probabilities 0.
    lse_b = lse.masked_fill(torch.isneginf(lse), float("inf")).contiguous()
    return _aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.to(q.dtype).contiguous(),
        q,
        k,
        v,
        out.to(q.dtype).contiguous(),
        lse_b,
        0.0,
        causal,
        attn_mask=bias,
        scale=scale,
    )


def _folded_bwd(q, k, v, out, lse, dout, dlse, scale, causal, bias):
    """The fused backward with a gradient on lse folded in exactly (and head sizes of q
    and v that differ).

    The backward of softmax attention is dS = P * (dP - delta) with
    delta = rowsum(dO * O) - dlse, and the fused kernel computes delta from the (dO, O)
    it is given. One more head column carries dlse: V' = [V, 0], O' = [O, 1],
    dO' = [dO, -dlse], and q, k get zero columns (scores unchanged); every tensor is
    padded to one head size, a multiple of 8. The gradients are sliced back."""
    D, Dv = q.shape[-1], v.shape[-1]
    width = max(D, Dv + (dlse is not None))
    width = -(-width // 8) * 8

    def padded(t: Tensor, column: Tensor | float | None = None) -> Tensor:
        extra = t.new_zeros(*t.shape[:-1], width - t.shape[-1])
        if column is not None:
            extra[..., 0] = column
        return torch.cat([t, extra], dim=-1)  # (..., width)

    fold = dlse is not None
    dq, dk, dv = _fused_cpu_bwd(
        padded(q),
        padded(k),
        padded(v),
        padded(out.to(q.dtype), 1.0 if fold else None),
        lse,
        padded(dout.to(q.dtype), -dlse.to(q.dtype) if fold else None),
        scale,
        causal,
        bias,
    )
    return dq[..., :D], dk[..., :D], dv[..., :Dv]


def _block_scores(
    qb: Tensor, k: Tensor, scale: float, causal: bool, bias: Tensor | None, a: int, b: int
) -> Tensor:
    """Scaled, masked scores of query rows a..b against all keys, in the compute dtype."""
    s = torch.matmul(qb, k.transpose(-1, -2)) * scale  # (B, G, b-a, Lk)
    if causal:
        Lk = k.shape[2]
        t = torch.arange(a, b, device=qb.device).unsqueeze(-1)
        j = torch.arange(Lk, device=qb.device)
        s = s.masked_fill(j > t, float("-inf"))
    if bias is not None:
        s = s + bias[..., a:b, :].to(s.dtype)
    return s


def _row_block(q: Tensor, k: Tensor) -> int:
    B, G, _, _ = q.shape
    return max(1, _MANUAL_BLOCK_ELEMS // max(1, B * G * k.shape[2]))


def _manual_fwd(
    q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    cd = compute_dtype(q.dtype)
    qc, kc, vc = q.to(cd), k.to(cd), v.to(cd)
    Lq = q.shape[2]
    outs, lses = [], []
    step = _row_block(q, k)
    for a in range(0, Lq, step):
        b = min(Lq, a + step)
        s = _block_scores(qc[:, :, a:b], kc, scale, causal, bias, a, b)
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        denom = p.sum(dim=-1, keepdim=True)
        nonempty = denom > 0
        o = torch.matmul(p, vc) / torch.where(nonempty, denom, torch.ones_like(denom))
        lse = torch.where(nonempty, m + torch.log(denom.clamp_min(1e-300)), float("-inf"))
        outs.append(o)
        lses.append(lse.squeeze(-1))
    return torch.cat(outs, dim=2).to(q.dtype), torch.cat(lses, dim=2)


def _manual_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dout: Tensor,
    dlse: Tensor | None,
    scale: float,
    causal: bool,
    bias: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    cd = compute_dtype(q.dtype)
    qc, kc, vc, doc = q.to(cd), k.to(cd), v.to(cd), dout.to(cd)
    delta = (doc * out.to(cd)).sum(dim=-1)  # (B, G, Lq)
    if dlse is not None:
        delta = delta - dlse.to(cd)
    lse_b = lse.to(cd).masked_fill(torch.isneginf(lse), float("inf"))
    dq = torch.empty_like(qc)
    dk = torch.zeros_like(kc)
    dv = torch.zeros_like(vc)
    Lq = q.shape[2]
    step = _row_block(q, k)
    for a in range(0, Lq, step):
        b = min(Lq, a + step)
        s = _block_scores(qc[:, :, a:b], kc, scale, causal, bias, a, b)
        p = torch.exp(s - lse_b[:, :, a:b].unsqueeze(-1))  # (B, G, rows, Lk)
        dv += torch.matmul(p.transpose(-1, -2), doc[:, :, a:b])
        dp = torch.matmul(doc[:, :, a:b], vc.transpose(-1, -2))
        ds = p * (dp - delta[:, :, a:b].unsqueeze(-1)) * scale
        dq[:, :, a:b] = torch.matmul(ds, kc)
        dk += torch.matmul(ds.transpose(-1, -2), qc[:, :, a:b])
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def accumulate_tile_grads(
    grads: tuple[Tensor, Tensor, Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dout: Tensor,
    dlse: Tensor | None,
    rq: slice,
    rk: slice,
    scale: float,
    causal: bool,
    bias: Tensor | None,
) -> None:
    """Backward of one tile (query rows rq against key rows rk), added in place into
    ``grads`` = (dq, dk, dv) (tensors or views laid out like q, k, v)."""
    g = attn_bwd(
        q[:, :, rq],
        k[:, :, rk],
        v[:, :, rk],
        out[:, :, rq],
        lse[:, :, rq],
        dout[:, :, rq],
        None if dlse is None else dlse[:, :, rq],
        scale,
        causal,
        bias,
    )
    grads[0][:, :, rq] += g[0]
    grads[1][:, :, rk] += g[1]
    grads[2][:, :, rk] += g[2]


def merge_into(
    acc_out: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor, first: bool = False
) -> None:
    """In place: (acc_out, acc_lse) <- merge((acc_out, acc_lse), (out, lse)).

    ``acc_out``/``acc_lse`` may be strided views into larger accumulators. ``out`` is
    consumed (scaled in place). No autograd: used inside the blockwise Function.
    ``first``: the caller's plan guarantees that nothing was merged into this region yet
    (it holds (0, -inf)), so the part is copied. The flag comes from the plan, never from
    the data, so there is no host sync; merging into (0, -inf) gives the same result
    exactly (alpha = 0, beta = exp(0) = 1), so a conservative plan only costs time.
    """
    if first:
        acc_out.copy_(out)
        acc_lse.copy_(lse)
        return
    new = torch.logaddexp(acc_lse, lse)
    finite = torch.isfinite(new)
    safe = torch.where(finite, new, torch.zeros_like(new))
    alpha = torch.where(finite, torch.exp(acc_lse - safe), torch.zeros_like(new))
    beta = torch.where(finite, torch.exp(lse - safe), torch.zeros_like(new))
    acc_out.mul_(alpha.unsqueeze(-1).to(acc_out.dtype))
    acc_out.add_(out.to(acc_out.dtype).mul_(beta.unsqueeze(-1).to(acc_out.dtype)))
    acc_lse.copy_(new)
