"""RETRO (Borgeaud et al., "Improving language models by retrieving from trillions of
tokens", arXiv 2112.04426): the retrieval database over document-aligned chunks, its
frozen embedders and exact search, the chunk-overlap measure of its leakage
analysis, and which tokens could be copied from the neighbours read."""

from .db import DatabaseError, RetroDB, document_chunks
from .embed import EMBEDDERS, ModelEmbedder, SketchEmbedder, make_embedder
from .overlap import chunk_overlap, copyable, longest_common_run

__all__ = [
    "EMBEDDERS",
    "DatabaseError",
    "ModelEmbedder",
    "RetroDB",
    "SketchEmbedder",
    "chunk_overlap",
    "copyable",
    "document_chunks",
    "longest_common_run",
    "make_embedder",
]
