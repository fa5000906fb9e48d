"""Rows that continue their documents from batch to batch (Transformer-XL's batching,
which LongMem trains with): row j of batch i is the i-th window of ``context`` tokens of
stream j, so a model that keeps a state per row from step to step (a memory bank) holds
the past of the document each row is reading.

- A corpus: the training split is cut into ``batch`` contiguous streams (documents
  shorter than ``min_document`` tokens left out), each starting at a seed-dependent
  offset; a stream that runs out starts again. Documents stay separated by EOD.
- A task (``task:kv-retrieval``): each stream is a sequence of documents of
  ``document`` tokens, an EOD then one training sequence
  (:func:`~longctx.data.tasks.kv_training_example`) each, drawn from (seed, row,
  document number).

Every batch depends only on (seed, index). Validation: whole sequences of ``val_length``
tokens (each starts a state of its own).
"""

from __future__ import annotations

import random

import numpy as np
import torch

from .corpus import Corpus, DataConfig, eval_windows, load_corpus
from .sources import Batch, TrainingSource
from .tasks import TaskData, task_source
from .tokenizer import EOD


def document_spans(tokens: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each document of an EOD-separated stream, its EOD included (a
    last document without one counts too)."""
    ends = (np.flatnonzero(tokens == EOD) + 1).tolist()
    if not ends or ends[-1] < len(tokens):
        ends.append(len(tokens))
    return list(zip([0, *ends[:-1]], ends))


def long_documents(tokens: np.ndarray, min_length: int) -> np.ndarray:
    """The documents of an EOD-separated stream with at least ``min_length`` tokens (EOD
    included), in order (the whole stream when ``min_length`` <= 1)."""
    if min_length <= 1:
        return tokens
    keep = [tokens[a:b] for a, b in document_spans(tokens) if b - a >= min_length]
    if not keep:
        raise ValueError(f"no document of the corpus has {min_length} tokens or more")
    return np.concatenate(keep)


class CorpusStream(TrainingSource):
    """A corpus read as ``batch`` continuing streams (module doc); baseline: the unigram
    cross-entropy."""

    unit = "bits/byte"
    baseline_name = "unigram baseline"

    def __init__(
        self,
        corpus: Corpus,
        batch: int,
        context: int,
        seed: int,
        eval_windows_: int,
        *,
        min_document: int = 0,
        val_length: int = 0,
    ):
        self.corpus, self.size, self.context = corpus, batch, context
        self.tokens = long_documents(corpus.train, min_document)
        part = len(self.tokens) // batch
        if part < context + 1:
            raise ValueError(
                f"{len(self.tokens)} training tokens make {batch} streams of {part} tokens, "
                f"fewer than the context {context} + 1; use fewer rows or more text"
            )
        shift = random.Random(f"stream-{seed}").randrange(part)
        self.starts = [j * part + shift for j in range(batch)]
        self.period = part - context - 1  # a stream starts again after this many tokens
        val = long_documents(corpus.val, min_document)
        windows = eval_windows(val, val_length or context, eval_windows_)
        self.val_batches = [
            (w[:, :-1], w[:, 1:])
            for w in (torch.stack(windows[i : i + batch]) for i in range(0, len(windows), batch))
        ]
        self.baseline = corpus.unigram_bits_per_token()

    def batch(self, index: int) -> Batch:
        offset = (index * self.context) % self.period
        n = len(self.tokens)
        rows = [
            self.tokens[np.arange(s + offset, s + offset + self.context + 1) % n]
            for s in self.starts
        ]
        x = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, context + 1)
        return x[:, :-1], x[:, 1:]


class TaskStream(TrainingSource):
    """Task documents read as ``batch`` continuing streams (module doc); the loss is on
    the task's targets; baseline: the no-retrieval chance."""

    unit = "bits/target token"
    baseline_name = "no-retrieval chance"

    def __init__(
        self,
        data: TaskData,
        batch: int,
        context: int,
        seed: int,
        eval_windows_: int,
        *,
        document: int,
    ):
        if document <= context or document % context:
            raise ValueError(
                f"data.task_document ({document}) must be a multiple of the context "
                f"({context}) and larger: each document spans several training steps"
            )
        self.data, self.size, self.context, self.seed = data, batch, context, seed
        self.document = document
        self._cache: dict[tuple[str, int], tuple[int, list[int], list[int]]] = {}
        n_val = max(1, -(-eval_windows_ // batch))
        self.val_batches = [self._documents("val", i) for i in range(n_val)]
        self.baseline = data.chance_bits(context)

    def _document(self, split: str, row: int, number: int) -> tuple[list[int], list[int]]:
        """Document ``number`` of stream ``row``: (ids, targets), ``document`` each."""
        cached = self._cache.get((split, row))
        if cached is not None and cached[0] == number:
            return cached[1], cached[2]
        rng = random.Random(f"{split}-{self.seed}-{row}-{number}")
        x, y = self.data.example(self.document - 1, rng)
        ids, targets = [EOD, *x], [-100, *y]  # nothing to predict from EOD
        self._cache[(split, row)] = (number, ids, targets)
        return ids, targets

    def _documents(self, split: str, index: int) -> Batch:
        rows = [self._document(split, j, index) for j in range(self.size)]
        return (
            torch.tensor([r[0] for r in rows], dtype=torch.int64),
            torch.tensor([r[1] for r in rows], dtype=torch.int64),
        )

    def batch(self, index: int) -> Batch:
        number, offset = divmod(index * self.context, self.document)
        xs, ys = [], []
        for j in range(self.size):
            ids, targets = self._document("train", j, number)
            xs.append(ids[offset : offset + self.context])
            ys.append(targets[offset : offset + self.context])
        return torch.tensor(xs, dtype=torch.int64), torch.tensor(ys, dtype=torch.int64)


def stream_source(
    cfg: DataConfig,
    *,
    batch: int,
    context: int,
    seed: int,
    eval_windows: int,
    val_length: int,
    corpus: Corpus | None = None,
) -> TrainingSource:
    """The continuing-rows source of ``cfg`` (a corpus, or ``task:<name>`` in documents
    of ``data.task_document`` tokens); validation sequences of ``val_length`` tokens
    (a task: whole documents)."""
    task = task_source(cfg.source)
    if task is None:
        return CorpusStream(
            corpus or load_corpus(cfg),
            batch,
            context,
            seed,
            eval_windows,
            min_document=cfg.min_document,
            val_length=val_length,
        )
    return TaskStream(
        TaskData.from_config(task, cfg),
        batch,
        context,
        seed,
        eval_windows,
        document=cfg.task_document,
    )


__all__ = ["CorpusStream", "TaskStream", "document_spans", "long_documents", "stream_source"]
