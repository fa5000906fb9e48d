"""RETROfit (Borgeaud et al., section 4.2): a trained decoder gains retrieval by training
only freshly initialised encoder and chunked cross-attention weights on top of its frozen
weights. With retrieval off, the result is exactly the base model."""

from __future__ import annotations

from pathlib import Path

from ..model import DecoderLM
from ..model.checkpoint import load_frozen_base
from ..nn.retro import is_retrieval_weight


def retrofit(model: DecoderLM, base: str | Path) -> list[str]:
    """Load the base run's (or checkpoint's) weights into ``model``'s decoder and freeze
    them; returns the names of the weights left to train (the retrieval layers'). The
    base must be the same decoder (every key of [model] but ``retro`` equal)."""
    return load_frozen_base(model, base, "model.retro.base", is_retrieval_weight)
