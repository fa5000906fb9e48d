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
    """Query block size: about the window, kept between 64 and 1024 rows."""
    return max(64, min(window, 1024))


def plan_sliding(n: int, window: int, causal: bool, block_size: int | None = None) -> list[Block]:
    window = positive_int(window, "window")
    c = positive_int(block_size, "block_size") if block_size is not None else default_block(window)
    tiles = []
    for a in range(0, n, c):
        b = min(n, a + c)
        k_hi = b if causal else min(n, b + window - 1)
        tiles.append(Tile(a, b, max(0, a - window + 1), k_hi))
    blk = Block(
        rows(0, n), rows(0, n), lq=n, lk=n, causal=causal, window=window, tiles=tuple(tiles)
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
