"""The figures of one trained comparison run, each measured the same way for every
method: its size, what its training reached in the budget (steps, tokens, tokens/s,
peak memory), validation bits per byte at 1x and 4x its training context and by
position, kv-retrieval exact match at each length (with Wilson intervals), and decoding
after a long prompt (ms per token, cache bytes).

Memory models (Focused-Transformer memory, LongMem) keep the whole context in memory for
kv-retrieval and decoding (capacity = the longest length); a RETRO model reads its
database for bits per byte and decoding (kv-retrieval asks about the prompt, which the
database does not hold, so there it is its decoder's own answer).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ..data import load_corpus
from ..evaluate import evaluate_run
from ..evaluate.retrieval import evaluate_retrieval
from ..model import latest_checkpoint, load_checkpoint, load_model
from ..model.generate import generate
from ..train import RunConfig
from .plan import Settings

DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def training_figures(run_dir: Path) -> dict:
    """What a finished run's training reached: steps, tokens, training seconds (across
    resumes), tokens/s over them, the final validation figure and the peak memory its
    training process logged."""
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    state = load_checkpoint(ckpt, [])[1]
    seconds = float(state.get("seconds", 0.0))
    rows = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    peaks = [r["peak_mem_gib"] for r in rows if r.get("peak_mem_gib") is not None]
    final = [r["val_bpb"] for r in rows if r.get("final")]
    tokens = int(state["tokens"])
    return {
        "steps": int(state["step"]),
        "tokens": tokens,
        "train_seconds": seconds,
        "train_tokens_per_s": tokens / seconds if seconds > 0 else None,
        "peak_mem_gib": max(peaks) if peaks else None,
        "val_bpb": final[-1] if final else None,
    }


def measure_run(
    run_dir: Path, settings: Settings, *, device=None, progress: bool = True, log=print
) -> dict:
    """Every figure of a trained run (module docstring), as a JSON-able dict."""
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    model, state = load_model(ckpt, device)
    cfg = RunConfig.from_dict(state["config"])
    ctx = cfg.train.context
    corpus = load_corpus(cfg.data)
    figures = {
        "checkpoint": str(ckpt),
        "method": describe(cfg),
        "params": model.num_params(),
        "trainable_params": model.num_trainable(),
        "context": ctx,
        **training_figures(run_dir),
    }
    longest = max(*settings.lengths, settings.decode_context)
    if model.memory_layers() or model.side is not None:  # keep the whole context
        model.configure_memory(capacity=_multiple(longest, model))

    t0 = time.monotonic()
    log("  bits per byte at 1x and 4x the training context")
    res = evaluate_run(
        run_dir,
        contexts=[ctx, 4 * ctx],
        windows=settings.windows,
        model=model,
        corpus=corpus,
        progress=progress,
    )
    figures["bpb"], figures["bpb_by_position"] = {}, {}
    for entry in res["by_context"]:
        key = "1x" if entry["context"] == ctx else "4x"
        figures["bpb"][key] = entry.get("bpb")
        figures["bpb_by_position"][key] = entry.get("buckets")
        if "skipped" in entry:
            figures.setdefault("notes", []).append(f"{key}: {entry['skipped']}")
    figures["unigram_bpb"] = res["unigram_bpb"]

    log(f"  kv-retrieval at {', '.join(f'{n:,}' for n in settings.lengths)} tokens")
    kv = evaluate_retrieval(
        model,
        "kv-retrieval",
        list(settings.lengths),
        DEPTHS,
        settings.trials,
        seed=settings.seed,
        progress=progress,
    )
    figures["kv"] = {
        length: {k: entry[k] for k in ("accuracy", "ci95", "trials", "correct") if k in entry}
        for length, entry in kv["by_length"].items()
    }

    log(f"  decoding after {settings.decode_context:,} tokens")
    figures["decode"] = decode_figures(model, cfg, corpus.val, settings)
    figures["measure_seconds"] = time.monotonic() - t0
    return figures


def decode_figures(model, cfg: RunConfig, val: np.ndarray, settings: Settings) -> dict:
    """Greedy decoding of ``decode_tokens`` after a prompt of ``decode_context``
    validation tokens (repeated if the split is shorter): median ms per new token, the
    cache's bytes after the last, the prefill's seconds."""
    n = settings.decode_context
    reps = -(-n // len(val))
    prompt = torch.from_numpy(np.tile(val, reps)[:n].astype(np.int64))
    retriever = None
    if cfg.model.retro.enabled:
        from ..retro import RetroDB

        retriever = RetroDB.open(cfg.data.retro_db).retriever(cfg.model.retro.neighbours)
    policy = "dilated" if cfg.model.attention.kind == "dilated" else "full"
    gen = generate(
        model,
        prompt,
        settings.decode_tokens,
        cache=policy,
        temperature=0,
        retriever=retriever,
    )
    return {
        "context": n,
        "cache_policy": policy,
        "ms_per_token": 1000 * statistics.median(gen.step_seconds),
        "cache_bytes": gen.cache_bytes[-1],
        "prefill_s": gen.prefill_seconds,
    }


def describe(cfg: RunConfig) -> str:
    """A short name of a run's method, e.g. "dense", "dilated (LongNet)", "LongMem"."""
    m = cfg.model
    if m.longmem.enabled:
        return f"LongMem ({m.longmem.side_layers}-layer SideNet, frozen backbone)"
    kind = m.attention.kind
    names = {
        "dense": "dense",
        "sliding_window": f"sliding window ({getattr(m.attention, 'window', '?')})",
        "dilated": "dilated (LongNet)",
        "colt5": "CoLT5",
        "memory": "Focused-Transformer memory",
        "linear": "linear attention",
        "retention": "retention (RetNet)",
    }
    name = names.get(kind, kind)
    if m.retro.enabled:
        name = f"RETRO ({name} decoder)"
    return name


def _multiple(n: int, model) -> int:
    """``n`` rounded up to what the model's memory capacity must divide by (a LongMem
    bank's chunk)."""
    if model.side is None:
        return n
    chunk = model.cfg.longmem.chunk
    return -(-n // chunk) * chunk


__all__ = ["decode_figures", "describe", "measure_run", "training_figures"]
