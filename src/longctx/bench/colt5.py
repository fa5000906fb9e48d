"""``longctx bench colt5``: forward time and FLOPs of CoLT5's routed layers against the
dense layers they replace, vs sequence length N.

- Feed-forward: a dense SwiGLU of hidden 4 * d against a routed one whose heavy branch is
  that same FFN (hidden 4 * d) applied to the routed N/16 tokens, plus a light SwiGLU of
  hidden d / 2 on every token (the paper's sizes with base hidden d: light 1/2, heavy 4x).
- Attention: dense multi-head attention (all heads, exact, longctx's fused op) against
  CoLT5 attention: a quarter of the heads local (window radius 127), the rest over the
  routed N/16 queries and N/8 keys/values.

``--causal no`` is the paper's (encoder) routing: top-k plus soft top-k weights;
``yes`` is longctx's causal per-token gate, with its bias set so that the routed fraction
at initialisation is about the capacity (the measured fraction is recorded per row).
FLOPs count 2 per multiply-add of the projections and 4 * D per visible attention pair,
at the routed counts actually measured.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from .. import ops
from .._util import powers_of_two, resolve_device
from ..nn import MultiHeadAttention, SwiGLU
from ..nn.colt5 import (
    ConditionalAttention,
    ConditionalFeedForward,
    conditional_attention_flops,
    conditional_ffn_flops,
)
from . import common

COMPONENTS = ("ffn", "attention")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``longctx bench colt5``."""
    p.add_argument("--components", default="ffn,attention", help="ffn, attention or both")
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--min-n", type=int, default=1024, help="smallest N (power of two)")
    p.add_argument("--max-n", type=int, default=16384, help="largest N (power of two)")
    p.add_argument("--budget", type=float, default=60.0, help="skip cases predicted slower")
    p.add_argument("--min-time", type=float, default=0.5, help="repeat fast cases (median)")
    p.add_argument("--seed", type=int, default=0)
    common.add_device_option(p)
    p.add_argument("--out", type=Path, default=Path("bench-out/colt5"))


def build(component: str, variant: str, causal: bool, d: int, heads: int) -> nn.Module:
    """The module of one case: a dense or routed feed-forward or attention."""
    if component == "ffn":
        if variant == "dense":
            return SwiGLU(d, 4 * d)
        return ConditionalFeedForward(d, d, capacity=1 / 16, causal=causal)
    if variant == "dense":
        attn = MultiHeadAttention(d, heads, "dense")
        if not causal:
            attn.kernel = ops.attention  # bidirectional: the op without its causal mask
        return attn
    return ConditionalAttention(d, heads, causal=causal, q_capacity=1 / 16, kv_capacity=1 / 8)


def _flops(component, variant, causal, n, d, heads, module, fractions) -> float:
    if component == "ffn":
        if variant == "dense":
            return 6 * d * 4 * d * n
        f = module
        return n * conditional_ffn_flops(d, f.light_hidden, f.heavy_hidden, fractions["ffn"])
    if variant == "dense":
        return 8 * d * d * n + ops.attention_flops(n, heads, d // heads, causal=causal)
    a = module
    return conditional_attention_flops(
        n, d, heads, a.light_heads, a.window, fractions["q"], fractions["kv"], causal
    )["total"]


def _row(case, n, args, info) -> dict:
    component, variant, causal = case
    return {
        "bench": "colt5",
        "component": component,
        "variant": variant,
        "causal": causal,
        "n": n,
        "batch": args.batch,
        "d_model": args.d_model,
        "heads": args.heads,
        # the target fractions; replaced by the measured ones once run
        "flops": args.batch * _target_flops(case, n, args),
        "x_bytes": 4 * args.batch * n * args.d_model,
        "machine": info,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _target_flops(case, n, args) -> float:
    component, variant, causal = case
    module = build(component, variant, causal, args.d_model, args.heads)
    fractions = {"ffn": 1 / 16, "q": 1 / 16, "kv": 1 / 8}
    return _flops(component, variant, causal, n, args.d_model, args.heads, module, fractions)


def _measure(case, n, row, args, device) -> None:
    component, variant, causal = case
    torch.manual_seed(args.seed)
    module = build(component, variant, causal, args.d_model, args.heads).to(device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.randn(args.batch, n, args.d_model, generator=g, device=device)
    with torch.inference_mode(), common.PeakMemory(device) as mem:
        module(x)  # warm-up
        seconds = common.time_call(lambda: module(x), device, args.min_time)
        peak = mem.peak()
    fractions = {"ffn": 1 / 16, "q": 1 / 16, "kv": 1 / 8}
    if variant == "routed":
        routers = (
            {"ffn": module.router}
            if component == "ffn"
            else {"q": module.q_router, "kv": module.kv_router}
        )
        for name, r in routers.items():
            fractions[name] = float(r.routed_fraction)
        row["routed_fraction"] = {k: fractions[k] for k in routers}
    row["flops"] = args.batch * _flops(
        component, variant, causal, n, args.d_model, args.heads, module, fractions
    )
    row.update(
        status="ok",
        time_s=seconds,
        gflops=row["flops"] / seconds / 1e9,
        peak_mem_bytes=peak,
        peak_mem_gib=peak / 2**30,
        peak_mem_over_start=peak - mem.start_rss,
    )


def run(args) -> list[dict]:
    """Run the benchmark (module docstring); returns its rows."""
    components = [c.strip() for c in args.components.split(",") if c.strip()]
    if not components or any(c not in COMPONENTS for c in components):
        raise ValueError(f"--components must be a subset of {COMPONENTS}, got {args.components!r}")
    for flag in ("d_model", "heads", "batch"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.d_model % args.heads or args.heads < 2:
        raise ValueError("--d-model must be a multiple of --heads, and --heads >= 2")
    ns = powers_of_two(args.min_n, args.max_n, minimum=16)
    device = resolve_device(args.device)
    causal_modes = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    cases = [
        (c, variant, causal)
        for c in components
        for causal in causal_modes
        for variant in ("dense", "routed")
    ]
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "results.jsonl"
    info = common.machine_info(device)
    rows = common.sweep(
        cases,
        ns,
        lambda case, n: _row(case, n, args, info),
        lambda case, n, row: _measure(case, n, row, args, device),
        budget=args.budget,
        device=device,
        cost="flops",
        size="x_bytes",
        results=results,
        desc="bench colt5",
    )
    summary = summarize(rows)  # adds the speedup columns to the rows
    measured = any(r["status"] == "ok" for r in rows)
    draw = (lambda: plot(rows, out_dir / "colt5.png", info)) if measured else None
    common.report(common.format_table(rows, COLUMNS), summary, out_dir, results, draw)
    return rows


COLUMNS = [
    ("component", "component", ""),
    ("variant", "variant", ""),
    ("causal", "causal", ""),
    ("N", "n", ","),
    ("time s", "time_s", ".4f"),
    ("GFLOP", "gflop", ".2f"),
    ("GFLOP/s", "gflops", ".1f"),
    ("speedup", "speedup", ".1f"),
    ("status", "status", ""),
]


def summarize(rows: list[dict]) -> dict:
    """Speedup of each routed case over the dense case of the same (component, causal, N)."""
    by = {
        (r["component"], r["variant"], r["causal"], r["n"]): r for r in rows if r["status"] == "ok"
    }
    for r in rows:
        r["gflop"] = r["flops"] / 1e9
        dense = by.get((r["component"], "dense", r["causal"], r["n"]))
        if r["variant"] == "routed" and r["status"] == "ok" and dense:
            r["speedup"] = dense["time_s"] / r["time_s"]
            r["flops_ratio"] = dense["flops"] / r["flops"]
    lines, out = [""], {}
    for r in rows:
        if "speedup" in r:
            mode = "causal" if r["causal"] else "non-causal"
            key = f"{r['component']}_{'causal' if r['causal'] else 'noncausal'}_{r['n']}"
            out[key] = {"speedup": r["speedup"], "flops_ratio": r["flops_ratio"]}
            lines.append(
                f"routed {r['component']} ({mode}) at N={r['n']:,}: {r['speedup']:.1f}x faster "
                f"than dense ({r['flops_ratio']:.1f}x fewer FLOPs)"
            )
    out["lines"] = lines
    return out


def plot(rows: list[dict], path: Path, info: dict) -> Path:
    """Time and FLOPs vs N of the routed and dense layers."""
    r0 = rows[0]
    return common.plot_sweep(
        rows,
        path,
        x="n",
        xlabel="sequence length N",
        panels=[("time_s", "forward time (s)"), ("gflop", "forward GFLOP")],
        series=lambda r: (
            f"{r['component']} {r['variant']} ({'causal' if r['causal'] else 'non-causal'})",
            f"{r['component']} {r['variant']}",
            r["causal"],
        ),
        title=(
            f"CoLT5 routed vs dense layers, d_model {r0['d_model']}, {r0['heads']} heads, "
            f"batch {r0['batch']} on {info.get('gpu', info['cpu'])} "
            f"({info['torch_threads']} threads)"
        ),
    )
