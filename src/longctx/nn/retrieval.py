"""Retrieval from a memory of (key, value) pairs: which slots each query reads.

- ``dense``: every valid entry (exact; no selection, see :mod:`longctx.nn.memory`);
- ``topk``: per query and head, the k keys with the largest inner product
  (:func:`torch_topk`, exact);
- ``faiss``: the k found through an index per (batch row, head) that is kept in step
  with the store as windows are written (:class:`FaissIndex`): ``ivf`` (approximate,
  an inverted file: a query reads about N^(3/4) of N keys) or ``flat`` (exact). Needs
  the optional extra: ``pip install longctx[faiss]``.

:func:`recall_at_k` counts found slots against exact top-k; :func:`attend_selected`
attends each query over its own selected slots.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

RETRIEVALS = ("dense", "topk", "faiss")
FAISS_INDEXES = ("flat", "ivf")
EXACT_BELOW = 16384  # an ivf row searches exactly (torch) until it holds this many entries
REGROW = 4  # an ivf row is rebuilt (more lists) each time it grows this many times


def require_faiss(
    what: str = "memory retrieval 'faiss'", instead: str = "use retrieval 'dense' or 'topk'"
):
    """The faiss module, or an ImportError that names the extra to install."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        raise ImportError(
            f"{what} needs the faiss package: install the optional extra with "
            f"`pip install longctx[faiss]` (faiss-cpu), or {instead}"
        ) from None
    import faiss

    return faiss


def ivf_lists(entries: int) -> int:
    """Inverted lists of an IVF index over ``entries`` keys: about 4 sqrt(N), a power of
    two, at least 8 keys per list."""
    target = 4 * math.sqrt(max(entries, 1))
    return max(1, min(2 ** round(math.log2(target)), entries // 8 or 1))


def ivf_probes(lists: int, nprobe: int = 0) -> int:
    """Lists a query scans: ``nprobe``, or (0) about 3 sqrt(lists)."""
    return min(lists, nprobe or max(1, round(3 * math.sqrt(lists))))


def torch_topk(keys: Tensor, valid: Tensor, queries: Tensor, k: int) -> Tensor:
    """Exact top-k memory slots by inner product (B, H, n, k); -1 past the valid count."""
    scores = torch.matmul(queries, keys.transpose(-1, -2))  # (B, H, n, C)
    if not bool(valid.all()):
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    kk = min(k, keys.shape[2])
    top = scores.topk(kk, dim=-1)
    idx = top.indices.masked_fill(torch.isneginf(top.values), -1)
    if kk < k:
        pad = idx.new_full((*idx.shape[:-1], k - kk), -1)
        idx = torch.cat([idx, pad], dim=-1)
    return idx


def _numpy(t: Tensor):
    """Vectors (m, D) as faiss takes them: a contiguous float32 numpy array on the CPU."""
    return t.detach().float().cpu().contiguous().numpy()


def recall_at_k(found: Tensor, exact: Tensor) -> tuple[int, int]:
    """(hits, total): how many of the exact top-k slots (..., k) (-1 = none) are among
    the ``found`` slots (..., k) of the same query."""
    want = exact >= 0
    hit = (exact.unsqueeze(-1) == found.unsqueeze(-2)).any(dim=-1) & want  # (..., k)
    return int(hit.sum()), int(want.sum())


class FaissIndex:
    """Top-k search over a :class:`~longctx.nn.state.MemoryStore`'s keys by inner
    product, one faiss index per (batch row, head), updated as the store is written
    (entries are added as windows arrive and removed when the ring overwrites them or a
    row is cleared), so no read rebuilds anything. Index ids are store slots.

    ``kind="ivf"``: an inverted file (IVF-Flat, Jegou et al., "Product quantization for
    nearest neighbor search", PAMI 2011): a row's keys are clustered into ``lists``
    lists by k-means (default 4 sqrt(entries), a power of 2) and a query scans the
    ``nprobe`` lists whose centroids score highest (default 3 sqrt(lists)), so it
    reads about N^(3/4) of N keys. Approximate: :attr:`recall` counts, on every
    ``recall_every``-th query (0: never), how many of the exact top-k it found. A row
    is searched exactly (torch) until it holds ``exact_below`` entries, and rebuilt
    with more lists each time it grows ``REGROW`` times. ``nprobe >= lists`` is exact.
    ``kind="flat"``: one list, every key scanned: exact.
    """

    def __init__(
        self,
        batch: int,
        *,
        kind: str = "ivf",
        nprobe: int = 0,
        exact_below: int = EXACT_BELOW,
        recall_every: int = 0,
    ):
        self.faiss = require_faiss()
        if kind not in FAISS_INDEXES:
            raise ValueError(f"faiss index must be one of {FAISS_INDEXES}, got {kind!r}")
        if nprobe < 0 or exact_below < 0 or recall_every < 0:
            raise ValueError(
                "nprobe, exact_below and recall_every must be >= 0, got "
                f"{nprobe}, {exact_below}, {recall_every}"
            )
        self.kind = kind
        self.nprobe = nprobe
        self.exact_below = 0 if kind == "flat" else exact_below
        self.recall_every = recall_every
        self.rows: list[list | None] = [None] * batch  # per row: one index per head
        self.built_at = [0] * batch  # entries the row held when its index was built
        self.hits = self.total = 0  # recall counts (see recall_every)

    @property
    def recall(self) -> float | None:
        """Fraction of the exact top-k found, over the sampled queries (None: none)."""
        return self.hits / self.total if self.total else None

    @property
    def nbytes(self) -> int:
        """Bytes of the indexes: keys (float32), ids and centroids, plus the id hash
        map used for removal (estimated at 16 bytes per entry)."""
        total = 0
        for indexes in self.rows:
            for index in indexes or []:
                total += index.ntotal * (4 * index.d + 8 + 16) + index.nlist * 4 * index.d
        return total

    def set_nprobe(self, nprobe: int) -> None:
        """Lists a query scans from now on (0: automatic), also in built indexes."""
        if nprobe < 0:
            raise ValueError(f"nprobe must be >= 0 (0: automatic), got {nprobe}")
        self.nprobe = nprobe
        for indexes in self.rows:
            for index in indexes or []:
                index.nprobe = self.probes(index.nlist)

    def lists_for(self, entries: int) -> int:
        """Lists of an index built over ``entries`` keys."""
        return 1 if self.kind == "flat" else ivf_lists(entries)

    def probes(self, lists: int) -> int:
        """Lists a query scans."""
        return ivf_probes(lists, self.nprobe)

    # ------------------------------------------------------------ kept in step

    def build(self, store, row: int) -> None:
        """(Re)build a row's indexes over every entry it holds (exact until it holds
        ``exact_below``)."""
        slots = store.valid[row].nonzero().flatten()
        n = len(slots)
        if n == 0 or n < self.exact_below:
            self.rows[row], self.built_at[row] = None, 0
            return
        faiss = self.faiss
        ids = slots.cpu().numpy().astype("int64")
        lists = self.lists_for(n)
        indexes = []
        for h in range(store.k.shape[1]):
            keys = _numpy(store.k[row, h, slots])
            dim = keys.shape[1]
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
            if lists == 1:
                index.quantizer.add(keys[:1] * 0)  # one centroid: every key in one list
                index.is_trained = True
            else:
                index.cp.niter = 10
                index.cp.max_points_per_centroid = 32  # k-means on a sample
                index.cp.min_points_per_centroid = 4  # (lists_for keeps >= 8)
                index.cp.seed = row * 1000 + h
                index.train(keys)
            index.set_direct_map_type(faiss.DirectMap.Hashtable)  # removal by id
            index.add_with_ids(keys, ids)
            index.nprobe = self.probes(lists)
            indexes.append(index)
        self.rows[row], self.built_at[row] = indexes, n

    def written(self, store, rows: Tensor, slots: Tensor, replaced: Tensor) -> None:
        """The store wrote entries at (rows, slots) (each (m,)); ``replaced`` (m,) marks
        slots that held an older entry."""
        for row in rows.unique().tolist():
            mine = rows == row
            held = int(store.valid[row].sum())
            indexes = self.rows[row]
            if indexes is None:
                if held >= self.exact_below:
                    self.build(store, row)
                continue
            if held >= REGROW * self.built_at[row] and self.kind == "ivf":
                self.build(store, row)
                continue
            new = slots[mine]
            old = new[replaced[mine]].cpu().numpy().astype("int64")
            ids = new.cpu().numpy().astype("int64")
            for h, index in enumerate(indexes):
                if len(old):
                    index.remove_ids(self.faiss.IDSelectorArray(len(old), self.faiss.swig_ptr(old)))
                keys = _numpy(store.k[row, h, new])
                index.add_with_ids(keys, ids)

    def cleared(self, row: int) -> None:
        """The store forgot a row."""
        self.rows[row], self.built_at[row] = None, 0

    # ------------------------------------------------------------ search

    def search(self, store, queries: Tensor, k: int) -> Tensor:
        """Top-k slots (B, H, n, k) (-1 where fewer) of queries (B, H, n, D)."""
        B, H, n, _ = queries.shape
        out = torch.full((B, H, n, k), -1, dtype=torch.long, device=queries.device)
        used = max(store.filled, 1)
        small = [row for row in range(B) if self.rows[row] is None]
        if len(small) == B:  # exact, every row (no copies)
            keys = store.k[:, :, :used].to(queries.dtype)
            return torch_topk(keys, store.valid[:, :used], queries, k)
        if small:  # exact, those rows together
            rows = torch.tensor(small, device=queries.device)
            keys = store.k[:, :, :used].index_select(0, rows).to(queries.dtype)
            valid = store.valid[:, :used].index_select(0, rows)
            out[rows] = torch_topk(keys, valid, queries.index_select(0, rows), k)
        for row in range(B):
            if self.rows[row] is None:
                continue
            q = queries[row]  # (H, n, D)
            for h, index in enumerate(self.rows[row]):
                _, found = index.search(_numpy(q[h]), k)
                out[row, h] = torch.from_numpy(found).to(out.device)
            if self.recall_every:
                sample = q[None, :, :: self.recall_every]
                keys = store.k[row : row + 1, :, :used].to(q.dtype)
                exact = torch_topk(keys, store.valid[row : row + 1, :used], sample, k)
                hits, total = recall_at_k(out[row : row + 1, :, :: self.recall_every], exact)
                self.hits += hits
                self.total += total
        return out


def store_index(
    store, kind: str, nprobe: int = 0, exact_below: int = EXACT_BELOW, recall_every: int = 0
) -> FaissIndex:
    """The :class:`FaissIndex` kept in step with ``store`` (a MemoryStore): attached and
    built over what the store holds if it has none yet; its probes and recall sampling
    set to the given ones."""
    if store.index is None:
        store.index = FaissIndex(
            store.batch,
            kind=kind,
            nprobe=nprobe,
            exact_below=exact_below,
            recall_every=recall_every,
        )
        for row in range(store.batch):
            store.index.build(store, row)
    index = store.index
    if index.nprobe != nprobe:  # the layer was configured since
        index.set_nprobe(nprobe)
    index.recall_every = recall_every
    return index


def attend_selected(q: Tensor, keys: Tensor, vals: Tensor, idx: Tensor, scale: float):
    """Attention of each query (B, H, n, D) over its own selected memory slots idx
    (B, H, n, k) (-1 = none): (out, lse), differentiable in q, keys and vals."""
    ks, vs = gather_slots(idx, keys, vals)  # (B, H, n, k, D) each
    return attend_gathered(q, ks, vs, idx < 0, scale)


def gather_slots(idx: Tensor, *buffers: Tensor) -> list[Tensor]:
    """Each buffer (B, H, C, ...) (or (1, H, C, ...), read by every row) at the slots
    idx (B, H, n, k) (-1 reads slot 0; mask it): (B, H, n, k, ...) each."""
    B, H, n, k = idx.shape
    out = []
    for buf in buffers:
        Bb, C, rest = buf.shape[0], buf.shape[2], buf.shape[3:]
        rows = (torch.arange(B, device=idx.device).view(B, 1) % Bb) * H
        rows = rows + torch.arange(H, device=idx.device).view(1, H)  # (B, H) rows of buf
        flat = (idx.clamp_min(0) + (rows * C).view(B, H, 1, 1)).reshape(-1)
        picked = buf.reshape(Bb * H * C, *rest).index_select(0, flat)
        out.append(picked.view(B, H, n, k, *rest))
    return out


def attend_gathered(q: Tensor, ks: Tensor, vs: Tensor, invalid: Tensor, scale: float):
    """Attention of each query q (B, H, n, D) over its own keys ks (B, H, n, k, D) and
    values vs (B, H, n, k, Dv); ``invalid`` (B, H, n, k) hides some. (out, lse); a query
    with nothing visible gets out 0 and lse -inf."""
    scores = torch.einsum("bhnd,bhnkd->bhnk", q, ks) * scale
    scores = scores.masked_fill(invalid, float("-inf"))
    empty = invalid.all(dim=-1, keepdim=True)
    scores_safe = torch.where(empty, torch.zeros_like(scores), scores)
    lse = torch.logsumexp(scores_safe, dim=-1)  # (B, H, n)
    p = torch.exp(scores_safe - lse.unsqueeze(-1)).masked_fill(invalid, 0.0)
    out = torch.einsum("bhnk,bhnkd->bhnd", p, vs)
    lse = lse.masked_fill(empty.squeeze(-1), float("-inf"))
    return out, lse


__all__ = [
    "FAISS_INDEXES",
    "RETRIEVALS",
    "EXACT_BELOW",
    "FaissIndex",
    "attend_gathered",
    "attend_selected",
    "gather_slots",
    "ivf_lists",
    "ivf_probes",
    "recall_at_k",
    "require_faiss",
    "store_index",
    "torch_topk",
]
