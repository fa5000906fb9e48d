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

Backends, by device and dtype:

- CPU (float64/32, bf16, fp16): PyTorch's fused CPU flash kernel, forward and backward;
- CUDA (float32, bf16, fp16): the fused flash or memory-efficient kernel per tile
  (``_cuda``);
- anything else (CUDA float64, other devices): an exact blockwise implementation in plain
  PyTorch (``_manual_*``).

A gradient on lse (and head sizes the fused backward cannot take as they are) is folded
into the fused backward exactly (``_folded_bwd``). The batch and head axes are split into
parts of at most ``GRID_LIMIT`` (the CUDA kernels' grid limit) on every device.
``last_backward_path`` names the backward that ran last ("fused", "folded" or "manual")
and ``last_backward_kernel`` the kernel ("cpu-flash", "flash", "efficient" or "manual").
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _cuda

_aten = torch.ops.aten
_FUSED_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# The fused CUDA kernels' limit on their batch and head grid axes.
GRID_LIMIT = 65535
# Elements of one score block in the blockwise fallback (keeps its memory bounded).
_MANUAL_BLOCK_ELEMS = 1 << 22

# Which implementation ran last (tests use it to check both paths are exercised).
last_backward_path: str = ""
last_backward_kernel: str = ""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype in which softmax statistics (lse) and merges are kept."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_rows(bias: Tensor | None) -> Tensor | None:
    """Bool mask broadcastable to (B, G, Lq) of rows whose keys are all forbidden (no
    host sync: the caller applies it whether or not any row is empty)."""
    if bias is None:
        return None
    return torch.isneginf(bias).all(dim=-1)


def _backend(q: Tensor) -> str:
    """'cpu' (fused CPU kernels), 'cuda' (fused CUDA kernels) or 'manual'."""
    if q.device.type == "cpu" and q.dtype in _FUSED_CPU_DTYPES:
        return "cpu"
    if q.device.type == "cuda" and q.dtype in _cuda.FUSED_DTYPES:
        return "cuda"
    return "manual"


def _grid_parts(B: int, G: int) -> list[tuple[slice, slice]] | None:
    """(batch, head) slices of at most GRID_LIMIT each, or None when one call fits."""
    n = GRID_LIMIT
    if max(B, G) <= n:
        return None
    return [(slice(b, b + n), slice(g, g + n)) for b in range(0, B, n) for g in range(0, G, n)]


def _bias_part(bias: Tensor | None, sb: slice, sg: slice) -> Tensor | None:
    """One part of a bias broadcastable to (B, G, Lq, Lk) (size 1 axes stay whole)."""
    if bias is None:
        return None
    b4 = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    return b4[sb if b4.shape[0] != 1 else slice(None), sg if b4.shape[1] != 1 else slice(None)]


def _joined(parts: list[tuple[Tensor, ...]], B: int, G: int) -> tuple[Tensor, ...]:
    """Reassemble per-part results (in _grid_parts order) along the batch and head axes."""
    per_row = -(-G // GRID_LIMIT)
    rows = [parts[i : i + per_row] for i in range(0, len(parts), per_row)]
    return tuple(
        torch.cat([torch.cat([p[j] for p in row], dim=1) for row in rows], dim=0)
        for j in range(len(parts[0]))
    )


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
    parts = _grid_parts(B, G)
    if parts is not None:
        results = [
            attn_fwd(q[sb, sg], k[sb, sg], v[sb, sg], scale, causal, _bias_part(bias, sb, sg))
            for sb, sg in parts
        ]
        return _joined(results, B, G)
    backend = _backend(q)
    if backend == "cpu" and v.shape[-1] == q.shape[-1]:  # one head size on CPU
        out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=bias, scale=scale
        )
    elif backend == "cuda":
        out, lse = _cuda.forward(q, k, v, scale, causal, bias)
    else:
        return _manual_fwd(q, k, v, scale, causal, bias)
    lse = lse.to(compute_dtype(q.dtype))
    empty = _empty_rows(bias)
    if empty is not None:
        # The fused kernels report lse = 0 (or NaN) for a fully masked row; ours is -inf.
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
    global last_backward_path, last_backward_kernel
    if k.shape[2] == 0 or q.shape[2] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    B, G = q.shape[:2]
    parts = _grid_parts(B, G)
    if parts is not None:
        results = [
            attn_bwd(
                *(t[sb, sg] for t in (q, k, v, out, lse, dout)),
                None if dlse is None else dlse[sb, sg],
                scale,
                causal,
                _bias_part(bias, sb, sg),
            )
            for sb, sg in parts
        ]
        return _joined(results, B, G)
    backend = _backend(q)
    if backend == "manual":
        last_backward_path = last_backward_kernel = "manual"
        return _manual_bwd(q, k, v, out, lse, dout, dlse, scale, causal, bias)
    head, head_v = q.shape[-1], v.shape[-1]
    if backend == "cpu":
        fused, last_backward_kernel = _fused_cpu_bwd, "cpu-flash"
        as_is = head == head_v
    else:
        fused = _cuda.backward
        last_backward_kernel = _cuda.kernel_for(q, k, v, causal, bias, int(dlse is not None))
        as_is = head == head_v and head % 8 == 0
    if dlse is None and as_is:
        last_backward_path = "fused"
        return fused(q, k, v, out, lse, dout, scale, causal, bias)
    last_backward_path = "folded"
    return _folded_bwd(q, k, v, out, lse, dout, dlse, scale, causal, bias, fused)


def _fused_cpu_bwd(q, k, v, out, lse, dout, scale, causal, bias):
    """PyTorch's fused CPU flash backward against the global (out, lse)."""
    lse_b = _cuda.backward_lse(lse).contiguous()
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


def _folded_bwd(q, k, v, out, lse, dout, dlse, scale, causal, bias, fused=_fused_cpu_bwd):
    """A fused backward (``fused``, the CPU one by default) with a gradient on lse folded
    in exactly, and head sizes of q and v that differ or are not multiples of 8.

    The backward of softmax attention is dS = P * (dP - delta) with
    delta = rowsum(dO * O) - dlse, and the fused kernel computes delta from the (dO, O)
    it is given. One more head column carries dlse: V' = [V, 0], O' = [O, 1],
    dO' = [dO, -dlse], and q, k get zero columns (scores unchanged); every tensor is
    padded to one head size, a multiple of 8. The gradients are sliced back."""
    D, Dv = q.shape[-1], v.shape[-1]
    fold = dlse is not None
    width = _cuda.round_up(max(D, Dv + fold), 8)
    dq, dk, dv = fused(
        _cuda.pad_head(q, width),
        _cuda.pad_head(k, width),
        _cuda.pad_head(v, width),
        _cuda.pad_head(out.to(q.dtype), width, 1.0 if fold else None),
        lse,
        _cuda.pad_head(dout.to(q.dtype), width, -dlse.to(q.dtype) if fold else None),
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
    lse_b = _cuda.backward_lse(lse.to(cd))
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
