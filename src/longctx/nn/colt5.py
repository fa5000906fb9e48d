"""CoLT5 conditional computation (Ainslie et al., "CoLT5: Faster Long-Range Transformers
with Conditional Computation", arXiv 2303.09752): the ``colt5`` attention pattern and the
``colt5`` feed-forward kind.

Every token takes a cheap *light* branch; a learned router (:mod:`longctx.nn.routing`)
picks the tokens that also take an expensive *heavy* branch, whose output is scaled by the
router's weight (the weight is what carries gradient to the router: selection itself is
not differentiable). In the model, routing is causal (a per-token gate; see
:mod:`longctx.nn.routing`).

:class:`ConditionalFeedForward`: y = FFN_light(x) + w * FFN_heavy(x) on routed tokens
(paper sizes: light hidden = hidden / 2, heavy hidden = 4 * hidden).

:class:`ConditionalAttention`: y = A_light(x) + w_q * A_heavy(x, w_kv * x). Light: local
attention (window radius 127: a causal query sees itself and the 127 keys before it) with
a quarter of the heads. Heavy: the other heads, full attention among the routed queries
over the routed keys/values (paper: N/16 queries, N/8 keys/values), keys and values
computed from the score-scaled inputs; in causal mode a routed query sees the routed keys
at positions <= its own. Three independent routers per layer (feed-forward, queries,
keys/values). An optional padding mask keeps padding out of routing and out of every
attention's keys. Decoding keeps a :class:`~longctx.nn.state.RoutedKVCache`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor, nn

from .. import ops
from ..ops.lowlevel import (
    query_rows_per_tile,
    sliding_window_attention_at,
    tiled_masked_attention,
)
from .feedforward import FeedForwardKind, SwiGLU, register_ffn
from .patterns import Pattern, check_decode_policy, register_pattern
from .rotary import apply_rotary
from .routing import (
    DEFAULT_EPSILON,
    DEFAULT_ITERATIONS,
    Router,
    apply_routed,
    gather_rows,
)
from .state import LayerState, RoutedKVCache

NO_SEQUENCE_PARALLEL = (
    "sequence parallelism does not support CoLT5 attention (its routed heavy branch needs "
    "the whole sequence's routing); use dense, dilated or sliding_window attention"
)


def _fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")
    return float(value)


# ----------------------------------------------------------------- feed-forward


class ConditionalFeedForward(nn.Module):
    """y = light(x) + w * heavy(x) on routed tokens (SwiGLU branches; module docstring)."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        light_hidden: int | None = None,
        heavy_hidden: int | None = None,
        capacity: float | int = 1 / 16,
        causal: bool = False,
        epsilon: float = DEFAULT_EPSILON,
        iterations: int = DEFAULT_ITERATIONS,
    ):
        super().__init__()
        self.light_hidden = light_hidden or max(1, hidden // 2)
        self.heavy_hidden = heavy_hidden or 4 * hidden
        self.light = SwiGLU(dim, self.light_hidden)
        self.heavy = SwiGLU(dim, self.heavy_hidden)
        self.router = Router(dim, capacity, causal=causal, epsilon=epsilon, iterations=iterations)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (B, N, C); ``mask`` (B, N) bool, False = padding (never routed)."""
        routing = self.router(x, mask)
        return self.light(x) + apply_routed(x, routing, self.heavy)

    def skipped_params(self) -> float:
        """Weights per token that routing skips on average: the heavy branch's, for the
        tokens beyond the capacity fraction."""
        heavy = sum(p.numel() for p in self.heavy.parameters())
        return (1 - float(self.router.capacity)) * heavy


def conditional_ffn_flops(dim: int, light_hidden: int, heavy_hidden: int, fraction: float) -> float:
    """Forward FLOPs per token (SwiGLU: 3 matrices; heavy on a fraction of the tokens)."""
    return 6 * dim * (light_hidden + fraction * heavy_hidden)


@register_ffn
@dataclasses.dataclass
class CoLT5FFN(FeedForwardKind):
    """``[model.ffn] kind = "colt5"``: a routed feed-forward with a causal router.
    ``capacity``: fraction of tokens through the heavy branch; ``light_hidden`` and
    ``heavy_hidden``: 0 = the paper's hidden / 2 and 4 * hidden."""

    kind: ClassVar[str] = "colt5"
    capacity: float = 1 / 16
    light_hidden: int = 0
    heavy_hidden: int = 0

    def __post_init__(self):
        self.capacity = _fraction(self.capacity, "model.ffn.capacity")
        for name in ("light_hidden", "heavy_hidden"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.ffn.{name} must be >= 0 (0 = default)")

    def build(self, dim: int, hidden: int) -> nn.Module:
        return ConditionalFeedForward(
            dim,
            hidden,
            light_hidden=self.light_hidden or None,
            heavy_hidden=self.heavy_hidden or None,
            capacity=self.capacity,
            causal=True,
        )


# ----------------------------------------------------------------- attention


def _routed_attention(q, k, v, q_pos, k_pos, q_valid, k_valid, causal: bool) -> Tensor:
    """Attention of routed queries (B, H, Mq, D) over routed keys (B, H, Mk, D): a query
    sees the valid keys (at positions <= its own when causal); invalid query slots and
    queries that see nothing give 0."""
    B, H, Mq, _ = q.shape
    Mk = k.shape[2]
    if not causal and bool(q_valid.all()) and bool(k_valid.all()):
        return ops.attention(q, k, v)

    def mask_fn(q0: int, q1: int, k0: int, k1: int) -> Tensor:
        m = q_valid[:, q0:q1, None] & k_valid[:, None, k0:k1]
        if causal:
            m = m & (k_pos[:, None, k0:k1] <= q_pos[:, q0:q1, None])
        return m.unsqueeze(1)  # (B, 1, rows, keys)

    step = query_rows_per_tile(B, H, Mk)
    tiles = []
    for a in range(0, Mq, step):
        b = min(Mq, a + step)
        k1 = Mk
        if causal:  # trim the keys no query of the tile can see
            qmax = q_pos[:, a:b].masked_fill(~q_valid[:, a:b], -1).amax(dim=-1)  # (B,)
            seen = (k_valid & (k_pos <= qmax.unsqueeze(-1))).any(dim=0)  # (Mk,)
            hits = seen.nonzero()
            k1 = int(hits[-1]) + 1 if len(hits) else 0
        if k1 > 0:
            tiles.append((a, b, 0, k1))
    return tiled_masked_attention(q, k, v, tiles, mask_fn, q.shape[-1] ** -0.5)[0]


def _local_attention(q, k, v, window: int, causal: bool, key_valid: Tensor | None) -> Tensor:
    """Sliding-window attention; with ``key_valid`` (B, N), padding keys are hidden."""
    if key_valid is None or bool(key_valid.all()):
        return ops.sliding_window_attention(q, k, v, window, causal=causal)
    B, H, N, _ = q.shape
    step = max(1, min(window, N))

    def mask_fn(q0: int, q1: int, k0: int, k1: int) -> Tensor:
        i = torch.arange(q0, q1, device=q.device).unsqueeze(-1)
        j = torch.arange(k0, k1, device=q.device)
        band = (i - j).abs() < window
        if causal:
            band = band & (j <= i)
        return (band & key_valid[:, None, k0:k1]).unsqueeze(1)  # (B, 1, rows, keys)

    tiles = []
    for a in range(0, N, step):
        b = min(N, a + step)
        tiles.append((a, b, max(0, a - window + 1), b if causal else min(N, b + window - 1)))
    return tiled_masked_attention(q, k, v, tiles, mask_fn, q.shape[-1] ** -0.5)[0]


class ConditionalAttention(nn.Module):
    """CoLT5 attention (module docstring): light local heads + routed heavy heads."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        *,
        light_heads: int | None = None,
        window: int = 128,
        q_capacity: float | int = 1 / 16,
        kv_capacity: float | int = 1 / 8,
        causal: bool = False,
        rope_base: float = 10000.0,
        epsilon: float = DEFAULT_EPSILON,
        iterations: int = DEFAULT_ITERATIONS,
    ):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not a multiple of n_heads {n_heads}")
        light_heads = light_heads or max(1, n_heads // 4)
        if not 1 <= light_heads < n_heads:
            raise ValueError(
                f"light_heads must be in [1, n_heads - 1] = [1, {n_heads - 1}] so that both "
                f"branches have heads, got {light_heads} (n_heads = {n_heads})"
            )
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.head_dim = D = dim // n_heads
        self.light_heads = light_heads
        self.heavy_heads = n_heads - light_heads
        self.window = window
        self.causal = causal
        self.rope_base = rope_base
        self.light_qkv = nn.Linear(dim, 3 * light_heads * D, bias=False)
        self.light_proj = nn.Linear(light_heads * D, dim, bias=False)
        self.heavy_q = nn.Linear(dim, self.heavy_heads * D, bias=False)
        self.heavy_kv = nn.Linear(dim, 2 * self.heavy_heads * D, bias=False)
        self.heavy_proj = nn.Linear(self.heavy_heads * D, dim, bias=False)
        kw = dict(causal=causal, epsilon=epsilon, iterations=iterations)
        self.q_router = Router(dim, q_capacity, **kw)
        self.kv_router = Router(dim, kv_capacity, **kw)

    def forward(
        self,
        x: Tensor,
        positions: Tensor | None = None,
        state: RoutedKVCache | None = None,
        start: int = 0,
        mask: Tensor | None = None,
    ) -> Tensor:
        """x (B, N, C) at positions start..start+N-1 (or ``positions`` (N,)); ``state``
        (from :meth:`new_state`) for incremental decoding (causal only): x continues it;
        ``mask`` (B, N) bool, False = padding."""
        B, N, C = x.shape
        if state is not None:
            if mask is not None:
                raise ValueError("a padding mask cannot be combined with a decoding cache")
            start = state.length
        if positions is None:
            positions = torch.arange(start, start + N, device=x.device)
        return self._light(x, positions, state, start, mask) + self._heavy(
            x, positions, state, mask
        )

    def _light(self, x, positions, state, start, mask) -> Tensor:
        B, N, _ = x.shape
        qkv = self.light_qkv(x).view(B, N, 3, self.light_heads, self.head_dim)  # (B, N, 3, Hl, D)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, Hl, N, D)
        q = apply_rotary(q, positions, self.rope_base)
        k = apply_rotary(k, positions, self.rope_base)
        if state is not None:
            keys, values, k_start = state.light_update(k, v, start)
            y = sliding_window_attention_at(q, keys, values, self.window, start, k_start)
        else:
            y = _local_attention(q, k, v, self.window, self.causal, mask)
        return self.light_proj(y.transpose(1, 2).reshape(B, N, -1))

    def _heavy(self, x, positions, state, mask) -> Tensor:
        B, N, C = x.shape
        H, D = self.heavy_heads, self.head_dim
        rq = self.q_router(x, mask)
        rkv = self.kv_router(x, mask)
        q_pos, k_pos = positions[rq.indices], positions[rkv.indices]  # (B, Mq), (B, Mk)
        xq = gather_rows(x, rq.indices)  # (B, Mq, C)
        xkv = gather_rows(x, rkv.indices) * rkv.weights.unsqueeze(-1).to(x.dtype)
        Mq, Mk = xq.shape[1], xkv.shape[1]
        q = self.heavy_q(xq).view(B, Mq, H, D).transpose(1, 2)  # (B, H, Mq, D)
        kv = self.heavy_kv(xkv).view(B, Mk, 2, H, D)
        k, v = (t.transpose(1, 2) for t in kv.unbind(2))  # (B, H, Mk, D)
        q = apply_rotary(q, q_pos, self.rope_base)
        k = apply_rotary(k, k_pos, self.rope_base)
        k_valid = rkv.valid
        if state is not None:
            k, v, k_pos, k_valid = state.heavy_update(k, v, k_pos, k_valid)
        if Mq == 0:
            return x.new_zeros(B, N, C)
        y = _routed_attention(q, k, v, q_pos, k_pos, rq.valid, k_valid, self.causal)
        y = self.heavy_proj(y.transpose(1, 2).reshape(B, Mq, H * D))
        y = y * rq.weights.unsqueeze(-1).to(y.dtype)  # 0 in padding slots
        return y.new_zeros(B, N, C).scatter_add_(1, rq.indices.unsqueeze(-1).expand(-1, -1, C), y)

    @property
    def routers(self) -> dict[str, Router]:
        """The layer's routers by name (``q``, ``kv``)."""
        return {"q": self.q_router, "kv": self.kv_router}

    def new_state(
        self,
        batch: int,
        capacity: int = 0,
        dtype=None,
        device=None,
        policy: str = "full",
        **options,
    ) -> RoutedKVCache:
        """A decode state for ``batch`` rows and up to ``capacity`` positions (causal only;
        any decode ``policy`` keeps this layer's own bounded light window and routed
        keys)."""
        check_decode_policy(policy, "colt5")
        if not self.causal:
            raise ValueError("a decoding cache needs causal ConditionalAttention")
        w = self.light_qkv.weight
        return RoutedKVCache(
            batch,
            self.light_heads,
            self.heavy_heads,
            self.head_dim,
            self.window,
            capacity,
            dtype or w.dtype,
            device or w.device,
        )

    def attention_flops(self, n: int) -> float:
        """Forward attention FLOPs of n tokens with the routers at their capacities."""
        return conditional_attention_flops(
            n,
            self.head_dim * (self.light_heads + self.heavy_heads),
            self.light_heads + self.heavy_heads,
            self.light_heads,
            self.window,
            float(self.q_router.capacity),
            float(self.kv_router.capacity),
            self.causal,
        )["attention"]

    def skipped_params(self) -> float:
        """Heavy-branch weights per token that routing skips on average (capacities)."""
        cq, ckv = float(self.q_router.capacity), float(self.kv_router.capacity)
        skipped = (1 - cq) * (self.heavy_q.weight.numel() + self.heavy_proj.weight.numel())
        return skipped + (1 - ckv) * self.heavy_kv.weight.numel()

    def sequence_parallel(self, sp) -> None:
        """Refused (the heavy branch routes over the whole sequence)."""
        raise ValueError(NO_SEQUENCE_PARALLEL)


def conditional_attention_flops(
    n: int,
    dim: int,
    n_heads: int,
    light_heads: int,
    window: int,
    q_fraction: float,
    kv_fraction: float,
    causal: bool,
) -> dict[str, float]:
    """Expected forward FLOPs of CoLT5 attention over n tokens, with the routed counts at
    the given fractions: ``projections`` (2 per multiply-add) and ``attention`` (4 * D
    per visible pair: the light band, and routed queries x routed keys, causal: keys at or
    before the query), and their ``total``."""
    D = dim // n_heads
    heavy = n_heads - light_heads
    mq, mk = q_fraction * n, kv_fraction * n
    proj = 2 * dim * D * (4 * light_heads * n + heavy * (2 * mq + 2 * mk))
    light = ops.sliding_window_flops(n, light_heads, D, window, causal=causal)
    pairs = q_fraction * kv_fraction * n * (n + 1) / 2 if causal else mq * mk
    attention = light + 4 * D * heavy * pairs
    return {"projections": proj, "attention": attention, "total": proj + attention}


@register_pattern
@dataclasses.dataclass
class CoLT5(Pattern):
    """``[model.attention] kind = "colt5"``: :class:`ConditionalAttention` in every layer,
    with causal routing. ``light_heads``: 0 = n_heads // 4 (at least 1); ``window``: the
    light local attention (each token sees itself + window - 1 before); ``q_capacity``
    and ``kv_capacity``: fractions of the tokens routed as heavy queries and keys."""

    kind: ClassVar[str] = "colt5"
    strategies: ClassVar[tuple[str, ...]] = ()
    light_heads: int = 0
    window: int = 128
    q_capacity: float = 1 / 16
    kv_capacity: float = 1 / 8

    def __post_init__(self):
        self.q_capacity = _fraction(self.q_capacity, "model.attention.q_capacity")
        self.kv_capacity = _fraction(self.kv_capacity, "model.attention.kv_capacity")
        if self.light_heads < 0:
            raise ValueError(
                f"model.attention.light_heads must be >= 0 (0 = default), got {self.light_heads}"
            )
        if self.window < 1:
            raise ValueError(f"model.attention.window must be >= 1, got {self.window}")

    def heads(self, n_heads: int) -> int:
        """The light heads of a layer with ``n_heads`` heads."""
        return self.light_heads or max(1, n_heads // 4)

    def check_model(self, dim: int, n_heads: int, n_layers: int) -> None:
        if n_heads < 2:
            raise ValueError("model.attention = 'colt5' needs n_heads >= 2 (light and heavy heads)")
        if not self.heads(n_heads) < n_heads:
            raise ValueError(
                f"model.attention.light_heads ({self.light_heads}) must be < n_heads "
                f"({n_heads}) so that the heavy branch has heads"
            )

    def build(self, dim: int, n_heads: int, layer: int, *, rope_base: float) -> nn.Module:
        return ConditionalAttention(
            dim,
            n_heads,
            light_heads=self.heads(n_heads),
            window=self.window,
            q_capacity=self.q_capacity,
            kv_capacity=self.kv_capacity,
            causal=True,
            rope_base=rope_base,
        )

    def new_state(
        self,
        module: nn.Module,
        batch: int,
        capacity: int,
        dtype,
        device,
        policy: str = "full",
        **options,
    ) -> LayerState | None:
        return module.new_state(batch, capacity, dtype, device, policy, **options)

    def flops(self, n: int, n_heads: int, head_dim: int) -> float:
        lh = self.heads(n_heads)
        fl = conditional_attention_flops(
            n,
            n_heads * head_dim,
            n_heads,
            lh,
            self.window,
            self.q_capacity,
            self.kv_capacity,
            True,
        )
        return fl["attention"]

    def check_sequence_parallel(self, strategy: str, world: int, n_heads: int, n: int) -> None:
        raise ValueError(NO_SEQUENCE_PARALLEL)


__all__ = [
    "CoLT5",
    "CoLT5FFN",
    "ConditionalAttention",
    "ConditionalFeedForward",
    "conditional_attention_flops",
    "conditional_ffn_flops",
]
