"""Sequence parallelism over torch.distributed (SPEC section 5).

One sequence is split over the P ranks of a sequence-parallel group; a strategy replaces
each attention layer's kernel, so the model code does not change: the model runs on the
local tokens with their global positions, and only attention talks to other ranks.

>>> sp = SequenceParallel(SPGroup.world(), "ring")      # inside torchrun / spawn
>>> sp.parallelize(model)
>>> x_local, pos = sp.shard(tokens, dim=1), sp.positions(tokens.shape[1])
>>> logits_local = model(x_local, positions=pos)
"""

from __future__ import annotations

from torch import Tensor, nn

from ..nn import MultiHeadAttention
from ..nn.attention import make_kernel
from . import shard as _shard
from .comm import SPGroup, backend_for, init_from_env
from .strategies import (
    STRATEGIES,
    longnet_attention,
    ring_attention,
    strategy_layout,
    ulysses_attention,
)

__all__ = [
    "STRATEGIES",
    "SPGroup",
    "SequenceParallel",
    "backend_for",
    "default_strategy",
    "init_from_env",
    "longnet_attention",
    "ring_attention",
    "ulysses_attention",
]


def default_strategy(attention: str) -> str:
    """longnet for dilated layers, ring for dense ones, ulysses for the rest."""
    return {"dilated": "longnet", "dense": "ring"}.get(attention, "ulysses")


class SequenceParallel:
    """A strategy bound to a group: shards sequences and wraps attention layers."""

    def __init__(self, group: SPGroup, strategy: str, *, causal: bool = True):
        self.group = group
        self.strategy = strategy
        self.causal = causal
        self.layout = strategy_layout(strategy, causal)

    @property
    def size(self) -> int:
        return self.group.size

    @property
    def rank(self) -> int:
        return self.group.rank

    def shard(self, x: Tensor, dim: int = 1) -> Tensor:
        return _shard.shard(x, dim, self.rank, self.size, self.layout)

    def positions(self, n: int, device=None) -> Tensor:
        return _shard.local_positions(n, self.rank, self.size, self.layout, device)

    def check_length(self, n: int) -> None:
        _shard.check_length(n, self.size, self.layout)

    def kernel(self, cfg):
        """The attention kernel (q, k, v local shards -> local output) of a model config
        (``longctx.model.ModelConfig``) under this strategy."""
        g, causal = self.group, self.causal
        if cfg.attention == "colt5":
            raise ValueError(
                "sequence parallelism does not support CoLT5 attention (its routed heavy "
                "branch needs the whole sequence's routing); use dense, dilated or "
                "sliding_window attention"
            )
        if self.strategy == "ring":
            if cfg.attention != "dense":
                raise ValueError(
                    f"the ring strategy computes dense attention; this model has "
                    f"{cfg.attention!r} attention (use ulysses, or longnet for dilated)"
                )
            return lambda q, k, v: ring_attention(q, k, v, g, causal=causal, layout=self.layout)
        if self.strategy == "longnet":
            if cfg.attention != "dilated":
                raise ValueError(
                    f"the longnet strategy computes dilated attention; this model has "
                    f"{cfg.attention!r} attention (use ring or ulysses)"
                )
            ws, rs, offs = cfg.segment_lengths, cfg.dilation_rates, cfg.dilated_offsets
            return lambda q, k, v: longnet_attention(
                q, k, v, g, ws, rs, causal=causal, offsets=offs
            )
        local = make_kernel(
            cfg.attention,
            segment_lengths=cfg.segment_lengths,
            dilation_rates=cfg.dilation_rates,
            offsets=cfg.dilated_offsets,
            window=cfg.window,
        )
        return lambda q, k, v: ulysses_attention(q, k, v, g, local)

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Swap every attention layer's kernel for this strategy's (in place)."""
        kernel = self.kernel(model.cfg)
        for block in model.blocks:
            if not isinstance(block.attn, MultiHeadAttention):
                raise ValueError("sequence parallelism needs MultiHeadAttention layers")
            block.attn.kernel = kernel
        return model
