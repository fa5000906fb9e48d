"""Multi-head causal self-attention whose pattern (kernel, decode, cost, parallelism)
is an attention pattern object (:mod:`longctx.nn.patterns`), chosen by name."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .chunking import recompute, token_chunks
from .patterns import Kernel, Pattern, make_pattern
from .rotary import apply_rotary
from .state import LayerState


class MultiHeadAttention(nn.Module):
    """Fused query/key/value projection, rotary positions, the pattern's attention, an
    output projection: x (B, N, C) -> (B, N, C).

    ``pattern`` is a registered kind (``"dense"``, ``"dilated"``, ``"sliding_window"``,
    or one of your own), a table ``{"kind": ..., **keys}`` or a pattern object; keyword
    ``options`` are the pattern's keys::

        attn = MultiHeadAttention(512, 8, "dilated", segment_lengths=[2048, 4096],
                                  dilation_rates=[1, 2])
        y = attn(x)                                          # training: whole sequence
        state = attn.new_state(batch=1, capacity=4096)       # decoding
        y = attn(x_chunk, state=state)                       # prefill, then token by token

    ``kernel`` is the whole-sequence attention (q, k, v) -> out, the pattern's by
    default; sequence parallelism replaces it with a distributed one. ``token_chunk``
    (default 0: off) runs the per-token work (``pre``, projections, rotary positions) in
    slices of that many tokens, recomputed in backward (:mod:`longctx.nn.chunking`); on a
    sequence longer than that (and the pattern's own kernel), the attention itself runs
    head group by head group, each recomputed in backward, so that q, k, v and their
    gradients exist for about ``token_chunk`` tokens' worth of heads at a time."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        pattern: str | dict | Pattern = "dense",
        *,
        rope_base: float = 10000.0,
        **options,
    ):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not a multiple of n_heads {n_heads}")
        if options:
            spec = {"kind": pattern, **options} if isinstance(pattern, str) else None
            if spec is None:
                raise ValueError("pattern options need the pattern given by name")
            pattern = spec
        self.pattern = make_pattern(pattern, "pattern")
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.rope_base = rope_base
        self.kernel: Kernel = self.pattern.kernel
        self.token_chunk = 0
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def extra_repr(self) -> str:
        return f"heads={self.n_heads}, pattern={self.pattern!r}"

    def forward(
        self,
        x: Tensor,
        positions: Tensor | None = None,
        state: LayerState | None = None,
        *,
        start: int = 0,
        pre=None,
    ) -> Tensor:
        """x (B, N, C) at ``positions`` (N,) (default start..start+N-1, or from the state).
        Without a state: the whole-sequence ``kernel``. With one (from :meth:`new_state`):
        x continues what the state holds (a prefill chunk or decoded tokens). ``pre``: a
        per-token function applied to x first (a block's norm), chunked with the
        projections."""
        N = x.shape[1]
        if positions is None:
            first = start if state is None else state.length
            positions = torch.arange(first, first + N, device=x.device)
        chunk, chunked = self.token_chunk, self.token_chunk > 0
        groups = self._head_groups(N) if state is None and chunked else []
        if len(groups) > 1:
            xn = x if pre is None else token_chunks(pre, (x,), (1,), chunk, 1)
            out = None
            for h0, h1 in groups:  # (B, N, C) contributions of the groups' heads
                part = recompute(self._head_group, xn, positions, h0, h1)
                out = part if out is None else out + part
            return out
        q, k, v = token_chunks(
            lambda xc, pc: self._project(xc, pc, pre),
            (x, positions),
            (1, -1),
            chunk,
            2,
            recomputed=chunked,
        )  # (B, H, N, Dh) each
        y = self.kernel(q, k, v) if state is None else self.pattern.attend(q, k, v, state)
        return token_chunks(self._output, (y,), (2,), chunk, 1, recomputed=chunked)

    def _head_groups(self, n: int) -> list[tuple[int, int]]:
        """Head ranges whose q, k, v hold about ``token_chunk`` tokens' worth of features
        (one range when the pattern's kernel is not this layer's: sequence parallelism)."""
        if self.kernel != self.pattern.kernel:
            return []
        per = max(1, self.n_heads * self.token_chunk // max(n, 1))
        return [(h, min(self.n_heads, h + per)) for h in range(0, self.n_heads, per)]

    def _head_group(self, x: Tensor, positions: Tensor, h0: int, h1: int) -> Tensor:
        """The output projection's share (B, N, C) of heads h0..h1-1 on normed input x."""
        B, N, C = x.shape
        g, Dh = h1 - h0, self.head_dim
        w = self.qkv.weight.view(3, self.n_heads, Dh, C)[:, h0:h1].reshape(3 * g * Dh, C)
        qkv = F.linear(x, w).view(B, N, 3, g, Dh)  # (B, N, 3, g, Dh)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, g, N, Dh) each
        q = apply_rotary(q, positions, self.rope_base)
        k = apply_rotary(k, positions, self.rope_base)
        y = self.pattern.head_kernel(q, k, v, h0, self.n_heads)  # (B, g, N, Dh)
        w_out = self.proj.weight.view(C, self.n_heads, Dh)[:, h0:h1].reshape(C, g * Dh)
        return F.linear(y.transpose(1, 2).reshape(B, N, g * Dh), w_out)

    def _project(self, x: Tensor, positions: Tensor, pre=None) -> tuple[Tensor, Tensor, Tensor]:
        """(q, k, v), each (B, H, n, Dh), of n tokens (rotary positions applied)."""
        if pre is not None:
            x = pre(x)
        B, n, _ = x.shape
        qkv = self.qkv(x).view(B, n, 3, self.n_heads, self.head_dim)  # (B, n, 3, H, Dh)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, n, Dh) each
        q = apply_rotary(q, positions, self.rope_base)
        k = apply_rotary(k, positions, self.rope_base)
        return q, k, v

    def _output(self, y: Tensor) -> Tensor:
        """The output projection of attention results y (B, H, n, Dh) -> (B, n, C)."""
        B, H, n, Dh = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, n, H * Dh))

    def new_state(
        self,
        batch: int,
        capacity: int = 0,
        dtype=None,
        device=None,
        policy: str = "full",
        **options,
    ) -> LayerState | None:
        """A state for ``batch`` rows: the pattern's decode cache for up to ``capacity``
        positions (``policy`` as in generation; see :meth:`Pattern.new_state`)."""
        w = self.qkv.weight
        dtype, device = dtype or w.dtype, device or w.device
        return self.pattern.new_state(self, batch, capacity, dtype, device, policy, **options)

    def attention_flops(self, n: int) -> float:
        """Forward attention FLOPs of a sequence of n tokens (the pattern's count)."""
        return self.pattern.flops(n, self.n_heads, self.head_dim)

    def sequence_parallel(self, sp) -> None:
        """Compute this layer over sequence shards: ``sp`` is a
        :class:`longctx.distributed.SequenceParallel`."""
        self.kernel = self.pattern.sequence_parallel(sp.strategy, sp.group, causal=sp.causal)
