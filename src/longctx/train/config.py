"""The run config: [model], [train] and [data] sections, from a preset, a TOML file and
``--set section.key=value`` overrides, validated when built."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from ..config import (
    FORMAT_VERSION,
    apply_overrides,
    check_format_version,
    from_dict,
    load_preset,
    load_toml,
    to_dict,
)
from ..data import VOCAB_SIZE, DataConfig, task_source
from ..model import ModelConfig

DEFAULT_PRESET = "tiny"


@dataclass
class CrossbatchConfig:
    """Crossbatch training of memory layers (Focused Transformer): in each window, memory
    layers also attend to the previous window of ``negatives`` other batch rows. The
    count stays at ``start`` for ``delay_steps`` steps, then grows linearly to
    ``negatives`` over ``ramp_steps`` steps (FoT's schedule: start small, then raise it;
    the delay lets retrieval form before distractors arrive). negatives = 0: off."""

    negatives: int = 0
    start: int = 0
    ramp_steps: int = 0
    delay_steps: int = 0

    def __post_init__(self):
        for name in ("negatives", "start", "ramp_steps", "delay_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.crossbatch.{name} must be >= 0, got {getattr(self, name)}")
        if self.start > self.negatives:
            raise ValueError(
                f"train.crossbatch.start ({self.start}) must be <= negatives ({self.negatives})"
            )

    def at(self, step: int) -> int | None:
        """Negatives at a step, or None when crossbatch is off."""
        if self.negatives == 0:
            return None
        step -= self.delay_steps
        if step < 0:
            return self.start
        if self.ramp_steps == 0 or step >= self.ramp_steps:
            return self.negatives
        return self.start + (self.negatives - self.start) * step // self.ramp_steps


SCHEDULES = ("steps", "time")


@dataclass
class TrainConfig:
    """The ``[train]`` table: optimisation, limits, evaluation and checkpoints."""

    context: int = 512  # tokens per training sequence
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 1000
    max_tokens: int = 0  # 0 = no limit
    # 0 = no limit; else the run's training time (wall clock), counted across resumes
    max_minutes: float = 0.0
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    # what the cosine decay spans after warmup: "steps" (max_steps) or "time"
    # (max_minutes of training: a run with a time budget decays within it)
    schedule: str = "steps"
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    bf16: bool | None = None  # bfloat16 autocast; None: on for CUDA, off for the CPU
    seed: int = 0
    log_every: int = 10
    eval_every: int = 250  # 0 = only at the end
    eval_windows: int = 64  # validation windows per periodic evaluation
    save_every: int = 250
    keep_checkpoints: int = 2
    threads: int = 0  # 0 = torch's default
    # "layer": recompute each block in backward (memory for compute; "off" keeps all)
    activation_checkpointing: str = "off"
    # tokens per slice of the per-token work (norms, projections, FFN, LM head and loss),
    # each recomputed in backward; 0 = one slice
    token_chunk: int = 0
    crossbatch: CrossbatchConfig = field(default_factory=CrossbatchConfig)

    def __post_init__(self):
        positive = (
            "context",
            "batch_size",
            "grad_accum",
            "max_steps",
            "log_every",
            "eval_windows",
            "save_every",
            "keep_checkpoints",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "max_tokens",
            "max_minutes",
            "warmup_steps",
            "weight_decay",
            "grad_clip",
            "eval_every",
            "threads",
            "token_chunk",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.activation_checkpointing not in ("off", "layer"):
            raise ValueError(
                "train.activation_checkpointing must be 'off' or 'layer', got "
                f"{self.activation_checkpointing!r}"
            )
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.schedule == "time" and not self.max_minutes:
            raise ValueError("train.schedule = 'time' needs train.max_minutes > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")


@dataclass
class RunConfig:
    """A run's whole config: ``[model]``, ``[train]`` and ``[data]``. Its file form
    (``config.json``) also records the format version."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self):
        if self.model.vocab_size < VOCAB_SIZE:
            raise ValueError(
                f"model.vocab_size must be >= {VOCAB_SIZE} (256 bytes + specials), "
                f"got {self.model.vocab_size}"
            )
        cb = self.train.crossbatch
        if cb.negatives and self.model.attention.kind != "memory":
            raise ValueError(
                "train.crossbatch needs a model with memory layers ([model.attention] kind = "
                f"'memory'), got {self.model.attention.kind!r} attention"
            )
        if task_source(self.data.source) and not self.data.task_window < self.train.context:
            raise ValueError(
                f"data.task_window ({self.data.task_window}) must be smaller than "
                f"train.context ({self.train.context}): questions about records beyond the "
                "window need a longer sequence"
            )
        if cb.negatives >= self.train.batch_size:
            raise ValueError(
                f"train.crossbatch.negatives ({cb.negatives}) must be < train.batch_size "
                f"({self.train.batch_size}): negatives are other rows of the batch"
            )

    @classmethod
    def from_dict(cls, data: dict, where: str = "") -> RunConfig:
        """From a run config's table (any format version this longctx reads)."""
        if not isinstance(data, dict):
            raise ValueError(f"the config must be a table of keys, got {data!r}")
        data = dict(data)
        version = check_format_version(data.pop("format_version", 1), "the config")
        if version == 1:  # the task's local window was the model's memory window
            model, source = data.get("model", {}), data.get("data", {})
            if isinstance(model, dict) and isinstance(source, dict) and "memory_window" in model:
                data["data"] = {"task_window": model["memory_window"], **source}
        return from_dict(cls, data, where)

    def to_dict(self) -> dict:
        """The config as written to ``config.json`` (with its format version)."""
        return {"format_version": FORMAT_VERSION, **to_dict(self)}


def resolve_config(
    preset: str | None = None, config_file: Path | None = None, overrides: list[str] = ()
) -> RunConfig:
    """Preset (default 'tiny', unless a config file is given), then the file, then --set.
    With ``model.longmem.backbone`` set, ``[model]`` is the backbone's (and the
    ``[model.longmem]`` keys)."""
    data: dict = {}
    if preset is not None or config_file is None:
        data = copy.deepcopy(load_preset(preset or DEFAULT_PRESET))
    if config_file is not None:
        _deep_update(data, load_toml(config_file))
    apply_overrides(data, list(overrides))
    model = data.get("model")
    longmem = model.get("longmem") if isinstance(model, dict) else None
    if isinstance(longmem, dict) and longmem.get("backbone"):  # the backbone's [model]
        from ..model.longmem import adopt_backbone

        data["model"] = adopt_backbone(model)
    return RunConfig.from_dict(data)


def _deep_update(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
