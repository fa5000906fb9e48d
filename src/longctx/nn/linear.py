"""Constant-state attention patterns: ``linear`` (linear attention) and ``retention``
(RetNet), the RNN family that exact attention is compared with.

Each trains with the chunkwise form (:mod:`longctx.ops.linear`) and decodes with the
recurrent one: its state (:class:`~longctx.nn.state.RecurrentState`) has the same size
after 10 tokens or 10 million, for every cache policy. Queries and keys arrive with
rotary positions applied, as for every pattern.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import Tensor, nn

from ..ops import linear as lin
from .norm import rms_normalize
from .patterns import Pattern, check_decode_policy, register_pattern
from .state import LayerState, RecurrentState


@dataclasses.dataclass
class _ConstantState(Pattern):
    """Shared parts of the two patterns: chunk option, state, decode, FLOPs."""

    chunk: int = 64

    def __post_init__(self):
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 1:
            raise ValueError(f"model.attention.chunk must be an integer >= 1, got {self.chunk!r}")

    def _run(self, q, k, v, state=None, return_state=False):
        raise NotImplementedError

    def kernel(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self._run(q, k, v)

    def new_state(self, module: nn.Module, batch, capacity, dtype, device, policy="full", **kw):
        check_decode_policy(policy, self.kind)
        H, D = module.n_heads, module.head_dim
        return RecurrentState(batch, H, D, D, self.kind == "linear", dtype, device)

    def cache_note(self, policy: str) -> str:
        return ""  # the state is constant-size under every policy

    def attend(self, q: Tensor, k: Tensor, v: Tensor, state: LayerState) -> Tensor:
        out, new = self._run(q, k, v, (state.s, state.z), return_state=True)
        state.advance(new, q.shape[2])
        return out

    def flops(self, n: int, n_heads: int, head_dim: int) -> float:
        # per chunk of c: c^2 D (scores) + c^2 D (mix) + 2 c D^2 (state in and out);
        # counted as multiply-adds x 2 like the softmax patterns' 4 * D per pair
        c = min(self.chunk, max(n, 1))
        return 2.0 * n_heads * n * (c * head_dim + 2 * head_dim * head_dim)


@register_pattern
@dataclasses.dataclass
class LinearAttention(_ConstantState):
    """``kind = "linear"``: causal linear attention with phi(x) = elu(x) + 1 (Katharopoulos
    et al., arXiv 2006.16236); ``chunk``: positions per chunk of the chunkwise form."""

    kind: ClassVar[str] = "linear"
    strategies: ClassVar[tuple[str, ...]] = ("ulysses",)

    def _run(self, q, k, v, state=None, return_state=False):
        return lin.linear_attention(
            q, k, v, chunk=self.chunk, state=state, return_state=return_state
        )


@register_pattern
@dataclasses.dataclass
class Retention(_ConstantState):
    """``kind = "retention"``: RetNet's retention (Sun et al., arXiv 2307.08621) with
    decay 1 - 2^(-5 - h) for head h, its output normalised per head (parameter-free
    RMS; RetNet uses a group norm, and a swish gate that this pattern leaves out).
    ``chunk``: positions per chunk. Sequence parallelism is refused: the decays depend
    on each head's global index, which head-sharded kernels do not see."""

    kind: ClassVar[str] = "retention"
    strategies: ClassVar[tuple[str, ...]] = ()

    def head_kernel(self, q: Tensor, k: Tensor, v: Tensor, first: int, total: int) -> Tensor:
        return self._run(q, k, v, first=first, total=total)

    def _run(self, q, k, v, state=None, return_state=False, first=0, total=None):
        decays = lin.retention_decays(total or q.shape[1])[first : first + q.shape[1]]
        res = lin.retention(q, k, v, decays, chunk=self.chunk, state=state, return_state=True)
        # per head and position: the same in every form
        out = rms_normalize(res[0], 1e-6).to(res[0].dtype)
        return (out, res[1]) if return_state else out


__all__ = ["LinearAttention", "Retention"]
