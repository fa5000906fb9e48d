"""Feed-forward layers and the ``[model.ffn]`` kinds that build them.

A kind is a dataclass whose fields are its config keys, with a class attribute ``kind``
and ``build(dim, hidden) -> nn.Module``; :func:`register_ffn` makes it available by name.
Built in: ``swiglu`` (here) and ``colt5`` (routed, :mod:`longctx.nn.colt5`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Registry


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x) (Shazeer 2020, "GLU Variants Improve Transformer")."""

    per_token = True  # each token's output depends on that token alone (may be chunked)

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)  # gate and up in one matmul
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)  # (B, N, hidden) each
        return self.w2(F.silu(gate) * up)


class FeedForwardKind:
    """Base of the ``[model.ffn]`` kinds (module docstring)."""

    kind: ClassVar[str] = ""

    def build(self, dim: int, hidden: int) -> nn.Module:
        """The feed-forward module of one layer, x (B, N, C) -> (B, N, C). A module whose
        output at each token depends on that token alone says so with a class attribute
        ``per_token = True``; training may then run it in token chunks."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """The ``[model.ffn]`` table: ``kind`` and the keys."""
        return {"kind": self.kind, **dataclasses.asdict(self)}


FFN_KINDS = Registry(FeedForwardKind, "swiglu")


def register_ffn(cls: type[FeedForwardKind]) -> type[FeedForwardKind]:
    """Class decorator: make a feed-forward kind available as ``[model.ffn] kind``."""
    return FFN_KINDS.register(cls)


def ffn_names() -> tuple[str, ...]:
    """The registered feed-forward kinds."""
    return FFN_KINDS.names()


def make_ffn(spec: str | dict | FeedForwardKind = "swiglu", where: str = "model.ffn"):
    """A feed-forward kind from its name, a table ``{"kind": ..., **keys}`` or itself."""
    return FFN_KINDS.make(spec, where)


@register_ffn
@dataclasses.dataclass
class SwiGLUFFN(FeedForwardKind):
    """The plain SwiGLU feed-forward (no keys)."""

    kind: ClassVar[str] = "swiglu"

    def build(self, dim: int, hidden: int) -> nn.Module:
        return SwiGLU(dim, hidden)


__all__ = [
    "FFN_KINDS",
    "FeedForwardKind",
    "SwiGLU",
    "SwiGLUFFN",
    "ffn_names",
    "make_ffn",
    "register_ffn",
]
