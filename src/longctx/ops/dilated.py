"""LongNet dilated attention (Ding et al., arXiv 2307.02486), exactly as docs/spec.md,
section 2.

Branch b = (w_b, r_b), w'_b = min(w_b, N). In branch b, head h with offset o_{h,b}, query
i attends key j iff both lie in the same segment of length w'_b (the last segment may be
shorter), both in-segment indices are congruent to o_{h,b} mod r_b, and (causal) j <= i.
Branch parts are merged by log-sum-exp (the paper's mixing weights s_b = exp(lse_b)), so a
key active in two branches counts twice. Gradients flow exactly through the mixing weights.

Implementation: for one (branch, head), the selected rows of all full segments are a
strided view (B, S, w', D)[:, :, o::r] that the fused kernel reads in place, so one kernel
call serves all full segments and one more the shorter last segment, with no gather copy.
Results are merged into the output as each call finishes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._blockwise import Block, plan_pairs, run_plan, span_tiles
from ._validate import check_qkv, positive_ints, resolve_scale

OFFSET_MODES = ("paper", "torchscale")


def head_offset_groups(num_heads: int, rate: int, offsets: str) -> list[tuple[int, slice]]:
    """[(offset o, slice of the heads whose offset is o)] for one branch.

    paper: o_h = h mod r (heads o, o+r, o+2r, ...);
    torchscale: o_h = floor(h / ceil(H / r)) (contiguous runs of ceil(H/r) heads).
    """
    if offsets == "paper":
        return [(o, slice(o, num_heads, rate)) for o in range(min(rate, num_heads))]
    if offsets == "torchscale":
        g = math.ceil(num_heads / rate)
        return [
            (o, slice(o * g, min((o + 1) * g, num_heads))) for o in range(math.ceil(num_heads / g))
        ]
    raise ValueError(f"offsets must be one of {OFFSET_MODES}, got {offsets!r}")


def head_offsets(num_heads: int, rate: int, offsets: str) -> list[int]:
    """o_{h,b} for every head h of a branch with dilation ``rate``."""
    result = [0] * num_heads
    for o, heads in head_offset_groups(num_heads, rate, offsets):
        for h in range(num_heads)[heads]:
            result[h] = o
    return result


def _full_segments_sel(head: int, n_full: int, seg: int, o: int, r: int):
    # (B, H, N, X) -> (B, S, c, X): head h, every full segment, in-segment rows o, o+r, ...
    # A strided view: the fused kernel reads it in place (row stride r * X), no copy.
    return lambda x: x[:, head, :n_full].unflatten(1, (n_full // seg, seg))[:, :, o::r]


def _tail_sel(head: int, n_full: int, o: int, r: int):
    # (B, H, N, X) -> (B, 1, c, X): head h, the shorter last segment
    return lambda x: x[:, head, n_full:][:, o::r].unsqueeze(1)


def _count(start: int, stop: int, step: int) -> int:
    return len(range(start, stop, step))


def check_branches(
    segment_lengths: Sequence[int], dilation_rates: Sequence[int], offsets: str
) -> tuple[list[int], list[int]]:
    """The branches as lists (w, r), or an error (lengths differ, bad values)."""
    ws = positive_ints(segment_lengths, "segment_lengths")
    rs = positive_ints(dilation_rates, "dilation_rates")
    if len(ws) != len(rs):
        raise ValueError(
            f"segment_lengths and dilation_rates must have the same length, got "
            f"{len(ws)} and {len(rs)}"
        )
    if offsets not in OFFSET_MODES:
        raise ValueError(f"offsets must be one of {OFFSET_MODES}, got {offsets!r}")
    return ws, rs


def check_coverage(
    n: int, num_heads: int, ws: Sequence[int], rs: Sequence[int], offsets: str
) -> None:
    """ValueError unless every (head, position) is a query of at least one branch."""
    if n == 0 or 1 in rs:
        return
    pos = torch.arange(n)
    covered = torch.zeros(num_heads, n, dtype=torch.bool)
    for w, r in zip(ws, rs):
        p = pos % min(w, n)  # in-segment index (segments start at multiples of w')
        residue = p % r
        offs = torch.tensor(head_offsets(num_heads, r, offsets)).unsqueeze(-1)
        covered |= residue.unsqueeze(0) == offs
    if not bool(covered.all()):
        h, i = (int(x) for x in (~covered).nonzero()[0])
        raise ValueError(
            f"dilated attention leaves head {h} at position {i} (and possibly others) with "
            f"no branch: with segment_lengths={list(ws)}, dilation_rates={list(rs)}, "
            f"offsets={offsets!r} and N={n}. Add a branch with dilation rate 1."
        )


def plan_dilated(
    n: int,
    num_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    causal: bool,
    offsets: str = "paper",
    *,
    check: bool = True,
    heads: tuple[int, int] | None = None,
) -> list[Block]:
    """The plan of the given branches; ``check=False`` skips the coverage check (for a
    subset of a layer's branches, as the distributed strategy computes locally).
    ``heads=(first, total)``: the input's num_heads heads are heads first.. of a layer
    of ``total`` heads (their offsets are those of their global index)."""
    ws, rs = check_branches(segment_lengths, dilation_rates, offsets)
    first, total = (0, num_heads) if heads is None else heads
    if first < 0 or first + num_heads > total:
        raise ValueError(f"heads {first}..{first + num_heads - 1} are not in 0..{total - 1}")
    if check:
        check_coverage(n, total, ws, rs, offsets)
    blocks: list[Block] = []
    if n == 0:
        return blocks
    for b, (w, r) in enumerate(zip(ws, rs)):
        seg = min(w, n)
        n_full = (n // seg) * seg
        fresh = b == 0  # the first branch's blocks write disjoint rows, before any other
        offs = head_offsets(total, r, offsets)[first : first + num_heads]
        for head, o in enumerate(offs):
            c = _count(o, seg, r)
            if c > 0:
                sel = _full_segments_sel(head, n_full, seg, o, r)
                tiles = span_tiles(c, c, causal=causal)
                groups = n_full // seg
                blk = Block(sel, sel, c, c, causal=causal, groups=groups, tiles=tiles, fresh=fresh)
                blocks.append(blk)
            c_tail = _count(o, n - n_full, r)
            if c_tail > 0:
                sel = _tail_sel(head, n_full, o, r)
                tiles = span_tiles(c_tail, c_tail, causal=causal)
                blk = Block(
                    sel, sel, c_tail, c_tail, causal=causal, groups=1, tiles=tiles, fresh=fresh
                )
                blocks.append(blk)
    return blocks


def dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    causal: bool = False,
    scale: float | None = None,
    offsets: str = "paper",
    return_lse: bool = False,
    heads: tuple[int, int] | None = None,
):
    """LongNet dilated attention over (B, H, N, D) inputs; any N >= 0.

    ``segment_lengths`` w_b and ``dilation_rates`` r_b define the branches. ``offsets``:
    "paper" (o = h mod r) or "torchscale" (o = floor(h / ceil(H / r))). Returns out
    (B, H, N, Dv), and lse (B, H, N) with ``return_lse``. Raises ValueError when some
    (head, position) is covered by no branch. ``heads=(first, total)``: the H input heads
    are heads first..first+H-1 of a layer of ``total`` heads (a group of a layer's heads
    computed alone gets the offsets of its place in the layer).
    """
    check_qkv(q, k, v, same_length=True)
    tau = resolve_scale(scale, q.shape[-1])
    plan = plan_dilated(
        q.shape[2],
        q.shape[1],
        segment_lengths,
        dilation_rates,
        bool(causal),
        offsets,
        heads=heads,
    )
    out, lse = run_plan(q, k, v, plan, tau)
    return (out, lse) if return_lse else out


def dilated_attention_flops(
    n: int,
    num_heads: int,
    head_dim: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    causal: bool = False,
    offsets: str = "paper",
    batch: int = 1,
) -> int:
    """Useful multiply-add FLOPs (2 per multiply-add) of the forward: 4 * D per visible pair."""
    plan = plan_dilated(n, num_heads, segment_lengths, dilation_rates, causal, offsets)
    return 4 * head_dim * plan_pairs(plan, num_heads, batch)
