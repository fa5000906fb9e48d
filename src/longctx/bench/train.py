"""``longctx bench train``: training tokens/s and peak memory vs context length for one
model size with dense, dilated (LongNet) and sliding-window attention, with and without
activation checkpointing.

Each step trains on a fixed number of tokens (``--tokens-per-step``, batch = that /
context, at least 1) so every context length does comparable work per step. A case whose
predicted step time exceeds ``--budget`` seconds (or whose predicted memory exceeds what
is free) is recorded as skipped with the prediction, which is how the dense model's
quadratic cost shows at long contexts. ``--checkpointing off,layer`` runs each pattern
plain and with ``train.activation_checkpointing = "layer"`` plus ``--token-chunk``
(``DecoderLM.set_activation_checkpointing``); every row reports peak memory per token.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .._util import parse_numbers, powers_of_two, resolve_device
from ..model import DecoderLM, ModelConfig
from . import common

# the model options of each series ([model] keys; attention and ffn as their tables)
PATTERNS = {
    "dense": {"attention": "dense"},
    # LongNet's paper pattern at 1/4 scale (w = 2048..32768 -> 512..8192, same rates)
    "dilated": {
        "attention": {
            "kind": "dilated",
            "segment_lengths": [512, 1024, 2048, 4096, 8192],
            "dilation_rates": [1, 2, 4, 6, 12],
        }
    },
    "sliding": {"attention": {"kind": "sliding_window", "window": 1024}},
    "colt5": {"attention": "colt5", "ffn": "colt5"},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``longctx bench train``."""
    p.add_argument(
        "--patterns",
        default="dense,dilated,sliding",
        help=f"comma-separated subset of {', '.join(PATTERNS)}",
    )
    p.add_argument("--min-context", type=int, default=2048)
    p.add_argument("--max-context", type=int, default=65536)
    p.add_argument(
        "--contexts",
        default=None,
        help="comma-separated context lengths (increasing) instead of the powers of two "
        "from --min-context to --max-context",
    )
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--tokens-per-step", type=int, default=16384)
    p.add_argument("--steps", type=int, default=2, help="timed steps per case")
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed steps before them (0: time the first step too; fine for long steps)",
    )
    p.add_argument(
        "--checkpointing",
        default="off",
        help="comma-separated subset of off,layer: a series per pattern and choice",
    )
    p.add_argument(
        "--token-chunk",
        type=int,
        default=16384,
        help="tokens per slice of the per-token work in the checkpointed series",
    )
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    common.add_device_option(p)
    p.add_argument(
        "--budget",
        type=float,
        default=120.0,
        help="skip a case whose predicted time (warm-up + timed steps) exceeds this",
    )
    p.add_argument(
        "--memory-limit-gib",
        type=float,
        default=None,
        help="skip a case predicted to need more than this (default: 90%% of free memory)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench-out/train"))


def run(args) -> list[dict]:
    """Run the benchmark (module docstring); returns its rows."""
    names = [p.strip() for p in args.patterns.split(",") if p.strip()]
    unknown = [p for p in names if p not in PATTERNS]
    if unknown or not names:
        raise ValueError(f"unknown pattern(s) {unknown}; choose from {list(PATTERNS)}")
    for flag in ("d_model", "layers", "heads", "tokens_per_step", "steps", "token_chunk"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    modes = [m.strip() for m in args.checkpointing.split(",") if m.strip()]
    if not modes or any(m not in ("off", "layer") for m in modes):
        raise ValueError(
            f"--checkpointing must list 'off' and/or 'layer', got {args.checkpointing!r}"
        )
    series = [(name, mode) for name in names for mode in modes]
    if args.warmup < 0:
        raise ValueError("--warmup must be >= 0")
    if args.contexts:
        contexts = parse_numbers(args.contexts, int, "--contexts", positive=True)
        if contexts != sorted(set(contexts)) or min(contexts) < 16:
            raise ValueError(f"--contexts must increase and be >= 16, got {args.contexts!r}")
    else:
        contexts = powers_of_two(
            args.min_context, args.max_context, minimum=16, names="--min-context/--max-context"
        )
    device = resolve_device(args.device)
    info = common.machine_info(device)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "results.jsonl"
    cfgs = {
        name: ModelConfig(
            d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, **PATTERNS[name]
        )
        for name in names
    }
    rows = common.sweep(
        series,
        contexts,
        lambda s, ctx: _row(s, cfgs[s[0]], ctx, args, info),
        lambda s, ctx, row: _measure(cfgs[s[0]], ctx, row, args, device),
        budget=args.budget,
        device=device,
        cost="train_flops_per_step",
        size="activation_proxy",
        results=results,
        desc="bench train",
        memory_limit=None if args.memory_limit_gib is None else int(args.memory_limit_gib * 2**30),
    )
    measured = any(r["status"] == "ok" for r in rows)
    draw = (lambda: plot(rows, out_dir / "train.png", info)) if measured else None
    common.report(common.format_table(rows, COLUMNS), summarize(rows), out_dir, results, draw)
    return rows


def _row(series: tuple[str, str], cfg: ModelConfig, ctx: int, args, info: dict) -> dict:
    name, mode = series
    batch = max(1, args.tokens_per_step // ctx)
    model = DecoderLM(cfg)
    fpt = model.flops_per_token(ctx)
    tokens = batch * ctx
    checkpointed = mode == "layer"
    return {
        "bench": "train",
        "pattern": name,
        "checkpointing": mode,
        "token_chunk": args.token_chunk if checkpointed else 0,
        "series": f"{name}+ckpt" if checkpointed else name,
        "context": ctx,
        "batch": batch,
        "tokens_per_step": tokens,
        "model": cfg.to_dict(),
        "parameters": model.num_params(),
        "bf16": args.bf16,
        "train_flops_per_step": fpt["train"] * tokens * (args.steps + args.warmup),
        # activations grow with tokens per step (x layers unless recomputed); a proxy for
        # memory prediction (the sweep scales the previous case's peak by its ratio)
        "activation_proxy": tokens * cfg.d_model * (8 if checkpointed else 64 * cfg.n_layers),
        "machine": info,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _measure(cfg: ModelConfig, ctx: int, row: dict, args, device: torch.device) -> None:
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    with common.PeakMemory(device) as mem:
        model = DecoderLM(cfg).to(device)
        model.set_activation_checkpointing(row["checkpointing"], row["token_chunk"])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randint(0, 256, (row["batch"], ctx + 1), generator=g).to(device)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                loss = model.loss(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step()
        common.synchronize(device)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        common.synchronize(device)
        seconds = (time.perf_counter() - t0) / args.steps
        peak = mem.peak()
    row.update(
        status="ok",
        step_s=seconds,
        time_s=warm + seconds * args.steps,
        tokens_per_s=row["tokens_per_step"] / seconds,
        peak_mem_bytes=peak,
        peak_mem_gib=peak / 2**30,
        peak_mem_over_start=peak - mem.start_rss,
        bytes_per_token=(peak - mem.start_rss) / row["tokens_per_step"],
    )


COLUMNS = [
    ("series", "series", ""),
    ("context", "context", ","),
    ("batch", "batch", ""),
    ("step s", "step_s", ".3f"),
    ("tokens/s", "tokens_per_s", ",.0f"),
    ("peak mem GiB", "peak_mem_gib", ".2f"),
    ("bytes/token", "bytes_per_token", ",.0f"),
    ("status", "status", ""),
]


def summarize(rows: list[dict]) -> dict:
    """Dilated over dense tokens/s at each context both measured (plain series); per
    series, tokens/s and bytes per token at the longest measured context relative to
    16k and 64k."""
    lines = [""]
    out: dict = {}
    by = {(r["series"], r["context"]): r for r in rows if r["status"] == "ok"}
    for ctx in sorted({r["context"] for r in rows}):
        dense, dil = by.get(("dense", ctx)), by.get(("dilated", ctx))
        if dense and dil:
            ratio = dil["tokens_per_s"] / dense["tokens_per_s"]
            out[f"dilated_over_dense_tokens_per_s_{ctx}"] = ratio
            lines.append(f"context {ctx:,}: dilated trains {ratio:.1f}x the tokens/s of dense")
    for series in sorted({r["series"] for r in rows}):
        ok = sorted((r for r in rows if r["series"] == series and r["status"] == "ok"),
                    key=lambda r: r["context"])  # fmt: skip
        if not ok:
            continue
        top = ok[-1]
        for ref_ctx, key, what in ((16384, "tokens_per_s", "tokens/s"),
                                   (65536, "bytes_per_token", "bytes/token")):  # fmt: skip
            ref = by.get((series, ref_ctx))
            if ref and top["context"] > ref_ctx:
                ratio = top[key] / ref[key]
                out[f"{series}_{key}_{top['context']}_over_{ref_ctx}"] = ratio
                lines.append(
                    f"{series}: {what} at {top['context']:,} = {ratio:.2f}x that at {ref_ctx:,}"
                )
    out["lines"] = lines
    return out


def plot(rows: list[dict], path: Path, info: dict) -> Path:
    """Tokens/s and peak memory vs context, one line per pattern."""
    r0 = rows[0]
    m = r0["model"]
    return common.plot_sweep(
        rows,
        path,
        x="context",
        xlabel="context length",
        panels=[
            ("tokens_per_s", "training tokens/s"),
            ("peak_mem_gib", "peak memory (GiB)"),
            ("bytes_per_token", "peak memory over the start, bytes per token"),
        ],
        series=lambda r: (r["series"], r["pattern"], r["checkpointing"] == "layer"),
        title=(
            f"training throughput, d_model={m['d_model']} layers={m['n_layers']} "
            f"heads={m['n_heads']}, {r0['tokens_per_step']:,} tokens/step, on "
            f"{info['cpu']} ({info['torch_threads']} threads)"
        ),
    )
