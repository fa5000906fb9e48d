"""Attention under an arbitrary boolean mask, computed in query tiles.

For attention patterns that no planner describes by position ranges: routed (CoLT5)
attention, where queries and keys are scattered subsets of the sequence with per-batch-row
positions, and key padding. Each tile is a range of query rows against one range of key
rows (everything outside the range is invisible to those queries), so a tile's (out, lse)
is final and no merge is needed. The mask of a tile is built only when that tile runs, so
memory is one tile's mask beyond the output (the kernels bound their own scores); a mask
that is the same for every query (key padding) runs as one tile. Each tile is a block of a
plan with an explicit mask, so the plan runner's autograd Function gives exact gradients
(also through lse).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._blockwise import Block, run_plan
from ._validate import check_qkv, optional_int, resolve_scale
from .attention import causal_query_offset, rows

# (q0, q1, k0, k1): query rows q0..q1 see (some of) key rows k0..k1 and no other key.
TileRange = tuple[int, int, int, int]
# mask of one tile: bool broadcastable to (B, H, q1 - q0, k1 - k0), or None (all visible)
MaskFn = Callable[[int, int, int, int], "Tensor | None"]
# mask elements per tile (the mask's batch x heads x rows x keys) that the planner aims for
TILE_ELEMS = 1 << 22


def query_rows_per_tile(batch: int, heads: int, keys: int) -> int:
    """Query rows per tile so that a (batch, heads, rows, keys) tile holds about
    TILE_ELEMS elements."""
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
    ``mask_fn``; rows in no tile get out = 0, lse = -inf. Tiles must not share query rows.
    Each tile is one block of a plan (``_blockwise``), run by the plan runner."""
    plan = [
        Block(
            rows(q0, q1),
            rows(k0, k1),
            lq=q1 - q0,
            lk=k1 - k0,
            mask_fn=lambda a, b, c, d, q0=q0, k0=k0: mask_fn(q0 + a, q0 + b, k0 + c, k0 + d),
            fresh=True,  # tiles never share query rows
        )
        for q0, q1, k0, k1 in tiles
    ]
    return run_plan(q, k, v, plan, scale)


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
    off = causal_query_offset(nq, nk, q_offset) if causal else 0

    def mask_fn(q0: int, q1: int, k0: int, k1: int) -> Tensor:
        # a broadcast (size-1) query or key axis is kept whole, not sliced to nothing
        rows = slice(q0, q1) if m.shape[-2] > 1 else slice(None)
        cols = slice(k0, k1) if m.shape[-1] > 1 else slice(None)
        part = m[..., rows, cols]
        if causal:
            i = torch.arange(q0, q1, device=q.device).unsqueeze(-1)
            j = torch.arange(k0, k1, device=q.device)
            part = part & (j <= i + off)
        return part

    # A tile's memory beyond the fused kernel's own is its mask, (B', H', rows, keys)
    # with B', H' the mask's own (broadcast) sizes; a mask that is the same for every
    # query (key padding) needs no query tiles at all, unless causal adds the diagonal.
    if m.shape[-2] == 1 and not causal:
        step = max(nq, 1)
    else:
        step = query_rows_per_tile(m.shape[0], m.shape[1], nk)
    tiles = []
    for a in range(0, nq, step):
        b = min(nq, a + step)
        k1 = min(nk, max(0, b - 1 + off + 1)) if causal else nk
        if k1 > 0:
            tiles.append((a, b, 0, k1))
    out, lse = tiled_masked_attention(q, k, v, tiles, mask_fn, tau)
    return (out, lse) if return_lse else out
