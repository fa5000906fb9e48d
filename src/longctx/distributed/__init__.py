"""Sequence parallelism over torch.distributed (docs/spec.md, "Sequence parallelism").

One sequence is split over the P ranks of a sequence-parallel group. The model code does
not change: :meth:`SequenceParallel.parallelize` asks every layer to compute its share
(an attention layer takes its pattern's distributed kernel; layers that cannot work on a
shard refuse with a clear error), the model runs on the local tokens with their global
positions, and only attention talks to other ranks.

>>> sp = SequenceParallel(SPGroup.world(), "ring")      # inside torchrun / spawn
>>> sp.parallelize(model)
>>> x_local, pos = sp.shard(tokens, dim=1), sp.positions(tokens.shape[1])
>>> logits_local = model(x_local, positions=pos)
"""

from __future__ import annotations

from torch import Tensor, nn

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


def default_strategy(attention) -> str:
    """The strategy for a model's attention pattern (a pattern or its kind): the first
    of the pattern's strategies (longnet for dilated, ring for dense, ulysses for the
    other patterns that shard)."""
    from ..nn.patterns import make_pattern

    strategies = make_pattern(attention).strategies
    return strategies[0] if strategies else "ulysses"


class SequenceParallel:
    """A strategy bound to a group: shards sequences and makes modules compute shards."""

    def __init__(self, group: SPGroup, strategy: str, *, causal: bool = True):
        self.group = group
        self.strategy = strategy
        self.causal = causal
        self.layout = strategy_layout(strategy, causal)

    @property
    def size(self) -> int:
        """Ranks in the group."""
        return self.group.size

    @property
    def rank(self) -> int:
        """This process's index in the group."""
        return self.group.rank

    def shard(self, x: Tensor, dim: int = 1) -> Tensor:
        """This rank's part of ``x`` (sequence along ``dim``) in the strategy's layout."""
        return _shard.shard(x, dim, self.rank, self.size, self.layout)

    def positions(self, n: int, device=None) -> Tensor:
        """Global positions of this rank's tokens of a length-n sequence."""
        return _shard.local_positions(n, self.rank, self.size, self.layout, device)

    def check_length(self, n: int) -> None:
        """ValueError unless a length-n sequence splits over the group."""
        _shard.check_length(n, self.size, self.layout)

    def parallelize(self, module: nn.Module) -> nn.Module:
        """Make every submodule that defines ``sequence_parallel(sp)`` compute its share
        of a sequence (in place): attention layers take their pattern's distributed
        kernel; layers that cannot (routing, memory, the n-gram embedding) raise
        ValueError saying why. Works on any module, not only DecoderLM."""
        for m in module.modules():
            hook = getattr(m, "sequence_parallel", None)
            if callable(hook):
                hook(self)
        return module
