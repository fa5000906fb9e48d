"""Focused-Transformer memory layers in a transformers model (:func:`add_memory`).

The model becomes a memory model, as longctx's ``memory`` pattern defines it: every layer
attends causally within windows of ``window`` positions, and the chosen layers also read,
in the same softmax, the keys and values of earlier windows kept in a memory per batch
row (dense, exact top-k or a faiss index). It is one more attention backend,
``longctx_memory``, over the model's own projections and rotary positions; the window
and memory logic is :class:`longctx.nn.MemoryAttention`'s (built without projections),
the states are longctx's (:class:`~longctx.nn.state.MemoryState`, ``KVCache``), held
across calls by a :class:`~longctx.hf.cache.MemoryCache`.

A plain forward (no cache) starts with an empty memory and processes its input window
by window; in training mode with ``crossbatch=d``, the memory layers instead read the
previous window of their own row and of d other rows, with gradients (Focused
Transformer's crossbatch training), so a plain PyTorch loop or the HF Trainer trains
them with ``model(ids, labels=ids).loss``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model.hf import ConversionError, rope_base_of
from ..nn.memory import Memory, MemoryAttention, local_attention
from ..nn.patterns import make_pattern
from ..nn.rotary import apply_rotary
from ..nn.state import CrossbatchState, KVCache
from .attention import CONFIG_KEY
from .cache import MemoryLayer

CROSSBATCH_KEY = "longctx_crossbatch"  # on the config: negatives in training, or None
READER = "_longctx_memory_reader"  # the MemoryAttention reader kept on each memory layer


def add_memory(
    model,
    layers: list[int],
    *,
    window: int = 512,
    retrieval: str = "dense",
    topk: int = 32,
    positions: str = "zero",
    capacity: int = 65536,
    faiss_index: str = "ivf",
    nprobe: int = 0,
    crossbatch: int | None = None,
) -> Memory:
    """Make ``model`` (a transformers decoder using the attention interface) a
    Focused-Transformer memory model: layers in ``layers`` read a memory of earlier
    windows (``retrieval`` dense/topk/faiss, ``topk`` keys per query and head,
    ``positions`` zero/absolute/none for memory keys, ``capacity`` entries per row,
    ``faiss_index`` ivf/flat, ``nprobe``), every layer attends within windows of
    ``window`` positions. ``crossbatch=d``: training-mode forwards without a cache use
    crossbatch (d other rows' previous windows as negatives). The settings are kept on
    the config (saved with it); the backend becomes ``longctx_memory``. Returns the
    pattern. Decode or continue long inputs with ``cache=MemoryCache(model)``."""
    cfg = model.config.get_text_config()
    pattern = make_pattern(
        {
            "kind": "memory",
            "layers": list(layers),
            "window": window,
            "capacity": capacity,
            "retrieval": retrieval,
            "topk": topk,
            "positions": positions,
            "faiss_index": faiss_index,
            "nprobe": nprobe,
            "separator": -1,  # the backend does not see token ids: clear_memory instead
        },
        "longctx.hf.add_memory",
    )
    H = cfg.num_attention_heads
    pattern.check_model(cfg.hidden_size, H, cfg.num_hidden_layers)
    if positions != "absolute":
        try:
            rope_base_of(cfg.to_dict())
        except ConversionError as exc:
            raise ValueError(
                f"memory positions {positions!r} undo the model's rotary positions, which "
                f"must be plain: {exc}; use positions='absolute'"
            ) from None
    if crossbatch is not None and (isinstance(crossbatch, bool) or crossbatch < 0):
        raise ValueError(f"crossbatch must be None or a number of negatives >= 0, got {crossbatch}")
    if retrieval == "faiss":
        from ..nn.retrieval import require_faiss

        require_faiss()
    for config in {id(c): c for c in (model.config, cfg)}.values():
        setattr(config, CONFIG_KEY, pattern.to_dict())
        setattr(config, CROSSBATCH_KEY, crossbatch)
    model.set_attn_implementation("longctx_memory")
    return pattern


def _reader(module, pattern: Memory, heads: int, head_dim: int) -> MemoryAttention:
    """The module's memory reader for ``pattern`` (made again when the pattern changed)."""
    reader = getattr(module, READER, None)
    if reader is None or reader.pattern != pattern or reader.n_heads != heads:
        absolute = pattern.positions == "absolute"
        rope = 10000.0 if absolute else rope_base_of(module.config.to_dict())
        reader = pattern.memory_layer(heads * head_dim, heads, rope_base=rope, projections=False)
        reader.pattern = pattern
        object.__setattr__(module, READER, reader)  # not a submodule: no parameters
    return reader


def _check_unpadded(mask: Tensor | None, n: int, nk: int) -> None:
    """A memory model's rows sit at the same positions: only a plain causal mask."""
    if mask is None:
        return
    causal = torch.arange(nk, device=mask.device) <= torch.arange(n, device=mask.device)[
        :, None
    ] + (nk - n)
    if not torch.equal(mask[:, 0], causal.expand(mask.shape[0], n, nk)):
        raise ValueError(
            "a memory model takes unpadded rows (its windows sit at the same positions in "
            "every row); padding or a custom attention mask is not supported"
        )


def memory_attention(pattern: Memory, module, q, k, v, mask, scale, layer, position_ids):
    """The ``longctx_memory`` backend (module docstring): q (B, H, N, D) after rotary,
    k/v (B, H, N_k, D) with query heads; ``layer`` a MemoryCache layer or None."""
    B, H, N, D = q.shape
    if scale is not None and abs(scale * D**0.5 - 1) > 1e-6:
        raise ValueError(f"memory layers use the scale 1/sqrt(head_dim); the model uses {scale}")
    if layer is not None and not isinstance(layer, MemoryLayer):
        raise ValueError(f"a {type(layer).__name__} is not a memory model's cache")
    if layer is None and k.shape[2] != N:
        raise ValueError(
            "a memory model continues a sequence only through its own cache: pass "
            "cache=longctx.hf.MemoryCache(model)"
        )
    _check_unpadded(mask, N, k.shape[2])
    past = 0 if layer is None else layer.length - N
    positions = torch.arange(past, past + N, device=q.device)
    if position_ids is not None and not torch.equal(
        position_ids.to(q.device), positions.expand_as(position_ids)
    ):
        raise ValueError("a memory model's rows sit at positions 0, 1, ...: got other position_ids")
    W = pattern.window
    if module.layer_idx not in pattern.layers:  # causal within windows
        if layer is None:
            return local_attention(q, k, v, None, W)[0]
        layer.pending = False
        if layer.state is None:
            layer.state = KVCache(B, H, W, D, k.dtype, k.device)
        return local_attention(q, k, v, layer.state, W)[0]
    reader = _reader(module, pattern, H, D)
    if pattern.positions == "absolute":
        q_plain, k_mem = q, k
    else:  # undo the model's rotation (orthogonal: rotate back by the same angles)
        q_plain = apply_rotary(q, -positions, reader.rope_base)
        k_mem = apply_rotary(k, -positions, reader.rope_base)
    crossbatch = getattr(module.config, CROSSBATCH_KEY, None)
    if layer is None and module.training and crossbatch is not None:
        state = CrossbatchState(crossbatch)
        return reader.attend_crossbatch(q_plain, q, k, k_mem, v, positions, state)
    if layer is None:
        state = reader.new_state(B, dtype=k.dtype, device=k.device)
    else:
        layer.pending = False
        if layer.state is None:
            layer.state = reader.new_state(B, dtype=k.dtype, device=k.device)
        state = layer.state
    tokens = torch.zeros(B, N, dtype=torch.long, device=q.device)  # no document rules
    return reader.attend_windows(q_plain, q, k, k_mem, v, positions, tokens, state)
