"""Sequence-parallel attention strategies (docs/spec.md, section 6).

Each takes this rank's shard of q, k, v (B, H, n, D) in the group's layout and returns
this rank's shard of the output; forward and dq/dk/dv equal the single-process op.

- :func:`ulysses_attention` (DeepSpeed-Ulysses, arXiv 2309.14509): all-to-all from
  sequence shards to head shards, any local attention op over all positions for H / P
  heads, all-to-all back. Needs H divisible by P.
- :func:`ring_attention` (Liu et al., arXiv 2310.01889): queries stay; key/value blocks
  travel around the ring and each visit is merged by log-sum-exp. Causal uses the zigzag
  layout. The whole ring is one autograd Function: the backward sends (k, v, dk, dv)
  around the ring in the same order on every rank, so it cannot deadlock.
- :func:`longnet_attention` (LongNet, arXiv 2307.02486, section 3.1): a dilated branch
  whose segment fits in a rank (w <= n) is computed locally; a longer one all-gathers the
  sparsified keys/values (n / r rows per head) among the w / n ranks of the segment
  (reduce-scatter in backward), and the local selected queries attend to them with a
  causal mask on global positions — including the rank's own keys.

Bytes each rank sends (B, H, n, D, element size e; P ranks; see ``comm``):

- ulysses: forward 4 (P - 1) / P * B H n D e (q, k, v, out); backward the same.
- ring: forward (P - 1) * 2 B H n D e; backward (P - 1) * 2 B H n D e + P * 2 B H n D e'
  (k, v for P - 1 hops, dk, dv in the accumulation dtype e' for P hops).
- longnet: per branch with w > n, forward 2 (G - 1) B H (n / r) D e with G = w / n ranks
  in the segment, backward the same: independent of N for a fixed local length n.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import ops
from ..ops.lowlevel import (
    accumulate_tile_grads,
    attn_fwd,
    check_branches,
    check_coverage,
    check_qkv,
    compute_dtype,
    head_offsets,
    merge_into,
    plan_dilated,
    resolve_scale,
    run_plan,
)
from .comm import GroupAllGather, HeadsToSeq, PendingExchange, SeqToHeads, SPGroup, ring_exchange
from .shard import chunk_ids

Kernel = Callable[[Tensor, Tensor, Tensor], Tensor]
STRATEGIES = ("longnet", "ulysses", "ring")


# ---------------------------------------------------------------------- Ulysses


def check_ulysses(num_heads: int, world: int) -> None:
    """ValueError unless the heads split evenly over the ranks."""
    if num_heads < world or num_heads % world:
        raise ValueError(
            f"Ulysses splits heads over ranks: {num_heads} heads cannot be split over {world} "
            f"ranks (the number of heads must be a multiple of {world}); use --sp-strategy "
            "ring or longnet, or fewer ranks"
        )


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, sp: SPGroup, kernel: Kernel) -> Tensor:
    """Sequence shards (contiguous layout) -> ``kernel`` over all positions for H / P heads
    -> sequence shards."""
    check_qkv(q, k, v, same_length=True)
    check_ulysses(q.shape[1], sp.size)
    qh, kh, vh = (SeqToHeads.apply(t, sp) for t in (q, k, v))  # (B, H/P, N, D)
    return HeadsToSeq.apply(kernel(qh, kh, vh), sp)  # (B, H, n, D)


def ulysses_bytes(batch, heads, n, head_dim, world, elem) -> dict[str, float]:
    """Bytes each rank sends for Ulysses, forward and backward (module docstring)."""
    one = batch * heads * n * head_dim * elem * (world - 1) / world
    return {"forward": 4 * one, "backward": 4 * one}


# ---------------------------------------------------------------------- ring


def _ring_tiles(q_chunks: list[int], k_chunks: list[int], c: int, causal: bool):
    """(q rows, k rows, top-left causal) for each visible pair of chunks."""
    tiles = []
    for a, qa in enumerate(q_chunks):
        for b, kb in enumerate(k_chunks):
            if causal and kb > qa:
                continue
            tiles.append(
                (slice(a * c, (a + 1) * c), slice(b * c, (b + 1) * c), causal and kb == qa)
            )
    return tiles


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sp: SPGroup, layout: str, causal: bool, scale: float):
        B, H, L, _ = q.shape
        P = sp.size
        mine = chunk_ids(sp.rank, P, layout)
        c = L // len(mine)
        acc = compute_dtype(q.dtype)
        out = q.new_zeros(B, H, L, v.shape[-1], dtype=acc)
        lse = q.new_full((B, H, L), float("-inf"), dtype=acc)
        kv = torch.cat([k, v], dim=-1)  # one message per hop
        D = k.shape[-1]
        written = set()  # query chunks merged into so far (the first visit is a copy)
        for step in range(P):
            pending = PendingExchange(kv, sp, "ring_kv") if step < P - 1 else None
            src = (sp.rank - step) % P
            kb, vb = kv[..., :D], kv[..., D:]
            for rq, rk, diag in _ring_tiles(mine, chunk_ids(src, P, layout), c, causal):
                o, lb = attn_fwd(q[:, :, rq], kb[:, :, rk], vb[:, :, rk], scale, diag, None)
                merge_into(out[:, :, rq], lse[:, :, rq], o, lb, rq.start not in written)
                written.add(rq.start)
            if pending is not None:
                kv = pending.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.sp, ctx.layout, ctx.causal, ctx.scale = sp, layout, causal, scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        sp, P = ctx.sp, ctx.sp.size
        if dout is None:
            dout = torch.zeros_like(out)
        dout = dout.contiguous()
        mine = chunk_ids(sp.rank, P, ctx.layout)
        c = q.shape[2] // len(mine)
        acc = compute_dtype(q.dtype)
        D, Dv = k.shape[-1], v.shape[-1]
        dq = torch.zeros_like(q, dtype=acc)
        # travelling block: k, v and the gradients accumulated for them so far
        blk = torch.cat(
            [k.to(acc), v.to(acc), torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc)],
            dim=-1,
        )
        for step in range(P):
            src = (sp.rank - step) % P
            kb = blk[..., :D].to(k.dtype)
            vb = blk[..., D : D + Dv].to(v.dtype)
            grads = (dq, blk[..., D + Dv : 2 * D + Dv], blk[..., 2 * D + Dv :])  # views
            for rq, rk, diag in _ring_tiles(mine, chunk_ids(src, P, ctx.layout), c, ctx.causal):
                accumulate_tile_grads(
                    grads, q, kb, vb, out, lse, dout, dlse, rq, rk, ctx.scale, diag, None
                )
            if step < P - 1:
                blk = ring_exchange(blk, sp, "ring_kv_grad")
        # one more hop brings each block's dk, dv home to its owner
        grads = ring_exchange(blk[..., D + Dv :], sp, "ring_grad_home")
        dk, dv = grads[..., :D], grads[..., D:]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sp: SPGroup,
    *,
    causal: bool = False,
    layout: str | None = None,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Exact attention over the whole sequence; q, k, v are this rank's shard in
    ``layout`` (default: zigzag when causal, contiguous otherwise)."""
    check_qkv(q, k, v, same_length=True)
    layout = layout or ("zigzag" if causal else "contiguous")
    tau = resolve_scale(scale, q.shape[-1])
    if q.shape[2] % len(chunk_ids(sp.rank, sp.size, layout)):
        raise ValueError(f"the local length {q.shape[2]} does not split into the {layout} chunks")
    out, lse = _Ring.apply(q, k, v, sp, layout, bool(causal), tau)
    return (out, lse) if return_lse else out


def ring_bytes(batch, heads, n, head_dim, world, elem, grad_elem=None) -> dict[str, float]:
    """Bytes each rank sends for ring attention, forward and backward."""
    grad_elem = grad_elem or max(elem, 4)
    kv = 2 * batch * heads * n * head_dim
    return {
        "forward": (world - 1) * kv * elem,
        "backward": (world - 1) * kv * grad_elem + world * kv * grad_elem,
    }


# ---------------------------------------------------------------------- LongNet


def check_longnet(
    n_total: int, world: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int]
) -> int:
    """The local length n; ValueError unless every branch's segment w' = min(w, N) divides
    n (computed locally) or is a multiple of n with n divisible by its rate (gathered)."""
    if n_total % world:
        raise ValueError(
            f"sequence length {n_total} must be a multiple of the {world} ranks for the longnet "
            "strategy (contiguous shards)"
        )
    n = n_total // world
    for w, r in zip(segment_lengths, dilation_rates):
        seg = min(w, n_total)
        if seg <= n and n % seg:
            raise ValueError(
                f"longnet strategy: segment length {seg} must divide the local length {n} "
                f"(= {n_total} / {world} ranks) so that no segment straddles two ranks"
            )
        if seg > n and (seg % n or n % r):
            raise ValueError(
                f"longnet strategy: segment length {seg} spans ranks, so it must be a multiple "
                f"of the local length {n}, and {n} a multiple of its dilation rate {r}"
            )
    return n


def _sparse_index(num_heads: int, n: int, r: int, offsets: str, device) -> Tensor:
    """(H, n / r) local rows of each head's residue (n, and every segment start, are
    multiples of r)."""
    offs = torch.tensor(head_offsets(num_heads, r, offsets), device=device).unsqueeze(-1)
    return offs + r * torch.arange(n // r, device=device)


def longnet_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sp: SPGroup,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    causal: bool = False,
    offsets: str = "paper",
    scale: float | None = None,
    return_lse: bool = False,
):
    """Distributed dilated attention over contiguous shards (module docstring)."""
    check_qkv(q, k, v, same_length=True)
    ws, rs = check_branches(segment_lengths, dilation_rates, offsets)
    B, H, n, D = q.shape
    P = sp.size
    N = n * P
    check_longnet(N, P, ws, rs)
    check_coverage(N, H, ws, rs, offsets)
    tau = resolve_scale(scale, D)
    local = [(w, r) for w, r in zip(ws, rs) if min(w, N) <= n]
    parts = []
    if local:
        plan = plan_dilated(
            n, H, [w for w, _ in local], [r for _, r in local], causal, offsets, check=False
        )
        parts.append(run_plan(q, k, v, plan, tau))
    for w, r in zip(ws, rs):
        seg = min(w, N)
        if seg <= n:
            continue
        group, first, last = sp.segment_group(seg // n)  # the ranks of my segment
        j = sp.rank - first  # my index within the segment
        idx = _sparse_index(H, n, r, offsets, q.device)  # (H, c)
        c = idx.shape[1]
        idx4 = idx.view(1, H, c, 1).expand(B, H, c, D)
        qs, ks, vs = (t.gather(2, idx4) for t in (q, k, v))  # (B, H, c, D)
        kvs = torch.stack([ks, vs])  # (2, B, H, c, D): one all-gather
        g = GroupAllGather.apply(kvs, group, last - first, sp)  # (G, 2, B, H, c, D)
        g = g.permute(1, 2, 3, 0, 4, 5).reshape(2, B, H, (last - first) * c, D)
        o, lse = ops.attention(
            qs,
            g[0],
            g[1],
            causal=causal,
            scale=tau,
            return_lse=True,
            q_offset=j * c if causal else None,
        )
        out_full = q.new_zeros(B, H, n, D).scatter(2, idx4, o)
        lse_full = lse.new_full((B, H, n), float("-inf")).scatter(2, idx.expand(B, H, c), lse)
        parts.append((out_full, lse_full))
    out, lse = parts[0] if len(parts) == 1 else ops.merge(parts)
    return (out, lse) if return_lse else out


def longnet_bytes(batch, heads, n, head_dim, world, elem, segment_lengths, dilation_rates):
    """Bytes a rank in the middle of every segment group sends (all groups are full when
    the segment lengths divide N; the last group of a shorter final segment sends less)."""
    total = 0.0
    N = n * world
    for w, r in zip(segment_lengths, dilation_rates):
        seg = min(w, N)
        if seg > n:
            G = min(seg // n, world)
            total += 2 * (G - 1) * batch * heads * (n // r) * head_dim * elem
    return {"forward": total, "backward": total}


def strategy_layout(strategy: str, causal: bool) -> str:
    """The sharding layout of a strategy: zigzag for causal ring, else contiguous."""
    if strategy not in STRATEGIES:
        raise ValueError(
            f"unknown sequence-parallel strategy {strategy!r}; choose from {STRATEGIES}"
        )
    return "zigzag" if strategy == "ring" and causal else "contiguous"
