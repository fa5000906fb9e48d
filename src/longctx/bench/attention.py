"""``longctx bench attention``: time, useful GFLOP/s and peak memory of attention vs N.

Methods: PyTorch's dense SDPA, longctx chunked attention, sliding-window attention, and
LongNet dilated attention in the paper's configuration (w = 2048..32768, r = 1, 2, 4, 6,
12) and a smaller one. Each (method, causal) series runs over powers of two of N; a case
whose predicted time exceeds the per-case budget (or whose predicted memory exceeds what
is free) is recorded as skipped, and the series stops there.

"Useful" FLOPs count 4 * D per visible (query, key) pair (QK^T and PV multiply-adds), so
masked or skipped work is not credited. The fp32 matmul peak is measured in the same run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import ops
from .._util import powers_of_two, resolve_device
from . import common

PAPER_SEGMENTS = [2048, 4096, 8192, 16384, 32768]
PAPER_RATES = [1, 2, 4, 6, 12]
SMALL_SEGMENTS = [512, 1024, 2048]
SMALL_RATES = [1, 2, 4]


@dataclass(frozen=True)
class Method:
    name: str
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]
    flops: Callable[[int, int, int, bool], int]  # (n, heads, head_dim, causal), batch 1
    settings: dict = field(default_factory=dict)


def _dense_flops(n: int, heads: int, head_dim: int, causal: bool) -> int:
    return ops.attention_flops(n, heads, head_dim, causal=causal)


def build_methods(chunk_size: int, window: int) -> dict[str, Method]:
    """The benchmarked methods by name, with their FLOP counts and settings."""

    def dilated(ws, rs):
        return Method(
            name="",
            run=lambda q, k, v, c: ops.dilated_attention(q, k, v, ws, rs, causal=c),
            flops=lambda n, h, d, c: ops.dilated_attention_flops(n, h, d, ws, rs, causal=c),
            settings={"segment_lengths": ws, "dilation_rates": rs, "offsets": "paper"},
        )

    methods = {
        "sdpa": Method(
            "sdpa",
            lambda q, k, v, c: F.scaled_dot_product_attention(q, k, v, is_causal=c),
            _dense_flops,
            {"kernel": "torch.nn.functional.scaled_dot_product_attention"},
        ),
        "chunked": Method(
            "chunked",
            lambda q, k, v, c: ops.chunked_attention(q, k, v, causal=c, chunk_size=chunk_size),
            _dense_flops,
            {"chunk_size": chunk_size},
        ),
        "sliding": Method(
            "sliding",
            lambda q, k, v, c: ops.sliding_window_attention(q, k, v, window, causal=c),
            lambda n, h, d, c: ops.sliding_window_flops(n, h, d, window, causal=c),
            {"window": window},
        ),
        "dilated-paper": dilated(PAPER_SEGMENTS, PAPER_RATES),
        "dilated-small": dilated(SMALL_SEGMENTS, SMALL_RATES),
    }
    return {name: Method(name, m.run, m.flops, m.settings) for name, m in methods.items()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``longctx bench attention``."""
    p.add_argument(
        "--quick",
        action="store_true",
        help="a short run: N = 1024..16384, 20 s per case (the README's main job)",
    )
    p.add_argument("--min-n", type=int, default=1024, help="smallest N (power of two)")
    p.add_argument("--max-n", type=int, default=1 << 20, help="largest N (default 1,048,576)")
    p.add_argument(
        "--methods",
        default="sdpa,chunked,sliding,dilated-paper,dilated-small",
        help="comma-separated subset of: sdpa, chunked, sliding, dilated-paper, dilated-small",
    )
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16", "float64"], default="float32"
    )
    common.add_device_option(p)
    p.add_argument(
        "--budget",
        type=float,
        default=120.0,
        help="skip a case whose predicted time exceeds this many seconds",
    )
    p.add_argument("--chunk-size", type=int, default=2048, help="chunked attention chunk")
    p.add_argument("--window", type=int, default=1024, help="sliding-window size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--min-time",
        type=float,
        default=0.3,
        help="repeat a fast case until this many seconds have run (median)",
    )
    p.add_argument(
        "--peak-size",
        type=int,
        default=None,
        help="matrix size of the matmul-peak measurement (default 4096 CPU, 8192 GPU)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench-out/attention"),
        help="output directory (results.jsonl, attention.png, summary.json)",
    )


def _check_args(args) -> tuple[list[str], list[bool]]:
    if args.quick:
        args.max_n = min(args.max_n, 16384)
        args.budget = min(args.budget, 20.0)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    known = build_methods(1, 1)
    unknown = [m for m in names if m not in known]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(known)}")
    for flag in ("batch", "heads", "head_dim", "chunk_size", "window"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    causal = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    return names, causal


def run(args) -> list[dict]:
    """Run the benchmark (module docstring); returns its rows."""
    names, causal_modes = _check_args(args)
    ns = powers_of_two(args.min_n, args.max_n)
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    methods = build_methods(args.chunk_size, args.window)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.jsonl"

    print(f"measuring the {args.dtype} matmul peak on {device} ...", flush=True)
    peak = common.matmul_peak_gflops(device, dtype, args.peak_size)
    info = common.machine_info(device)
    where = info.get("gpu", info["cpu"])
    print(
        f"matmul peak: {peak:.1f} GFLOP/s ({where}, {info['torch_threads']} threads, "
        f"torch {info['torch']})"
    )

    rows = common.sweep(
        [(name, c) for name in names for c in causal_modes],
        ns,
        lambda s, n: _case_row(methods[s[0]], s[1], n, args, info, peak),
        lambda s, n, row: _measure(methods[s[0]], s[1], n, row, args, device, dtype, peak),
        budget=args.budget,
        device=device,
        cost="useful_flops",
        size="qkvo_bytes",
        results=results_path,
        desc="bench attention",
    )

    measured = any(r["status"] == "ok" for r in rows)
    draw = (lambda: plot(rows, out_dir / "attention.png", info, peak)) if measured else None
    common.report(format_results(rows), summarize(rows, peak), out_dir, results_path, draw)
    return rows


def _case_row(method: Method, causal: bool, n: int, args, info: dict, peak: float) -> dict:
    b, h, d = args.batch, args.heads, args.head_dim
    elem = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    return {
        "bench": "attention",
        "method": method.name,
        "causal": causal,
        "n": n,
        "batch": b,
        "heads": h,
        "head_dim": d,
        "dtype": args.dtype,
        "settings": method.settings,
        "useful_flops": b * method.flops(n, h, d, causal),
        "qkvo_bytes": 4 * b * h * n * d * elem,
        "matmul_peak_gflops": peak,
        "machine": info,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _measure(method, causal, n, row, args, device, dtype, peak) -> None:
    g = torch.Generator(device=device).manual_seed(args.seed)
    shape = (args.batch, args.heads, n, args.head_dim)
    with torch.inference_mode(), common.PeakMemory(device) as mem:
        q = torch.randn(shape, generator=g, device=device, dtype=dtype)
        k = torch.randn(shape, generator=g, device=device, dtype=dtype)
        v = torch.randn(shape, generator=g, device=device, dtype=dtype)
        if n <= 1 << 15:  # warm-up (caches, allocator) where it is cheap
            method.run(q, k, v, causal)
        seconds = common.time_call(lambda: method.run(q, k, v, causal), device, args.min_time)
        peak_mem = mem.peak()
    gflops = row["useful_flops"] / seconds / 1e9
    row.update(
        status="ok",
        time_s=seconds,
        gflops=gflops,
        pct_of_peak=100.0 * gflops / peak,
        peak_mem_bytes=peak_mem,
        peak_mem_over_start=peak_mem - mem.start_rss,
        peak_mem_is_region=mem.reset_ok,
        mem_ratio=peak_mem / row["qkvo_bytes"],
    )


COLUMNS = [
    ("method", "method", ""),
    ("causal", "causal", ""),
    ("N", "n", ","),
    ("time s", "time_s", ".4f"),
    ("GFLOP/s", "gflops", ".1f"),
    ("% peak", "pct_of_peak", ".1f"),
    ("peak mem GiB", "peak_gib", ".2f"),
    ("mem/qkvo", "mem_ratio", ".2f"),
    ("status", "status_short", ""),
]


def format_results(rows: list[dict]) -> str:
    """The result rows as a table."""
    shown = []
    for r in rows:
        s = dict(r)
        if "peak_mem_bytes" in r:
            s["peak_gib"] = r["peak_mem_bytes"] / 2**30
        s["status_short"] = r["status"][:48]
        shown.append(s)
    return common.format_table(shown, COLUMNS)


def _find(rows, method, causal, n):
    for r in rows:
        if r["method"] == method and r["causal"] == causal and r["n"] == n and r["status"] == "ok":
            return r
    return None


def summarize(rows: list[dict], peak: float) -> dict:
    """The headline figures (dilated at the largest N, its efficiency, dilated vs dense),
    where the run measured them."""
    lines = ["", f"matmul peak (fp32, measured in this run): {peak:.1f} GFLOP/s"]
    summary: dict = {"matmul_peak_gflops": peak}
    big = [
        r for r in rows if r["method"] == "dilated-paper" and r["causal"] and r["status"] == "ok"
    ]
    if big:
        r = max(big, key=lambda r: r["n"])
        summary["dilated_paper_causal_largest"] = {
            k: r[k] for k in ("n", "time_s", "gflops", "pct_of_peak", "peak_mem_bytes", "mem_ratio")
        }
        lines.append(
            f"dilated (paper config) causal forward at N={r['n']:,}: {r['time_s']:.2f} s, "
            f"peak memory {r['peak_mem_bytes'] / 2**30:.2f} GiB = {r['mem_ratio']:.2f}x q,k,v,out"
        )
    eff = [
        r
        for r in rows
        if r["method"] == "dilated-paper" and r["n"] >= 65536 and r["status"] == "ok"
    ]
    if eff:
        worst = min(eff, key=lambda r: r["gflops"])
        summary["dilated_paper_min_pct_of_peak_n_ge_65536"] = worst["pct_of_peak"]
        lines.append(
            f"dilated (paper config) useful GFLOP/s at N >= 65,536: lowest {worst['gflops']:.1f} "
            f"({worst['pct_of_peak']:.1f}% of peak, N={worst['n']:,}, causal={worst['causal']})"
        )
    dense = _find(rows, "sdpa", False, 32768)
    dil = _find(rows, "dilated-paper", False, 32768)
    if dense and dil:
        speedup = dense["time_s"] / dil["time_s"]
        summary["dilated_vs_sdpa_speedup_n32768_noncausal"] = speedup
        lines.append(f"dilated vs dense SDPA at N=32,768 non-causal: {speedup:.1f}x faster")
    summary["lines"] = lines
    return summary


def plot(rows: list[dict], path: Path, info: dict, peak: float) -> Path:
    """Time and peak memory vs N, one line per method and causality."""
    r0 = rows[0]
    for r in rows:
        if "peak_mem_bytes" in r:
            r["peak_mem_gib"] = r["peak_mem_bytes"] / 2**30
    return common.plot_sweep(
        rows,
        path,
        x="n",
        xlabel="sequence length N",
        panels=[("time_s", "forward time (s)"), ("peak_mem_gib", "peak memory (GiB)")],
        series=lambda r: (
            f"{r['method']} ({'causal' if r['causal'] else 'non-causal'})",
            r["method"],
            not r["causal"],
        ),
        title=(
            f"attention forward, B={r0['batch']} H={r0['heads']} D={r0['head_dim']} "
            f"{r0['dtype']} on {info.get('gpu', info['cpu'])} ({info['torch_threads']} "
            f"threads); matmul peak {peak:.0f} GFLOP/s"
        ),
    )
