"""Attention as a plan of blocks, merged by log-sum-exp, with one exact autograd Function.

A *plan* is a list of :class:`Block`. Each block selects some queries and some keys (as
views of the full tensors) and says which (query, key) pairs inside it are visible; its
:class:`Tile` list cuts it into kernel calls (``_kernels.attn_fwd``), each chosen so that
the fused kernel needs no explicit mask where possible. Tile results are merged into the
output accumulators in place, so memory stays at one tile's result beyond the output
(the LongNet requirement that branch results be merged as they are computed).

Backward recomputes each block from the *global* out and lse (flash-attention style), so
gradients through the merge weights — which are functions of lse — are exact, and a
gradient on the returned lse is honoured. Dense, chunked, sliding-window and dilated
attention are all plans; they differ only in their planners.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._kernels import accumulate_tile_grads, attn_fwd, compute_dtype, merge_into

Selector = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Tile:
    """Rows q0..q1 of a block's queries against rows k0..k1 of its keys: one kernel call."""

    q0: int
    q1: int
    k0: int
    k1: int


@dataclass(frozen=True)
class Block:
    """A gather unit of a plan: selected queries and keys, computed as one or more tiles.

    ``qsel(x)`` maps a full (B, H, Nq, X) tensor to a view (B, *g, lq, X) of the block's
    queries; ``ksel`` likewise for keys with ``lk`` rows. Selected rows are in position
    order; ``q_pos0``/``k_pos0`` are the positions of their first rows in a common
    coordinate in which consecutive selected rows are consecutive (for dilated blocks, the
    index within the sparsified segment). Pair (t, s) is visible iff ``k_pos0 + s <=
    q_pos0 + t`` when causal, and ``|(q_pos0 + t) - (k_pos0 + s)| < window`` when a window
    is set. ``tiles`` split the block into kernel calls (default: one tile); together they
    must cover every visible pair exactly once.
    """

    qsel: Selector
    ksel: Selector
    lq: int
    lk: int
    q_pos0: int = 0
    k_pos0: int = 0
    causal: bool = False
    window: int | None = None
    # kernel heads per batch row ((head, segment) groups); None = all heads of the input
    groups: int | None = None
    tiles: tuple[Tile, ...] | None = None
    # an explicit mask instead of the position rule: tile (q0, q1, k0, k1) -> bool
    # broadcastable to (B, G, rows, cols) (True = visible), or None (all visible)
    mask_fn: Callable[[int, int, int, int], Tensor | None] | None = None
    # no earlier block of the plan writes these query rows: the first tile over each row
    # range is copied into the accumulators instead of merged (decided by the planner,
    # so the forward needs no host sync to find out)
    fresh: bool = False

    def all_tiles(self) -> tuple[Tile, ...]:
        """The block's tiles (one covering the block when none are given)."""
        return self.tiles if self.tiles is not None else (Tile(0, self.lq, 0, self.lk),)

    def _delta(self, tile: Tile) -> int:
        return (self.q_pos0 + tile.q0) - (self.k_pos0 + tile.k0)

    def visible(self, tile: Tile | None = None, device: torch.device | str = "cpu") -> Tensor:
        """(rows, cols) bool matrix of visible pairs of a tile (default: whole block)."""
        tile = tile or Tile(0, self.lq, 0, self.lk)
        t = torch.arange(tile.q0, tile.q1, device=device).unsqueeze(-1) + self.q_pos0
        s = torch.arange(tile.k0, tile.k1, device=device).unsqueeze(0) + self.k_pos0
        allowed = torch.ones(t.shape[0], s.shape[1], dtype=torch.bool, device=device)
        if self.causal:
            allowed &= s <= t
        if self.window is not None:
            allowed &= (t - s).abs() < self.window
        return allowed

    def kernel_mask(
        self, tile: Tile, dtype: torch.dtype, device: torch.device
    ) -> tuple[bool, Tensor | None]:
        """(top-left causal flag for the kernel, additive bias or None) for one tile.

        Decided from the tile's position ranges, so a tile that needs no mask (all pairs
        visible, or exactly top-left causal) never builds one; a block with ``mask_fn``
        uses that mask instead.
        """
        if self.mask_fn is not None:
            mask = self.mask_fn(tile.q0, tile.q1, tile.k0, tile.k1)
            if mask is None:
                return False, None
            bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
            return False, bias.masked_fill_(~mask, float("-inf"))
        delta = self._delta(tile)
        cols = tile.k1 - tile.k0
        # largest position gap (query - key) among the tile's causally visible pairs,
        # and the largest key-after-query gap
        q_lo, q_hi = self.q_pos0 + tile.q0, self.q_pos0 + tile.q1 - 1
        k_lo, k_hi = self.k_pos0 + tile.k0, self.k_pos0 + tile.k1 - 1
        window_free = self.window is None or (
            q_hi - k_lo < self.window and (self.causal or k_hi - q_lo < self.window)
        )
        if window_free:
            if not self.causal or delta >= cols - 1:
                return False, None
            if delta == 0:
                return True, None
        allowed = self.visible(tile, device)
        bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return False, bias.masked_fill_(~allowed, float("-inf"))

    def visible_pairs(self) -> int:
        """Number of visible (query, key) pairs in one group of this block (all tiles)."""
        total = 0
        for tile in self.all_tiles():
            causal, bias = self.kernel_mask(tile, torch.float32, torch.device("cpu"))
            rows, cols = tile.q1 - tile.q0, tile.k1 - tile.k0
            if bias is not None:
                total += int(torch.isfinite(bias).sum())
            elif causal:  # top-left: row t sees cols 0..t
                m = min(rows, cols)
                total += m * (m + 1) // 2 + max(rows - cols, 0) * cols
            else:
                total += rows * cols
        return total


def span_tiles(
    lq: int,
    lk: int,
    *,
    causal: bool,
    delta: int = 0,
    row_chunk: int | None = None,
    key_chunk: int | None = None,
) -> tuple[Tile, ...]:
    """Tiles covering a (lq x lk) block once, where (causal) row t sees cols s <= t + delta.

    Rows are cut into chunks of ``row_chunk`` (default: all rows). Per row chunk [a, b):
    the cols every row sees form one unmasked span [0, a + delta), and the cols only some
    rows see one diagonal span that is exactly top-left causal, so neither needs an
    explicit mask. ``key_chunk`` further cuts spans. (Splitting a causal block into more
    row chunks does not pay on CPU: the fused kernel's own causal path beats small masked
    diagonal tiles plus unmasked ones, measured with ``longctx bench attention``.)
    """
    if row_chunk is None:
        row_chunk = max(lq, 1)
    tiles = []
    for a in range(0, lq, row_chunk):
        b = min(lq, a + row_chunk)
        if causal:
            free = min(max(a + delta, 0), lk)
            spans = [(0, free), (free, min(max(b + delta, 0), lk))]
        else:
            spans = [(0, lk)]
        for k0, k1 in spans:
            step = key_chunk or max(k1 - k0, 1)
            tiles += [Tile(a, b, c, min(k1, c + step)) for c in range(k0, k1, step)]
    return tuple(tiles)


def _gather(sel: Selector, x: Tensor) -> Tensor:
    """Kernel input (B, G, rows, X) from a selection (copies only if the view needs it)."""
    return sel(x).flatten(1, -3)


def _lse_view(sel: Selector, lse: Tensor) -> Tensor:
    return sel(lse.unsqueeze(-1)).squeeze(-1)


def _forward(q: Tensor, k: Tensor, v: Tensor, plan: Sequence[Block], scale: float):
    B, H, Nq, _ = q.shape
    acc_dtype = compute_dtype(q.dtype)
    out_dtype = q.dtype if q.dtype == acc_dtype else acc_dtype
    out = q.new_zeros(B, H, Nq, v.shape[-1], dtype=out_dtype)
    lse = q.new_full((B, H, Nq), float("-inf"), dtype=acc_dtype)
    for blk in plan:
        qb = _gather(blk.qsel, q)  # (B, G, lq, D)
        kb = _gather(blk.ksel, k)  # (B, G, lk, D)
        vb = _gather(blk.ksel, v)
        ov = blk.qsel(out)  # (B, *g, lq, Dv) view of the accumulator
        lv = _lse_view(blk.qsel, lse)  # (B, *g, lq)
        written: list[tuple[int, int]] = []  # row ranges of this block merged so far
        for tl in blk.all_tiles():
            first = blk.fresh and all(tl.q1 <= a or tl.q0 >= b for a, b in written)
            written.append((tl.q0, tl.q1))
            causal, bias = blk.kernel_mask(tl, q.dtype, q.device)
            ob, lb = attn_fwd(
                qb[:, :, tl.q0 : tl.q1],
                kb[:, :, tl.k0 : tl.k1],
                vb[:, :, tl.k0 : tl.k1],
                scale,
                causal,
                bias,
            )
            ot = ov[..., tl.q0 : tl.q1, :]
            lt = lv[..., tl.q0 : tl.q1]
            merge_into(ot, lt, ob.view(ot.shape), lb.view(lt.shape), first)
    return out.to(q.dtype), lse


def _backward(q, k, v, out, lse, dout, dlse, plan: Sequence[Block], scale: float):
    acc_dtype = compute_dtype(q.dtype)
    dq = torch.zeros_like(q, dtype=acc_dtype)
    dk = torch.zeros_like(k, dtype=acc_dtype)
    dv = torch.zeros_like(v, dtype=acc_dtype)
    for blk in plan:
        qb = _gather(blk.qsel, q)
        kb = _gather(blk.ksel, k)
        vb = _gather(blk.ksel, v)
        ob = _gather(blk.qsel, out)
        dob = _gather(blk.qsel, dout)
        lb = _lse_view(blk.qsel, lse).reshape(ob.shape[:-1])
        dlb = None if dlse is None else _lse_view(blk.qsel, dlse).reshape(ob.shape[:-1])
        grads, pending = [], []
        for full, sel, like in ((dq, blk.qsel, qb), (dk, blk.ksel, kb), (dv, blk.ksel, vb)):
            view = sel(full)  # (B, *g, rows, X) view of the full gradient
            try:  # accumulate in place where the block's layout is a view of it
                grads.append(view.view(like.shape))
            except RuntimeError:  # strided groups: a buffer, added afterwards
                grads.append(torch.zeros_like(like, dtype=acc_dtype))
                pending.append((view, grads[-1]))
        for tl in blk.all_tiles():
            causal, bias = blk.kernel_mask(tl, q.dtype, q.device)
            rq, rk = slice(tl.q0, tl.q1), slice(tl.k0, tl.k1)
            accumulate_tile_grads(
                tuple(grads), qb, kb, vb, ob, lb, dob, dlb, rq, rk, scale, causal, bias
            )
        for view, part in pending:
            view += part.view(view.shape)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _PlanAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        out, lse = _forward(q, k, v, plan, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        ctx.scale = scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _backward(q, k, v, out, lse, dout, dlse, ctx.plan, ctx.scale)
        return dq, dk, dv, None, None


def run_plan(
    q: Tensor, k: Tensor, v: Tensor, plan: Sequence[Block], scale: float
) -> tuple[Tensor, Tensor]:
    """(out, lse) of attention over the union (with multiplicity) of the plan's blocks."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _PlanAttention.apply(q, k, v, list(plan), scale)
    return _forward(q, k, v, plan, scale)


def plan_pairs(plan: Sequence[Block], num_heads: int, batch: int = 1) -> int:
    """Visible (query, key) pairs of a plan, counted with multiplicity over blocks."""
    return batch * sum(
        (num_heads if blk.groups is None else blk.groups) * blk.visible_pairs() for blk in plan
    )
