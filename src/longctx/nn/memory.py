"""Memory attention (Focused Transformer, Tworkowski et al. arXiv 2307.03170; Memorizing
Transformer, Wu et al. arXiv 2203.08913): the ``memory`` attention pattern.

A memory model processes its input in windows of W positions (aligned to multiples of
W). Every layer attends causally within the window; the memory layers' queries also
attend, in the same softmax, to the (key, value) pairs of earlier windows held in a
:class:`~longctx.nn.state.MemoryStore`: two parts merged by log-sum-exp (``ops.merge``),
so the result is exactly attention over their union. When a window completes, the memory
layers write its keys and values to their store.

Retrieval from memory (:mod:`longctx.nn.retrieval`): ``dense`` (every entry, exact),
``topk`` (per query and head, the k largest inner products, exact) or ``faiss`` (an
index kept in step with the store: ``ivf`` approximate, ``flat`` exact).

Memory is not a parameter: its capacity and retrieval can change after training
(:meth:`MemoryAttention.configure`, ``DecoderLM.configure_memory``).

Positions of memory keys (rotary, as in the local part):

- ``absolute``: keys keep the rotation of their absolute positions, queries theirs; with
  dense retrieval this is exactly causal attention over the concatenated context;
- ``zero`` (LongLLaMA): memory keys unrotated, as if at position 0; queries rotated by
  their position within the current window;
- ``none``: no rotation on either side of the memory scores.

Documents (:func:`document_rules`): a separator token ends a document. Queries after it
in its window do not read memory; the row's memory is cleared when the window is
written; only the tokens after the last separator are written.

Crossbatch training (a :class:`~longctx.nn.state.CrossbatchState` per memory layer):
each window's queries also attend, with gradients, to the previous window of their own
row (positive) and of ``negatives`` other rows; no store is used.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor, nn

from .. import ops
from ..config import check_choices
from .patterns import Kernel, Pattern, register_pattern
from .retrieval import (
    EXACT_BELOW,
    FAISS_INDEXES,
    RETRIEVALS,
    FaissIndex,
    attend_selected,
    require_faiss,
    store_index,
    torch_topk,
)
from .rotary import apply_rotary
from .state import CrossbatchState, KVCache, LayerState, MemoryState, MemoryStore

MEMORY_POSITIONS = ("none", "zero", "absolute")
NO_SEQUENCE_PARALLEL = (
    "sequence parallelism does not support memory layers (each window reads the memory "
    "written by the windows before it); use dense, dilated or sliding_window attention"
)


def document_rules(tokens: Tensor, separator: int) -> tuple[Tensor, Tensor, list[int]]:
    """For a window's token ids (B, n): which queries may read memory (B, n) (none after
    a document separator), which tokens are written (B, n) (those after the last
    separator), and which rows' memory is cleared (rows that hold a separator).
    ``separator`` < 0: no separator."""
    is_sep = (tokens == separator) & (separator >= 0)  # (B, n)
    idx = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    last = torch.where(is_sep, idx, -1).amax(dim=1, keepdim=True)  # -1: none
    keep = idx > last
    clear = is_sep.any(dim=1).nonzero().flatten().tolist()
    return memory_visible(tokens, separator), keep, clear


def memory_visible(tokens: Tensor, separator: int) -> Tensor:
    """(B, n) bool: which queries of a window (token ids (B, n)) may read memory: those
    up to the window's first document separator (no host sync)."""
    B, n = tokens.shape
    is_sep = (tokens == separator) & (separator >= 0)
    idx = torch.arange(n, device=tokens.device).expand(B, n)
    first = torch.where(is_sep, idx, n).amin(dim=1, keepdim=True)  # n: none
    return idx <= first


def window_pieces(offset: int, n: int, window: int) -> list[tuple[int, int]]:
    """[a, b) pieces of an input of n positions whose first position sits at ``offset``
    within its window: each piece lies in one window (the first may start mid-window)."""
    pieces, a = [], 0
    while a < n:
        b = min(n, a + window - (offset if a == 0 else 0))
        pieces.append((a, b))
        a = b
    return pieces


def local_attention(
    q: Tensor, k: Tensor, v: Tensor, cache: KVCache | None, window: int
) -> tuple[Tensor, Tensor]:
    """Causal attention within windows of ``window`` positions: q, k, v (B, H, n, D) ->
    (out, lse). Without ``cache`` the input starts a window; with one (a per-window
    :class:`KVCache`), it continues the window the cache holds (length = offset)."""
    offset = 0 if cache is None else cache.length
    outs, lses = [], []
    for a, b in window_pieces(offset, q.shape[2], window):
        qa, ka, va = q[:, :, a:b], k[:, :, a:b], v[:, :, a:b]
        whole = offset == 0 and b - a == window  # a complete window: attend in place
        if cache is not None and not whole:
            ka, va = cache.update(ka, va, offset)
        o, lse = ops.attention(qa, ka, va, causal=True, return_lse=True)  # bottom-right
        outs.append(o)
        lses.append(lse)
        offset = (offset + b - a) % window
        if cache is not None and offset == 0:
            cache.reset()  # the window is complete
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def local_attention_flops(n: int, window: int, n_heads: int, head_dim: int) -> float:
    """Forward FLOPs of causal attention within windows over n positions."""
    full, rest = divmod(n, window)
    per = ops.attention_flops(window, n_heads, head_dim, causal=True)
    return float(full * per + ops.attention_flops(rest, n_heads, head_dim, causal=True))


class MemoryAttention(nn.Module):
    """Causal multi-head attention over the local window plus a memory (module doc).

    Two ways to call it:

    - one window at a time, with a store you hold (drop-in)::

          layer = MemoryAttention(512, 8, retrieval="topk", topk=32, positions="zero")
          memory = layer.new_memory(batch=4, capacity=65536)
          for a in range(0, x.shape[1], 256):
              y = layer(x[:, a : a + 256], start=a, memory=memory)  # reads, then writes

    - with a state (:meth:`new_state`; what :class:`~longctx.model.DecoderLM` does):
      input of any length that continues the state, cut into windows of ``window``
      positions; each completed window moves into the state's store."""

    needs_state = True  # the model gives it a state (memory) even for a plain forward

    def __init__(
        self,
        dim: int,
        n_heads: int,
        *,
        retrieval: str = "dense",
        topk: int = 32,
        positions: str = "absolute",
        rope_base: float = 10000.0,
        faiss_index: str = "ivf",
        nprobe: int = 0,
        window: int = 256,
        capacity: int = 65536,
        separator: int = -1,
        projections: bool = True,
    ):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not a multiple of n_heads {n_heads}")
        if positions not in MEMORY_POSITIONS:
            raise ValueError(
                f"memory positions must be one of {MEMORY_POSITIONS}, got {positions!r}"
            )
        if topk < 1:
            raise ValueError(f"memory topk must be >= 1, got {topk}")
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.topk = topk
        self.positions = positions
        self.rope_base = rope_base
        self.window = window
        self.separator = separator
        self.configure(
            capacity=capacity,
            retrieval=retrieval,
            faiss_index=faiss_index,
            nprobe=nprobe,
            recall_every=0,
            exact_below=EXACT_BELOW,
        )
        if projections:
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
            self.proj = nn.Linear(dim, dim, bias=False)
        else:  # a reader for another model's projections (longctx.hf): attend_* only
            self.qkv = self.proj = None

    def _like(self, dtype, device):
        """dtype and device of new states: given, or the projections'."""
        if self.qkv is None:
            if dtype is None or device is None:
                raise ValueError("a memory layer without projections needs dtype and device")
            return dtype, device
        w = self.qkv.weight
        return dtype or w.dtype, device or w.device

    def configure(
        self,
        *,
        capacity: int | None = None,
        retrieval: str | None = None,
        topk: int | None = None,
        faiss_index: str | None = None,
        nprobe: int | None = None,
        recall_every: int | None = None,
        exact_below: int | None = None,
    ) -> None:
        """Change how memory is kept and read (no weight changes; memories made after
        this use it): ``capacity`` entries per row, ``retrieval`` dense/topk/faiss,
        ``topk`` entries each query reads (topk and faiss retrieval),
        ``faiss_index`` ivf/flat, ``nprobe`` lists an ivf query scans (0: automatic),
        ``recall_every``: count an index's recall against exact top-k on every n-th
        query (0: off), ``exact_below``: an ivf row is searched exactly until it holds
        this many entries (see :class:`FaissIndex`). None leaves a setting as it is."""
        if capacity is not None:
            if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
                raise ValueError(f"memory capacity must be an integer >= 1, got {capacity!r}")
            self.capacity = capacity
        if retrieval is not None:
            if retrieval not in RETRIEVALS:
                raise ValueError(f"memory retrieval must be one of {RETRIEVALS}, got {retrieval!r}")
            if retrieval == "faiss":
                require_faiss()
            self.retrieval = retrieval
        if topk is not None:
            if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
                raise ValueError(f"memory topk must be an integer >= 1, got {topk!r}")
            self.topk = topk
        if faiss_index is not None:
            if faiss_index not in FAISS_INDEXES:
                raise ValueError(f"faiss index must be one of {FAISS_INDEXES}, got {faiss_index!r}")
            self.faiss_index = faiss_index
        if nprobe is not None:
            if nprobe < 0:
                raise ValueError(f"nprobe must be >= 0 (0: automatic), got {nprobe}")
            self.nprobe = nprobe
        for name, value in (("recall_every", recall_every), ("exact_below", exact_below)):
            if value is not None:
                if value < 0:
                    raise ValueError(f"{name} must be >= 0, got {value}")
                setattr(self, name, value)

    # ------------------------------------------------------------------ states

    def new_memory(self, batch: int, capacity: int | None = None, dtype=None, device=None):
        """An empty :class:`MemoryStore` for this layer (default: its capacity), with
        the search index its retrieval keeps."""
        dtype, device = self._like(dtype, device)
        store = MemoryStore(
            batch, self.n_heads, self.head_dim, capacity or self.capacity, dtype, device
        )
        self._index(store)
        return store

    def _index(self, store: MemoryStore) -> FaissIndex | None:
        """The store's search index for ``faiss`` retrieval, attached (and built over
        what the store holds) if the store has none yet."""
        if self.retrieval != "faiss":
            return None
        return store_index(
            store, self.faiss_index, self.nprobe, self.exact_below, self.recall_every
        )

    def new_state(
        self,
        batch: int,
        capacity: int = 0,
        dtype=None,
        device=None,
        policy: str = "full",
        **options,
    ) -> LayerState:
        """A :class:`MemoryState` (an empty store and window) for any decode ``policy``
        (``capacity``, the decode length, is not needed: the store has its own); for
        ``policy="crossbatch"`` a :class:`CrossbatchState` with ``negatives``."""
        if policy == "crossbatch":
            return CrossbatchState(options.get("negatives", 0))
        dtype, device = self._like(dtype, device)
        store = self.new_memory(batch, None, dtype, device)
        return MemoryState(store, self.window, self.separator, dtype, device)

    # ------------------------------------------------------------------ pieces

    def _project(self, x: Tensor, positions: Tensor):
        """q, q rotated, k rotated, k as memory stores it, v: each (B, H, n, D)."""
        B, n, _ = x.shape
        qkv = self.qkv(x).view(B, n, 3, self.n_heads, self.head_dim)  # (B, n, 3, H, D)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, n, D)
        q_rot = apply_rotary(q, positions, self.rope_base)
        k_rot = apply_rotary(k, positions, self.rope_base)
        return q, q_rot, k_rot, k_rot if self.positions == "absolute" else k, v

    def _memory_query(self, q: Tensor, q_rot: Tensor, window_pos: Tensor) -> Tensor:
        """Queries as they meet memory keys (``window_pos``: positions within the window)."""
        if self.positions == "absolute":
            return q_rot
        if self.positions == "zero":
            return apply_rotary(q, window_pos, self.rope_base)
        return q

    def _out(self, y: Tensor) -> Tensor:
        B, _, n, _ = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, n, -1))  # (B, n, C)

    def read(self, qm: Tensor, memory: MemoryStore, visible: Tensor | None = None):
        """(out, lse) (B, H, n, D) of memory queries over ``memory``; ``visible`` (B, n)
        hides the memory from some queries."""
        used = max(memory.filled, 1)  # skip never-written slots (a store fills from 0)
        if self.retrieval == "faiss":  # before the copies: the index reads the store
            idx = self._index(memory).search(memory, qm.detach(), self.topk)
        mk, mv, valid = memory.k[:, :, :used], memory.v[:, :, :used], memory.valid[:, :used]
        if torch.is_grad_enabled():  # backward needs them as read, and the store moves on
            mk, mv, valid = mk.clone(), mv.clone(), valid.clone()
        elif self.retrieval != "dense":  # whole buffers: contiguous, so selecting copies none
            mk, mv = memory.k, memory.v
        mk, mv = mk.to(qm.dtype), mv.to(qm.dtype)
        if self.retrieval == "dense":
            mask = valid[:, None, None, :]
            if visible is not None:
                mask = mask & visible[:, None, :, None]
            return ops.masked_attention(qm, mk, mv, mask, return_lse=True)
        if self.retrieval == "topk":
            idx = torch_topk(mk[:, :, :used], valid, qm.detach(), self.topk)
        if visible is not None:
            idx = idx.masked_fill(~visible[:, None, :, None], -1)
        return attend_selected(qm, mk, mv, idx, self.head_dim**-0.5)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        x: Tensor,
        positions: Tensor | None = None,
        state: LayerState | None = None,
        *,
        start: int = 0,
        memory: MemoryStore | None = None,
        window_start: int | None = None,
        memory_visible: Tensor | None = None,
        write: bool = True,
        write_keep: Tensor | None = None,
        clear_rows: list[int] | None = None,
    ) -> Tensor:
        """With ``state``: see the class docstring. Without: x (B, n, C) is one window at
        positions start..start+n-1 (or ``positions``); queries attend causally within x
        and to ``memory``; then x's keys/values are written to memory (``write``;
        ``write_keep`` (B, n) selects which). ``memory_visible`` (B, n) bool hides the
        memory from some queries (e.g. after a document separator). ``window_start``:
        position of the window's first token (``zero`` mode). ``clear_rows``: rows whose
        memory is cleared after the read, before the write."""
        if state is not None:
            if positions is None:
                positions = torch.arange(state.length, state.length + x.shape[1], device=x.device)
            if isinstance(state, CrossbatchState):
                return self._crossbatch(x, positions, state)
            return self._windows(x, positions, state)
        if positions is None:
            positions = torch.arange(start, start + x.shape[1], device=x.device)
        q, q_rot, k_rot, k_mem, v = self._project(x, positions)
        local = ops.attention(q_rot, k_rot, v, causal=True, return_lse=True)
        if memory is None:
            return self._out(local[0])
        first = int(positions[0]) if window_start is None else window_start
        qm = self._memory_query(q, q_rot, positions - first)
        y = ops.merge([local, self.read(qm, memory, memory_visible)])[0]
        if clear_rows:
            memory.clear(clear_rows)
        if write:
            memory.add(k_mem, v, positions, write_keep)
        return self._out(y)

    def _windows(self, x: Tensor, positions: Tensor, st: MemoryState) -> Tensor:
        """Input that continues the state (see :meth:`attend_windows`)."""
        tokens = self._tokens(st, st.length, x.shape[1], x)
        q, q_rot, k_rot, k_mem, v = self._project(x, positions)
        return self._out(self.attend_windows(q, q_rot, k_rot, k_mem, v, positions, tokens, st))

    def attend_windows(
        self,
        q: Tensor,
        q_rot: Tensor,
        k_rot: Tensor,
        k_mem: Tensor,
        v: Tensor,
        positions: Tensor,
        tokens: Tensor,
        st: MemoryState,
    ) -> Tensor:
        """Attention output (B, H, n, D) of projected input that continues the state
        (queries unrotated and rotated, keys rotated and as memory stores them, values;
        token ids (B, n) for the document rules): per window piece, attend locally (the
        window so far) and read the store; a completed window is written to the store."""
        start, n, W = st.length, q.shape[2], st.window
        outs = []
        for a, b in window_pieces(st.held, n, W):
            off = st.held  # where the piece starts within its window
            if off == 0 and b - a == W:  # a complete window: attend and write in place
                keys, values, window_tokens = k_rot[:, :, a:b], v[:, :, a:b], tokens[:, a:b]
                mem_k, mem_v = k_mem[:, :, a:b], v[:, :, a:b]
            else:  # part of a window: through the state's window buffers
                st.append(k_rot[:, :, a:b], k_mem[:, :, a:b], v[:, :, a:b], tokens[:, a:b])
                keys, values = st.k_rot[:, :, : st.held], st.v[:, :, : st.held]
                mem_k, mem_v, window_tokens = st.k_mem, st.v, st.tokens[:, : st.held]
            local = ops.attention(q_rot[:, :, a:b], keys, values, causal=True, return_lse=True)
            visible = memory_visible(window_tokens, st.separator)
            w0 = start + a - off  # the window's first position
            qm = self._memory_query(q[:, :, a:b], q_rot[:, :, a:b], positions[a:b] - w0)
            read = self.read(qm, st.store, visible[:, off : off + b - a])
            outs.append(ops.merge([local, read])[0])
            if off + b - a == W:  # the window is complete: into memory
                _, keep, clear = document_rules(window_tokens, st.separator)
                if clear:
                    st.store.clear(clear)
                window_pos = torch.arange(w0, w0 + W, device=q.device)
                st.store.add(mem_k, mem_v, window_pos, keep)
                st.held = 0
        st.length = start + n
        return torch.cat(outs, dim=2)

    def _tokens(self, st: MemoryState, start: int, n: int, x: Tensor) -> Tensor:
        """The input's token ids (B, n), as the model showed them to the state."""
        if st.pending is not None and st.pending[1] == start and st.pending[0].shape[1] == n:
            return st.pending[0]
        if st.separator < 0:  # no document rules: the ids do not matter
            return torch.zeros(x.shape[0], n, dtype=torch.long, device=x.device)
        raise ValueError(
            "a memory layer with a document separator needs the input's token ids: call "
            "state.observe(tokens, start) first (DecoderLM does this for its layers)"
        )

    def _crossbatch(self, x: Tensor, positions: Tensor, st: CrossbatchState) -> Tensor:
        """Crossbatch training (see :meth:`attend_crossbatch`)."""
        q, q_rot, k_rot, k_mem, v = self._project(x, positions)
        return self._out(self.attend_crossbatch(q, q_rot, k_rot, k_mem, v, positions, st))

    def attend_crossbatch(
        self,
        q: Tensor,
        q_rot: Tensor,
        k_rot: Tensor,
        k_mem: Tensor,
        v: Tensor,
        positions: Tensor,
        st: CrossbatchState,
    ) -> Tensor:
        """Crossbatch training (module docstring) on projected input (as
        :meth:`attend_windows`) that starts at a window boundary: output (B, H, n, D)."""
        B, n = q.shape[0], q.shape[2]
        d = st.negatives
        if not 0 <= d < B:
            raise ValueError(f"crossbatch negatives must be in [0, batch - 1 = {B - 1}], got {d}")
        start, W = st.length, self.window
        if start % W:
            raise ValueError(f"crossbatch input must start at a window boundary, got {start}")
        rows = (
            torch.arange(B, device=q.device).unsqueeze(-1) + torch.arange(d + 1, device=q.device)
        ) % B
        outs = []
        for a, b in window_pieces(0, n, W):
            local = ops.attention(
                q_rot[:, :, a:b], k_rot[:, :, a:b], v[:, :, a:b], causal=True, return_lse=True
            )
            if st.previous is None:
                outs.append(local[0])
            else:
                pk, pv = st.previous  # (B, H, m, D)
                mk = pk[rows].transpose(1, 2).flatten(2, 3)  # (B, H, (d + 1) * m, D), own first
                mv = pv[rows].transpose(1, 2).flatten(2, 3)
                qm = self._memory_query(q[:, :, a:b], q_rot[:, :, a:b], positions[a:b] - start - a)
                read = ops.attention(qm, mk, mv, return_lse=True)
                outs.append(ops.merge([local, read])[0])
            st.previous = (k_mem[:, :, a:b], v[:, :, a:b])
        st.length = start + n
        return torch.cat(outs, dim=2)

    # ------------------------------------------------------------------ model protocol

    def attention_flops(self, n: int) -> float:
        """Forward FLOPs of the local part (causal within windows); memory reads depend on
        what the store holds and are not counted."""
        return local_attention_flops(n, self.window, self.n_heads, self.head_dim)

    def sequence_parallel(self, sp) -> None:
        """Refused: windows read what earlier windows wrote."""
        raise ValueError(NO_SEQUENCE_PARALLEL)


@register_pattern
@dataclasses.dataclass
class Memory(Pattern):
    """``[model.attention] kind = "memory"``: a Focused-Transformer model. Every layer
    attends causally within windows of ``window`` positions; the layers in ``layers``
    also read a memory of earlier windows (:class:`MemoryAttention`): ``capacity``
    entries per layer and batch row (FIFO), ``retrieval`` dense/topk/faiss (``topk``
    keys; ``faiss_index`` ivf/flat, ``nprobe`` lists an ivf query scans, 0: automatic),
    memory key ``positions`` none/zero/absolute, and a document ``separator`` token
    (-1: none) that clears a row's memory. Capacity and retrieval can be changed after
    training (``DecoderLM.configure_memory``)."""

    kind: ClassVar[str] = "memory"
    strategies: ClassVar[tuple[str, ...]] = ()
    layers: list[int] = dataclasses.field(default_factory=lambda: [0])
    window: int = 256
    capacity: int = 65536
    retrieval: str = "dense"
    topk: int = 32
    positions: str = "zero"
    faiss_index: str = "ivf"
    nprobe: int = 0
    separator: int = 256

    def __post_init__(self):
        if not isinstance(self.layers, list) or any(
            isinstance(i, bool) or not isinstance(i, int) for i in self.layers
        ):
            raise ValueError(
                f"model.attention.layers must be a list of layer indices, got {self.layers!r}"
            )
        if not self.layers:
            raise ValueError(
                "model.attention.layers is empty: a memory model needs at least one memory "
                "layer (for a model without memory use kind = 'dense')"
            )
        for name in ("window", "capacity", "topk"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.attention.{name} must be >= 1, got {getattr(self, name)}")
        if self.nprobe < 0:
            raise ValueError(
                f"model.attention.nprobe must be >= 0 (0: automatic), got {self.nprobe}"
            )
        check_choices(
            self,
            "model.attention",
            retrieval=RETRIEVALS,
            positions=MEMORY_POSITIONS,
            faiss_index=FAISS_INDEXES,
        )

    def check_model(self, dim: int, n_heads: int, n_layers: int) -> None:
        bad = [i for i in self.layers if not 0 <= i < n_layers]
        if bad or len(set(self.layers)) != len(self.layers):
            raise ValueError(
                f"model.attention.layers must hold distinct indices in [0, {n_layers - 1}], "
                f"got {self.layers}"
            )

    def build(self, dim: int, n_heads: int, layer: int, *, rope_base: float) -> nn.Module:
        if layer not in self.layers:
            return super().build(dim, n_heads, layer, rope_base=rope_base)
        return self.memory_layer(dim, n_heads, rope_base=rope_base)

    def memory_layer(
        self, dim: int, n_heads: int, *, rope_base: float, projections: bool = True
    ) -> MemoryAttention:
        """A :class:`MemoryAttention` with this pattern's settings (``projections``
        False: a reader for another model's projections, as :mod:`longctx.hf` uses)."""
        return MemoryAttention(
            dim,
            n_heads,
            retrieval=self.retrieval,
            topk=self.topk,
            positions=self.positions,
            rope_base=rope_base,
            faiss_index=self.faiss_index,
            nprobe=self.nprobe,
            window=self.window,
            capacity=self.capacity,
            separator=self.separator,
            projections=projections,
        )

    # the layers without memory: causal attention within each window

    def kernel(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return local_attention(q, k, v, None, self.window)[0]

    def new_state(
        self,
        module: nn.Module,
        batch: int,
        capacity: int,
        dtype,
        device,
        policy: str = "full",
        **options,
    ) -> LayerState | None:
        if policy == "crossbatch":
            return None  # whole windows from position 0: the kernel
        return KVCache(batch, module.n_heads, self.window, module.head_dim, dtype, device)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, state: KVCache) -> Tensor:
        return local_attention(q, k, v, state, self.window)[0]

    def cache_note(self, policy: str) -> str:
        return "" if policy == "full" else f"cache={policy!r}: memory models keep memory + window"

    def mask(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        return q_pos[:, None] // self.window == k_pos[None, :] // self.window

    def flops(self, n: int, n_heads: int, head_dim: int) -> float:
        return local_attention_flops(n, self.window, n_heads, head_dim)

    def check_sequence_parallel(self, strategy: str, world: int, n_heads: int, n: int) -> None:
        raise ValueError(NO_SEQUENCE_PARALLEL)

    def sequence_parallel(self, strategy: str, group, *, causal: bool = True) -> Kernel:
        raise ValueError(NO_SEQUENCE_PARALLEL)


__all__ = [
    "MEMORY_POSITIONS",
    "Memory",
    "MemoryAttention",
    "document_rules",
    "local_attention",
    "local_attention_flops",
    "memory_visible",
    "window_pieces",
]
