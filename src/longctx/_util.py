"""Small helpers every layer may use: atomic file writes, figures, number lists, units and
progress reporting. Nothing here knows about models or tensors beyond plain values.

Each helper has exactly one home: a module that needs one of these imports it from here
instead of writing its own.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

LN2 = math.log(2.0)


def nats_to_bits(nats: float) -> float:
    """A cross-entropy in nats as bits (per token; tokens are bytes, so per byte)."""
    return nats / LN2


# ------------------------------------------------------------------------- devices

DEVICE_HELP = "auto (CUDA when available), cpu, cuda or cuda:N"


def resolve_device(spec=None):
    """A ``torch.device`` from ``auto`` (CUDA when available, else the CPU; under
    torchrun, this process's ``LOCAL_RANK`` GPU), ``cpu``, ``cuda`` or ``cuda:N``. A CUDA
    device that is not there is a clear error. None means auto."""
    import torch

    spec = "auto" if spec is None else spec
    if isinstance(spec, torch.device):
        spec = str(spec)
    if not isinstance(spec, str):
        raise ValueError(f"--device must be {DEVICE_HELP}, got {spec!r}")
    local = os.environ.get("LOCAL_RANK")
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        spec = "cuda" if local is None else f"cuda:{int(local) % torch.cuda.device_count()}"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {spec}: no CUDA device is available here "
                "(torch.cuda.is_available() is False); use --device cpu or auto"
            )
        if spec == "cuda" and local is not None:  # one GPU per torchrun process
            spec = f"cuda:{int(local) % torch.cuda.device_count()}"
        device = torch.device(spec)
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        return device
    raise ValueError(f"--device must be {DEVICE_HELP}, got {spec!r}")


# ------------------------------------------------------------------------- files


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    A crash while writing leaves ``path`` as it was (the temporary file may remain and is
    overwritten next time). The temporary name keeps ``path``'s suffix, so writers that
    choose a format by extension (matplotlib, safetensors) still work."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    yield tmp
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; on success it replaces
    ``path`` whole (a directory is written completely or not at all). An existing
    non-empty ``path`` is refused unless ``overwrite``; on an error the temporary
    directory is removed and ``path`` is left as it was."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; choose a new directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to ``path`` atomically (temporary file + rename)."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)


def settings_tag(settings: dict | None) -> str:
    """A file-name suffix for evaluation settings that differ from the run's own, so
    that results under other settings do not overwrite each other: "" for none, else
    e.g. ".capacity-fit.topk-32" (keys sorted)."""
    if not settings:
        return ""
    return "".join(f".{key}-{settings[key]}" for key in sorted(settings))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """``obj`` as indented JSON, written atomically."""
    return atomic_write(path, json.dumps(obj, indent=2))


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one JSON line and flush it (a crash loses at most the line being written)."""
    with Path(path).open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    return Path(path)


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------- numbers


def powers_of_two(
    lo: int, hi: int, *, minimum: int = 1, names: str = "--min-n/--max-n"
) -> list[int]:
    """Powers of two in [lo, hi] (lo rounded up to one). ``names`` are the options shown in
    the error when the range is empty or below ``minimum``."""
    if lo < minimum or hi < lo:
        lo_name, _, hi_name = names.partition("/")
        raise ValueError(f"need {minimum} <= {lo_name} <= {hi_name}, got {lo} and {hi}")
    return [1 << e for e in range(math.ceil(math.log2(lo)), int(math.log2(hi)) + 1)]


def parse_numbers(text: str, kind: Callable = int, flag: str = "value", *, positive=False) -> list:
    """Comma-separated numbers (``kind`` int or float), with an error naming ``flag``."""
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"{flag} is empty")
    if positive and min(values) <= 0:
        raise ValueError(f"{flag} must list positive numbers, got {text!r}")
    return values


# ------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> int:
    """The process's resident set size in bytes (0 where unknown)."""
    return _status_kib("VmRSS") or 0


def peak_rss() -> int:
    """The process's peak resident set size in bytes."""
    value = _status_kib("VmHWM")
    if value is not None:
        return value
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory(device) -> int:
    """Peak bytes of this process so far on a ``torch.device``: torch's peak allocation
    on CUDA, the peak resident set size elsewhere."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device)
    return peak_rss()


# ------------------------------------------------------------------------- progress


class Progress:
    """A progress report that suits where it goes.

    On a terminal: a tqdm bar. Elsewhere (a log file, a pipe): one plain line at most every
    ``interval`` seconds and one at the end, never carriage-return updates. ``enabled``
    False: silent. ``write`` prints a message either way (above the bar on a terminal)."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        *,
        unit: str = "it",
        initial: int = 0,
        enabled: bool = True,
        interval: float = 30.0,
        stream=None,
        leave: bool = True,
    ):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = initial
        self.enabled = enabled
        self.interval = interval
        self.stream = stream or sys.stderr
        self.postfix = ""
        self._bar = None
        self._printed = -1  # the count of the last line printed (no repeat at the end)
        self._last = time.monotonic()
        self._start = self._last
        if enabled and _is_tty(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=initial, desc=desc, unit=unit, file=self.stream, leave=leave
            )

    def update(self, n: int = 1, **postfix) -> None:
        """Count ``n`` more; ``postfix``: the status shown beside the count."""
        self.n += n
        if postfix:
            self.postfix = ", ".join(f"{k}={v}" for k, v in postfix.items())
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(**postfix)
        elif self.enabled and time.monotonic() - self._last >= self.interval:
            self._line()

    def set_postfix(self, **postfix) -> None:
        """Change the status shown beside the count (no step)."""
        self.update(0, **postfix)

    def write(self, message: str) -> None:
        """Print a message (above the bar on a terminal, to stdout)."""
        if self._bar is not None:
            self._bar.write(message)  # stdout, above the bar
        else:
            print(message, file=sys.stdout, flush=True)

    def close(self) -> None:
        """End the report (a last line when not on a terminal)."""
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.n and self.n != self._printed:
            self._line()
        self.enabled = False

    def _line(self) -> None:
        self._last, self._printed = time.monotonic(), self.n
        total = f"/{self.total}" if self.total else ""
        extra = f" ({self.postfix})" if self.postfix else ""
        elapsed = self._last - self._start
        line = f"{self.desc}: {self.n}{total} {self.unit}{extra} [{elapsed:.0f} s]"
        print(line, file=self.stream)
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
