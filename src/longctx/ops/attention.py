"""Exact attention with log-sum-exp, the differentiable merge, and chunked attention.

docs/spec.md, section 1. Layout (B, H, N, D) like
``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._blockwise import Block, run_plan, span_tiles
from ._kernels import compute_dtype
from ._validate import check_qkv, optional_int, positive_int, resolve_scale


def rows(start: int, stop: int):
    """Selector of all heads and sequence rows start..stop of a (B, H, N, X) tensor."""
    return lambda x: x[:, :, start:stop]


def causal_query_offset(nq: int, nk: int, q_offset: int | None) -> int:
    """Position of query 0 in key coordinates (bottom-right alignment unless given)."""
    return nk - nq if q_offset is None else q_offset


def _single_block(nq: int, nk: int, causal: bool, q_offset: int | None, **tiling) -> list[Block]:
    if nq == 0 or nk == 0:
        return []  # nothing to compute: out = 0, lse = -inf
    off = causal_query_offset(nq, nk, q_offset) if causal else 0
    tiles = span_tiles(nq, nk, causal=causal, delta=off, **tiling)
    blk = Block(
        rows(0, nq), rows(0, nk), lq=nq, lk=nk, q_pos0=off, causal=causal, tiles=tiles, fresh=True
    )
    return [blk]


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    q_offset: int | None = None,
):
    """Exact softmax attention; optionally also its log-sum-exp.

    q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv) -> out (B, H, Nq, Dv) and, with
    ``return_lse``, lse (B, H, Nq) in float32 (float64 for float64 inputs).

    Causal masking aligns bottom-right when Nq != Nk: query i sits at key position
    i + (Nk - Nq), unless ``q_offset`` gives the position of query 0. A query that sees no
    key gets out = 0 and lse = -inf. Gradients are exact, also through lse.
    """
    check_qkv(q, k, v)
    tau = resolve_scale(scale, q.shape[-1])
    q_offset = optional_int(q_offset, "q_offset")
    plan = _single_block(q.shape[2], k.shape[2], bool(causal), q_offset)
    out, lse = run_plan(q, k, v, plan, tau)
    return (out, lse) if return_lse else out


def chunked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    chunk_size: int = 1024,
    return_lse: bool = False,
    q_offset: int | None = None,
):
    """Attention computed in (chunk_size x chunk_size) blocks merged by lse.

    Equal to :func:`attention` for every chunk size (1, sizes that do not divide N, sizes
    larger than N). The score memory is O(chunk_size**2) per (batch, head); causal blocks
    strictly above the diagonal are skipped.
    """
    check_qkv(q, k, v)
    tau = resolve_scale(scale, q.shape[-1])
    chunk_size = positive_int(chunk_size, "chunk_size")
    q_offset = optional_int(q_offset, "q_offset")
    plan = _single_block(
        q.shape[2], k.shape[2], bool(causal), q_offset, row_chunk=chunk_size, key_chunk=chunk_size
    )
    out, lse = run_plan(q, k, v, plan, tau)
    return (out, lse) if return_lse else out


def attention_flops(
    nq: int,
    num_heads: int,
    head_dim: int,
    *,
    causal: bool = False,
    nk: int | None = None,
    batch: int = 1,
) -> int:
    """Useful FLOPs (4 * D per visible (query, key) pair: QK^T and PV multiply-adds) of
    dense attention of ``nq`` queries over ``nk`` keys (default ``nq``); causal aligns
    bottom-right, as :func:`attention` does."""
    nk = nq if nk is None else nk
    pairs = _causal_pairs(nq, nk) if causal else nq * nk
    return 4 * head_dim * num_heads * batch * pairs


def _causal_pairs(nq: int, nk: int) -> int:
    """Visible pairs of bottom-right causal attention: query i sees keys 0 .. i + nk - nq."""
    off = nk - nq
    lo = max(0, -off)  # first row that sees a key
    hi = min(nq, nk - off)  # rows before this see fewer than nk keys
    partial = 0
    if hi > lo:
        a, b = lo + off + 1, hi - 1 + off + 1  # counts of the first and last partial rows
        partial = (a + b) * (hi - lo) // 2
    full = max(0, nq - max(hi, lo)) * nk
    return partial + full


def merge(parts: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Exact merge of partial attentions over disjoint (or multiplicity-counted) key sets.

    ``parts`` is a sequence of (out (..., N, Dv), lse (..., N)). Returns
    lse = logsumexp_i(lse_i), out = sum_i exp(lse_i - lse) * out_i. Parts with
    lse = -inf contribute nothing; if every part is empty the result is (0, -inf) and the
    gradients are finite (zero). Differentiable in every out_i and lse_i.
    """
    if isinstance(parts, (Tensor, str, bytes)) or not isinstance(parts, Sequence):
        raise TypeError("parts must be a sequence of (out, lse) pairs")
    if len(parts) == 0:
        raise ValueError("merge needs at least one (out, lse) part")
    outs, lses = [], []
    for i, part in enumerate(parts):
        if not isinstance(part, (tuple, list)) or len(part) != 2:
            raise TypeError(f"parts[{i}] must be an (out, lse) pair")
        o, lse = part
        if not (isinstance(o, Tensor) and isinstance(lse, Tensor)):
            raise TypeError(f"parts[{i}] must hold two tensors")
        if o.dim() < 1 or o.shape[:-1] != lse.shape:
            raise ValueError(
                f"parts[{i}]: out must have shape lse.shape + (Dv,), got out "
                f"{tuple(o.shape)} and lse {tuple(lse.shape)}"
            )
        if i and (o.shape != outs[0].shape or o.dtype != outs[0].dtype):
            raise ValueError(
                f"parts[{i}] has out {tuple(o.shape)} {o.dtype}; expected "
                f"{tuple(outs[0].shape)} {outs[0].dtype} like parts[0]"
            )
        outs.append(o)
        lses.append(lse)
    cd = compute_dtype(outs[0].dtype)
    stacked = torch.stack([lse.to(cd) for lse in lses])  # (m, ..., N)
    m = stacked.amax(dim=0).detach()  # the max cancels exactly: no gradient needed
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(stacked - m)  # empty parts -> 0, with zero gradient
    total = w.sum(dim=0)
    nonempty = total > 0
    total_safe = torch.where(nonempty, total, torch.ones_like(total))
    lse = torch.where(nonempty, m + torch.log(total_safe), torch.full_like(m, float("-inf")))
    out = None
    for i, o in enumerate(outs):
        term = (w[i] / total_safe).unsqueeze(-1) * o.to(cd)
        out = term if out is None else out + term
    return out.to(outs[0].dtype), lse
