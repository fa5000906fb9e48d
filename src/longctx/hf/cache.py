"""transformers ``Cache`` classes whose layers hold longctx states: the bounded exact
dilated decode cache (:class:`DilatedCache`, per batch row) and a memory model's windows
and memory stores (:class:`MemoryCache`)."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from ..nn.state import DilatedKVCache

TAG = "_longctx_cache_layer"  # set on the key tensor handed to the attention backend


class StateLayer(CacheLayerMixin):
    """One layer of a longctx cache. ``update`` only counts the slots and hands itself to
    the backend (through the key tensor): the backend, which has the padding mask and the
    positions, stores the tokens in ``state`` (a longctx layer state it makes) and attends
    over it. ``backend``: the attention backend that reads this kind of layer."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    backend = ""

    def __init__(self, **kwargs):
        super().__init__()
        self.length = 0
        self.state = None
        self.pending = False  # an update the backend has not consumed yet

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending:
            raise RuntimeError(
                f"a {type(self).__name__} is read only by the {self.backend!r} attention "
                "backend; this model computes its attention otherwise"
            )
        self.pending = True
        self.length += key_states.shape[-2]
        setattr(key_states, TAG, self)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # masks cover the new tokens only: (kv_length, kv_offset) = (q, tokens seen)
        return query_length, self.length

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length, self.state, self.pending = 0, None, False

    @property
    def nbytes(self) -> int:
        return 0 if self.state is None else self.state.nbytes


class DilatedLayer(StateLayer):
    """A layer of a :class:`DilatedCache`: ``state`` is a
    :class:`~longctx.nn.state.DilatedKVCache`."""

    backend = "longctx_dilated"
    state: DilatedKVCache | None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            self.state.select(beam_idx.to(self.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            rows = torch.arange(self.state.k[0].shape[0], device=self.device)
            self.state.select(rows.repeat_interleave(repeats))

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.state is not None:
            self.state.select(torch.as_tensor(indices, device=self.device))


class MemoryLayer(StateLayer):
    """A layer of a :class:`MemoryCache`: ``state`` is a memory layer's
    :class:`~longctx.nn.state.MemoryState` (store and current window) or, for the other
    layers, the :class:`~longctx.nn.state.KVCache` of the current window."""

    backend = "longctx_memory"


def _check_backend(model, backend: str, cls: str, how: str) -> None:
    if model is None:
        return
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != backend:
        raise ValueError(
            f"{cls} needs the {backend!r} attention backend; the model uses {impl!r} ({how})"
        )


class DilatedCache(Cache):
    """Decode cache of a model whose attention is ``longctx_dilated``: per layer, branch
    and head only the open segment's keys of the head's residue, at most
    sum_b ceil(w_b / r_b) keys per head whatever the context (the full caches of
    transformers grow with it). Exact: decoding equals recomputing the whole sequence.
    Pass it as ``cache=`` to ``model(...)`` or ``model.generate(...)``. ``model`` (optional)
    is checked to use the ``longctx_dilated`` backend."""

    def __init__(self, model=None):
        how = "longctx.hf.configure(model, 'dilated', ...) selects it"
        _check_backend(model, "longctx_dilated", "DilatedCache", how)
        super().__init__(layer_class_to_replicate=DilatedLayer)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors held, all layers together."""
        return sum(layer.nbytes for layer in self.layers)


class MemoryCache(Cache):
    """The state of a model made a memory model by :func:`longctx.hf.add_memory`: per
    layer the current window's keys and values, and per memory layer its memory of
    earlier windows (one store per batch row). Pass it as ``cache=`` to process a long
    input chunk by chunk (any chunk size) or to ``generate``; each call continues where
    the last stopped. ``model`` (optional) is checked to be a memory model."""

    def __init__(self, model=None):
        _check_backend(model, "longctx_memory", "MemoryCache", "longctx.hf.add_memory sets it")
        super().__init__(layer_class_to_replicate=MemoryLayer)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors held (windows and stores), all layers together."""
        return sum(layer.nbytes for layer in self.layers)

    def clear_memory(self, rows: list[int] | None = None) -> None:
        """Forget what the memory layers hold for ``rows`` (default all), e.g. at a
        document boundary; the current windows are kept."""
        for layer in self.layers:
            store = getattr(layer.state, "store", None)
            if store is not None:
                store.clear(rows)
