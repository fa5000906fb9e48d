"""Checkpoints: a directory per step holding safetensors files and ``state.json``.

Written atomically: files go to a hidden temporary directory, are flushed to disk, and the
directory is renamed into place, so a crash never leaves a half-written checkpoint under a
real name and never touches earlier ones. ``state.json`` records the sha256 of every
tensor file; loading verifies them and names the checkpoint and file when one is
truncated or corrupt. ``state.json`` also records the format version
(:data:`longctx.config.FORMAT_VERSION`): older checkpoints load (their config is
translated), a newer one is a clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import FORMAT_VERSION, check_format_version
from .config import ModelConfig
from .lm import DecoderLM

STEP_PREFIX = "step-"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated or corrupt."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    ckpt_root: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict
) -> Path:
    """Write ``ckpt_root/step-<step>/`` with one ``<name>.safetensors`` per entry of
    ``tensors`` and ``state.json``; return its path."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / checkpoint_name(step)
    tmp = ckpt_root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    hashes = {}
    for name, group in tensors.items():
        path = tmp / f"{name}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, str(path))
        hashes[path.name] = _sha256(path)
    state = dict(state, format_version=FORMAT_VERSION, step=step, files=hashes)
    with (tmp / "state.json").open("w") as f:
        json.dump(state, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    for path in tmp.iterdir():
        with path.open("rb") as f:
            os.fsync(f.fileno())
    if final.exists():  # re-saving the same step (e.g. Ctrl-C right after a save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not ckpt_root.is_dir():
        return []
    dirs = [p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)]
    return sorted(dirs, key=lambda p: p.name)


def prune_checkpoints(ckpt_root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, and leftovers of killed writers."""
    for old in list_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in ckpt_root.glob(f".tmp-{STEP_PREFIX}*"):  # leftovers of a killed writer
        if not tmp.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(
    path: Path, names: list[str]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Read and verify a checkpoint directory: ({name: tensors}, state)."""
    state_path = path / "state.json"
    try:
        state = json.loads(state_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no state.json (incomplete?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: state.json is corrupt ({exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: state.json is not a table")
    try:
        check_format_version(state.get("format_version", 1), f"checkpoint {path}")
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    files = state.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"checkpoint {path}: state.json lists no tensor files")
    out = {}
    for name in names:
        fname = f"{name}.safetensors"
        fpath = path / fname
        if not fpath.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {fname}")
        if fname not in files or _sha256(fpath) != files[fname]:
            raise CheckpointError(
                f"checkpoint {path}: {fname} is truncated or corrupt (sha256 differs from the "
                "one recorded when it was written); resume from an earlier checkpoint with "
                "--checkpoint, or start again"
            )
        try:
            out[name] = load_file(str(fpath))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path}: cannot read {fname}: {exc}") from None
    return out, state


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint of ``step``."""
    return f"{STEP_PREFIX}{step:08d}"


def latest_checkpoint(ckpt_root: Path) -> Path:
    """The newest complete checkpoint directory (CheckpointError if there is none)."""
    ckpts = list_checkpoints(ckpt_root)
    if not ckpts:
        raise CheckpointError(f"no checkpoint under {ckpt_root}")
    return ckpts[-1]


def load_model(path: Path, map_location: str | torch.device = "cpu") -> tuple[DecoderLM, dict]:
    """A model and its checkpoint state from a checkpoint directory (any format version
    this longctx reads; the model is moved to ``map_location``)."""
    tensors, state = load_checkpoint(path, ["model"])
    try:
        cfg = ModelConfig.from_dict(state["config"]["model"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint {path}: state.json has no model config ({exc})"
        ) from None
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: its model config is invalid: {exc}") from None
    model = DecoderLM(cfg)
    try:
        model.load_state_dict(tensors["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path}: weights do not fit its config: {exc}") from None
    return model.to(map_location), state


def run_checkpoint(path: str | Path, key: str) -> Path:
    """The checkpoint directory a config key (``key``, named in errors) points to: a run
    directory (its newest checkpoint) or a checkpoint directory."""
    where = Path(path).expanduser()
    if (where / "checkpoints").is_dir():
        where = latest_checkpoint(where / "checkpoints")
    if not (where / "state.json").is_file():
        raise ValueError(
            f"{key} {path} is not a run or checkpoint directory (a run directory of longctx "
            "train, or one of its checkpoints)"
        )
    return where


def load_frozen_base(model: DecoderLM, path: str | Path, key: str, own) -> list[str]:
    """Load a trained run's (or checkpoint's) weights into ``model``, which is the same
    decoder plus weights of its own (``own(name)`` is true for those), and freeze the
    loaded ones. Every ``[model]`` key but the one named by ``key``'s table must agree.
    Returns the names of the weights left to train. ValueError naming ``key`` otherwise."""
    ckpt = run_checkpoint(path, key)
    frozen, _ = load_model(ckpt)
    table = key.split(".")[1]  # model.<table>.<key>
    ours = {k: v for k, v in model.cfg.to_dict().items() if k != table}
    theirs = {k: v for k, v in frozen.cfg.to_dict().items() if k != table}
    if ours != theirs:
        diff = sorted(k for k in ours if ours[k] != theirs.get(k))[0]
        raise ValueError(
            f"{key} {ckpt} is another decoder (model.{diff} differs: {theirs.get(diff)!r} "
            f"there, {ours[diff]!r} here)"
        )
    missing, unexpected = model.load_state_dict(frozen.state_dict(), strict=False)
    if unexpected or any(not own(name) for name in missing):
        raise ValueError(f"{key} {ckpt} does not fit this model's weights")
    for name, p in model.named_parameters():
        p.requires_grad_(bool(own(name)))
    return [name for name, p in model.named_parameters() if p.requires_grad]
