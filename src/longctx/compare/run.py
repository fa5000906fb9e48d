"""Running a comparison: build what the entries need, train each preset in its own
process (so that a crash, an out-of-memory kill or a bad config stops only that preset,
and its peak memory is its own), measure it here, and rewrite the table after each.

A comparison lives in one folder and survives Ctrl-C and a kill:

- ``comparison.json`` holds its training settings; running again in the folder with
  other minutes, data or seed is refused (the runs would not be comparable);
- ``runs/<preset>/`` is the preset's run directory. ``trained.json`` marks a finished
  training; a run with checkpoints but no mark is resumed (its budget counts the
  training time already spent); one killed before its first checkpoint starts again;
- ``runs/<preset>/measured.json`` holds its figures; a preset with figures measured
  under the same settings is neither retrained nor measured again;
- a failed preset is recorded with its error (and tried again on the next run).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .. import __version__
from .._util import atomic_write_json, resolve_device
from ..bench.common import machine_info
from ..model.checkpoint import list_checkpoints
from .measure import measure_run, training_figures
from .plan import Entry, Settings, plan
from .report import write_report

FOLDER_FILE, TRAINED, MEASURED, TRAIN_LOG = (
    "comparison.json",
    "trained.json",
    "measured.json",
    "train.log",
)
INTERRUPT_WAIT_S = 300  # how long a Ctrl-C waits for a training process to save


def run_comparison(
    presets: list[str],
    settings: Settings,
    out: Path,
    *,
    device: str = "auto",
    progress: bool = True,
    log=print,
) -> dict:
    """Train and measure every preset (module docstring); returns the result written to
    ``out`` (``results``: figures per preset, or its ``error`` and ``stage``)."""
    out = Path(out)
    entries = plan(presets, settings, out)
    _claim_folder(out, settings)
    torch_device = resolve_device(device)
    result = {
        "settings": settings.to_dict(),
        "presets": [e.name for e in entries],
        "machine": machine_info(torch_device),
        "versions": _versions(),
        "databases": {},
        "results": {},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for e in entries:
        if e.added:
            log(f"{e.name} is added: it is the frozen backbone of the LongMem entries")
    t0 = time.monotonic()
    for i, entry in enumerate(entries, 1):
        log(f"[{i}/{len(entries)}] {entry.name}")
        stage = "starting"
        try:
            figures = _reuse(entry, settings, log)
            if figures is None:
                if entry.backbone and "error" in result["results"].get(entry.backbone, {}):
                    raise RuntimeError(f"its backbone run {entry.backbone!r} failed")
                if entry.db is not None:
                    stage = "building its database"
                    result["databases"][str(entry.db)] = _database(entry, settings, progress, log)
                stage = "training"
                _train(entry, settings, device, log)
                stage = "measuring"
                figures = measure_run(
                    entry.run_dir, settings, device=torch_device, progress=progress, log=log
                )
                atomic_write_json(
                    entry.run_dir / MEASURED, {"settings": settings.to_dict(), "figures": figures}
                )
            result["results"][entry.name] = figures
        except KeyboardInterrupt:
            result["interrupted"] = entry.name
            write_report(result, out)
            raise
        except Exception as exc:  # noqa: BLE001 - one preset's failure is its table row
            message = f"{type(exc).__name__}: {exc}"
            log(f"  failed while {stage}: {message}")
            result["results"][entry.name] = {"error": message, "stage": stage}
        result["seconds"] = time.monotonic() - t0
        write_report(result, out)
    return result


def _claim_folder(out: Path, settings: Settings) -> None:
    """Record the folder's training settings, or refuse other ones."""
    path = out / FOLDER_FILE
    want = settings.training()
    if path.exists():
        try:
            have = json.loads(path.read_text())["training"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a comparison's settings file ({exc})") from None
        if have != want:
            raise ValueError(
                f"{out} holds a comparison trained with {have}; these settings differ "
                f"({want}): choose another --out, or the same --minutes, --data and --seed"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"training": want, "longctx": __version__})


def _reuse(entry: Entry, settings: Settings, log) -> dict | None:
    """A preset's figures measured under the same settings (None: none yet)."""
    path = entry.run_dir / MEASURED
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except ValueError:
        return None
    if saved.get("settings") != settings.to_dict():
        return None
    log(f"  measured already ({path}): reused")
    return {**saved["figures"], "reused": True}


def _database(entry: Entry, settings: Settings, progress: bool, log) -> dict:
    """The RETRO database of the comparison's data (built once, then reused)."""
    from ..retro import RetroDB

    if (entry.db / "manifest.json").exists():
        db = RetroDB.open(entry.db)
        db.check_compatible(chunk=entry.db_chunk)
        return {
            "chunks": len(db),
            "build_seconds": db.manifest.get("build_seconds"),
            "reused": True,
        }
    log(f"  building the RETRO database of {settings.data} (chunk {entry.db_chunk}) in {entry.db}")
    db = RetroDB.build(settings.data, entry.db, chunk=entry.db_chunk, progress=progress)
    return {"chunks": len(db), "build_seconds": db.manifest.get("build_seconds")}


def _train(entry: Entry, settings: Settings, device: str, log) -> None:
    """Train the preset in a child process (resuming it when it has checkpoints)."""
    run_dir = entry.run_dir
    if (run_dir / TRAINED).exists():
        log("  trained already")
        return
    cmd = [sys.executable, "-m", "longctx", "train", "--out", str(run_dir), "--no-eval"]
    if list_checkpoints(run_dir / "checkpoints"):
        cmd.append("--resume")
        log(f"  resuming its training ({settings.minutes:g} minutes in all)")
    else:
        for name in ("config.json", "metrics.jsonl"):  # killed before its first checkpoint
            (run_dir / name).unlink(missing_ok=True)
        cmd += ["--preset", entry.name]
        for override in entry.overrides:
            cmd += ["--set", override]
        log(f"  training for {settings.minutes:g} minutes")
    cmd += ["--device", device]
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / TRAIN_LOG
    log(f"  log: {log_path}")
    rc = _run_child(cmd, log_path)
    if rc in (130, -signal.SIGINT):
        raise KeyboardInterrupt
    if rc != 0:
        raise RuntimeError(f"training exited with status {rc}: {_last_error(log_path)}")
    figures = training_figures(run_dir)
    atomic_write_json(run_dir / TRAINED, figures)
    log(
        f"  trained {figures['steps']:,} steps, {figures['tokens']:,} tokens in "
        f"{figures['train_seconds'] / 60:.1f} minutes"
    )


def _run_child(cmd: list[str], log_path: Path) -> int:
    """Run ``cmd`` with its output appended to ``log_path``; its exit status. On Ctrl-C
    (which the child also receives) wait for it to save its checkpoint first; the child
    dies with this process (Linux), so a killed comparison leaves no training behind."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
        )
        try:
            return proc.wait()
        except KeyboardInterrupt:
            try:
                proc.wait(timeout=INTERRUPT_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise


def _die_with_parent() -> None:
    """In the child: be killed when the comparison's process dies (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _last_error(log_path: Path) -> str:
    """The last non-empty line of a training log (its error, usually)."""
    try:
        lines = [x.strip() for x in log_path.read_text().splitlines() if x.strip()]
    except OSError:
        return f"see {log_path}"
    return f"{lines[-1] if lines else 'no output'} (log: {log_path})"


def _versions() -> dict:
    import numpy
    import torch

    return {
        "longctx": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": sys.version.split()[0],
    }


__all__ = ["run_comparison"]
