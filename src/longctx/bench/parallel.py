"""``longctx bench parallel``: bytes each rank sends, and time, of the sequence-parallel
strategies (longnet, ulysses, ring) vs N and P, on a gloo group of local processes.

Two sweeps:

- ``local``: the local length n fixed (``--local-length``), P = 2, 4, 8 ranks, so
  N = P * n grows with P: LongNet's claim (arXiv 2307.02486, section 3.1) is that its
  bytes per rank stay constant here; ring's grow with P.
- ``global``: P fixed (``--world``), N growing: ring and Ulysses grow linearly in N;
  LongNet's gathered branches become local once n reaches their segment length.

Every case runs causal forward + backward of one attention layer (B, H, D, float32) on
every rank; time is the slowest rank's median over ``--reps`` runs. Bytes are counted by
the collectives (``longctx.distributed.comm``) and compared with the formulas in
``longctx.distributed.strategies``. LongNet's branches are w = n/4, n/2, n, 2n with rates
1, 2, 4, 8 for n = ``--local-length`` (the largest gathered over 2 ranks in the local
sweep; in the global sweep the same branches become local as N / P reaches them). The
processes share this machine's cores (one thread each), so times measure the algorithms'
overheads, not a cluster's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from .._util import Progress, parse_numbers
from ..distributed import STRATEGIES, SPGroup
from ..distributed.launch import spawn
from ..distributed.shard import shard
from ..distributed.strategies import (
    check_longnet,
    longnet_attention,
    longnet_bytes,
    ring_attention,
    ring_bytes,
    strategy_layout,
    ulysses_attention,
    ulysses_bytes,
)
from ..nn.patterns import make_kernel
from . import common


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``longctx bench parallel``."""
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--sweep", choices=["both", "local", "global"], default="both")
    p.add_argument("--local-length", type=int, default=2048, help="n for the local sweep")
    p.add_argument("--worlds", default="2,4,8", help="P values of the local sweep")
    p.add_argument("--world", type=int, default=4, help="P of the global sweep")
    p.add_argument("--global-ns", default="4096,8192,16384", help="N of the global sweep")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=2, help="timed runs per case (after a warm-up)")
    p.add_argument("--timeout", type=float, default=300.0, help="process-group timeout (s)")
    p.add_argument("--out", type=Path, default=Path("bench-out/parallel"))
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu (gloo, the default) or cuda (NCCL, one GPU per rank)",
    )


def longnet_branches(n: int) -> tuple[list[int], list[int]]:
    """LongNet branches for local length n: w = n/4, n/2, n, 2n with rates 1, 2, 4, 8."""
    return [n // 4, n // 2, n, 2 * n], [1, 2, 4, 8]


def _worker(rank, world, strategies, N, B, H, D, reps, ws, rs, device="cpu"):
    sp = SPGroup.world()
    device = torch.device(f"cuda:{rank}" if device == "cuda" else "cpu")
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(B, H, N, D, generator=g) for _ in range(4)]  # q, k, v, dout
    out = {}
    for strategy in strategies:
        layout = strategy_layout(strategy, True)
        q, k, v, dout = (shard(t, 2, rank, world, layout).to(device) for t in full)

        def step(q=q, k=k, v=v, dout=dout, strategy=strategy):
            qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
            if strategy == "ring":
                o = ring_attention(qs, ks, vs, sp, causal=True)
            elif strategy == "longnet":
                o = longnet_attention(qs, ks, vs, sp, ws, rs, causal=True)
            else:
                o = ulysses_attention(qs, ks, vs, sp, make_kernel("dense"))
            o.backward(dout)

        step()  # warm-up
        torch.distributed.barrier()
        sp.reset_counts()
        times = []
        for _ in range(reps):
            torch.distributed.barrier()
            t0 = time.perf_counter()
            step()
            common.synchronize(device)
            times.append(time.perf_counter() - t0)
        out[strategy] = {
            "time_s": statistics.median(times),
            "bytes_per_step": sum(sp.bytes_sent.values()) / reps,
            "bytes_by_op": {k: v / reps for k, v in sp.bytes_sent.items()},
        }
    return out


def _formula(strategy, B, H, n, D, world, ws, rs) -> float:
    if strategy == "ring":
        f = ring_bytes(B, H, n, D, world, 4)
    elif strategy == "ulysses":
        f = ulysses_bytes(B, H, n, D, world, 4)
    else:
        f = longnet_bytes(B, H, n, D, world, 4, ws, rs)
    return f["forward"] + f["backward"]


def run(args) -> list[dict]:
    """Run the benchmark (module docstring); returns its rows."""
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if not strategies or any(s not in STRATEGIES for s in strategies):
        raise ValueError(f"--strategies must be a subset of {STRATEGIES}, got {args.strategies!r}")
    points = []  # (sweep, P, N)
    if args.sweep in ("both", "local"):
        n = args.local_length
        if n % 8:
            raise ValueError(f"--local-length must be a multiple of 8 (n/4 with rate 2), got {n}")
        points += [
            ("local", P, P * n) for P in parse_numbers(args.worlds, int, "--worlds", positive=True)
        ]
    if args.sweep in ("both", "global"):
        points += [
            ("global", args.world, N)
            for N in parse_numbers(args.global_ns, int, "--global-ns", positive=True)
        ]
    if args.device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda (one GPU per rank), got {args.device!r}")
    ws, rs = longnet_branches(args.local_length)
    for _, P, N in points:
        if N % (2 * P):
            raise ValueError(f"N = {N} must split into 2P = {2 * P} chunks (zigzag layout)")
        if "longnet" in strategies:
            check_longnet(N, P, ws, rs)
        if "ulysses" in strategies and args.heads % P:
            raise ValueError(f"--heads {args.heads} must be a multiple of P = {P} for ulysses")
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "results.jsonl"
    results.write_text("")
    info = common.machine_info(torch.device(args.device))
    B, H, D = args.batch, args.heads, args.head_dim
    rows = []
    bar = Progress(len(points), "bench parallel", unit="case")
    for sweep, P, N in points:
        work = (strategies, N, B, H, D, args.reps, ws, rs, args.device)
        per_rank = spawn(P, _worker, work, timeout_s=args.timeout, device=args.device)
        for s in strategies:
            sent = [r[s]["bytes_per_step"] for r in per_rank]
            formula = _formula(s, B, H, N // P, D, P, ws, rs)
            row = {
                "bench": "parallel",
                "sweep": sweep,
                "strategy": s,
                "world": P,
                "n": N,
                "local_length": N // P,
                "batch": B,
                "heads": H,
                "head_dim": D,
                "time_s": max(r[s]["time_s"] for r in per_rank),
                "bytes_per_rank": max(sent),
                "bytes_per_rank_min": min(sent),
                "bytes_formula": formula,
                "formula_error": (max(sent) - formula) / formula if formula else 0.0,
                "bytes_by_op": per_rank[0][s]["bytes_by_op"],
                "status": "ok",
                "machine": info,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            row["mib_per_rank"] = row["bytes_per_rank"] / 2**20
            rows.append(row)
            common.append_jsonl(results, row)
        bar.update(1)
    bar.close()
    draw = lambda: plot(rows, out_dir / "parallel.png", info)  # noqa: E731
    common.report(common.format_table(rows, COLUMNS), summarize(rows), out_dir, results, draw)
    return rows


COLUMNS = [
    ("sweep", "sweep", ""),
    ("strategy", "strategy", ""),
    ("P", "world", ""),
    ("N", "n", ","),
    ("n", "local_length", ","),
    ("fwd+bwd s", "time_s", ".3f"),
    ("MiB/rank", "mib_per_rank", ".2f"),
    ("formula err", "formula_error", ".2%"),
]


def summarize(rows: list[dict]) -> dict:
    """Deviation from the byte formulas, and bytes per rank over each sweep."""
    lines, out = [""], {}
    worst = max((abs(r["formula_error"]) for r in rows if r["bytes_formula"]), default=0.0)
    out["max_formula_error"] = worst
    lines.append(f"bytes per rank vs the formulas: largest deviation {worst:.2%}")
    local = [r for r in rows if r["sweep"] == "local"]
    for s in sorted({r["strategy"] for r in local}):
        pts = sorted((r for r in local if r["strategy"] == s), key=lambda r: r["n"])
        if len(pts) >= 2:
            a, b = pts[0], pts[-1]
            out[f"{s}_local_sweep"] = {
                "n_small": a["n"],
                "n_large": b["n"],
                "bytes_small": a["bytes_per_rank"],
                "bytes_large": b["bytes_per_rank"],
            }
            lines.append(
                f"{s}: N {a['n']:,} (P={a['world']}) -> {b['n']:,} (P={b['world']}), local "
                f"length {a['local_length']:,}: {a['mib_per_rank']:.2f} -> "
                f"{b['mib_per_rank']:.2f} MiB sent per rank per step"
            )
    out["lines"] = lines
    return out


def _sweep_label(r: dict) -> str:
    return f"n = {r['local_length']:,} fixed" if r["sweep"] == "local" else f"P = {r['world']}"


def plot(rows: list[dict], path: Path, info: dict) -> Path:
    """Bytes per rank and time vs N, one line per strategy and sweep."""
    r0 = rows[0]
    return common.plot_sweep(
        rows,
        path,
        x="n",
        xlabel="sequence length N",
        panels=[("mib_per_rank", "MiB sent per rank per step"), ("time_s", "fwd+bwd time (s)")],
        series=lambda r: (
            f"{r['strategy']} ({_sweep_label(r)})",
            r["strategy"],
            r["sweep"] == "global",
        ),
        title=(
            f"sequence-parallel attention, causal, B={r0['batch']} H={r0['heads']} "
            f"D={r0['head_dim']} float32, gloo on {info['cpu']}"
        ),
    )
