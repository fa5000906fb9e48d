"""The RETRO retrieval database (Borgeaud et al., arXiv 2112.04426, section 2.3).

A corpus's training documents cut into chunks of m tokens (document-aligned: a
document's last chunk is padded with PAD), each with its document id and a key from a
frozen embedder (:mod:`longctx.retro.embed`). A neighbour is the pair [N, F]: the chunk N
and its continuation F, the next chunk of the same document (PAD at a document's end).

On disk, a directory::

    manifest.json   format, version, chunk size, counts, tokenizer, embedder, source
    tokens.npy      (n, m) uint16   the chunks
    docs.npy        (n,) int32      the document of each chunk (non-decreasing)
    keys.npy        (n, d) float16  unit-norm keys

read memory-mapped. A database is built once (:meth:`RetroDB.build`, ``longctx retro
build-db``) and reused by training, generation and evaluation; a corrupt, truncated or
mismatched one is a :class:`DatabaseError` that says what is wrong.

Search is exact top-k by inner product (torch, in blocks) by default, or through a
faiss index (``flat``: exact; ``ivf``: inverted file; ``hnsw``: graph; the ``faiss``
extra) whose recall against exact :meth:`RetroDB.recall` measures. Both exclude the
query's own document (training: a neighbour from it could contain its continuation) or
its own chunk when asked.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._util import Progress, atomic_dir
from ..data.corpus import DataConfig, load_corpus
from ..data.tokenizer import EOD, PAD
from .embed import make_embedder

FORMAT = "longctx-retro-db"
FORMAT_VERSION = 1
FILES = {"tokens.npy": "uint16", "docs.npy": "int32", "keys.npy": "float16"}
INDEXES = ("exact", "flat", "ivf", "hnsw")  # search methods
HNSW_LINKS, HNSW_EF_SEARCH = 32, 128
EMBED_BATCH = 8192  # chunks per embedder call while building
KEY_BLOCK = 65536  # keys per block in exact search


class DatabaseError(ValueError):
    """A database that cannot be used (the message says why)."""


def document_chunks(stream: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut a token stream whose documents are separated by EOD into chunks of ``chunk``
    tokens that never cross a document boundary: (tokens (n, chunk) uint16, PAD-filled
    at each document's end; docs (n,) int32, the document index of each chunk)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    ends = np.flatnonzero(stream == EOD)
    starts = np.concatenate([[0], ends + 1])
    stops = np.concatenate([ends, [len(stream)]])
    pieces, docs = [], []
    for d, (a, b) in enumerate(zip(starts, stops, strict=True)):
        if b <= a:
            continue
        n = -(-(b - a) // chunk)
        padded = np.full(n * chunk, PAD, dtype=np.uint16)
        padded[: b - a] = stream[a:b]
        pieces.append(padded.reshape(n, chunk))
        docs.append(np.full(n, d, dtype=np.int32))
    if not pieces:
        return np.zeros((0, chunk), np.uint16), np.zeros(0, np.int32)
    return np.concatenate(pieces), np.concatenate(docs)


class RetroDB:
    """A database opened from disk (:meth:`open`) or just built (:meth:`build`)."""

    def __init__(self, path: Path, manifest: dict, tokens, docs, keys):
        self.path = path
        self.manifest = manifest
        self.chunk: int = manifest["chunk"]
        self.tokens = tokens  # (n, m) uint16, memory-mapped
        self.docs = docs  # (n,) int32
        self.keys = keys  # (n, d) float16
        self._embedder = None
        self._keys32: Tensor | None = None
        self._indexes: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return (
            f"RetroDB({str(self.path)!r}: {len(self):,} chunks of {self.chunk} tokens, "
            f"{self.manifest['documents']:,} documents, embedder "
            f"{self.manifest['embedder']['kind']})"
        )

    # ------------------------------------------------------------------ build, open

    @classmethod
    def build(
        cls,
        source: str,
        out: str | Path,
        *,
        chunk: int = 64,
        embedder: str | dict = "sketch",
        checkpoint: str | Path | None = None,
        val_percent: float = 5.0,
        max_bytes: int = 0,
        overwrite: bool = False,
        progress: bool = True,
    ) -> RetroDB:
        """Build the database of the *training* split of ``source`` (as ``data.source``:
        stdlib, a file, a directory or a glob; split as training splits it) into ``out``:
        chunks of ``chunk`` tokens keyed by ``embedder`` (``sketch``, or ``model`` with a
        ``checkpoint``). ``out`` is written whole or not at all."""
        t0 = time.perf_counter()
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
        data = DataConfig(source=source, val_percent=val_percent, max_bytes=max_bytes)
        corpus = load_corpus(data)
        tokens, docs = document_chunks(corpus.train, chunk)
        if len(tokens) == 0:
            raise ValueError(f"the corpus {corpus.description} has no training text")
        embed = make_embedder(embedder, checkpoint)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            np.save(tmp / "tokens.npy", tokens)
            np.save(tmp / "docs.npy", docs)
            keys = np.lib.format.open_memmap(
                tmp / "keys.npy", mode="w+", dtype=np.float16, shape=(len(tokens), embed.dim)
            )
            bar = Progress(len(tokens), "retro build-db", unit="chunk", enabled=progress)
            with bar:
                for a in range(0, len(tokens), EMBED_BATCH):
                    part = torch.from_numpy(tokens[a : a + EMBED_BATCH].astype(np.int64))
                    keys[a : a + len(part)] = embed(part).numpy().astype(np.float16)
                    bar.update(len(part))
            keys.flush()
            del keys
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "chunk": chunk,
                "chunks": len(tokens),
                "documents": int(docs[-1]) + 1,
                "tokens": int((tokens != PAD).sum()),
                "tokenizer": "bytes",
                "embedder": embed.spec,
                "key_dim": embed.dim,
                "source": {**data.to_dict(), "description": corpus.description},
                "files": {
                    name: {"dtype": dtype, "bytes": (tmp / name).stat().st_size}
                    for name, dtype in FILES.items()
                },
                "build_seconds": round(time.perf_counter() - t0, 2),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        db = cls.open(out)
        db._embedder = embed
        return db

    @classmethod
    def open(cls, path: str | Path) -> RetroDB:
        """Open a database directory (memory-mapped); DatabaseError if it is missing,
        corrupt, truncated, of another format version, or inconsistent."""
        path = Path(path)
        where = f"retro database {path}"
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except FileNotFoundError:
            raise DatabaseError(
                f"{where}: no manifest.json (build one with longctx retro build-db)"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DatabaseError(f"{where}: manifest.json is not valid JSON ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise DatabaseError(f"{where}: manifest.json is not a longctx retro manifest")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise DatabaseError(
                f"{where}: format version {version!r}; this longctx reads {FORMAT_VERSION}"
            )
        arrays = {}
        for name, dtype in FILES.items():
            file = path / name
            try:
                arrays[name] = np.load(file, mmap_mode="r")
            except FileNotFoundError:
                raise DatabaseError(f"{where}: {name} is missing") from None
            except (ValueError, OSError) as exc:
                raise DatabaseError(f"{where}: {name} is corrupt or truncated ({exc})") from None
            if str(arrays[name].dtype) != dtype:
                raise DatabaseError(f"{where}: {name} holds {arrays[name].dtype}, not {dtype}")
            recorded = manifest.get("files", {}).get(name, {}).get("bytes")
            if recorded is not None and file.stat().st_size != recorded:
                raise DatabaseError(
                    f"{where}: {name} has {file.stat().st_size} bytes, the manifest says "
                    f"{recorded} (a partial copy?)"
                )
        tokens, docs, keys = arrays["tokens.npy"], arrays["docs.npy"], arrays["keys.npy"]
        n, m = manifest.get("chunks"), manifest.get("chunk")
        shapes = {
            "tokens.npy": (tokens.shape, (n, m)),
            "docs.npy": (docs.shape, (n,)),
            "keys.npy": (keys.shape, (n, manifest.get("key_dim"))),
        }
        for name, (shape, expected) in shapes.items():
            if tuple(shape) != expected:
                raise DatabaseError(f"{where}: {name} has shape {shape}, expected {expected}")
        return cls(path, manifest, tokens, docs, keys)

    def check_compatible(self, *, chunk: int | None = None, embedder: dict | None = None):
        """DatabaseError unless the database has this chunk size and embedder."""
        if chunk is not None and chunk != self.chunk:
            raise DatabaseError(
                f"retro database {self.path} has chunks of {self.chunk} tokens; the model "
                f"uses {chunk}"
            )
        if embedder is not None and embedder != self.manifest["embedder"]:
            raise DatabaseError(
                f"retro database {self.path} was keyed by {self.manifest['embedder']}, not "
                f"{embedder}"
            )

    # ------------------------------------------------------------------ contents

    @property
    def embedder(self):
        """The database's embedder, rebuilt from its manifest (to embed queries)."""
        if self._embedder is None:
            self._embedder = make_embedder(self.manifest["embedder"])
        return self._embedder

    def embed(self, chunks: Tensor) -> Tensor:
        """Keys (n, d) float32 of query chunks (n, m) of token ids."""
        chunks = torch.as_tensor(chunks)
        if chunks.dim() != 2 or chunks.shape[1] != self.chunk:
            raise ValueError(
                f"query chunks must have shape (n, {self.chunk}), got {tuple(chunks.shape)}"
            )
        return self.embedder(chunks)

    def continuation(self, ids: np.ndarray) -> np.ndarray:
        """F of chunks ``ids`` (any shape): the next chunk of the same document, PAD at a
        document's end; PAD for id -1. Shape ids.shape + (m,)."""
        ids = np.asarray(ids)
        flat = ids.reshape(-1)
        nxt = flat + 1
        ok = (flat >= 0) & (nxt < len(self))
        ok[ok] &= np.asarray(self.docs[nxt[ok]]) == np.asarray(self.docs[flat[ok]])
        out = np.full((len(flat), self.chunk), PAD, dtype=np.uint16)
        out[ok] = self.tokens[nxt[ok]]
        return out.reshape(*ids.shape, self.chunk)

    def neighbours(self, ids: Tensor | np.ndarray) -> Tensor:
        """The values [N, F] of chunks ``ids`` (q, k) (-1: none, all PAD): (q, k, 2m)
        int64 token ids."""
        ids = np.asarray(ids.cpu() if isinstance(ids, Tensor) else ids)
        chunks = np.full((*ids.shape, self.chunk), PAD, dtype=np.uint16)
        chunks[ids >= 0] = self.tokens[ids[ids >= 0]]
        both = np.concatenate([chunks, self.continuation(ids)], axis=-1)
        return torch.from_numpy(both.astype(np.int64))

    # ------------------------------------------------------------------ search

    def _float_keys(self) -> Tensor:
        if self._keys32 is None:
            self._keys32 = torch.from_numpy(np.asarray(self.keys, dtype=np.float32))
        return self._keys32

    def search(
        self,
        queries: Tensor,
        k: int,
        *,
        exclude_docs: Tensor | None = None,
        exclude_ids: Tensor | None = None,
        index: str = "exact",
        batch: int = 256,
    ) -> tuple[Tensor, Tensor]:
        """Top-``k`` chunks by inner product for query keys (q, d): (scores (q, k), ids
        (q, k)), best first; id -1 (score -inf) where fewer than k chunks qualify.
        ``exclude_docs`` (q,): no neighbour from that document (training);
        ``exclude_ids`` (q,): not that chunk (a query that is a database chunk).
        ``index``: ``exact`` (torch), or a faiss index ``flat``/``ivf``/``hnsw``."""
        queries = torch.as_tensor(queries, dtype=torch.float32)
        if queries.dim() != 2 or queries.shape[1] != self.keys.shape[1]:
            raise ValueError(
                f"queries must have shape (q, {self.keys.shape[1]}), got {tuple(queries.shape)}"
            )
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if index not in INDEXES:
            raise ValueError(f"unknown index {index!r}; choose from {INDEXES}")
        excluding = exclude_docs is not None or exclude_ids is not None
        if index == "exact" and not excluding:
            return self._search_exact(queries, k, None, None, batch)
        # over-fetch without exclusions, drop the excluded, answer the rest exactly
        fetch = min(len(self), 4 * k + 64 if excluding else k)
        if index == "exact":
            scores, ids = self._search_exact(queries, fetch, None, None, batch)
        else:
            found = self.faiss_index(index).search(queries.numpy(), fetch)
            scores, ids = torch.from_numpy(found[0]), torch.from_numpy(found[1]).long()
        return self._keep(queries, scores, ids, k, exclude_docs, exclude_ids, batch)

    def _search_exact(self, queries, k, exclude_docs, exclude_ids, batch):
        keys = self._float_keys()
        docs = torch.from_numpy(np.asarray(self.docs, dtype=np.int64))
        scores_out, ids_out = [], []
        for a in range(0, len(queries), batch):
            q = queries[a : a + batch]
            best = torch.full((len(q), k), -math.inf)
            best_ids = torch.full((len(q), k), -1, dtype=torch.long)
            for b in range(0, len(keys), KEY_BLOCK):
                s = q @ keys[b : b + KEY_BLOCK].T  # (qb, kb)
                key_ids = torch.arange(b, b + s.shape[1])
                if exclude_docs is not None:
                    same = docs[b : b + s.shape[1]][None, :] == exclude_docs[a : a + batch, None]
                    s = s.masked_fill(same, -math.inf)
                if exclude_ids is not None:
                    own = key_ids[None, :] == exclude_ids[a : a + batch, None]
                    s = s.masked_fill(own, -math.inf)
                top = s.topk(min(k, s.shape[1]), dim=1)
                merged = torch.cat([best, top.values], dim=1)
                merged_ids = torch.cat([best_ids, key_ids[top.indices]], dim=1)
                keep = merged.topk(k, dim=1)
                best, best_ids = keep.values, merged_ids.gather(1, keep.indices)
            best_ids = best_ids.masked_fill(torch.isneginf(best), -1)
            scores_out.append(best)
            ids_out.append(best_ids)
        return torch.cat(scores_out), torch.cat(ids_out)

    def faiss_index(self, kind: str):
        """The faiss index ``kind`` (flat, ivf, hnsw) over the keys, built on first use."""
        if kind not in self._indexes:
            from ..nn.retrieval import ivf_lists, ivf_probes, require_faiss

            faiss = require_faiss(f"retro search with index {kind!r}", "use index 'exact'")
            keys = self._float_keys().numpy()
            d = keys.shape[1]
            if kind == "flat":
                built = faiss.IndexFlatIP(d)
            elif kind == "ivf":
                lists = ivf_lists(len(keys))
                built = faiss.IndexIVFFlat(
                    faiss.IndexFlatIP(d), d, lists, faiss.METRIC_INNER_PRODUCT
                )
                built.cp.seed = 0
                built.train(keys)
                built.nprobe = ivf_probes(lists)
            else:
                built = faiss.IndexHNSWFlat(d, HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
                built.hnsw.efSearch = HNSW_EF_SEARCH
            built.add(keys)
            self._indexes[kind] = built
        return self._indexes[kind]

    def _keep(self, queries, scores, ids, k, exclude_docs, exclude_ids, batch):
        """The best k of fetched candidates (q, f) that are not excluded; a query left
        with fewer than k (a database smaller than k, or many excluded) is searched
        again exactly, with its exclusions."""
        bad = ids < 0
        if exclude_docs is not None:
            docs = torch.from_numpy(np.asarray(self.docs, dtype=np.int64))
            bad |= (docs[ids.clamp(min=0)] == exclude_docs[:, None]) & ~bad
        if exclude_ids is not None:
            bad |= ids == exclude_ids[:, None]
        scores = scores.masked_fill(bad, -math.inf)
        order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
        scores = scores.gather(1, order)
        ids = ids.gather(1, order).masked_fill(torch.isneginf(scores), -1)
        if scores.shape[1] < k:  # a database smaller than k
            pad = k - scores.shape[1]
            scores = torch.cat([scores, scores.new_full((len(scores), pad), -math.inf)], 1)
            ids = torch.cat([ids, ids.new_full((len(ids), pad), -1)], 1)
        short = (ids < 0).any(dim=1).nonzero().flatten()
        if len(short):
            redo = self._search_exact(
                queries[short], k,
                None if exclude_docs is None else exclude_docs[short],
                None if exclude_ids is None else exclude_ids[short], batch,
            )  # fmt: skip
            scores[short], ids[short] = redo
        return scores, ids

    def recall(self, kind: str, queries: Tensor, k: int) -> float:
        """The share of the exact top-k chunks that index ``kind`` finds for ``queries``."""
        from ..nn.retrieval import recall_at_k

        found = self.search(queries, k, index=kind)[1]
        hits, total = recall_at_k(found, self.search(queries, k)[1])
        return hits / max(total, 1)

    def retrieve(
        self,
        chunks: Tensor,
        k: int,
        *,
        docs: Tensor | None = None,
        exclude_ids: Tensor | None = None,
        index: str = "exact",
    ) -> Tensor:
        """The k neighbours [N, F] (q, k, 2m) of query chunks (q, m): embedded, searched
        (``docs``: the queries' documents, excluded), and looked up."""
        keys = self.embed(chunks)
        _, ids = self.search(keys, k, exclude_docs=docs, exclude_ids=exclude_ids, index=index)
        return self.neighbours(ids)

    def sequence_neighbours(
        self,
        x: Tensor,
        k: int,
        *,
        exclude_docs: Tensor | None = None,
        index: str = "exact",
    ) -> Tensor:
        """The k neighbours [N, F] (B, l, k, 2m) of the l complete chunks of sequences
        x (B, N) (chunks aligned to the sequences' starts); ``exclude_docs`` (B * l,):
        a document excluded per chunk (see :meth:`search`)."""
        m = self.chunk
        B, chunks = x.shape[0], x.shape[1] // m
        queries = x[:, : chunks * m].reshape(B * chunks, m)
        ids = self.search(self.embed(queries), k, exclude_docs=exclude_docs, index=index)[1]
        return self.neighbours(ids.view(B, chunks, k))

    def retriever(self, k: int, *, index: str = "exact"):
        """A RETRO model's retriever for decoding and generation (``generate(...,
        retriever=db.retriever(k))``): chunk ids (B, m) -> neighbours [N, F] (B, k, 2m)."""

        def retrieve(chunks: Tensor) -> Tensor:
            return self.retrieve(chunks.cpu(), k, index=index).to(chunks.device)

        return retrieve

    def info(self) -> dict[str, Any]:
        """The manifest plus sizes, for ``longctx retro info``."""
        size = sum(self.manifest["files"][name]["bytes"] for name in FILES)
        return {**self.manifest, "path": str(self.path), "bytes": size}
