"""What a comparison trains: its presets in order, each with the overrides that put it on
the comparison's common ground (one data source, one seed, one time budget with the
learning-rate decay fitted to it), and what it needs from the others (a RETRO database
built from the same data; for LongMem, the comparison's own dense run as its backbone).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import load_preset, preset_names

# dense, sliding window, dilated (LongNet), CoLT5, Focused-Transformer memory, RETRO,
# LongMem, linear attention, retention: d_model 192, 4 layers, context 512 each
DEFAULT_PRESETS = (
    "tiny",
    "tiny-sliding",
    "tiny-dilated",
    "tiny-colt5",
    "tiny-memory",
    "retro-tiny",
    "longmem-tiny",
    "tiny-linear",
    "tiny-retention",
)
BACKBONE = "tiny"  # the preset whose run is a LongMem entry's frozen backbone
NO_STEP_LIMIT = 10_000_000  # the time budget stops a comparison run, not a step count
RUNS = "runs"  # the run directories, under the comparison's folder


@dataclasses.dataclass(frozen=True)
class Settings:
    """A comparison's common ground (``minutes``, ``data``, ``seed``: what a finished
    run must share to be reused) and how every run is measured."""

    minutes: float = 6.0  # training budget per preset (wall clock)
    data: str = "stdlib"  # data.source of every run
    seed: int = 0
    windows: int = 32  # validation windows per context for bits per byte
    lengths: tuple[int, ...] = (1024, 4096, 16384)  # kv-retrieval context lengths
    trials: int = 10  # kv-retrieval trials per (length, depth) cell
    decode_context: int = 16384  # decoding is timed after a prompt of this many tokens
    decode_tokens: int = 8
    # more --set overrides for every preset (e.g. a smaller model for a quick look)
    overrides: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.minutes > 0:
            raise ValueError(f"--minutes must be > 0, got {self.minutes}")
        for name in ("windows", "trials", "decode_context", "decode_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.decode_tokens < 2:
            raise ValueError("decode_tokens must be >= 2 (the first comes from the prefill)")
        if not self.lengths or min(self.lengths) < 64:
            raise ValueError(f"kv-retrieval lengths must be >= 64, got {self.lengths}")

    def training(self) -> dict:
        """The settings a trained run must match to be reused."""
        return {
            "minutes": self.minutes,
            "data": self.data,
            "seed": self.seed,
            "overrides": list(self.overrides),
        }

    def to_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "lengths": list(self.lengths),
            "overrides": list(self.overrides),
        }


@dataclasses.dataclass(frozen=True)
class Entry:
    """One preset of a comparison: its run directory, the ``--set`` overrides of its
    training, and what it needs (a RETRO database, built under the comparison's folder;
    the entry whose run is its backbone)."""

    name: str
    run_dir: Path
    overrides: tuple[str, ...]
    db: Path | None = None  # a RETRO database of the comparison's data, chunk db_chunk
    db_chunk: int = 0
    backbone: str | None = None
    added: bool = False  # not asked for: another entry needs it


def parse_presets(text: str | None) -> list[str]:
    """``--presets a,b,...`` (None: the default list); a clear error for unknown or
    repeated names."""
    if text is None:
        return list(DEFAULT_PRESETS)
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise ValueError("--presets is empty; give comma-separated preset names")
    valid = preset_names()
    unknown = [p for p in names if p not in valid]
    if unknown:
        raise ValueError(
            f"unknown preset(s) {', '.join(unknown)}; valid presets: {', '.join(valid)}"
        )
    repeated = sorted({p for p in names if names.count(p) > 1})
    if repeated:
        raise ValueError(f"preset(s) named more than once: {', '.join(repeated)}")
    return names


def plan(presets: list[str], settings: Settings, out: Path) -> list[Entry]:
    """The entries of a comparison in training order. A LongMem preset's backbone is the
    comparison's ``tiny`` run, trained first (added to the list when it is missing)."""
    tables = {name: load_preset(name) for name in presets}
    longmem = [n for n in presets if _is_longmem(tables[n])]
    order = list(presets)
    added = set()
    if longmem and BACKBONE not in order:
        order.insert(0, BACKBONE)
        added.add(BACKBONE)
    elif longmem and order.index(BACKBONE) > min(order.index(n) for n in longmem):
        order.remove(BACKBONE)
        order.insert(0, BACKBONE)
    entries = []
    for name in order:
        table = tables.get(name) or load_preset(name)
        run_dir = out / RUNS / name
        common = [
            f"data.source={settings.data}",
            f"train.seed={settings.seed}",
            f"train.max_minutes={settings.minutes}",
            "train.schedule=time",
            f"train.max_steps={NO_STEP_LIMIT}",
            "train.eval_every=0",
        ]
        model = table.get("model", {})
        db, chunk, backbone = None, 0, None
        if (model.get("retro") or {}).get("layers"):
            chunk = int(model["retro"].get("chunk", 64))
            db = out / f"retro-db-{chunk}"
            common.append(f"data.retro_db={db}")
        if _is_longmem(table):
            backbone = BACKBONE
            common.append(f"model.longmem.backbone={out / RUNS / BACKBONE}")
        common += settings.overrides
        entries.append(Entry(name, run_dir, tuple(common), db, chunk, backbone, name in added))
    return entries


def _is_longmem(table: dict) -> bool:
    return bool((table.get("model", {}).get("longmem") or {}).get("side_layers"))


__all__ = ["DEFAULT_PRESETS", "Entry", "Settings", "parse_presets", "plan"]
