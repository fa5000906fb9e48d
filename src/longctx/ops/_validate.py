"""Input checks shared by the ops: clear ValueError/TypeError messages, never assert."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def check_qkv(q: Tensor, k: Tensor, v: Tensor, *, same_length: bool = False) -> None:
    """TypeError/ValueError unless q, k, v are (B, H, N, D) tensors that agree."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have shape (batch, heads, seq, head_dim), got {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(
            "q, k, v must agree on (batch, heads), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head_dim differ: {q.shape[-1]} vs {k.shape[-1]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v sequence lengths differ: {k.shape[2]} vs {v.shape[2]}")
    if same_length and q.shape[2] != k.shape[2]:
        raise ValueError(
            f"this op is self-attention: q and k must have the same length, got "
            f"{q.shape[2]} and {k.shape[2]}"
        )


def resolve_scale(scale: float | None, head_dim: int) -> float:
    """The softmax scale: ``scale``, or head_dim ** -0.5 when None."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def positive_int(value: object, name: str) -> int:
    """``value`` as an int, or ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def positive_ints(values: Sequence[int], name: str) -> list[int]:
    """A non-empty sequence of positive ints, or an error naming ``name``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of positive integers, got {values!r}")
    if len(values) == 0:
        raise ValueError(f"{name} must not be empty")
    return [positive_int(x, f"{name}[{i}]") for i, x in enumerate(values)]


def optional_int(value: object, name: str) -> int | None:
    """None or an int, else TypeError naming ``name``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer or None, got {value!r}")
    return value
