"""Attention as a recurrence over key chunks: the online-softmax state of a set of queries.

For each query, causal softmax attention over keys k_1, k_2, ... is an RNN whose state is
(y, z) = (sum_s e^{q.k_s} v_s, sum_s e^{q.k_s}) and whose output is y / z (Su Jianlin,
"Attention as a quadratic-complexity RNN", 2024; the online softmax of Rabe & Staats,
arXiv 2112.05682). :class:`StreamingAttention` keeps it in the stable form
(out, lse) = (y / z, log z): a chunk of keys is attended exactly (:func:`attention` or
:func:`masked_attention`) and merged in by log-sum-exp (:func:`merge`). The result is
the attention over every key seen, for any chunking and any order of chunks, and it is
differentiable (also through lse).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._kernels import compute_dtype
from ._validate import check_qkv, resolve_scale
from .attention import attention, merge
from .masked import masked_attention


class StreamingAttention:
    """The online-softmax state of queries q (B, H, Nq, D) (module docstring)::

    state = StreamingAttention(q)
    for k, v in chunks:                 # any chunking, any order
        state.update(k, v)              # or update(k, v, mask) for visible pairs only
    out, lse = state.read()             # = attention(q, all k, all v, return_lse=True)
    """

    def __init__(self, q: Tensor, *, scale: float | None = None):
        if not isinstance(q, Tensor) or q.dim() != 4:
            raise ValueError(f"q must be a (B, H, Nq, D) tensor, got {getattr(q, 'shape', q)}")
        self.q = q
        self.scale = resolve_scale(scale, q.shape[-1])
        self.out: Tensor | None = None
        self.lse: Tensor | None = None
        self.keys_seen = 0
        self._dv = q.shape[-1]

    def update(self, k: Tensor, v: Tensor, mask: Tensor | None = None) -> StreamingAttention:
        """Attend one chunk of keys k (B, H, m, D) and values v (B, H, m, Dv) and merge it
        into the state. ``mask`` (broadcastable to (B, H, Nq, m)): bool, True = visible;
        or integer counts (a key visible through c branches of a pattern counts c times,
        as in dilated attention), attended as c passes of ``mask >= 1 .. c``."""
        check_qkv(self.q, k, v)
        if mask is None:
            parts = [attention(self.q, k, v, scale=self.scale, return_lse=True)]
        elif mask.dtype == torch.bool:
            parts = [masked_attention(self.q, k, v, mask, scale=self.scale, return_lse=True)]
        elif not mask.dtype.is_floating_point and not mask.is_complex():
            levels = int(mask.max()) if mask.numel() else 0  # one host sync per chunk
            parts = [
                masked_attention(self.q, k, v, mask >= c, scale=self.scale, return_lse=True)
                for c in range(1, levels + 1)
            ]
        else:
            raise TypeError(f"mask must be bool or integer counts, got {mask.dtype}")
        if self.out is not None:
            parts.insert(0, (self.out, self.lse))
        if parts:
            self.out, self.lse = parts[0] if len(parts) == 1 else merge(parts)
        self.keys_seen += k.shape[2]
        self._dv = v.shape[-1]
        return self

    def read(self) -> tuple[Tensor, Tensor]:
        """(out (B, H, Nq, Dv), lse (B, H, Nq)) over every key seen; before any visible
        key: out = 0 (Dv = D when no chunk came) and lse = -inf."""
        if self.out is None:
            B, H, Nq, _ = self.q.shape
            lse = self.q.new_full((B, H, Nq), float("-inf"), dtype=compute_dtype(self.q.dtype))
            return self.q.new_zeros(B, H, Nq, self._dv), lse
        return self.out, self.lse


__all__ = ["StreamingAttention"]
