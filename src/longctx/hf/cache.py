"""A transformers ``Cache`` for the ``longctx_dilated`` backend whose size does not grow
with the context (LongNet's bounded exact decode cache, per batch row)."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from ..nn.state import RowDilatedKVCache

TAG = "_longctx_dilated_layer"  # set on the key tensor handed to the attention backend


class DilatedLayer(CacheLayerMixin):
    """One layer of a :class:`DilatedCache`. ``update`` only counts the slots and hands
    itself to the ``longctx_dilated`` backend (through the key tensor): the backend,
    which has the padding mask and the positions, stores the tokens and attends over the
    :class:`~longctx.nn.state.RowDilatedKVCache` it keeps in ``state``."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, **kwargs):
        super().__init__()
        self.length = 0
        self.state: RowDilatedKVCache | None = None
        self.pending = False  # an update the backend has not consumed yet

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending:
            raise RuntimeError(
                "a DilatedCache is read only by the 'longctx_dilated' attention backend; "
                "this model computes its attention otherwise (longctx.hf.configure(model, "
                "'dilated', ...) selects the backend)"
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

    @property
    def nbytes(self) -> int:
        return 0 if self.state is None else self.state.nbytes


class DilatedCache(Cache):
    """Decode cache of a model whose attention is ``longctx_dilated``: per layer, branch
    and head only the open segment's keys of the head's residue, at most
    sum_b ceil(w_b / r_b) keys per head whatever the context (the full caches of
    transformers grow with it). Exact: decoding equals recomputing the whole sequence.
    Pass it as ``cache=`` to ``model(...)`` or ``model.generate(...)``. ``model`` (optional)
    is checked to use the ``longctx_dilated`` backend."""

    def __init__(self, model=None):
        if model is not None:
            impl = getattr(model.config, "_attn_implementation", None)
            if impl != "longctx_dilated":
                raise ValueError(
                    f"DilatedCache needs the 'longctx_dilated' attention backend; the model "
                    f"uses {impl!r} (longctx.hf.configure(model, 'dilated', ...) selects it)"
                )
        super().__init__(layer_class_to_replicate=DilatedLayer)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors held, all layers together."""
        return sum(layer.nbytes for layer in self.layers)
