"""Retrieval from a memory of (key, value) pairs: which slots each query reads.

- ``dense``: every valid entry (exact; no selection, see :mod:`longctx.nn.memory`);
- ``topk``: per query and head, the k keys with the largest inner product
  (:func:`torch_topk`, exact);
- ``faiss``: the same k found through a faiss index per (batch row, head)
  (:func:`faiss_search`; ``flat`` is exact, ``hnsw`` approximate, with its recall
  against exact top-k from :func:`faiss_recall`). Needs the optional extra:
  ``pip install longctx[faiss]``.

:func:`attend_selected` attends each query over its own selected slots.
"""

from __future__ import annotations

import torch
from torch import Tensor

RETRIEVALS = ("dense", "topk", "faiss")
FAISS_INDEXES = ("flat", "hnsw")


def require_faiss():
    """The faiss module, or an ImportError that names the extra to install."""
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
    faiss = require_faiss()
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


def attend_selected(q: Tensor, keys: Tensor, vals: Tensor, idx: Tensor, scale: float):
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


__all__ = [
    "FAISS_INDEXES",
    "RETRIEVALS",
    "attend_selected",
    "faiss_recall",
    "faiss_search",
    "require_faiss",
    "torch_topk",
]
