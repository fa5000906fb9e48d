"""Multi-head causal self-attention whose pattern (kernel and mask together) is chosen by
name: ``dense``, ``dilated`` (LongNet) or ``sliding_window``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .. import ops
from ..ops.dilated import check_branches
from .rotary import apply_rotary

Kernel = Callable[[Tensor, Tensor, Tensor], Tensor]
ATTENTION_PATTERNS = ("dense", "dilated", "sliding_window")


def make_kernel(
    pattern: str,
    *,
    segment_lengths: Sequence[int] = (),
    dilation_rates: Sequence[int] = (),
    offsets: str = "paper",
    window: int | None = None,
) -> Kernel:
    """The causal attention op of a pattern, as a function of (q, k, v) (B, H, N, D)."""
    if pattern == "dense":
        return lambda q, k, v: ops.attention(q, k, v, causal=True)
    if pattern == "dilated":
        ws, rs = check_branches(segment_lengths, dilation_rates, offsets)
        return lambda q, k, v: ops.dilated_attention(q, k, v, ws, rs, causal=True, offsets=offsets)
    if pattern == "sliding_window":
        if window is None or window < 1:
            raise ValueError(f"sliding_window attention needs window >= 1, got {window!r}")
        return lambda q, k, v: ops.sliding_window_attention(q, k, v, window, causal=True)
    raise ValueError(f"unknown attention pattern {pattern!r}; choose from {ATTENTION_PATTERNS}")


class MultiHeadAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        n_heads: int,
        kernel: Kernel,
        rope_base: float = 10000.0,
    ):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not a multiple of n_heads {n_heads}")
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.rope_base = rope_base
        self.kernel = kernel
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(
        self, x: Tensor, positions: Tensor | None = None, cache=None, start: int = 0
    ) -> Tensor:
        """x (B, N, C) at positions start..start+N-1 (or the given ``positions``).
        ``cache``: an object with ``attend(q, k, v, start)`` (see longctx.model.cache) that
        stores this chunk's keys/values and attends over everything stored so far."""
        B, N, C = x.shape
        if positions is None:
            positions = torch.arange(start, start + N, device=x.device)
        qkv = self.qkv(x).view(B, N, 3, self.n_heads, self.head_dim)  # (B, N, 3, H, Dh)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, N, Dh) each
        q = apply_rotary(q, positions, self.rope_base)
        k = apply_rotary(k, positions, self.rope_base)
        y = self.kernel(q, k, v) if cache is None else cache.attend(q, k, v, start)  # (B, H, N, Dh)
        y = y.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj(y)
