"""Training: run configs, the training loop in parts, the optimiser, and the parallel
interface (one process by default)."""

from .config import CrossbatchConfig, RunConfig, TrainConfig, resolve_config
from .loop import (
    StepStats,
    Trainer,
    TrainResult,
    load_run_config,
    prepare_run,
    train,
    validation_bits,
)
from .parallel import Parallel, SingleProcess

__all__ = [
    "CrossbatchConfig",
    "Parallel",
    "RunConfig",
    "SingleProcess",
    "StepStats",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "load_run_config",
    "prepare_run",
    "resolve_config",
    "train",
    "validation_bits",
]
