"""Attention under an arbitrary boolean mask, computed in query tiles.

For attention patterns that no planner describes by position ranges: routed (CoLT5)
attention, where queries and keys are scattered subsets of the sequence with per-batch-row
positions, and key padding. Each tile is a range of query rows against one range of key
rows (everything outside the range is invisible to those queries), so a tile's (out, lse)
is final and no merge is needed. The mask of a tile is built only when that tile runs, so
memory is one tile's mask and scores beyond the output. Gradients are exact (the
flash-attention backward against the saved out and lse, also through lse).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._kernels import accumulate_tile_grads, attn_fwd, compute_dtype
from ._validate import check_qkv, optional_int, resolve_scale

# (q0, q1, k0, k1): query rows q0..q1 see (some of) key rows k0..k1 and no other key.
TileRange = tuple[int, int, int, int]
# mask of one tile: bool broadcastable to (B, H, q1 - q0, k1 - k0), or None (all visible)
MaskFn = Callable[[int, int, int, int], "Tensor | None"]
# score elements per tile (batch x heads x rows x keys) that the planner aims for
TILE_ELEMS = 1 << 22


def _bias(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None:
        return None
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill_(~mask, float("-inf"))


def _forward(q, k, v, tiles, mask_fn, scale):
    B, H, Nq, _ = q.shape
    acc = compute_dtype(q.dtype)
    out = q.new_zeros(B, H, Nq, v.shape[-1])
    lse = q.new_full((B, H, Nq), float("-inf"), dtype=acc)
    for q0, q1, k0, k1 in tiles:
        bias = _bias(mask_fn(q0, q1, k0, k1), q.dtype)
        o, lb = attn_fwd(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], scale, False, bias)
        out[:, :, q0:q1] = o
        lse[:, :, q0:q1] = lb
    return out, lse


def _backward(q, k, v, out, lse, dout, dlse, tiles, mask_fn, scale):
    acc = compute_dtype(q.dtype)
    dq = torch.zeros_like(q, dtype=acc)
    dk = torch.zeros_like(k, dtype=acc)
    dv = torch.zeros_like(v, dtype=acc)
    for q0, q1, k0, k1 in tiles:
        bias = _bias(mask_fn(q0, q1, k0, k1), q.dtype)
        rq, rk = slice(q0, q1), slice(k0, k1)
        accumulate_tile_grads(
            (dq, dk, dv), q, k, v, out, lse, dout, dlse, rq, rk, scale, False, bias
        )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _TiledMaskedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, tiles, mask_fn, scale):
        out, lse = _forward(q, k, v, tiles, mask_fn, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.tiles, ctx.mask_fn, ctx.scale = tiles, mask_fn, scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _backward(
            q, k, v, out, lse, dout.contiguous(), dlse, ctx.tiles, ctx.mask_fn, ctx.scale
        )
        return dq, dk, dv, None, None, None


def query_rows_per_tile(batch: int, heads: int, keys: int) -> int:
    return max(1, TILE_ELEMS // max(1, batch * heads * keys))


def tiled_masked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tiles: Sequence[TileRange],
    mask_fn: MaskFn,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """(out, lse) where query rows of each tile attend the tile's key range under
    ``mask_fn``; rows in no tile get out = 0, lse = -inf. Tiles must not share query rows."""
    return _TiledMaskedAttention.apply(q, k, v, tuple(tiles), mask_fn, scale)


def _check_mask(mask: Tensor, q: Tensor, k: Tensor) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool (True = visible), got {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"mask is on {mask.device}, q on {q.device}")
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if mask.dim() > 4:
        raise ValueError(f"mask must broadcast to (B, H, Nq, Nk) = {full}, got {tuple(mask.shape)}")
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    for have, want in zip(m.shape, full):
        if have not in (1, want):
            raise ValueError(
                f"mask must broadcast to (B, H, Nq, Nk) = {full}, got {tuple(mask.shape)}"
            )
    return m


def masked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    q_offset: int | None = None,
):
    """Exact attention where query i sees key j iff ``mask[..., i, j]`` (and, with
    ``causal``, j <= i + offset as in :func:`longctx.ops.attention`).

    ``mask`` is bool, broadcastable to (B, H, Nq, Nk) (e.g. (B, 1, 1, Nk) key padding).
    A query that sees no key gets out = 0 and lse = -inf, with zero gradients. Work and
    memory are O(Nq * Nk) time and O(tile) memory; use the position-planned ops
    (dense, sliding, dilated) when the pattern is one of theirs.
    """
    check_qkv(q, k, v)
    m = _check_mask(mask, q, k)
    tau = resolve_scale(scale, q.shape[-1])
    q_offset = optional_int(q_offset, "q_offset")
    nq, nk = q.shape[2], k.shape[2]
    off = (nk - nq if q_offset is None else q_offset) if causal else 0

    def mask_fn(q0: int, q1: int, k0: int, k1: int) -> Tensor:
        part = m[..., q0:q1, k0:k1]
        if causal:
            i = torch.arange(q0, q1, device=q.device).unsqueeze(-1)
            j = torch.arange(k0, k1, device=q.device)
            part = part & (j <= i + off)
        return part

    step = query_rows_per_tile(q.shape[0], q.shape[1], nk)
    tiles = []
    for a in range(0, nq, step):
        b = min(nq, a + step)
        k1 = min(nk, max(0, b - 1 + off + 1)) if causal else nk
        if k1 > 0:
            tiles.append((a, b, 0, k1))
    out, lse = tiled_masked_attention(q, k, v, tiles, mask_fn, tau)
    return (out, lse) if return_lse else out
