"""Modules with parameters, built on :mod:`longctx.ops`. Layout (batch, seq, dim).

- Attention: :class:`MultiHeadAttention` (any registered pattern), the patterns and their
  registry (:class:`Pattern`, :func:`register_pattern`, :func:`make_pattern`; built in:
  :class:`Dense`, :class:`Dilated`, :class:`SlidingWindow`, :class:`CoLT5`,
  :class:`Memory`), :class:`ConditionalAttention` (CoLT5), :class:`MemoryAttention`
  (Focused Transformer) with retrieval (:func:`torch_topk`, :class:`FaissIndex`,
  :func:`recall_at_k`).
- Feed-forward: :class:`SwiGLU`, :class:`ConditionalFeedForward` (CoLT5) and the
  ``[model.ffn]`` kinds (:func:`make_ffn`, :func:`register_ffn`).
- Routing: :class:`Router`, :func:`soft_topk`, :func:`apply_routed`.
- States carried between calls (:mod:`longctx.nn.state`): :class:`KVCache`,
  :class:`DilatedKVCache`, :class:`RoutedKVCache`, :class:`MemoryStore`,
  :class:`MemoryState`, :class:`CrossbatchState`, :class:`ModelState`.
- Others: :class:`RMSNorm`, :class:`NgramEmbedding`, :func:`apply_rotary`.
"""

from .attention import MultiHeadAttention
from .colt5 import (
    CoLT5,
    CoLT5FFN,
    ConditionalAttention,
    ConditionalFeedForward,
    conditional_attention_flops,
    conditional_ffn_flops,
)
from .feedforward import FeedForwardKind, SwiGLU, SwiGLUFFN, ffn_names, make_ffn, register_ffn
from .linear import LinearAttention, Retention
from .memory import MEMORY_POSITIONS, Memory, MemoryAttention, document_rules
from .ngram import NgramEmbedding
from .norm import RMSNorm
from .patterns import (
    Dense,
    Dilated,
    Pattern,
    SlidingWindow,
    make_kernel,
    make_pattern,
    pattern_class,
    pattern_names,
    register_pattern,
)
from .retrieval import FAISS_INDEXES, RETRIEVALS, FaissIndex, recall_at_k, torch_topk
from .rotary import apply_rotary
from .routing import Router, Routing, apply_routed, soft_topk
from .state import (
    CrossbatchState,
    DilatedKVCache,
    KVCache,
    LayerState,
    MemoryState,
    MemoryStore,
    ModelState,
    RecurrentState,
    RoutedKVCache,
)

__all__ = [
    "FAISS_INDEXES",
    "MEMORY_POSITIONS",
    "RETRIEVALS",
    "CoLT5",
    "CoLT5FFN",
    "ConditionalAttention",
    "ConditionalFeedForward",
    "CrossbatchState",
    "Dense",
    "Dilated",
    "DilatedKVCache",
    "FeedForwardKind",
    "KVCache",
    "LayerState",
    "LinearAttention",
    "Memory",
    "MemoryAttention",
    "MemoryState",
    "MemoryStore",
    "ModelState",
    "MultiHeadAttention",
    "NgramEmbedding",
    "Pattern",
    "RMSNorm",
    "RecurrentState",
    "Retention",
    "RoutedKVCache",
    "Router",
    "Routing",
    "SlidingWindow",
    "SwiGLU",
    "SwiGLUFFN",
    "apply_rotary",
    "apply_routed",
    "conditional_attention_flops",
    "conditional_ffn_flops",
    "document_rules",
    "FaissIndex",
    "recall_at_k",
    "ffn_names",
    "make_ffn",
    "make_kernel",
    "make_pattern",
    "pattern_class",
    "pattern_names",
    "register_ffn",
    "register_pattern",
    "soft_topk",
    "torch_topk",
]
