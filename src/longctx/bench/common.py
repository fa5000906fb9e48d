"""Shared pieces of the benchmarks: machine facts, matmul peak, memory, timing, output."""

from __future__ import annotations

import json
import os
import platform
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .._util import (
    Progress,
    append_jsonl,
    atomic_write,
    current_rss,
    peak_rss,
    pyplot,
    save_figure,
)


def machine_info(device: torch.device) -> dict:
    """What a figure was measured on: recorded with every benchmark row."""
    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def add_device_option(p) -> None:
    """The ``--device`` option every benchmark takes."""
    from .._util import DEVICE_HELP

    p.add_argument("--device", default="auto", help=f"where to run: {DEVICE_HELP}")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(device: torch.device, dtype=torch.float32, size: int | None = None) -> float:
    """Best observed GFLOP/s of a square matmul: the machine's practical peak for dtype."""
    size = size or (8192 if device.type == "cuda" else 4096)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    best = float("inf")
    for i in range(6):
        synchronize(device)
        t = time.perf_counter()
        a @ b
        synchronize(device)
        if i:  # the first call warms up
            best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


# ------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak memory of a measured region.

    CPU: the process's peak resident set size (VmHWM), reset at the start of the region
    through /proc/self/clear_refs (Linux); where that is unavailable, the process-lifetime
    peak (ru_maxrss) and ``reset = False``. CUDA: torch's peak allocated bytes.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.reset_ok = False
        self.start_rss = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.reset_ok = True
            self.start_rss = torch.cuda.memory_allocated(self.device)
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset_ok = True
        except OSError:
            self.reset_ok = False
        self.start_rss = current_rss()
        return self

    def __exit__(self, *exc) -> None:
        return None

    def peak(self) -> int:
        """Peak bytes since the region started (see the class docstring)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return peak_rss()


class TensorPeak(TorchDispatchMode):
    """Peak bytes of tensor storage allocated under the mode and alive at once (any
    device): the tensors' own footprint, free of allocator caching, which on the CPU
    makes the resident-set peak of small cases noisy. Every op is intercepted, so use it
    for memory figures, not timings."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _free(self, ptr: int) -> None:
        self.now -= self.live.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                ptr, n = st.data_ptr(), st.nbytes()
                if n and ptr not in self.live:
                    self.live[ptr] = n
                    self.now += n
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(st, self._free, ptr)
        return out


def available_memory(device: torch.device) -> int:
    """Bytes a case may still use: free device memory, or available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    value = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                value = int(line.split()[1]) * 1024
    except OSError:
        pass
    return value if value is not None else 1 << 62


# ------------------------------------------------------------------------- timing


def time_call(
    fn: Callable[[], object],
    device: torch.device,
    min_total: float = 0.3,
    min_runs: int = 3,
    single_above: float = 2.0,
) -> float:
    """Median seconds of fn().

    A first run longer than ``single_above`` seconds is reported alone; otherwise fn runs
    at least ``min_runs`` times and until ``min_total`` seconds have run (at most 50).
    On a shared machine a single sub-second sample can be off by tens of percent.
    """
    times: list[float] = []
    while True:
        synchronize(device)
        t = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t)
        if len(times) == 1 and times[0] > single_above:
            break
        if (sum(times) >= min_total and len(times) >= min_runs) or len(times) >= 50:
            break
    times.sort()
    return times[len(times) // 2]


# ------------------------------------------------------------------------- output


def report(
    table: str,
    summary: dict,
    out_dir: Path,
    results: Path,
    plot: Callable[[], Path] | None,
) -> None:
    """The end of every benchmark: print the table, write summary.json and print its
    ``lines``, then draw the plot (``plot`` is None when nothing was measured)."""
    print()
    print(table)
    atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2))
    for line in summary["lines"]:
        print(line)
    if plot is not None:
        png = plot()
        print(f"\nwrote {results}, {out_dir / 'summary.json'} and {png}")


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """columns: (header, key, format spec) — missing values print as '-'."""
    cells = [[h for h, _, _ in columns]]
    for row in rows:
        line = []
        for _, key, spec in columns:
            value = row.get(key)
            line.append("-" if value is None else format(value, spec))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    out = []
    for j, r in enumerate(cells):
        out.append("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def human_bytes(n: float) -> str:
    """``n`` bytes as B, KiB, MiB, GiB or TiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


# ------------------------------------------------------------------------- sweeps


def predict_skip(
    last: dict | None,
    row: dict,
    budget: float,
    device: torch.device,
    *,
    cost: str,
    size: str,
    memory_limit: int | None = None,
) -> str | None:
    """Why a sweep case should be skipped, or None.

    Time is predicted from the previous measured case of the series scaled by the ratio
    of ``row[cost]`` (e.g. FLOPs); memory from its peak scaled by the ratio of
    ``row[size]`` (bytes that grow with the case). The first case of a series is skipped
    only when twice ``row[size]`` exceeds the free memory. ``memory_limit`` (bytes)
    replaces 90% of the free memory as the bound (a linear prediction overestimates when
    the previous case's peak holds a constant part).
    """
    free = available_memory(device)
    limit = memory_limit if memory_limit is not None else 0.9 * free
    if last is None:
        need = 2 * row[size]
        if need > limit:
            return f"needs about {human_bytes(need)}, {human_bytes(free)} free"
        return None
    t = last["time_s"] * row[cost] / max(last[cost], 1)
    if t > budget:
        return f"predicted {t:.0f} s > budget {budget:.0f} s"
    need = last["peak_mem_over_start"] * row[size] / max(last[size], 1)
    if need > limit:
        bound, left = human_bytes(limit), human_bytes(free)
        return f"predicted memory {human_bytes(need)} > {bound} (free {left})"
    return None


def sweep(
    series: Sequence,
    xs: Sequence[int],
    make_row: Callable[[object, int], dict],
    measure: Callable[[object, int, dict], None],
    *,
    budget: float,
    device: torch.device,
    cost: str,
    size: str,
    results: Path,
    desc: str,
    memory_limit: int | None = None,
) -> list[dict]:
    """Run every series over xs (increasing): build a row, skip it (and the rest of the
    series) when ``predict_skip`` says so, else ``measure`` fills it; each row is appended
    to ``results`` (JSONL) as soon as it is done. A progress bar shows the current case."""
    results.write_text("")
    rows: list[dict] = []
    bar = Progress(len(series) * len(xs), desc, unit="case")
    for s in series:
        last: dict | None = None
        stop: str | None = None
        for x in xs:
            bar.set_postfix(case=f"{s} {x:,}")
            row = make_row(s, x)
            if stop is None:
                stop = predict_skip(
                    last, row, budget, device, cost=cost, size=size, memory_limit=memory_limit
                )
            if stop is not None:
                row["status"] = "skipped: " + stop
            else:
                measure(s, x, row)
                last = row
            rows.append(row)
            append_jsonl(results, row)
            bar.update(1)
    bar.close()
    return rows


def plot_sweep(
    rows: Sequence[dict],
    path: Path,
    *,
    x: str,
    xlabel: str,
    panels: Sequence[tuple[str, str]],
    series: Callable[[dict], tuple[str, str, bool]],
    title: str,
) -> Path:
    """Log-log panels of measured rows: one line per series; ``series(row)`` gives
    (label, color key, dashed)."""
    plt = pyplot()
    ok = [r for r in rows if r.get("status") == "ok"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    groups: dict[tuple, list[dict]] = {}
    for r in ok:
        groups.setdefault(series(r), []).append(r)
    colors = {key: f"C{i}" for i, key in enumerate(sorted({g[1] for g in groups}))}
    for ax, (key, ylabel) in zip(axes[0], panels, strict=True):
        for (label, color, dashed), pts in sorted(groups.items()):
            pts = sorted((r for r in pts if r.get(key) is not None), key=lambda r: r[x])
            if not pts:
                continue
            ax.plot(
                [r[x] for r in pts],
                [r[key] for r in pts],
                "--" if dashed else "-",
                marker="o",
                color=colors[color],
                label=label,
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
