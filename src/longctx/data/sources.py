"""What the training loop draws from: a text corpus or a synthetic task, behind one
interface (:class:`TrainingSource`). Every batch depends only on (seed, index), so a
resumed run draws exactly what an uninterrupted one would."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from .corpus import Corpus, DataConfig, eval_windows, load_corpus, sample_batch
from .tasks import TaskData, task_source

Batch = tuple[Tensor, Tensor]  # (inputs, targets), each (B, N) int64; targets -100: no loss


class TrainingSource(Protocol):
    """Training batches by index, fixed validation batches, and the baseline that a
    model's validation loss is compared with (in ``unit``)."""

    unit: str  # of validation losses: "bits/byte" or "bits/target token"
    baseline_name: str  # what ``baseline`` is
    baseline: float
    val_batches: list[Batch]

    def batch(self, index: int) -> Batch:
        """The training batch of ``index``: (inputs, targets)."""
        ...


class CorpusSource(TrainingSource):
    """Random windows of a text corpus; validation: evenly spread windows of its
    validation split. Baseline: the unigram cross-entropy."""

    unit = "bits/byte"
    baseline_name = "unigram baseline"

    def __init__(self, corpus: Corpus, batch: int, context: int, seed: int, eval_windows_: int):
        self.corpus, self.size, self.context, self.seed = corpus, batch, context, seed
        windows = eval_windows(corpus.val, context, eval_windows_)  # each (N + 1,)
        self.val_batches = [
            (w[:, :-1], w[:, 1:])
            for w in (torch.stack(windows[i : i + batch]) for i in range(0, len(windows), batch))
        ]
        self.baseline = corpus.unigram_bits_per_token()

    def batch(self, index: int) -> Batch:
        return sample_batch(self.corpus.train, self.size, self.context, self.seed, index)


class TaskSource(TrainingSource):
    """Synthetic task sequences (:class:`~longctx.data.tasks.TaskData`); the loss is on
    the task's targets only. Baseline: the no-retrieval chance."""

    unit = "bits/target token"
    baseline_name = "no-retrieval chance"

    def __init__(self, data: TaskData, batch: int, context: int, seed: int, eval_windows_: int):
        self.data, self.size, self.context, self.seed = data, batch, context, seed
        n_val = max(1, -(-eval_windows_ // batch))
        self.val_batches = [data.batch(batch, context, seed, i, "val") for i in range(n_val)]
        self.baseline = data.chance_bits(context)

    def batch(self, index: int) -> Batch:
        return self.data.batch(self.size, self.context, self.seed, index)


def training_source(
    cfg: DataConfig,
    *,
    batch: int,
    context: int,
    seed: int,
    eval_windows: int,
    corpus: Corpus | None = None,
) -> TrainingSource:
    """The source ``cfg`` names (``data.source``: a corpus, or ``task:<name>``)."""
    task = task_source(cfg.source)
    if task is None:
        return CorpusSource(corpus or load_corpus(cfg), batch, context, seed, eval_windows)
    return TaskSource(TaskData.from_config(task, cfg), batch, context, seed, eval_windows)


__all__ = ["Batch", "CorpusSource", "TaskSource", "TrainingSource", "training_source"]
