"""Attention patterns: one object per kind of attention layer, found by name in a registry.

A pattern owns everything about its kind of layer (:class:`Pattern`):

- its config: the pattern is a dataclass whose fields are the keys of ``[model.attention]``
  (``kind = "dilated"`` picks the class; unknown keys are an error naming the valid ones);
- the module it builds for a layer (:meth:`Pattern.build`; default a
  :class:`~longctx.nn.attention.MultiHeadAttention` that calls back into the pattern);
- the training/prefill call over a whole sequence (:meth:`Pattern.kernel`);
- its decode state: creation (:meth:`Pattern.new_state`) and the chunked prefill and
  one-token step over it (:meth:`Pattern.attend`);
- its attention FLOPs (:meth:`Pattern.flops`);
- its sequence-parallel kernel, or a clear refusal (:meth:`Pattern.sequence_parallel`).

The built-in patterns here are ``dense``, ``dilated`` (LongNet) and ``sliding_window``;
``colt5`` lives in :mod:`longctx.nn.colt5` and ``memory`` in :mod:`longctx.nn.memory`.
A user pattern needs only a ``kind`` and a visibility rule (:meth:`Pattern.mask`); it then
trains, decodes with a full cache and counts its FLOPs through generic (O(N^2)) paths, and
may override any method with a faster one::

    @register_pattern
    @dataclass
    class Strided(Pattern):
        kind: ClassVar[str] = "strided"
        stride: int = 4

        def mask(self, q_pos, k_pos):  # (n,) and (m,) positions -> (n, m) visible
            return (q_pos[:, None] - k_pos[None, :]) % self.stride == 0
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import ops
from ..config import Registry
from ..ops.lowlevel import (
    check_branches,
    head_offset_groups,
    head_offsets,
    query_rows_per_tile,
    sliding_window_attention_at,
    tiled_masked_attention,
)
from .state import DilatedKVCache, KVCache, LayerState

Kernel = Callable[[Tensor, Tensor, Tensor], Tensor]
CACHE_POLICIES = ("full", "dilated")  # decode states; generation adds "none" (no state)


class Pattern:
    """Base class of attention patterns (module docstring). Subclasses are dataclasses
    whose fields are their config keys, with a class attribute ``kind``."""

    kind: ClassVar[str] = ""

    # ------------------------------------------------------------------ config

    def check_model(self, dim: int, n_heads: int, n_layers: int) -> None:
        """ValueError if the pattern cannot serve a model of this shape."""

    def to_dict(self) -> dict[str, Any]:
        """The ``[model.attention]`` table: ``kind`` and the pattern's keys."""
        return {"kind": self.kind, **dataclasses.asdict(self)}

    # ------------------------------------------------------------------ modules

    def build(self, dim: int, n_heads: int, layer: int, *, rope_base: float) -> nn.Module:
        """The attention module of layer ``layer``: called as ``module(x, positions,
        state)`` with x (B, N, C), positions (N,) and a state from :meth:`new_state`."""
        from .attention import MultiHeadAttention

        return MultiHeadAttention(dim, n_heads, self, rope_base=rope_base)

    # ------------------------------------------------------------------ attention

    def mask(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """(..., n, m) bool: which keys at positions ``k_pos`` (..., m) the queries at
        ``q_pos`` (..., n) see (leading axes, such as a batch of rows at different
        positions, broadcast). Causality (key <= query) is added by the generic paths; a
        pattern with its own kernel, decode and FLOPs need not define this."""
        raise NotImplementedError(
            f"pattern {self.kind!r} defines neither mask() nor its own kernel/attend/flops"
        )

    def pair_counts(self, q_pos: Tensor, k_pos: Tensor, n_heads: int) -> Tensor:
        """How many times each query at ``q_pos`` (n,) attends each key at ``k_pos`` (m,),
        causality included: bool (n, m), or integer counts (H, n, m) when a key reaches a
        query through several branches (dilated). The exact constant-memory decode
        (``cache="recompute"``) streams keys under it. Generic: :meth:`mask` and causality."""
        return self.mask(q_pos, k_pos) & (k_pos[None, :] <= q_pos[:, None])

    def first_key(self, position: int) -> int:
        """The first key position that a query at ``position`` or later can see (earlier
        keys are never read). Generic: 0."""
        return 0

    def kernel(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal attention of a whole sequence (positions 0..N-1): q, k, v (B, H, N, D)
        after rotary -> (B, H, N, D). Generic: :meth:`mask` in query tiles."""
        return masked_pattern_attention(self.mask, q, k, v, 0)

    def head_kernel(self, q: Tensor, k: Tensor, v: Tensor, first: int, total: int) -> Tensor:
        """:meth:`kernel` for heads first..first+H-1 (H = q.shape[1]) of a layer of
        ``total`` heads, computed alone (training recomputes attention head group by head
        group to bound memory). Generic: :meth:`kernel` (every head alike); a pattern
        whose heads differ (dilated offsets, retention decays) overrides it."""
        return self.kernel(q, k, v)

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
        """The state of one layer: for a decode ``policy`` (``"full"``, ``"dilated"``) its
        decode cache for up to ``capacity`` positions (a pattern without a bounded cache
        uses the full one, and :meth:`cache_note` says so). Other policies (``"crossbatch"``)
        belong to the patterns that define them."""
        self.check_policy(policy)
        return KVCache(batch, module.n_heads, capacity, module.head_dim, dtype, device)

    def check_policy(self, policy: str) -> None:
        """ValueError unless ``policy`` is a decode cache policy."""
        check_decode_policy(policy, self.kind)

    def cache_note(self, policy: str) -> str:
        """Why a cache policy is not honoured as asked (empty when it is)."""
        if policy != "dilated":
            return ""
        return (
            f"cache='dilated' on a model with {self.kind!r} attention: no layer is dilated, "
            "so every layer uses the full cache"
        )

    def attend(self, q: Tensor, k: Tensor, v: Tensor, state: LayerState) -> Tensor:
        """Queries, keys, values (B, H, n, D) of positions state.length.. (prefill chunk or
        one decoded token): store what later queries need and attend over everything
        visible so far. Generic: a full cache and :meth:`mask`."""
        start = state.length
        keys, values = state.update(k, v, start)
        return masked_pattern_attention(self.mask, q, keys, values, start)

    def prefill_multiple(self) -> int:
        """Prefill chunks must start at multiples of this (1: anywhere)."""
        return 1

    def flops(self, n: int, n_heads: int, head_dim: int) -> float:
        """Useful forward FLOPs (4 * D per visible pair) of one layer over n causal
        positions. Generic: counts :meth:`mask` in row blocks."""
        pairs, pos = 0, torch.arange(n)
        step = max(1, (1 << 22) // max(n, 1))
        for a in range(0, n, step):
            q = pos[a : a + step]
            pairs += int((self.mask(q, pos) & (pos[None, :] <= q[:, None])).sum())
        return 4.0 * head_dim * n_heads * pairs

    # ------------------------------------------------------------------ parallelism

    # the sequence-parallel strategies that compute this pattern (the first is the default)
    strategies: ClassVar[tuple[str, ...]] = ("ulysses",)

    def check_sequence_parallel(self, strategy: str, world: int, n_heads: int, n: int) -> None:
        """ValueError unless this pattern runs under ``strategy`` over ``world`` ranks for
        sequences of length n (checked before training starts)."""
        from ..distributed.strategies import check_ulysses

        self._check_strategy(strategy)
        if strategy == "ulysses":
            check_ulysses(n_heads, world)

    def sequence_parallel(self, strategy: str, group, *, causal: bool = True) -> Kernel:
        """The kernel that computes this pattern over sequence shards (q, k, v local ->
        local output) under ``strategy``. Ulysses (any pattern with a :meth:`kernel`)
        switches to head shards and runs :meth:`kernel` over all positions."""
        from ..distributed.strategies import ulysses_attention

        self._check_strategy(strategy)
        return lambda q, k, v: ulysses_attention(q, k, v, group, self.kernel)

    def _check_strategy(self, strategy: str) -> None:
        if strategy not in self.strategies:
            supported = ", ".join(self.strategies) or "none"
            raise ValueError(
                f"the {strategy} sequence-parallel strategy does not compute {self.kind!r} "
                f"attention (strategies that do: {supported})"
            )


def check_decode_policy(policy: str, kind: str) -> None:
    """ValueError unless ``policy`` is a decode cache policy (the state of a layer of
    attention ``kind``)."""
    if policy == "crossbatch":
        raise ValueError(
            "crossbatch training needs a model with memory layers "
            f"([model.attention] kind = 'memory'); this one has {kind!r} attention"
        )
    if policy not in CACHE_POLICIES:
        raise ValueError(f"unknown cache policy {policy!r}; choose from {CACHE_POLICIES}")


def masked_pattern_attention(
    mask: Callable[[Tensor, Tensor], Tensor], q: Tensor, k: Tensor, v: Tensor, q_start: int
) -> Tensor:
    """Attention of queries at positions q_start.. over keys at 0.. under ``mask`` and
    causality, in query tiles (memory: one tile's mask and scores)."""
    nq, nk = q.shape[2], k.shape[2]
    device = q.device

    def mask_fn(q0: int, q1: int, k0: int, k1: int) -> Tensor:
        qp = torch.arange(q_start + q0, q_start + q1, device=device)
        kp = torch.arange(k0, k1, device=device)
        return (mask(qp, kp) & (kp[None, :] <= qp[:, None]))[None, None]  # (1, 1, n, m)

    step = query_rows_per_tile(q.shape[0], q.shape[1], nk)
    tiles = [
        (a, min(nq, a + step), 0, min(nk, q_start + min(nq, a + step))) for a in range(0, nq, step)
    ]
    tiles = [t for t in tiles if t[3] > 0]
    return tiled_masked_attention(q, k, v, tiles, mask_fn, q.shape[-1] ** -0.5)[0]


# -------------------------------------------------------------------- the registry

PATTERNS = Registry(
    Pattern,
    "dense",
    "; a pattern of your own must be registered first (in Python: import its module; on "
    "the command line: longctx --import MODULE ...)",
)


def register_pattern(cls: type[Pattern]) -> type[Pattern]:
    """Class decorator: make a :class:`Pattern` dataclass available by its ``kind``
    (``[model.attention] kind = ...``, ``--set model.attention=...``). Registering a
    kind again replaces the earlier class."""
    return PATTERNS.register(cls)


def pattern_names() -> tuple[str, ...]:
    """The registered pattern kinds."""
    return PATTERNS.names()


def pattern_class(kind: str) -> type[Pattern]:
    """The pattern class registered as ``kind``."""
    return PATTERNS.get(kind)


def make_pattern(spec: str | dict | Pattern = "dense", where: str = "model.attention") -> Pattern:
    """A pattern from a kind name, a table ``{"kind": ..., **keys}`` or a pattern
    (returned as is). Keys are checked against the pattern's fields."""
    return PATTERNS.make(spec, where)


def make_kernel(kind: str = "dense", **options) -> Kernel:
    """The causal training kernel (q, k, v) -> out of a pattern given by name and keys."""
    return make_pattern({"kind": kind, **options}, "pattern").kernel


# -------------------------------------------------------------------- dense


@register_pattern
@dataclasses.dataclass
class Dense(Pattern):
    """Exact causal attention over every earlier position."""

    kind: ClassVar[str] = "dense"
    strategies: ClassVar[tuple[str, ...]] = ("ring", "ulysses")

    def mask(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        return k_pos[..., None, :] <= q_pos[..., :, None]

    def kernel(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return ops.attention(q, k, v, causal=True)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, state: KVCache) -> Tensor:
        keys, values = state.update(k, v, state.length)
        return ops.attention(q, keys, values, causal=True)  # bottom-right aligned

    def flops(self, n: int, n_heads: int, head_dim: int) -> float:
        return float(ops.attention_flops(n, n_heads, head_dim, causal=True))

    def sequence_parallel(self, strategy: str, group, *, causal: bool = True) -> Kernel:
        if strategy == "ring":
            from ..distributed.strategies import ring_attention, strategy_layout

            layout = strategy_layout(strategy, causal)
            return lambda q, k, v: ring_attention(q, k, v, group, causal=causal, layout=layout)
        return super().sequence_parallel(strategy, group, causal=causal)


# -------------------------------------------------------------------- dilated


@register_pattern
@dataclasses.dataclass
class Dilated(Pattern):
    """LongNet dilated attention (Ding et al., arXiv 2307.02486): branches (w_b, r_b);
    see :func:`longctx.ops.dilated_attention`. A branch with rate 1 is required so that
    every position is covered at every length.

    Decoding: ``policy="dilated"`` keeps, per branch and head, only the current
    segment's keys of the head's residue (:class:`~longctx.nn.state.DilatedKVCache`:
    exact, and bounded whatever the context); ``"full"`` keeps every key. A prefill chunk
    of more than one token must start at a multiple of lcm(w_b): it then holds whole
    segments of every branch and needs no earlier key."""

    kind: ClassVar[str] = "dilated"
    strategies: ClassVar[tuple[str, ...]] = ("longnet", "ulysses")
    segment_lengths: list[int] = dataclasses.field(default_factory=lambda: [128, 256, 512])
    dilation_rates: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4])
    offsets: str = "paper"

    def __post_init__(self):
        try:
            check_branches(self.segment_lengths, self.dilation_rates, self.offsets)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"model.attention (dilated): {exc}") from None
        if 1 not in self.dilation_rates:
            raise ValueError(
                "model.attention.dilation_rates needs a branch with rate 1 so that every "
                f"position is covered at every length, got {self.dilation_rates}"
            )

    def kernel(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.head_kernel(q, k, v, 0, q.shape[1])

    def head_kernel(self, q: Tensor, k: Tensor, v: Tensor, first: int, total: int) -> Tensor:
        ws, rs = self.segment_lengths, self.dilation_rates
        return ops.dilated_attention(
            q, k, v, ws, rs, causal=True, offsets=self.offsets, heads=(first, total)
        )

    def pair_counts(self, q_pos: Tensor, k_pos: Tensor, n_heads: int) -> Tensor:
        # a key counts once per branch in which it shares the query's segment and the
        # head's residue (the union with multiplicity that the branch merge computes)
        return sum(m.long() for m in self.branch_masks(q_pos, k_pos, n_heads))

    def branch_masks(self, q_pos: Tensor, k_pos: Tensor, n_heads: int) -> list[Tensor]:
        """Per branch, bool (..., H, n, m): which keys at positions ``k_pos`` (..., m)
        the queries at ``q_pos`` (..., n) see through that branch, causality included
        (leading axes broadcast: rows of a batch may sit at different positions). The
        branches' attentions merged by lse are the layer's attention."""
        qi = q_pos[..., None, :, None]  # (..., 1, n, 1)
        kj = k_pos[..., None, None, :]  # (..., 1, 1, m)
        offsets = torch.tensor(
            [head_offsets(n_heads, r, self.offsets) for r in self.dilation_rates],
            device=q_pos.device,
        )  # (branches, H)
        masks = []
        for b, (w, r) in enumerate(zip(self.segment_lengths, self.dilation_rates, strict=True)):
            o = offsets[b][:, None, None]  # (H, 1, 1)
            masks.append(
                (qi // w == kj // w) & (kj <= qi) & ((qi % w) % r == o) & ((kj % w) % r == o)
            )
        return masks

    def first_key(self, position: int) -> int:
        # the earliest segment start, over the branches, of a query at or after position
        return min(position // w * w for w in self.segment_lengths)

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
        if policy == "dilated":
            H, D = module.n_heads, module.head_dim
            ws, rs = self.segment_lengths, self.dilation_rates
            return DilatedKVCache(batch, H, D, ws, rs, self.offsets, dtype, device)
        return super().new_state(module, batch, capacity, dtype, device, policy, **options)

    def cache_note(self, policy: str) -> str:
        return ""

    def prefill_multiple(self) -> int:
        return math.lcm(*self.segment_lengths)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, state: LayerState) -> Tensor:
        start, n = state.length, q.shape[2]
        if n > 1:  # an aligned prefill chunk: self-contained
            multiple = self.prefill_multiple()
            if start % multiple:
                raise ValueError(
                    f"a prefill chunk of a dilated layer must start at a multiple of "
                    f"{multiple} (the lcm of the segment lengths), got {start}"
                )
            state.update(k, v, start)
            return self.kernel(q, k, v)
        state.update(k, v, start)
        return self._decode(q, start, state)

    def _decode(self, q: Tensor, t: int, state: LayerState) -> Tensor:
        """Output (B, H, 1, D) of the query at position t: per branch, the heads whose
        offset matches t's residue attend their visible keys; a branch's part has
        lse = -inf for the other heads, and the parts merge by lse in one call."""
        B, H, _, D = q.shape
        parts = []
        for b, (w, r) in enumerate(zip(self.segment_lengths, self.dilation_rates)):
            residue = (t % w) % r
            heads = dict(head_offset_groups(H, r, self.offsets)).get(residue)  # a slice
            if heads is None:
                continue
            if isinstance(state, DilatedKVCache):
                kb, vb = state.keys(b, residue, t)  # (B, Hg, L, D)
            else:  # the full cache: the segment's positions of this residue
                rows = slice((t // w) * w + residue, t + 1, r)
                kb, vb = state.k[:, heads, rows], state.v[:, heads, rows]  # (B, Hg, L, D)
            o, lse = ops.attention(q[:, heads], kb, vb, return_lse=True)  # (B, Hg, 1, D)
            if o.shape[1] < H:  # -> (B, H, 1, D), lse -inf for the other heads
                o_all, lse_all = q.new_zeros(B, H, 1, D), lse.new_full((B, H, 1), -math.inf)
                o_all[:, heads], lse_all[:, heads] = o, lse
                o, lse = o_all, lse_all
            parts.append((o, lse))
        return ops.merge(parts)[0]  # every head has the rate-1 branch

    def decode_rows(
        self, q: Tensor, pos: Tensor, state: DilatedKVCache, scale: float | None = None
    ) -> Tensor:
        """Output (B, H, 1, D) of one query per row at positions ``pos`` (B,) (rows may
        sit at different positions) over a :class:`~longctx.nn.state.DilatedKVCache` that
        already holds the query's own key: each branch over the keys it keeps, merged
        (:meth:`_decode` is the faster form for rows at one position)."""
        parts = []
        for b in range(len(self.segment_lengths)):
            k, v, seen = state.visible(b, pos)
            parts.append(ops.masked_attention(q, k, v, seen, scale=scale, return_lse=True))
        return ops.merge(parts)[0]

    def flops(self, n: int, n_heads: int, head_dim: int) -> float:
        ws, rs, offs = self.segment_lengths, self.dilation_rates, self.offsets
        return float(
            ops.dilated_attention_flops(n, n_heads, head_dim, ws, rs, causal=True, offsets=offs)
        )

    def check_sequence_parallel(self, strategy: str, world: int, n_heads: int, n: int) -> None:
        super().check_sequence_parallel(strategy, world, n_heads, n)
        if strategy == "longnet":
            from ..distributed.strategies import check_longnet

            check_longnet(n, world, self.segment_lengths, self.dilation_rates)

    def sequence_parallel(self, strategy: str, group, *, causal: bool = True) -> Kernel:
        if strategy == "longnet":
            from ..distributed.strategies import longnet_attention

            ws, rs, offs = self.segment_lengths, self.dilation_rates, self.offsets
            return lambda q, k, v: longnet_attention(
                q, k, v, group, ws, rs, causal=causal, offsets=offs
            )
        return super().sequence_parallel(strategy, group, causal=causal)


# -------------------------------------------------------------------- sliding window


@register_pattern
@dataclasses.dataclass
class SlidingWindow(Pattern):
    """Causal local attention: query i sees keys i - window < j <= i (Mistral style)."""

    kind: ClassVar[str] = "sliding_window"
    window: int = 256

    def __post_init__(self):
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"model.attention.window must be an integer >= 1, got {self.window!r}")

    def mask(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        gap = q_pos[..., :, None] - k_pos[..., None, :]
        return (gap >= 0) & (gap < self.window)

    def first_key(self, position: int) -> int:
        return max(0, position - self.window + 1)

    def kernel(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return ops.sliding_window_attention(q, k, v, self.window, causal=True)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, state: KVCache) -> Tensor:
        start = state.length
        keys, values = state.update(k, v, start)
        lo = max(0, start - self.window + 1)  # the first key any of these queries sees
        return sliding_window_attention_at(
            q, keys[:, :, lo:], values[:, :, lo:], self.window, start, lo
        )

    def flops(self, n: int, n_heads: int, head_dim: int) -> float:
        return float(ops.sliding_window_flops(n, n_heads, head_dim, self.window, causal=True))


__all__ = [
    "CACHE_POLICIES",
    "PATTERNS",
    "Dense",
    "Dilated",
    "Kernel",
    "Pattern",
    "SlidingWindow",
    "check_decode_policy",
    "make_kernel",
    "make_pattern",
    "masked_pattern_attention",
    "pattern_class",
    "pattern_names",
    "register_pattern",
]
