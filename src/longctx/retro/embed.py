"""Frozen chunk embedders of the RETRO database: a chunk of token ids -> a unit vector.

RETRO (Borgeaud et al., arXiv 2112.04426) keys its database with a frozen BERT averaged
over each chunk's tokens. Nothing is downloaded here, so the embedders are:

- ``sketch`` (default): a count sketch of the chunk's byte n-grams. Each n-gram is hashed
  to one of ``buckets`` fixed random rows of a ``dim``-wide table (seeded), the rows are
  summed and the sum is L2-normalised. Lexical, deterministic, no training.
- ``model``: a frozen longctx checkpoint's hidden states after its middle block, averaged
  over the chunk's tokens and L2-normalised (closest in spirit to the frozen BERT).

Both are described by a JSON-able ``spec`` that the database records in its manifest,
and rebuilt from it (:func:`make_embedder`) to embed queries the same way.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.tokenizer import PAD

EMBEDDERS = ("sketch", "model")
_PRIME = 2147483647  # 2^31 - 1: n-gram ids are reduced modulo it, then mixed


class SketchEmbedder:
    """Hashed byte n-grams summed into a fixed random ``dim``-wide space (module doc)."""

    def __init__(self, dim: int = 128, ngram: int = 4, buckets: int = 65536, seed: int = 0):
        for name, value in (("dim", dim), ("ngram", ngram), ("buckets", buckets)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"sketch embedder: {name} must be an integer >= 1, got {value!r}")
        self.dim, self.ngram, self.buckets, self.seed = dim, ngram, buckets, seed
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(buckets, dim, generator=g) / math.sqrt(dim)

    @property
    def spec(self) -> dict:
        return {"kind": "sketch", "dim": self.dim, "ngram": self.ngram,
                "buckets": self.buckets, "seed": self.seed}  # fmt: skip

    def __call__(self, chunks: Tensor) -> Tensor:
        """(n, m) token ids (PAD = absent) -> (n, dim) float32 unit vectors (zero for a
        chunk shorter than one n-gram)."""
        chunks = chunks.long()
        n, m = chunks.shape
        g = self.ngram
        if m < g:
            return torch.zeros(n, self.dim)
        grams = torch.zeros(n, m - g + 1, dtype=torch.long)
        for i in range(g):  # base-512 digits: ids < 512, g <= 7 keeps it inside int64
            grams = grams * 512 + chunks[:, i : m - g + 1 + i]
        valid = (chunks != PAD).unfold(1, g, 1).all(-1)  # (n, m - g + 1)
        bucket = ((grams % _PRIME) * 48271 % _PRIME) % self.buckets
        out = F.embedding_bag(
            bucket, self.table, per_sample_weights=valid.float(), mode="sum"
        )  # (n, dim)
        return F.normalize(out, dim=-1)


class ModelEmbedder:
    """Mean-pooled hidden states of a frozen longctx checkpoint (module doc):
    ``checkpoint`` a checkpoint directory or a run directory (its latest checkpoint),
    ``layer`` the block whose output is pooled (default the middle one)."""

    def __init__(self, checkpoint: str | Path, layer: int | None = None, batch: int = 256):
        from ..model import latest_checkpoint, load_model

        path = Path(checkpoint).expanduser().resolve()
        if (path / "checkpoints").is_dir():  # a run directory: its latest checkpoint
            path = latest_checkpoint(path / "checkpoints")
        if not path.is_dir():
            raise ValueError(f"the model embedder's checkpoint {path} does not exist")
        self.checkpoint = str(path)
        self.model, _ = load_model(path)
        self.model.eval().requires_grad_(False)
        n_layers = len(self.model.blocks)
        self.layer = n_layers // 2 if layer is None else layer
        if not 0 <= self.layer < n_layers:
            raise ValueError(f"model embedder: layer must be in [0, {n_layers - 1}]")
        self.dim = self.model.cfg.d_model
        self.batch = batch

    @property
    def spec(self) -> dict:
        return {"kind": "model", "checkpoint": self.checkpoint, "layer": self.layer,
                "dim": self.dim}  # fmt: skip

    def __call__(self, chunks: Tensor) -> Tensor:
        """(n, m) token ids -> (n, d_model) float32 unit vectors."""
        chunks = chunks.long()
        captured = []
        hook = self.model.blocks[self.layer].register_forward_hook(
            lambda _m, _i, out: captured.append(out)
        )
        outs = []
        try:
            with torch.no_grad():
                for a in range(0, len(chunks), self.batch):
                    part = chunks[a : a + self.batch]
                    captured.clear()
                    self.model.hidden_states(part)
                    h = captured[0].float()  # (b, m, d)
                    keep = (part != PAD).unsqueeze(-1).float()
                    mean = (h * keep).sum(1) / keep.sum(1).clamp_min(1)
                    outs.append(F.normalize(mean, dim=-1))
        finally:
            hook.remove()
        return torch.cat(outs) if outs else torch.zeros(0, self.dim)


def make_embedder(spec: str | dict, checkpoint: str | Path | None = None):
    """An embedder from a name (``sketch``, or ``model`` with ``checkpoint``: a
    checkpoint directory) or from the ``spec`` a database recorded."""
    if isinstance(spec, str):
        spec = {"kind": spec}
        if checkpoint is not None:
            spec["checkpoint"] = str(checkpoint)
    kind = spec.get("kind")
    options = {k: v for k, v in spec.items() if k != "kind"}
    if kind == "sketch":
        return SketchEmbedder(**options)
    if kind == "model":
        if "checkpoint" not in options:
            raise ValueError("the model embedder needs a checkpoint (--embedder-checkpoint)")
        options.pop("dim", None)
        return ModelEmbedder(**options)
    raise ValueError(f"unknown embedder {kind!r}; choose from {EMBEDDERS}")
