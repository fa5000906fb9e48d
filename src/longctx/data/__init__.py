"""Tokenizer, corpora, synthetic tasks and the training sources built on them. Never
imports the model."""

from .corpus import Corpus, DataConfig, eval_windows, load_corpus, sample_batch
from .sources import CorpusSource, TaskSource, TrainingSource, training_source
from .stream import CorpusStream, TaskStream, stream_source
from .tasks import TASKS, Example, TaskData, make_example, task_source
from .tokenizer import BOS, EOD, PAD, VOCAB_SIZE, decode, encode

__all__ = [
    "BOS",
    "EOD",
    "PAD",
    "TASKS",
    "VOCAB_SIZE",
    "Corpus",
    "CorpusSource",
    "CorpusStream",
    "DataConfig",
    "Example",
    "TaskData",
    "TaskSource",
    "TaskStream",
    "TrainingSource",
    "decode",
    "encode",
    "eval_windows",
    "load_corpus",
    "make_example",
    "sample_batch",
    "stream_source",
    "task_source",
    "training_source",
]
