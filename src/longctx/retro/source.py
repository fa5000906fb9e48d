"""Training batches with RETRO neighbours: a corpus source whose every batch also carries
each sequence's retrieved neighbours from a database built from the same corpus."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..data.corpus import sample_windows
from ..data.sources import CorpusSource
from ..data.tokenizer import EOD
from .db import DatabaseError, RetroDB


class RetroSource:
    """Batches (inputs, targets, neighbours (B, l, k, 2m)) for a RETRO model: the
    sequence's complete chunks of m tokens (aligned to its start) are embedded and
    searched in ``db``. In training, no neighbour comes from the document of the text
    that chunk's neighbours help predict (the next chunk's: the paper's rule, so that a
    neighbour's continuation cannot hold the target); validation text is not in the
    database. Validation batches get their neighbours once, here."""

    unit = "bits/byte"
    baseline_name = "unigram baseline"

    def __init__(self, base: CorpusSource, db: RetroDB, k: int, index: str = "exact"):
        self.base, self.db, self.k, self.index = base, db, k, index
        self.ends = np.flatnonzero(base.corpus.train == EOD)  # document boundaries
        self.baseline = base.baseline
        self.val_batches = [(x, y, self.neighbours(x)) for x, y in base.val_batches]

    def batch(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        b = self.base
        rows, starts = sample_windows(b.corpus.train, b.size, b.context, b.seed, index)
        x = rows[:, :-1]
        return x, rows[:, 1:], self.neighbours(x, starts)

    def neighbours(self, x: Tensor, starts: np.ndarray | None = None) -> Tensor:
        """Neighbours (B, l, k, 2m) of the complete chunks of sequences x (B, N) that start
        at ``starts`` in the training split (None: not training text, nothing excluded)."""
        m = self.db.chunk
        docs = None
        if starts is not None:
            nxt = starts[:, None] + (np.arange(x.shape[1] // m) + 1) * m  # next chunks' starts
            docs = torch.from_numpy(np.searchsorted(self.ends, nxt.reshape(-1), "left"))
        return self.db.sequence_neighbours(x, self.k, exclude_docs=docs, index=self.index)


def retro_source(source, cfg) -> RetroSource:
    """The RETRO source of a run config whose ``data.retro_db`` names a database:
    checked against the model (chunk size, retrieval layers) and the corpus it was built
    from (the same training split)."""
    if not isinstance(source, CorpusSource):
        raise ValueError("data.retro_db needs a text corpus (data.source), not a task")
    if not cfg.model.retro.enabled:
        raise ValueError(
            "data.retro_db is set but the model has no retrieval layers (model.retro.layers)"
        )
    db = RetroDB.open(cfg.data.retro_db)
    db.check_compatible(chunk=cfg.model.retro.chunk)
    built = db.manifest["source"]
    for key in ("source", "val_percent", "max_bytes"):
        if built.get(key) != getattr(cfg.data, key):
            raise DatabaseError(
                f"retro database {db.path} was built with data.{key} = {built.get(key)!r}; "
                f"this run has {getattr(cfg.data, key)!r} (build it from the same corpus)"
            )
    return RetroSource(source, db, cfg.model.retro.neighbours)
