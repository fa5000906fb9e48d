"""RETROfit (Borgeaud et al., section 4.2): a trained decoder gains retrieval by training
only freshly initialised encoder and chunked cross-attention weights on top of its frozen
weights. With retrieval off, the result is exactly the base model."""

from __future__ import annotations

from pathlib import Path

from ..model import DecoderLM, latest_checkpoint, load_model
from ..nn.retro import is_retrieval_weight


def retrofit(model: DecoderLM, base: str | Path) -> list[str]:
    """Load the base run's (or checkpoint's) weights into ``model``'s decoder and freeze
    them; returns the names of the weights left to train (the retrieval layers'). The
    base must be the same decoder (every key of [model] but ``retro`` equal)."""
    path = Path(base).expanduser()
    if (path / "checkpoints").is_dir():
        path = latest_checkpoint(path / "checkpoints")
    if not path.is_dir():
        raise ValueError(f"model.retro.base {base} is not a run or checkpoint directory")
    frozen, _ = load_model(path)
    ours = {k: v for k, v in model.cfg.to_dict().items() if k != "retro"}
    theirs = {k: v for k, v in frozen.cfg.to_dict().items() if k != "retro"}
    if ours != theirs:
        diff = sorted(k for k in ours if ours[k] != theirs.get(k))
        raise ValueError(
            f"model.retro.base {path} is another decoder (model.{diff[0]} differs); RETROfit "
            "adds retrieval to the same decoder"
        )
    missing, unexpected = model.load_state_dict(frozen.state_dict(), strict=False)
    if unexpected or any(not is_retrieval_weight(name) for name in missing):
        raise ValueError(f"model.retro.base {path} does not fit this decoder's weights")
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(is_retrieval_weight(name))
        if p.requires_grad:
            trainable.append(name)
    return trainable
