"""Training loop, run configs and checkpoints of runs."""

from .config import RunConfig, TrainConfig, resolve_config
from .loop import TrainResult, prepare_run, train

__all__ = ["RunConfig", "TrainConfig", "TrainResult", "prepare_run", "resolve_config", "train"]
