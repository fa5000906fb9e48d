"""Sliding-window (local) attention, computed blockwise in O(N * window).

Causal (Mistral / Longformer-decoder style): query i sees keys j with i - window < j <= i,
i.e. at most ``window`` keys including itself. Non-causal: keys with |i - j| < window
(``window - 1`` on each side and itself).
"""

from __future__ import annotations

from torch import Tensor

from ._blockwise import Block, Tile, plan_pairs, run_plan
from ._validate import check_qkv, optional_int, positive_int, resolve_scale
from .attention import rows


def default_block(window: int) -> int:
    """Query rows per block, from ``longctx bench``-style timings on CPU (N = 16,384,
    4 heads of 64): small windows pay per kernel call, so a block of 2 * window rows in
    one masked tile wins up to 256 rows (window 128: 0.078 s against 0.135 s with 64-row
    blocks); large windows use a quarter of the window, at most 512 rows."""
    if window <= 1024:
        return max(64, min(2 * window, 256))
    return min(window // 4, 512)


def plan_sliding(n: int, window: int, causal: bool, block_size: int | None = None) -> list[Block]:
    """One block over the whole sequence, tiled per query block [a, b).

    With b - a <= window, the keys every query of the block sees form one unmasked span;
    the keys just past the window's edge form a masked band (one per side when
    non-causal); causal: the keys [a, b) form an exactly top-left causal tile.
    Blocks larger than the window are cut into single tiles with explicit masks.
    """
    window = positive_int(window, "window")
    c = positive_int(block_size, "block_size") if block_size is not None else default_block(window)
    tiles = []
    for a in range(0, n, c):
        b = min(n, a + c)
        lo = max(0, a - window + 1)  # first key any query of the block sees
        hi = b if causal else min(n, b + window - 1)  # one past the last
        if b - a > window:
            tiles.append(Tile(a, b, lo, hi))
            continue
        # keys every query sees: [b - window, a + window) (causal: up to a, diagonal after)
        all_lo = max(lo, b - window)
        all_hi = a if causal else min(hi, a + window)
        cuts = sorted({lo, all_lo, all_hi, hi} | ({b} if causal else set()))
        tiles += [Tile(a, b, k0, k1) for k0, k1 in zip(cuts[:-1], cuts[1:]) if k1 > k0]
    blk = Block(
        rows(0, n),
        rows(0, n),
        lq=n,
        lk=n,
        causal=causal,
        window=window,
        tiles=tuple(tiles),
        fresh=True,
    )
    return [blk]


def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    *,
    causal: bool = True,
    scale: float | None = None,
    return_lse: bool = False,
    block_size: int | None = None,
):
    """Local attention of (B, H, N, D) inputs with a window of ``window`` keys (see module)."""
    check_qkv(q, k, v, same_length=True)
    tau = resolve_scale(scale, q.shape[-1])
    block_size = optional_int(block_size, "block_size")
    plan = plan_sliding(q.shape[2], window, bool(causal), block_size)
    out, lse = run_plan(q, k, v, plan, tau)
    return (out, lse) if return_lse else out


def sliding_window_flops(
    n: int, num_heads: int, head_dim: int, window: int, *, causal: bool = True, batch: int = 1
) -> int:
    """Useful FLOPs (4 * D per visible pair) of the forward."""
    plan = plan_sliding(n, window, causal)
    return 4 * head_dim * plan_pairs(plan, num_heads, batch)


def sliding_window_attention_at(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    q_start: int,
    k_start: int,
    *,
    scale: float | None = None,
) -> Tensor:
    """Causal sliding-window attention of queries at positions q_start, q_start+1, ...
    over keys at positions k_start, k_start+1, ... (decoding and chunked prefill)."""
    check_qkv(q, k, v)
    tau = resolve_scale(scale, q.shape[-1])
    window = positive_int(window, "window")
    nq, nk = q.shape[2], k.shape[2]
    blk = Block(
        rows(0, nq),
        rows(0, nk),
        lq=nq,
        lk=nk,
        q_pos0=q_start,
        k_pos0=k_start,
        causal=True,
        window=window,
        fresh=True,
    )
    out, _ = run_plan(q, k, v, [blk] if nq and nk else [], tau)
    return out
