"""Every state that a layer or the model carries from one call to the next, in one place:
key/value caches for decoding, the bounded dilated cache, CoLT5's routed cache, memory
stores and the memory layer's current window, the crossbatch context, and the model-level
container with the n-gram token history.

States only *store*. The pattern or module that owns a state decides what to write and
attends over what it reads (as gpt-fast's ``KVCache.update`` stores and its module
attends). Every state follows the :class:`LayerState` protocol:

- ``length``: positions seen so far (the next input starts there);
- ``nbytes``: bytes of the tensors it holds;
- ``observe(tokens, start)``: the model shows each input's token ids to every state
  before its layers run (states that apply document rules keep them; the rest ignore
  them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .._util import atomic_path
from ..ops.lowlevel import compute_dtype, head_offset_groups, head_offsets


class LayerState:
    """Base of the per-layer states (see the module docstring for the protocol)."""

    length: int = 0

    def tensors(self) -> list[Tensor]:
        """The tensors whose bytes ``nbytes`` counts."""
        return []

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors the state holds."""
        return sum(t.nbytes for t in self.tensors())

    def observe(self, tokens: Tensor, start: int) -> None:
        """See the token ids (B, n) of the input at positions start..start+n-1."""

    def check_start(self, start: int) -> None:
        """ValueError unless input at ``start`` continues what the state holds."""
        if start != self.length:
            raise ValueError(f"cache holds {self.length} positions; got a chunk at {start}")


# ---------------------------------------------------------------- key/value caches


class KVCache(LayerState):
    """All keys and values so far, in preallocated buffers (B, H, capacity, D) written
    by index. Also the per-window cache of a windowed layer (``reset`` at each window)."""

    def __init__(self, batch: int, heads: int, capacity: int, head_dim: int, dtype, device):
        shape = (batch, heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        """Positions the buffers hold."""
        return self.k.shape[2]

    def tensors(self) -> list[Tensor]:
        return [self.k, self.v]

    def update(self, k: Tensor, v: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Store keys/values (B, H, n, D) of positions start..start+n-1 (``start`` must
        be ``length``); return all stored keys and values (views, (B, H, start+n, D))."""
        self.check_start(start)
        end = start + k.shape[2]
        if end > self.capacity:
            raise ValueError(
                f"the cache was made for {self.capacity} positions; position {end - 1} "
                "does not fit (raise the capacity)"
            )
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reset(self) -> None:
        """Forget everything (the buffers are reused)."""
        self.length = 0


class DilatedKVCache(LayerState):
    """Bounded exact cache of a dilated-attention layer (LongNet).

    A future query of branch b sees only keys of its own segment with its own residue, so
    per branch and head only the current segment's keys whose residue is the head's
    offset are kept: at most ceil(w_b / r_b) rows, whatever the context length.

    Rows may sit at different positions and hold padding (Hugging Face generation of a
    left-padded batch): :meth:`push` and :meth:`fill` take per-row positions and
    validity; :meth:`update` is the uniform case (every row at start..start+n-1). Buffers
    (B, H, cap_b + 1, D): the last slot absorbs the writes of rows and heads that store
    nothing, so one scatter serves the whole batch. ``count[b]`` (B, H) rows held,
    ``segment[b]`` (B,) the segment they belong to."""

    def __init__(
        self,
        batch: int,
        heads: int,
        head_dim: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        offsets: str,
        dtype,
        device,
    ):
        self.segment_lengths = list(segment_lengths)
        self.dilation_rates = list(dilation_rates)
        self.caps = [math.ceil(w / r) for w, r in zip(self.segment_lengths, self.dilation_rates)]
        self.offsets = [
            torch.tensor(head_offsets(heads, r, offsets), device=device)
            for r in self.dilation_rates
        ]  # per branch: (H,) each head's offset
        # per branch: {offset: the heads with that offset (a slice)}
        self.heads = [dict(head_offset_groups(heads, r, offsets)) for r in self.dilation_rates]
        shape = (batch, heads)
        self.k = [
            torch.zeros(*shape, c + 1, head_dim, dtype=dtype, device=device) for c in self.caps
        ]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.count = [torch.zeros(shape, dtype=torch.long, device=device) for _ in self.caps]
        self.segment = [torch.full((batch,), -1, device=device) for _ in self.caps]
        self.length = 0  # positions (slots, padding included) stored so far

    def tensors(self) -> list[Tensor]:
        return [*self.k, *self.v, *self.count, *self.segment]

    def branches(self):
        """(w_b, r_b) of every branch."""
        return zip(self.segment_lengths, self.dilation_rates)

    def update(self, k: Tensor, v: Tensor, start: int) -> None:
        """Store the keys/values (B, H, n, D) of positions start..start+n-1 in every row:
        one position (decoding), or a chunk that starts a segment of every branch
        (prefill); keep what later queries can see."""
        self.check_start(start)
        B, _, n, _ = k.shape
        if n == 1:
            self._push_at(k[:, :, 0], v[:, :, 0], start)
        else:
            bad = [w for w in self.segment_lengths if start % w]
            if bad:
                raise ValueError(
                    "a chunk of several positions must start a segment of every branch; "
                    f"{start} is not a multiple of {bad[0]}"
                )
            pos = torch.arange(start, start + n, device=k.device).expand(B, n)
            self.fill(k, v, pos, torch.ones(B, n, dtype=torch.bool, device=k.device))
        self.length = start + n

    def _push_at(self, k: Tensor, v: Tensor, t: int) -> None:
        """:meth:`push` for every row at position t, right after t - 1 (per branch only
        the heads with t's residue write; no host synchronisation)."""
        B, _, D = k.shape
        for b, (w, r) in enumerate(self.branches()):
            if t % w == 0:  # a new segment: earlier rows are closed
                self.count[b].zero_()
                self.segment[b].fill_(t // w)
            h = self.heads[b].get((t % w) % r)
            if h is None:
                continue
            count = self.count[b][:, h]  # (B, Hg), a view
            index = count[:, :, None, None].expand(*count.shape, 1, D)
            self.k[b][:, h].scatter_(2, index, k[:, h, None])
            self.v[b][:, h].scatter_(2, index, v[:, h, None])
            count += 1

    def push(self, k: Tensor, v: Tensor, pos: Tensor, valid: Tensor) -> None:
        """Store one token per row: keys/values (B, H, D) at positions ``pos`` (B,);
        rows where ``valid`` (B,) is false (padding) store nothing."""
        B, H, D = k.shape
        for b, (w, r) in enumerate(self.branches()):
            seg = pos // w
            fresh = valid & (seg != self.segment[b])  # a new segment closes the old rows
            self.count[b][fresh] = 0
            self.segment[b] = torch.where(valid, seg, self.segment[b])
            write = valid[:, None] & (self.offsets[b][None, :] == ((pos % w) % r)[:, None])
            slot = torch.where(write, self.count[b], self.caps[b])  # (B, H); cap: discarded
            index = slot[:, :, None, None].expand(B, H, 1, D)
            self.k[b].scatter_(2, index, k[:, :, None])
            self.v[b].scatter_(2, index, v[:, :, None])
            self.count[b] += write

    def fill(self, k: Tensor, v: Tensor, pos: Tensor, valid: Tensor) -> None:
        """Store keys/values (B, H, n, D) at positions ``pos`` (B, n) in order, ``valid``
        (B, n), that hold every position of each row's last segments (a prompt into an
        empty cache, or a chunk that starts a segment of every branch): only each row's
        last segment is kept."""
        B, H, n, D = k.shape
        last = torch.where(valid, pos, -1).amax(-1)  # (B,) the row's last position
        for b, (w, r) in enumerate(self.branches()):
            seg = torch.where(last >= 0, last // w, -1)
            keep = valid & (pos // w == seg[:, None])  # (B, n) in the last segment
            keep = keep[:, None, :] & (
                ((pos % w) % r)[:, None, :] == self.offsets[b][None, :, None]
            )  # (B, H, n) with the head's residue
            rank = keep.cumsum(-1) - 1
            slot = torch.where(keep, rank, self.caps[b])
            index = slot[..., None].expand(B, H, n, D)
            self.k[b].zero_().scatter_(2, index, k)
            self.v[b].zero_().scatter_(2, index, v)
            self.count[b] = keep.sum(-1)
            self.segment[b] = seg

    def keys(self, b: int, offset: int, t: int) -> tuple[Tensor, Tensor]:
        """Keys/values (B, Hg, c, D) that branch b holds for the heads with ``offset``
        after position t, for rows filled through :meth:`update` (all at one position:
        the count is the segment's positions of that residue up to t; views)."""
        w, r = self.segment_lengths[b], self.dilation_rates[b]
        c = len(range(t // w * w + offset, t + 1, r))
        h = self.heads[b][offset]
        return self.k[b][:, h, :c], self.v[b][:, h, :c]

    def visible(self, b: int, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Branch b's keys/values (B, H, cap_b + 1, D) and which of them a query at
        positions ``pos`` (B,) sees: bool (B, H, 1, cap_b + 1) (only the heads whose offset
        is the query's residue, only the rows held)."""
        w, r = self.segment_lengths[b], self.dilation_rates[b]
        active = self.offsets[b][None, :] == ((pos % w) % r)[:, None]  # (B, H)
        slots = torch.arange(self.caps[b] + 1, device=pos.device)
        seen = (slots < self.count[b][..., None]) & active[..., None]  # (B, H, cap + 1)
        return self.k[b], self.v[b], seen[:, :, None, :]

    def select(self, rows: Tensor) -> None:
        """Keep (and reorder, repeat) the batch rows ``rows`` (beam search)."""
        for name in ("k", "v", "count", "segment"):
            setattr(self, name, [t.index_select(0, rows) for t in getattr(self, name)])


class RoutedKVCache(LayerState):
    """Decoding state of one causal CoLT5 attention layer: the light heads' last
    ``window - 1`` keys/values (bounded), and every routed key/value with its position
    and validity (slots: a chunk adds as many as its busiest row routed)."""

    def __init__(
        self,
        batch: int,
        light_heads: int,
        heavy_heads: int,
        head_dim: int,
        window: int,
        capacity: int,
        dtype,
        device,
    ):
        self.window = window
        self.light_k = torch.zeros(batch, light_heads, 0, head_dim, dtype=dtype, device=device)
        self.light_v = torch.zeros_like(self.light_k)
        shape = (batch, heavy_heads, capacity, head_dim)
        self.heavy_k = torch.zeros(shape, dtype=dtype, device=device)
        self.heavy_v = torch.zeros(shape, dtype=dtype, device=device)
        self.heavy_pos = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        self.heavy_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.slots = 0
        self.length = 0

    def tensors(self) -> list[Tensor]:
        return [
            self.light_k,
            self.light_v,
            self.heavy_k,
            self.heavy_v,
            self.heavy_pos,
            self.heavy_valid,
        ]

    def light_update(self, k: Tensor, v: Tensor, start: int) -> tuple[Tensor, Tensor, int]:
        """Add the light keys/values (B, Hl, n, D) of positions start..; return the keys
        and values the chunk's queries can see and the position of the first of them."""
        self.check_start(start)
        keys = torch.cat([self.light_k, k], dim=2)
        vals = torch.cat([self.light_v, v], dim=2)
        k_start = start - self.light_k.shape[2]
        first = max(0, keys.shape[2] - (self.window - 1))  # what later queries can see
        self.light_k = keys[:, :, first:].clone()
        self.light_v = vals[:, :, first:].clone()
        self.length = start + k.shape[2]
        return keys, vals, k_start

    def heavy_update(self, k: Tensor, v: Tensor, pos: Tensor, valid: Tensor):
        """Store a chunk's routed keys/values (B, Hh, m, D) with positions and validity
        (B, m); return everything stored: (k, v, positions, valid)."""
        m = k.shape[2]
        end = self.slots + m
        if end > self.heavy_k.shape[2]:
            raise ValueError(
                f"the cache was made for {self.heavy_k.shape[2]} positions; it is full "
                "(raise the capacity)"
            )
        self.heavy_k[:, :, self.slots : end] = k
        self.heavy_v[:, :, self.slots : end] = v
        self.heavy_pos[:, self.slots : end] = pos
        self.heavy_valid[:, self.slots : end] = valid
        self.slots = end
        return (
            self.heavy_k[:, :, :end],
            self.heavy_v[:, :, :end],
            self.heavy_pos[:, :end],
            self.heavy_valid[:, :end],
        )


# ---------------------------------------------------------------- recurrent state


class RecurrentState(LayerState):
    """The constant-size state of a linear-attention or retention layer: S (B, H, D, Dv)
    and, for linear attention, the normaliser z (B, H, D), in the compute dtype. Its size
    does not depend on how many positions it has seen."""

    def __init__(self, batch, heads, head_dim, value_dim, with_z, dtype, device):
        cd = compute_dtype(dtype)
        self.s = torch.zeros(batch, heads, head_dim, value_dim, dtype=cd, device=device)
        self.z = torch.zeros(batch, heads, head_dim, dtype=cd, device=device) if with_z else None
        self.length = 0

    def tensors(self) -> list[Tensor]:
        return [self.s] if self.z is None else [self.s, self.z]

    def advance(self, new: tuple[Tensor, Tensor | None], n: int) -> None:
        """Take the state after ``n`` more positions."""
        self.s, z = new
        if self.z is not None:
            self.z = z
        self.length += n


# ---------------------------------------------------------------- memory


class MemoryStore:
    """Per-batch-row first-in-first-out memory of one layer's (key, value) pairs.

    Buffers (B, H, C, D) for keys and (B, H, C, value_dim) for values (``value_dim``
    defaults to D; LongMem's chunk bank packs a chunk's token keys and values into one
    value), the absolute position of each entry
    (B, C), its write order (B, C) and which slots hold an entry (B, C). Each row is a
    ring buffer: once full, a new entry replaces the oldest. Rows never see each other's
    entries. The order of slots is irrelevant to attention (a softmax over a set)."""

    def __init__(
        self,
        batch: int,
        heads: int,
        head_dim: int,
        capacity: int,
        dtype,
        device,
        value_dim: int | None = None,
    ):
        if capacity < 1:
            raise ValueError(f"memory capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        # the buffers grow (doubling) up to the capacity as entries arrive, so a store
        # larger than what is ever written costs only what is written
        slots = min(capacity, self.FIRST_SLOTS)
        self.k = torch.zeros(batch, heads, slots, head_dim, dtype=dtype, device=device)
        dv = head_dim if value_dim is None else value_dim
        self.v = torch.zeros(batch, heads, slots, dv, dtype=dtype, device=device)
        self.pos = torch.zeros(batch, slots, dtype=torch.long, device=device)
        self.age = torch.zeros(batch, slots, dtype=torch.long, device=device)  # write order
        self.valid = torch.zeros(batch, slots, dtype=torch.bool, device=device)
        self.written = [0] * batch  # entries ever written per row (ring pointer = % C)
        self.version = 0  # bumped on every change
        self.index = None  # a search index kept in step (retrieval.FaissIndex), if any

    FIRST_SLOTS = 4096

    def _grow(self, slots: int) -> None:
        """Make room for slot indices < ``slots`` (<= capacity)."""
        have = self.k.shape[2]
        if slots <= have:
            return
        new = min(self.capacity, max(slots, 2 * have))

        def wider(t: Tensor, dim: int) -> Tensor:
            shape = list(t.shape)
            shape[dim] = new - have
            return torch.cat([t, t.new_zeros(shape)], dim=dim)

        self.k, self.v = wider(self.k, 2), wider(self.v, 2)
        self.pos, self.age, self.valid = (wider(t, 1) for t in (self.pos, self.age, self.valid))

    @property
    def batch(self) -> int:
        """Batch rows."""
        return self.k.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the store's tensors."""
        return sum(t.nbytes for t in (self.k, self.v, self.pos, self.age, self.valid))

    def size(self, row: int) -> int:
        """Entries that row ``row`` holds."""
        return int(self.valid[row].sum())

    @property
    def filled(self) -> int:
        """1 + the last slot that holds an entry in any row (0 when empty): reads may
        skip the slots after it (rings fill from slot 0, so a young store is short).
        Read from the data (one host sync per read), so it stays right whatever wrote
        the slots."""
        used = self.valid.any(dim=0).nonzero()
        return int(used[-1]) + 1 if len(used) else 0

    def add(self, k: Tensor, v: Tensor, positions: Tensor, keep: Tensor | None = None) -> None:
        """Append the entries (B, H, n, D) at ``positions`` (n,) or (B, n); ``keep``
        (B, n) bool selects which of each row's entries to write (default all). Only the
        last C written survive (FIFO). All rows are written at once."""
        B, H, n, D = k.shape
        if (self.batch, self.k.shape[1], self.k.shape[3]) != (B, H, D):
            raise ValueError(
                f"memory holds (B, H, D) = {(self.batch, self.k.shape[1], self.k.shape[3])}, "
                f"got keys {tuple(k.shape)}"
            )
        C = self.capacity
        pos = positions.expand(B, n) if positions.dim() == 1 else positions
        kept = torch.ones(B, n, dtype=torch.bool, device=k.device) if keep is None else keep
        with torch.no_grad():
            rank = kept.long().cumsum(dim=1) - 1  # (B, n) index among the row's kept
            count = kept.sum(dim=1)  # (B,)
            skip = (count - C).clamp(min=0)  # more than C new entries: only the last C
            write = kept & (rank >= skip.unsqueeze(-1))
            written = torch.tensor(self.written, device=k.device)
            order = written.unsqueeze(-1) + rank - skip.unsqueeze(-1)  # (B, n) write order
            rows, cols = write.nonzero(as_tuple=True)
            slots = order[rows, cols] % C
            if len(slots):
                self._grow(int(slots.max()) + 1)
            replaced = self.valid[rows, slots]
            self.k[rows, :, slots] = k[rows, :, cols].to(self.k.dtype)
            self.v[rows, :, slots] = v[rows, :, cols].to(self.v.dtype)
            self.pos[rows, slots] = pos[rows, cols]
            self.age[rows, slots] = order[rows, cols]
            self.valid[rows, slots] = True
            self.written = [w + m for w, m in zip(self.written, (count - skip).tolist())]
        self.version += 1
        if self.index is not None and len(slots):
            self.index.written(self, rows, slots, replaced)

    def clear(self, rows=None) -> None:
        """Forget everything in the given rows (default: all rows)."""
        rows = range(self.batch) if rows is None else [int(r) for r in rows]
        for b in rows:
            self.valid[b] = False
            self.written[b] = 0
            if self.index is not None:
                self.index.cleared(b)
        self.version += 1

    def entries(self, row: int) -> tuple[Tensor, Tensor, Tensor]:
        """(k (H, m, D), v, positions (m,)) of a row, oldest first."""
        slots = self.valid[row].nonzero().flatten()
        order = slots[self.age[row, slots].argsort()]
        return self.k[row][:, order], self.v[row][:, order], self.pos[row, order]

    def state_dict(self) -> dict[str, Tensor]:
        """Every tensor of the store, for saving."""
        return {
            "k": self.k,
            "v": self.v,
            "pos": self.pos,
            "age": self.age,
            "valid": self.valid,
            "written": torch.tensor(self.written, dtype=torch.long),
            "capacity": torch.tensor(self.capacity, dtype=torch.long),
        }

    def save(self, path: str | Path) -> None:
        """Write the store to a safetensors file (atomically)."""
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file({k: t.contiguous().cpu() for k, t in self.state_dict().items()}, str(tmp))

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> MemoryStore:
        """A store saved by :meth:`save` (ValueError naming the file if it is not one)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            data = load_file(str(path), device=str(device))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"cannot read memory file {path}: {exc}") from None
        missing = {"k", "v", "pos", "age", "valid", "written"} - set(data)
        if missing:
            raise ValueError(f"memory file {path} lacks {sorted(missing)}")
        B, H, C, D = data["k"].shape
        if "capacity" in data:  # absent in files written before the buffers could grow
            C = int(data["capacity"])
        store = cls(B, H, D, C, data["k"].dtype, device, data["v"].shape[-1])
        store.k, store.v = data["k"], data["v"]
        store.pos, store.age, store.valid = data["pos"], data["age"], data["valid"]
        store.written = [int(x) for x in data["written"]]
        return store


class MemoryState(LayerState):
    """State of a memory layer (Focused Transformer): its :class:`MemoryStore`, and the
    current window: keys as rotated for local attention (``k_rot``), keys as memory
    stores them (``k_mem``), values, and the window's token ids (for the document rules).
    A window moves into the store when it completes."""

    def __init__(
        self,
        store: MemoryStore,
        window: int,
        separator: int,
        dtype,
        device,
    ):
        B, H, _, D = store.k.shape
        self.store = store
        self.window = window
        self.separator = separator
        shape = (B, H, window, D)
        self.k_rot = torch.zeros(shape, dtype=dtype, device=device)
        self.k_mem = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.tokens = torch.zeros(B, window, dtype=torch.long, device=device)
        self.held = 0  # positions of the current window in the buffers
        self.pending: tuple[Tensor, int] | None = None  # the input's ids, from observe
        self.length = 0

    def tensors(self) -> list[Tensor]:
        return [self.k_rot, self.k_mem, self.v]

    @property
    def nbytes(self) -> int:
        """Bytes of the store and the window buffers."""
        return self.store.nbytes + super().nbytes

    def observe(self, tokens: Tensor, start: int) -> None:
        self.pending = (tokens, start)

    def append(self, k_rot: Tensor, k_mem: Tensor, v: Tensor, tokens: Tensor) -> None:
        """Add positions to the current window (B, H, n, D) and their ids (B, n)."""
        a, b = self.held, self.held + k_rot.shape[2]
        if b > self.window:
            raise ValueError(f"the window holds {self.window} positions; got {b}")
        self.k_rot[:, :, a:b], self.k_mem[:, :, a:b], self.v[:, :, a:b] = k_rot, k_mem, v
        self.tokens[:, a:b] = tokens
        self.held = b


class CrossbatchState(LayerState):
    """Crossbatch training context of a memory layer (Focused Transformer): the previous
    window's memory keys and values of every row (with their autograd graph), which the
    next window's queries read for their own row (positive) and ``negatives`` other
    rows."""

    def __init__(self, negatives: int):
        self.negatives = negatives
        self.previous: tuple[Tensor, Tensor] | None = None
        self.length = 0

    def tensors(self) -> list[Tensor]:
        return [] if self.previous is None else list(self.previous)


# ---------------------------------------------------------------- LongMem


class ChunkBank:
    """LongMem's cache memory bank (Wang et al. 2023, arXiv 2306.07174): per batch row,
    the last ``capacity`` tokens' (key, value) pairs of one backbone layer, in chunks of
    ``chunk`` tokens, first in first out.

    A :class:`MemoryStore` of chunks (capacity / chunk slots per row): the key of a chunk
    is the mean of its tokens' keys, its value packs the tokens' keys and values,
    (2, chunk, D) flattened. Tokens that do not yet fill a chunk wait in the row's tail
    and join the next tokens written to that row (a cleared row drops its tail)."""

    def __init__(
        self, batch: int, heads: int, head_dim: int, capacity: int, chunk: int, dtype, device
    ):
        if chunk < 1 or capacity < chunk or capacity % chunk:
            raise ValueError(
                f"the bank's capacity ({capacity} tokens) must be a positive multiple of its "
                f"chunk size ({chunk})"
            )
        self.chunk, self.heads, self.head_dim = chunk, heads, head_dim
        self.store = MemoryStore(
            batch, heads, head_dim, capacity // chunk, dtype, device, 2 * chunk * head_dim
        )
        empty = torch.zeros(heads, 0, head_dim, dtype=dtype, device=device)
        self.tails = [(empty, empty, torch.zeros(0, dtype=torch.long, device=device))] * batch

    @property
    def batch(self) -> int:
        """Batch rows."""
        return self.store.batch

    @property
    def capacity(self) -> int:
        """Tokens a row holds at most (not counting its tail)."""
        return self.store.capacity * self.chunk

    @property
    def nbytes(self) -> int:
        """Bytes of the store and the tails."""
        return self.store.nbytes + sum(t.nbytes for tail in self.tails for t in tail)

    def add(self, k: Tensor, v: Tensor, positions: Tensor, keep: Tensor | None = None) -> None:
        """Append tokens' keys and values (B, H, n, D) at ``positions`` (n,) or (B, n);
        ``keep`` (B, n) bool selects which of each row's tokens (default all). Every
        completed chunk goes into the store; the rest stays in the row's tail."""
        B, H, n, D = k.shape
        if (self.batch, self.heads, self.head_dim) != (B, H, D):
            raise ValueError(
                f"the bank holds (B, H, D) = {(self.batch, self.heads, self.head_dim)}, got "
                f"keys {tuple(k.shape)}"
            )
        m = self.chunk
        pos = positions.expand(B, n) if positions.dim() == 1 else positions
        rows = []  # per row: chunk keys (H, c, D), packed values (H, c, 2 m D), positions (c,)
        for b in range(B):
            sel = slice(None) if keep is None else keep[b]
            tk, tv, tp = self.tails[b]
            rk = torch.cat([tk, k[b][:, sel].to(tk.dtype)], dim=1)  # (H, t, D)
            rv = torch.cat([tv, v[b][:, sel].to(tv.dtype)], dim=1)
            rp = torch.cat([tp, pos[b][sel]])
            c = rk.shape[1] // m
            self.tails[b] = (rk[:, c * m :], rv[:, c * m :], rp[c * m :])
            ck = rk[:, : c * m].reshape(H, c, m, D)  # (H, c, m, D)
            cv = rv[:, : c * m].reshape(H, c, m, D)
            packed = torch.stack([ck, cv], dim=2).reshape(H, c, 2 * m * D)  # (H, c, 2 m D)
            rows.append((ck.mean(dim=2), packed, rp[: c * m : m]))
        most = max(r[0].shape[1] for r in rows)
        if most == 0:
            return
        keys = k.new_zeros(B, H, most, D, dtype=self.store.k.dtype)
        vals = k.new_zeros(B, H, most, 2 * m * D, dtype=self.store.v.dtype)
        where = torch.zeros(B, most, dtype=torch.long, device=k.device)
        written = torch.zeros(B, most, dtype=torch.bool, device=k.device)
        for b, (ck, packed, cp) in enumerate(rows):
            c = ck.shape[1]
            keys[b, :, :c], vals[b, :, :c], where[b, :c], written[b, :c] = ck, packed, cp, True
        self.store.add(keys, vals, where, written)

    def clear(self, rows=None) -> None:
        """Forget everything in the given rows (default all), their tails included."""
        rows = range(self.batch) if rows is None else [int(r) for r in rows]
        for b in rows:
            tk, tv, tp = self.tails[b]
            self.tails[b] = (tk[:, :0], tv[:, :0], tp[:0])
        self.store.clear(list(rows))

    def unpack(self, packed: Tensor) -> tuple[Tensor, Tensor]:
        """Packed chunk values (..., 2 m D) -> the chunks' token keys and values
        (..., m, D) each."""
        both = packed.unflatten(-1, (2, self.chunk, self.head_dim))  # (..., 2, m, D)
        return both[..., 0, :, :], both[..., 1, :, :]

    def tokens(self, row: int) -> tuple[Tensor, Tensor, Tensor]:
        """(keys (H, t, D), values (H, t, D), positions (t,)) of the tokens a row's chunks
        hold, oldest first (the tail not included)."""
        _, packed, pos = self.store.entries(row)  # (H, c, 2 m D), (c,)
        k, v = self.unpack(packed)  # (H, c, m, D) each
        H, D, m = self.heads, self.head_dim, self.chunk
        tok_pos = (pos[:, None] + torch.arange(m, device=pos.device)).flatten()
        return k.reshape(H, -1, D), v.reshape(H, -1, D), tok_pos


class LongMemState(LayerState):
    """What a LongMem model carries between calls: the bank, and the segment in
    progress: the backbone's and the SideNet's per-segment key/value caches (used when a
    segment arrives in pieces; reset at each segment start), the cached layer's keys and
    values and the token ids of the segment so far (they go into the bank when it
    completes), the n-gram history of the backbone's embedding (continued across
    segments: it is part of each token's input, not of the backbone's window)."""

    def __init__(
        self,
        bank: ChunkBank,
        segment: int,
        separator: int,
        backbone: list[KVCache],
        side: list[KVCache],
        history: Tensor | None,
    ):
        B, H, D = bank.batch, bank.heads, bank.head_dim
        dtype, device = bank.store.k.dtype, bank.store.k.device
        self.bank = bank
        self.segment = segment
        self.separator = separator
        self.backbone, self.side = backbone, side
        self.history = history
        self.k = torch.zeros(B, H, segment, D, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.tokens = torch.zeros(B, segment, dtype=torch.long, device=device)
        self.held = 0  # positions of the current segment so far
        self.length = 0

    def tensors(self) -> list[Tensor]:
        caches = [t for c in (*self.backbone, *self.side) for t in c.tensors()]
        return [self.k, self.v, *caches]

    @property
    def nbytes(self) -> int:
        """Bytes of the bank, the caches and the segment buffers."""
        return self.bank.nbytes + super().nbytes

    def start_segment(self) -> None:
        """Forget the previous segment's caches (the n-gram history carries on)."""
        self.held = 0
        for cache in (*self.backbone, *self.side):
            cache.reset()

    def append(self, k: Tensor, v: Tensor, tokens: Tensor) -> None:
        """Add the cached layer's keys and values (B, H, n, D) and the token ids (B, n)
        of the next positions of the segment."""
        a, b = self.held, self.held + k.shape[2]
        if b > self.segment:
            raise ValueError(f"a segment holds {self.segment} positions; got {b}")
        self.k[:, :, a:b], self.v[:, :, a:b], self.tokens[:, a:b] = k, v, tokens
        self.held = b


# ---------------------------------------------------------------- the model's state


class RetroState(LayerState):
    """A RETRO model's retrieval state (shared by its retrieval layers): the token ids
    and first-retrieval-layer rows of the chunk in progress, and for every completed
    chunk its neighbours' token ids (B, l, k, r) with their visibility (non-PAD) and
    encodings E (B, l, k, r, C). Neighbours come from ``given`` (B, l', k, r) for chunks
    below l' (known in advance: a whole sequence, teacher forcing), else from
    ``retriever`` (chunk token ids (B, m) -> neighbours (B, k, r)) when the chunk
    completes, else none."""

    def __init__(self, chunk: int, given: Tensor | None = None, retriever=None):
        self.chunk = chunk
        self.given = given
        self.retriever = retriever
        self.pending_tokens: Tensor | None = None  # the current call's ids
        self.tokens: Tensor | None = None  # (B, < m) ids of the chunk in progress
        self.rows: Tensor | None = None  # (B, < m, C) its rows at the first retrieval layer
        self.neighbours: Tensor | None = None  # (B, l, k, r) of completed chunks
        self.encoded: Tensor | None = None  # (B, l, k, r, C)
        self.length = 0

    def tensors(self) -> list[Tensor]:
        held = (self.tokens, self.rows, self.neighbours, self.encoded)
        return [t for t in held if t is not None]

    @property
    def chunks(self) -> int:
        """Completed chunks whose neighbours are held."""
        return 0 if self.neighbours is None else self.neighbours.shape[1]

    def observe(self, tokens: Tensor, start: int) -> None:
        self.check_start(start)
        self.pending_tokens = tokens
        self.length = start + tokens.shape[1]

    def take_chunks(self, rows: Tensor) -> tuple[Tensor, Tensor] | None:
        """Add the current call's rows (B, n, C) at the first retrieval layer (with its
        observed ids); return the chunks this completes: (ids (B, c, m), rows
        (B, c, m, C)), or None."""
        tokens, self.pending_tokens = self.pending_tokens, None
        if tokens is None or tokens.shape[1] != rows.shape[1]:
            raise ValueError("a RETRO state must observe each input's token ids first")
        if self.tokens is not None:
            tokens = torch.cat([self.tokens, tokens], dim=1)
            rows = torch.cat([self.rows, rows], dim=1)
        m = self.chunk
        done = tokens.shape[1] // m
        self.tokens, self.rows = tokens[:, done * m :], rows[:, done * m :]
        if done == 0:
            return None
        B, C = rows.shape[0], rows.shape[-1]
        return tokens[:, : done * m].view(B, done, m), rows[:, : done * m].view(B, done, m, C)

    def append(self, neighbours: Tensor, encoded: Tensor) -> None:
        """Record completed chunks' neighbours (B, c, k, r) and encodings (B, c, k, r, C)."""
        if self.neighbours is None:
            self.neighbours, self.encoded = neighbours, encoded
        else:
            self.neighbours = torch.cat([self.neighbours, neighbours], dim=1)
            self.encoded = torch.cat([self.encoded, encoded], dim=1)


class ModelState:
    """What a model carries between calls: one state per layer (None for layers that
    keep nothing), the n-gram embedding's token history (B, n - 1) (None when the model
    has none), a RETRO model's :class:`RetroState` and a LongMem model's
    :class:`LongMemState` (None otherwise), and the position the next input starts at.
    ``nbytes`` counts the layer, retrieval and LongMem states."""

    def __init__(
        self,
        layers: list[LayerState | None],
        history: Tensor | None = None,
        retro: RetroState | None = None,
        longmem: LongMemState | None = None,
    ):
        self.layers = layers
        self.history = history
        self.retro = retro
        self.longmem = longmem
        self.length = 0

    @property
    def nbytes(self) -> int:
        """Bytes of every layer's state (and the retrieval state)."""
        held = [*self.layers, self.retro, self.longmem]
        return sum(s.nbytes for s in held if s is not None)

    def observe(self, tokens: Tensor, start: int) -> None:
        """Show the input's token ids to every layer state (before the layers run)."""
        for s in [*self.layers, self.retro]:
            if s is not None:
                s.observe(tokens, start)


__all__ = [
    "ChunkBank",
    "CrossbatchState",
    "DilatedKVCache",
    "KVCache",
    "LayerState",
    "LongMemState",
    "MemoryState",
    "MemoryStore",
    "ModelState",
    "RetroState",
    "RecurrentState",
    "RoutedKVCache",
]
