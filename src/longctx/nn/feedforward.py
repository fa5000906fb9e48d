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

from ..config import from_dict


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x) (Shazeer 2020, "GLU Variants Improve Transformer")."""

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
        """The feed-forward module of one layer, x (B, N, C) -> (B, N, C)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """The ``[model.ffn]`` table: ``kind`` and the keys."""
        return {"kind": self.kind, **dataclasses.asdict(self)}


_FFN_KINDS: dict[str, type[FeedForwardKind]] = {}


def register_ffn(cls: type[FeedForwardKind]) -> type[FeedForwardKind]:
    """Class decorator: make a feed-forward kind available as ``[model.ffn] kind``."""
    if not (isinstance(cls, type) and issubclass(cls, FeedForwardKind)):
        raise TypeError(f"register_ffn needs a subclass of FeedForwardKind, got {cls!r}")
    if not dataclasses.is_dataclass(cls) or not cls.kind:
        raise TypeError(f"{cls.__name__} must be a dataclass with a class attribute kind")
    _FFN_KINDS[cls.kind] = cls
    return cls


def ffn_names() -> tuple[str, ...]:
    """The registered feed-forward kinds."""
    return tuple(sorted(_FFN_KINDS))


def make_ffn(spec: str | dict | FeedForwardKind = "swiglu", where: str = "model.ffn"):
    """A feed-forward kind from its name, a table ``{"kind": ..., **keys}`` or itself."""
    if isinstance(spec, FeedForwardKind):
        return spec
    if isinstance(spec, str):
        spec = {"kind": spec}
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be a kind name or a table of keys, got {spec!r}")
    keys = dict(spec)
    kind = keys.pop("kind", "swiglu")
    if kind not in _FFN_KINDS:
        raise ValueError(f"{where} must be one of {ffn_names()}, got {kind!r}")
    return from_dict(_FFN_KINDS[kind], keys, where)


@register_ffn
@dataclasses.dataclass
class SwiGLUFFN(FeedForwardKind):
    """The plain SwiGLU feed-forward (no keys)."""

    kind: ClassVar[str] = "swiglu"

    def build(self, dim: int, hidden: int) -> nn.Module:
        return SwiGLU(dim, hidden)


__all__ = ["FeedForwardKind", "SwiGLU", "SwiGLUFFN", "ffn_names", "make_ffn", "register_ffn"]
