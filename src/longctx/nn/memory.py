"""Memory attention (Focused Transformer, Tworkowski et al. arXiv 2307.03170; Memorizing
Transformer, Wu et al. arXiv 2203.08913); SPEC section 4.

A memory layer's query attends, in one softmax, to its causal local context and to the
(key, value) pairs of earlier windows held in a :class:`MemoryStore`: two parts merged by
log-sum-exp (``ops.merge``), so the result is exactly attention over their union.

Retrieval from memory:

- ``dense``: every valid memory entry (exact);
- ``topk``: per query and head, the k memory keys with the largest inner product with the
  query (exact, torch), then attention over those k;
- ``faiss``: the same k found through a faiss index per (batch row, head) (``flat`` is
  exact inner product; ``hnsw`` is approximate, its recall against exact top-k reported
  by :func:`faiss_recall`). Needs the optional extra: ``pip install longctx[faiss]``.

Positions of memory keys (rotary, as in the local part):

- ``absolute``: keys keep the rotation of their absolute positions, queries theirs; with
  dense retrieval this is exactly causal attention over the concatenated context;
- ``zero`` (LongLLaMA): memory keys unrotated, as if at position 0; queries rotated by
  their position within the current window;
- ``none``: no rotation on either side of the memory scores.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .. import ops
from .rotary import apply_rotary

RETRIEVALS = ("dense", "topk", "faiss")
MEMORY_POSITIONS = ("none", "zero", "absolute")
FAISS_INDEXES = ("flat", "hnsw")


class MemoryStore:
    """Per-batch-row first-in-first-out memory of one layer's (key, value) pairs.

    Buffers (B, H, C, D) for keys and values, the absolute position of each entry
    (B, C) and which slots hold an entry (B, C). Each row is a ring buffer: once full,
    a new entry replaces the oldest. Rows never see each other's entries. The order of
    slots is irrelevant to attention (a softmax over a set)."""

    def __init__(self, batch: int, heads: int, head_dim: int, capacity: int, dtype, device):
        if capacity < 1:
            raise ValueError(f"memory capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        shape = (batch, heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        self.age = torch.zeros(batch, capacity, dtype=torch.long, device=device)  # write order
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.written = [0] * batch  # entries ever written per row (ring pointer = % C)
        self.version = 0  # bumped on every change (faiss indexes are rebuilt on change)

    @property
    def batch(self) -> int:
        return self.k.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.k, self.v, self.pos, self.age, self.valid))

    def size(self, row: int) -> int:
        return int(self.valid[row].sum())

    @property
    def filled(self) -> int:
        """1 + the last slot that holds an entry in any row (0 when empty): reads may
        skip the slots after it (rings fill from slot 0, so a young store is short)."""
        used = self.valid.any(dim=0).nonzero()
        return int(used[-1]) + 1 if len(used) else 0

    def add(self, k: Tensor, v: Tensor, positions: Tensor, keep: Tensor | None = None) -> None:
        """Append the entries (B, H, n, D) at ``positions`` (n,) or (B, n); ``keep``
        (B, n) bool selects which of each row's entries to write (default all). Only the
        last C written survive (FIFO)."""
        B, H, n, D = k.shape
        if (self.batch, self.k.shape[1], self.k.shape[3]) != (B, H, D):
            raise ValueError(
                f"memory holds (B, H, D) = {(self.batch, self.k.shape[1], self.k.shape[3])}, "
                f"got keys {tuple(k.shape)}"
            )
        pos = positions.expand(B, n) if positions.dim() == 1 else positions
        with torch.no_grad():
            for b in range(B):
                idx = torch.arange(n, device=k.device)
                if keep is not None:
                    idx = idx[keep[b]]
                idx = idx[-self.capacity :]  # more than C new entries: the last C
                m = len(idx)
                if m == 0:
                    continue
                slots = (self.written[b] + torch.arange(m, device=k.device)) % self.capacity
                self.k[b][:, slots] = k[b][:, idx].to(self.k.dtype)
                self.v[b][:, slots] = v[b][:, idx].to(self.v.dtype)
                self.pos[b, slots] = pos[b, idx]
                self.age[b, slots] = self.written[b] + torch.arange(m, device=k.device)
                self.valid[b, slots] = True
                self.written[b] += m
        self.version += 1

    def clear(self, rows=None) -> None:
        """Forget everything in the given rows (default: all rows)."""
        rows = range(self.batch) if rows is None else [int(r) for r in rows]
        for b in rows:
            self.valid[b] = False
            self.written[b] = 0
        self.version += 1

    def entries(self, row: int) -> tuple[Tensor, Tensor, Tensor]:
        """(k (H, m, D), v, positions (m,)) of a row, oldest first."""
        slots = self.valid[row].nonzero().flatten()
        order = slots[self.age[row, slots].argsort()]
        return self.k[row][:, order], self.v[row][:, order], self.pos[row, order]

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "k": self.k,
            "v": self.v,
            "pos": self.pos,
            "age": self.age,
            "valid": self.valid,
            "written": torch.tensor(self.written, dtype=torch.long),
        }

    def save(self, path: str | Path) -> None:
        """Write the store to a safetensors file (atomically)."""
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: t.contiguous().cpu() for k, t in self.state_dict().items()}, str(tmp))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> MemoryStore:
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
        store = cls(B, H, D, C, data["k"].dtype, device)
        store.k, store.v = data["k"], data["v"]
        store.pos, store.age, store.valid = data["pos"], data["age"], data["valid"]
        store.written = [int(x) for x in data["written"]]
        return store


class WindowCache:
    """The current window's keys and values during decoding (one layer): rotated keys for
    local attention, the keys as memory stores them, values."""

    def __init__(self, batch: int, heads: int, head_dim: int, window: int, dtype, device):
        shape = (batch, heads, window, head_dim)
        self.k_rot = torch.zeros(shape, dtype=dtype, device=device)
        self.k_mem = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self.k_rot.nbytes + self.k_mem.nbytes + self.v.nbytes

    def append(self, k_rot: Tensor, k_mem: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        a, b = self.length, self.length + k_rot.shape[2]
        if b > self.v.shape[2]:
            raise ValueError(f"the window holds {self.v.shape[2]} positions; got {b}")
        self.k_rot[:, :, a:b], self.k_mem[:, :, a:b], self.v[:, :, a:b] = k_rot, k_mem, v
        self.length = b
        return self.k_rot[:, :, :b], self.v[:, :, :b]

    def flush(self, memory: MemoryStore, positions: Tensor, keep, clear_rows) -> None:
        """Move the window into memory (after clearing rows that ended a document)."""
        n = self.length
        if clear_rows:
            memory.clear(clear_rows)
        memory.add(self.k_mem[:, :, :n], self.v[:, :, :n], positions[:n], keep)
        self.length = 0


def _require_faiss():
    try:
        import faiss  # noqa: F401
    except ImportError:
        raise ImportError(
            "memory retrieval 'faiss' needs the faiss package: install the optional extra "
            "with `pip install longctx[faiss]` (faiss-cpu), or use retrieval 'dense' or 'topk'"
        ) from None
    import faiss

    return faiss


def faiss_search(keys: Tensor, valid: Tensor, queries: Tensor, k: int, index: str = "flat"):
    """Top-k memory slots by inner product through faiss: keys (B, H, C, D), valid
    (B, C), queries (B, H, n, D) -> slot indices (B, H, n, k) (-1 where fewer than k).
    One index per (row, head) over its valid entries."""
    faiss = _require_faiss()
    if index not in FAISS_INDEXES:
        raise ValueError(f"faiss index must be one of {FAISS_INDEXES}, got {index!r}")
    B, H, C, D = keys.shape
    n = queries.shape[2]
    out = torch.full((B, H, n, k), -1, dtype=torch.long)
    for b in range(B):
        slots = valid[b].nonzero().flatten().cpu()
        if len(slots) == 0:
            continue
        for h in range(H):
            data = keys[b, h, slots].detach().float().cpu().contiguous().numpy()
            if index == "flat":
                ix = faiss.IndexFlatIP(D)
            else:
                ix = faiss.IndexHNSWFlat(D, 32, faiss.METRIC_INNER_PRODUCT)
                ix.hnsw.efSearch = max(64, 2 * k)
            ix.add(data)
            q = queries[b, h].detach().float().cpu().contiguous().numpy()
            _, found = ix.search(q, min(k, len(slots)))
            found_t = torch.from_numpy(found).long()
            mapped = torch.where(found_t >= 0, slots[found_t.clamp_min(0)], found_t)
            out[b, h, :, : mapped.shape[1]] = mapped
    return out.to(keys.device)


def torch_topk(keys: Tensor, valid: Tensor, queries: Tensor, k: int) -> Tensor:
    """Exact top-k memory slots by inner product (B, H, n, k); -1 past the valid count."""
    scores = torch.matmul(queries, keys.transpose(-1, -2))  # (B, H, n, C)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    kk = min(k, keys.shape[2])
    top = scores.topk(kk, dim=-1)
    idx = top.indices.masked_fill(torch.isneginf(top.values), -1)
    if kk < k:
        pad = idx.new_full((*idx.shape[:-1], k - kk), -1)
        idx = torch.cat([idx, pad], dim=-1)
    return idx


def faiss_recall(keys: Tensor, valid: Tensor, queries: Tensor, k: int, index: str) -> float:
    """Fraction of the exact top-k slots that the faiss index finds."""
    exact = torch_topk(keys, valid, queries, k)
    approx = faiss_search(keys, valid, queries, k, index)
    hit, total = 0, 0
    for e, a in zip(exact.reshape(-1, k).tolist(), approx.reshape(-1, k).tolist()):
        want = {s for s in e if s >= 0}
        hit += len(want & set(a))
        total += len(want)
    return hit / max(total, 1)


def _attend_selected(q: Tensor, keys: Tensor, vals: Tensor, idx: Tensor, scale: float):
    """Attention of each query (B, H, n, D) over its own selected memory slots idx
    (B, H, n, k) (-1 = none): (out, lse), differentiable in q, keys and vals."""
    B, H, n, k = idx.shape
    D, Dv = keys.shape[-1], vals.shape[-1]
    safe = idx.clamp_min(0)
    flat = safe.reshape(B, H, n * k, 1)
    ks = keys.gather(2, flat.expand(-1, -1, -1, D)).view(B, H, n, k, D)
    vs = vals.gather(2, flat.expand(-1, -1, -1, Dv)).view(B, H, n, k, Dv)
    scores = torch.einsum("bhnd,bhnkd->bhnk", q, ks) * scale
    scores = scores.masked_fill(idx < 0, float("-inf"))
    empty = (idx < 0).all(dim=-1, keepdim=True)
    scores_safe = torch.where(empty, torch.zeros_like(scores), scores)
    lse = torch.logsumexp(scores_safe, dim=-1)  # (B, H, n)
    p = torch.exp(scores_safe - lse.unsqueeze(-1)).masked_fill(idx < 0, 0.0)
    out = torch.einsum("bhnk,bhnkd->bhnd", p, vs)
    lse = lse.masked_fill(empty.squeeze(-1), float("-inf"))
    return out, lse


class MemoryAttention(nn.Module):
    """Causal multi-head attention over the local context plus a memory (module doc)."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        *,
        retrieval: str = "dense",
        topk: int = 32,
        positions: str = "absolute",
        rope_base: float = 10000.0,
        faiss_index: str = "flat",
    ):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not a multiple of n_heads {n_heads}")
        if retrieval not in RETRIEVALS:
            raise ValueError(f"memory retrieval must be one of {RETRIEVALS}, got {retrieval!r}")
        if positions not in MEMORY_POSITIONS:
            raise ValueError(
                f"memory positions must be one of {MEMORY_POSITIONS}, got {positions!r}"
            )
        if faiss_index not in FAISS_INDEXES:
            raise ValueError(f"faiss index must be one of {FAISS_INDEXES}, got {faiss_index!r}")
        if topk < 1:
            raise ValueError(f"memory topk must be >= 1, got {topk}")
        if retrieval == "faiss":
            _require_faiss()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.retrieval = retrieval
        self.topk = topk
        self.positions = positions
        self.rope_base = rope_base
        self.faiss_index = faiss_index
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def new_memory(self, batch: int, capacity: int, dtype, device) -> MemoryStore:
        return MemoryStore(batch, self.n_heads, self.head_dim, capacity, dtype, device)

    def forward(
        self,
        x: Tensor,
        positions: Tensor | None = None,
        memory: MemoryStore | None = None,
        *,
        start: int = 0,
        window_start: int | None = None,
        memory_visible: Tensor | None = None,
        write: bool = True,
        write_keep: Tensor | None = None,
        clear_rows: list[int] | None = None,
    ) -> Tensor:
        """x (B, n, C): a window at positions start..start+n-1 (or ``positions``). Queries
        attend causally within x and to ``memory``; then x's keys/values are written to
        memory (``write``; ``write_keep`` (B, n) selects which). ``memory_visible``
        (B, n) bool hides the memory from some queries (e.g. after a document separator).
        ``window_start``: position of the window's first token (``zero`` mode).
        ``clear_rows``: rows whose memory is cleared after the read, before the write
        (a document ended in this window)."""
        B, n, C = x.shape
        if positions is None:
            positions = torch.arange(start, start + n, device=x.device)
        qkv = self.qkv(x).view(B, n, 3, self.n_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, n, D)
        q_rot = apply_rotary(q, positions, self.rope_base)
        k_rot = apply_rotary(k, positions, self.rope_base)
        local = ops.attention(q_rot, k_rot, v, causal=True, return_lse=True)
        if memory is None:
            y = local[0]
        else:
            first = int(positions[0]) if window_start is None else window_start
            y = ops.merge([local, self.read(q, q_rot, positions - first, memory, memory_visible)])[
                0
            ]
            if clear_rows:
                memory.clear(clear_rows)
            if write:
                memory.add(k_rot if self.positions == "absolute" else k, v, positions, write_keep)
        return self.proj(y.transpose(1, 2).reshape(B, n, C))

    def forward_crossbatch(
        self,
        x: Tensor,
        positions: Tensor,
        previous: tuple[Tensor, Tensor] | None,
        negatives: int,
        *,
        window_start: int,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Crossbatch training (Focused Transformer): queries of window x (B, n, C) attend
        to their causal window and, in the same softmax, to the previous window of their
        own row (positive) and of the next ``negatives`` rows (cyclically; negatives from
        other documents), with gradients through all of those keys and values. Returns
        (output, this window's (memory keys, values)) for the next window."""
        B, n, C = x.shape
        if not 0 <= negatives < B:
            raise ValueError(
                f"crossbatch negatives must be in [0, batch - 1 = {B - 1}], got {negatives}"
            )
        qkv = self.qkv(x).view(B, n, 3, self.n_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, n, D)
        q_rot = apply_rotary(q, positions, self.rope_base)
        k_rot = apply_rotary(k, positions, self.rope_base)
        local = ops.attention(q_rot, k_rot, v, causal=True, return_lse=True)
        k_mem = k_rot if self.positions == "absolute" else k
        if previous is None:
            y = local[0]
        else:
            pk, pv = previous  # (B, H, m, D)
            rows = (
                torch.arange(B, device=x.device).unsqueeze(-1)
                + torch.arange(negatives + 1, device=x.device)
            ) % B
            mk = pk[rows].transpose(1, 2).flatten(2, 3)  # (B, H, (d) * m, D): own row first
            mv = pv[rows].transpose(1, 2).flatten(2, 3)
            if self.positions == "absolute":
                qm = q_rot
            elif self.positions == "zero":
                qm = apply_rotary(q, positions - window_start, self.rope_base)
            else:
                qm = q
            read = ops.attention(qm, mk, mv, return_lse=True)
            y = ops.merge([local, read])[0]
        return self.proj(y.transpose(1, 2).reshape(B, n, C)), (k_mem, v)

    def step(
        self,
        x: Tensor,
        positions: Tensor,
        window: WindowCache,
        memory: MemoryStore,
        *,
        window_start: int,
        memory_visible: Tensor | None = None,
    ) -> Tensor:
        """Decoding: x (B, n, C) continues the current window. Its keys join ``window``
        (written to memory later, by :meth:`flush`); queries attend to the window so far
        and read the memory, exactly as :meth:`forward` does for the whole window."""
        B, n, C = x.shape
        qkv = self.qkv(x).view(B, n, 3, self.n_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, n, D)
        q_rot = apply_rotary(q, positions, self.rope_base)
        k_rot = apply_rotary(k, positions, self.rope_base)
        keys, vals = window.append(k_rot, k if self.positions != "absolute" else k_rot, v)
        local = ops.attention(q_rot, keys, vals, causal=True, return_lse=True)
        read = self.read(q, q_rot, positions - window_start, memory, memory_visible)
        y = ops.merge([local, read])[0]
        return self.proj(y.transpose(1, 2).reshape(B, n, C))

    def read(self, q, q_rot, local_pos, memory: MemoryStore, visible=None):
        """(out, lse) (B, H, n, D) of the queries over the memory."""
        if self.positions == "absolute":
            qm = q_rot
        elif self.positions == "zero":
            qm = apply_rotary(q, local_pos, self.rope_base)
        else:
            qm = q
        scale = self.head_dim**-0.5
        used = max(memory.filled, 1)  # skip never-written slots (a store fills from 0)
        mk, mv, valid = memory.k[:, :, :used], memory.v[:, :, :used], memory.valid[:, :used]
        if torch.is_grad_enabled():  # backward needs them as read, and the store moves on
            mk, mv, valid = mk.clone(), mv.clone(), valid.clone()
        if self.retrieval == "dense":
            mask = valid[:, None, None, :]
            if visible is not None:
                mask = mask & visible[:, None, :, None]
            return ops.masked_attention(qm, mk.to(qm.dtype), mv.to(qm.dtype), mask, return_lse=True)
        if self.retrieval == "topk":
            idx = torch_topk(mk.to(qm.dtype), valid, qm.detach(), self.topk)
        else:
            idx = faiss_search(mk, valid, qm, self.topk, self.faiss_index)
        if visible is not None:
            idx = idx.masked_fill(~visible[:, None, :, None], -1)
        return _attend_selected(qm, mk.to(qm.dtype), mv.to(qm.dtype), idx, scale)


__all__ = [
    "FAISS_INDEXES",
    "MEMORY_POSITIONS",
    "RETRIEVALS",
    "MemoryAttention",
    "WindowCache",
    "MemoryStore",
    "faiss_recall",
    "faiss_search",
    "torch_topk",
]
