"""``longctx bench hf``: a tiny random Llama in Hugging Face transformers, its attention
``sdpa`` (transformers' dense backend, full DynamicCache) against ``longctx_dilated``
(LongNet dilated attention with the bounded :class:`~longctx.hf.DilatedCache`).

At each context length: the prefill time of the prompt (one forward, last logits only),
then the median time of ``--decode`` generated tokens, and the bytes the cache holds.
A prefill predicted (quadratically for sdpa, linearly for dilated, from the previous
length) to take longer than ``--budget`` seconds is skipped; the cache is then filled
with random keys and values of the same shape instead (decode time depends on the cache's
size, not its content), and the row says so.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from .._util import Progress, parse_numbers, resolve_device
from . import common

BACKENDS = ("sdpa", "longctx_dilated")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``longctx bench hf``."""
    p.add_argument("--lengths", default="8192,32768,131072", help="context lengths")
    p.add_argument("--backends", default=",".join(BACKENDS), help="sdpa, longctx_dilated")
    p.add_argument("--segment-lengths", default="2048,8192,32768", help="dilated: w_b")
    p.add_argument("--dilation-rates", default="1,4,16", help="dilated: r_b")
    p.add_argument("--hidden", type=int, default=256, help="the Llama's hidden size")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--decode", type=int, default=16, help="timed generated tokens per case")
    p.add_argument("--budget", type=float, default=120.0, help="seconds a prefill may take")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench-out/hf"))
    common.add_device_option(p)


def _model(args, backend: str, device):
    import transformers

    import longctx.hf as lh

    cfg = transformers.LlamaConfig(
        vocab_size=264,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=1 << 20,
    )
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(cfg).eval().to(device)
    if backend == "longctx_dilated":
        ws = parse_numbers(args.segment_lengths, int, "--segment-lengths")
        rs = parse_numbers(args.dilation_rates, int, "--dilation-rates")
        lh.configure(model, "dilated", segment_lengths=ws, dilation_rates=rs)
        return model, lambda: lh.DilatedCache(model)
    model.set_attn_implementation(backend)
    return model, lambda: transformers.DynamicCache(config=model.config)


def _cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def _fill_random(model, cache, n: int, device) -> None:
    """A full cache of n random keys/values per layer (a skipped prefill's stand-in)."""
    cfg = model.config
    D = cfg.hidden_size // cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        k = torch.randn(1, cfg.num_key_value_heads, n, D, device=device)
        cache.update(k, torch.randn_like(k), i)


def run(args) -> list[dict]:
    """Run the benchmark (module docstring); returns its rows."""
    lengths = parse_numbers(args.lengths, int, "--lengths")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in backends if b not in BACKENDS]
    if bad or not backends:
        raise ValueError(f"unknown backend {bad}; choose from {BACKENDS}")
    if args.decode < 1:
        raise ValueError(f"--decode must be >= 1, got {args.decode}")
    device = resolve_device(args.device)
    info = common.machine_info(device)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    results.write_text("")
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, 256, (1, max(lengths) + args.decode), generator=g).to(device)
    rows: list[dict] = []
    bar = Progress(len(backends) * len(lengths), "bench hf", unit="case")
    try:
        for backend in backends:
            model, new_cache = _model(args, backend, device)
            last = None  # (n, prefill seconds) of the previous measured prefill
            for n in lengths:
                bar.set_postfix(case=f"{backend} {n:,}")
                row = _measure(model, new_cache, backend, n, ids, last, args, device)
                if row["prefill_s"] is not None:
                    last = (n, row["prefill_s"])
                row.update(bench="hf", machine=info, time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
                rows.append(row)
                common.append_jsonl(results, row)
                bar.update(1)
    finally:
        bar.close()

    def draw():
        return common.plot_sweep(
            rows,
            args.out / "hf.png",
            x="context",
            xlabel="context (tokens)",
            panels=[
                ("prefill_s", "prefill (s)"),
                ("decode_ms_per_token", "decode, ms per token"),
                ("cache_mib", "cache (MiB)"),
            ],
            series=lambda r: (r["backend"], r["backend"], False),
            title=f"tiny Llama in transformers, on {info['cpu']}",
        )

    common.report(common.format_table(rows, COLUMNS), summarize(rows), args.out, results, draw)
    return rows


def _measure(model, new_cache, backend, n, ids, last, args, device) -> dict:
    cache = new_cache()
    scale = 2 if backend == "sdpa" else 1  # prefill cost grows as n^2 or n
    predicted = None if last is None else last[1] * (n / last[0]) ** scale
    prefill = None
    note = ""
    with torch.no_grad():
        if predicted is not None and predicted > args.budget and backend == "sdpa":
            _fill_random(model, cache, n, device)
            note = f"prefill skipped (predicted {predicted:.0f} s > {args.budget:.0f} s)"
        else:
            common.synchronize(device)
            t = time.perf_counter()
            model(ids[:, :n], cache=cache, use_cache=True, logits_to_keep=1)
            common.synchronize(device)
            prefill = time.perf_counter() - t
        steps = []
        for i in range(args.decode):
            common.synchronize(device)
            t = time.perf_counter()
            model(ids[:, n + i : n + i + 1], cache=cache, use_cache=True)
            common.synchronize(device)
            steps.append(time.perf_counter() - t)
    nbytes = _cache_bytes(cache)
    return {
        "status": "ok",
        "backend": backend,
        "context": n,
        "prefill_s": prefill,
        "decode_ms_per_token": 1000 * statistics.median(steps),
        "cache_bytes": nbytes,
        "cache_mib": nbytes / 2**20,
        "note": note,
    }


COLUMNS = [
    ("backend", "backend", ""),
    ("context", "context", ","),
    ("prefill s", "prefill_s", ".2f"),
    ("decode ms/token", "decode_ms_per_token", ".2f"),
    ("cache MiB", "cache_mib", ".2f"),
    ("", "note", ""),
]


def summarize(rows: list[dict]) -> dict:
    """Per context: dilated over sdpa decode time and cache bytes."""
    out, lines = {}, [""]
    for n in sorted({r["context"] for r in rows}):
        by = {r["backend"]: r for r in rows if r["context"] == n}
        if set(BACKENDS) <= set(by):
            d, s = by["longctx_dilated"], by["sdpa"]
            ratio = d["decode_ms_per_token"] / s["decode_ms_per_token"]
            mem = d["cache_bytes"] / s["cache_bytes"]
            out[f"decode_time_dilated_over_sdpa_{n}"] = ratio
            out[f"cache_bytes_dilated_over_sdpa_{n}"] = mem
            lines.append(
                f"context {n:,}: dilated decode {ratio:.2f}x sdpa's time, cache {mem:.3f}x"
            )
    out["lines"] = lines
    return out
