"""Modules with parameters, built on longctx.ops. Layout (batch, seq, dim)."""

from .attention import ATTENTION_PATTERNS, MultiHeadAttention
from .feedforward import SwiGLU
from .ngram import NgramEmbedding
from .norm import RMSNorm
from .rotary import apply_rotary

__all__ = [
    "ATTENTION_PATTERNS",
    "MultiHeadAttention",
    "NgramEmbedding",
    "RMSNorm",
    "SwiGLU",
    "apply_rotary",
]
