"""A LongMem model's backbone (:mod:`longctx.nn.longmem`): any trained longctx run or
checkpoint, whose ``[model]`` table becomes the LongMem model's (with its
``[model.longmem]`` keys), loaded frozen into the model's own layers; the SideNet then
starts as a copy of the backbone's layers."""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import CheckpointError, load_frozen_base, run_checkpoint
from .lm import DecoderLM


def adopt_backbone(model: dict) -> dict:
    """The ``[model]`` table of a LongMem run whose table is ``model`` (with
    ``longmem.backbone`` set): the backbone's own table, with ``model``'s ``longmem``
    keys. The backbone defines the architecture; other keys of ``model`` are ignored."""
    longmem = dict(model.get("longmem") or {})
    path = run_checkpoint(longmem["backbone"], "model.longmem.backbone")
    try:
        table = json.loads((path / "state.json").read_text())["config"]["model"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: no readable model config ({exc})") from None
    if (table.get("longmem") or {}).get("side_layers"):
        raise ValueError(
            f"model.longmem.backbone {path} is itself a LongMem model; the backbone must be a "
            "plain decoder"
        )
    return {**table, "longmem": longmem}


def load_backbone(model: DecoderLM, backbone: str | Path) -> list[str]:
    """Load the backbone's weights into a LongMem ``model``'s frozen layers and start the
    SideNet from them; returns the names of the weights that train (the SideNet's). The
    backbone must be the same decoder (every ``[model]`` key but ``longmem`` equal)."""
    if model.side is None:
        raise ValueError("load_backbone needs a LongMem model (model.longmem.side_layers > 0)")
    trainable = load_frozen_base(
        model, backbone, "model.longmem.backbone", lambda name: name.startswith("side.")
    )
    model.side.init_from(model)
    return trainable


__all__ = ["adopt_backbone", "load_backbone"]
