"""Tokenizer, corpora and batches. Never imports the model."""

from .corpus import Corpus, DataConfig, load_corpus
from .tokenizer import BOS, EOD, PAD, VOCAB_SIZE, decode, encode

__all__ = [
    "BOS",
    "EOD",
    "PAD",
    "VOCAB_SIZE",
    "Corpus",
    "DataConfig",
    "decode",
    "encode",
    "load_corpus",
]
