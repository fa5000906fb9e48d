"""``longctx bench generate``: per-token decoding latency, cache bytes and peak memory vs
context length for the cache policies (full, dilated, none, recompute) of one model.

The model is the ``longnet-small`` preset's architecture (dilated attention, paper pattern
at 1/16 scale) with random weights: latency and memory do not depend on the weights. For
each context N, a random prompt of N tokens is prefilled (in aligned chunks), then
``--tokens`` tokens are decoded greedily; the median step time is reported. A case whose
predicted time exceeds ``--budget`` seconds is recorded as skipped. For ``recompute`` the
summary fits the exponent x of per-token time ~ N^x (theory: about the number of layers
once N is many chunks).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from .._util import powers_of_two, resolve_device
from ..config import load_preset
from ..model import DecoderLM, ModelConfig
from ..model.generate import CACHE_POLICIES, generate
from . import common


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``longctx bench generate``."""
    p.add_argument("--preset", default="longnet-small", help="model architecture preset")
    p.add_argument("--policies", default="full,dilated,none")
    p.add_argument("--min-context", type=int, default=8192)
    p.add_argument("--max-context", type=int, default=262144)
    p.add_argument("--tokens", type=int, default=16, help="decoded tokens per case")
    p.add_argument("--recompute-chunk", type=int, default=256, help="chunk of the recompute policy")
    p.add_argument("--budget", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench-out/generate"))
    common.add_device_option(p)


def run(args) -> list[dict]:
    """Run the benchmark (module docstring); returns its rows."""
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    bad = [p for p in policies if p not in CACHE_POLICIES]
    if bad or not policies:
        raise ValueError(f"unknown cache policy {bad}; choose from {CACHE_POLICIES}")
    if args.tokens < 2:
        raise ValueError(
            f"--tokens must be >= 2 (the first new token comes from the prefill's logits, "
            f"so per-token latency needs a second), got {args.tokens}"
        )
    if args.recompute_chunk < 1:
        raise ValueError(f"--recompute-chunk must be >= 1, got {args.recompute_chunk}")
    contexts = powers_of_two(
        args.min_context, args.max_context, names="--min-context/--max-context"
    )
    cfg = ModelConfig.from_dict(load_preset(args.preset).get("model", {}))
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    model = DecoderLM(cfg).eval().to(device)
    info = common.machine_info(device)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"

    def cost(policy: str, n: int) -> float:
        # prefill ~ n; without a cache ~ n per decoded token; recompute ~ chunk passes
        if policy == "recompute":
            passes = max(1.0, n / args.recompute_chunk) ** cfg.n_layers
            return passes * args.recompute_chunk * (args.tokens + 1)
        return n * (args.tokens + 1 if policy == "none" else 1)

    def make_row(policy: str, n: int) -> dict:
        return {
            "bench": "generate",
            "policy": policy,
            "context": n,
            "tokens": args.tokens,
            "model": cfg.to_dict(),
            "machine": info,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "recompute_chunk": args.recompute_chunk if policy == "recompute" else None,
            "cost": cost(policy, n),
            "size": n,
        }

    rows = common.sweep(
        policies,
        contexts,
        make_row,
        lambda policy, n, row: _measure(model, policy, n, row, args),
        budget=args.budget,
        device=device,
        cost="cost",
        size="size",
        results=results,
        desc="bench generate",
    )

    def draw():
        return common.plot_sweep(
            rows,
            args.out / "generate.png",
            x="context",
            xlabel="context length",
            panels=[
                ("latency_ms", "per-token latency (ms)"),
                ("cache_mib", "cache (MiB)"),
                ("peak_mem_mib", "peak memory over the start (MiB)"),
            ],
            series=lambda r: (r["policy"], r["policy"], False),
            title=f"decoding, {args.preset} architecture ({cfg.attention.kind}), on {info['cpu']}",
        )

    measured = any(r["status"] == "ok" for r in rows)
    table = common.format_table(rows, COLUMNS)
    common.report(table, summarize(rows), args.out, results, draw if measured else None)
    return rows


def _measure(model, policy, n, row, args) -> None:
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, 256, (n,), generator=g).tolist()

    def run():
        return generate(
            model,
            prompt,
            args.tokens,
            cache=policy,
            temperature=0,
            recompute_chunk=args.recompute_chunk,
        )

    tensor_peak = None
    if policy == "recompute":  # its memory is small: count tensor bytes, not the RSS
        with common.TensorPeak() as tensors:
            run()
        tensor_peak = tensors.peak
    t0 = time.perf_counter()
    with common.PeakMemory(model.embed.weight.device) as mem:
        gen = run()
        peak = mem.peak()
    latency = statistics.median(gen.step_seconds)
    row.update(
        status="ok",
        time_s=time.perf_counter() - t0,
        prefill_s=gen.prefill_seconds,
        latency_ms=1000 * latency,
        tokens_per_s=1 / latency,
        cache_bytes=gen.cache_bytes[-1],
        # none and recompute keep no cache
        cache_mib=gen.cache_bytes[-1] / 2**20 if policy not in ("none", "recompute") else None,
        peak_mem_bytes=peak,
        peak_mem_over_start=peak - mem.start_rss,
        peak_mem_mib=(peak - mem.start_rss) / 2**20,
        peak_tensor_mib=None if tensor_peak is None else tensor_peak / 2**20,
    )


COLUMNS = [
    ("policy", "policy", ""),
    ("context", "context", ","),
    ("prefill s", "prefill_s", ".2f"),
    ("ms/token", "latency_ms", ".2f"),
    ("tokens/s", "tokens_per_s", ".1f"),
    ("cache MiB", "cache_mib", ".2f"),
    ("peak MiB", "peak_mem_mib", ".1f"),
    ("tensor MiB", "peak_tensor_mib", ".3f"),
    ("status", "status", ""),
]


def summarize(rows: list[dict]) -> dict:
    """The dilated cache's share of the full cache, and its latency spread."""
    ok = {(r["policy"], r["context"]): r for r in rows if r["status"] == "ok"}
    lines, out = [""], {}
    for n in sorted({r["context"] for r in rows}):
        full, dil = ok.get(("full", n)), ok.get(("dilated", n))
        if full and dil:
            ratio = dil["cache_bytes"] / full["cache_bytes"]
            out[f"dilated_over_full_cache_bytes_{n}"] = ratio
            lines.append(f"context {n:,}: dilated cache = {100 * ratio:.2f}% of the full cache")
    dil = sorted((r for r in ok.values() if r["policy"] == "dilated"), key=lambda r: r["context"])
    if len(dil) >= 2:
        lat = [r["latency_ms"] for r in dil]
        out["dilated_latency_max_over_min"] = max(lat) / min(lat)
        lines.append(
            f"dilated per-token latency from {dil[0]['context']:,} to {dil[-1]['context']:,}: "
            f"{min(lat):.2f}-{max(lat):.2f} ms (max/min {max(lat) / min(lat):.2f}x)"
        )
    rec = sorted((r for r in ok.values() if r["policy"] == "recompute"), key=lambda r: r["context"])
    # the exponent shows once N is several chunks: fit those points when there are two
    many = [r for r in rec if r["context"] >= 4 * r["recompute_chunk"]]
    fit = many if len(many) >= 2 else rec
    if len(rec) >= 2:
        xs = [math.log(r["context"]) for r in fit]
        ys = [math.log(r["latency_ms"]) for r in fit]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        layers = rec[0]["model"]["n_layers"]
        out["recompute_time_exponent"] = slope
        peaks = [r["peak_tensor_mib"] for r in rec]
        out["recompute_peak_tensor_max_over_min"] = max(peaks) / max(min(peaks), 1e-9)
        lines.append(
            f"recompute per-token time ~ N^{slope:.2f} from {fit[0]['context']:,} to "
            f"{fit[-1]['context']:,} (theory for {layers} layers: about N^{layers} once N "
            f"is many chunks); peak tensor memory {min(peaks):.3f}-{max(peaks):.3f} MiB"
        )
    out["lines"] = lines
    return out
