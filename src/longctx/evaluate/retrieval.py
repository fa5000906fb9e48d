"""Retrieval evaluations (docs/spec.md, "Evaluations"): passkey and kv-retrieval accuracy
over a grid of context lengths x needle depths, with a 95% Wilson confidence interval per
cell, a JSON file and a heatmap.

A trial counts as correct when the model's greedy continuation of the prompt is exactly
the answer. That is decided in one teacher-forced forward pass over prompt + answer: the
greedy continuation equals the answer iff the argmax at every answer position is the
answer token. A memory model makes that pass in two calls with one state (the prompt
up to its last token, then the rest; the same logits), and in between each trial
records whether its needle was still in memory; accuracy is also reported split by
that.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .._util import Progress, atomic_write_json, pyplot, save_figure
from ..data.tasks import TASKS, make_example
from ..model import DecoderLM
from ..nn.state import MemoryState, ModelState

RECALL_EVERY = 16  # an approximate index's recall is counted on every 16th query


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Trial:
    """One trial's outcome: the greedy answer was exact (``correct``), and, for a model
    with memory layers, whether the whole needle was still readable when the question
    was asked (``in_memory``: in every memory layer's store or in the current window;
    None for a model without memory)."""

    correct: bool
    in_memory: bool | None = None


def needle_in_memory(state: ModelState, needle: tuple[int, int], row: int) -> bool:
    """Whether every position of ``needle`` [start, end) is readable by the next query
    of ``row``: held by each memory layer's store, or in its current window."""
    a, b = needle
    want = torch.arange(a, b)
    for layer_state in state.layers:
        if not isinstance(layer_state, MemoryState):
            continue
        window_start = layer_state.length - layer_state.held
        store = layer_state.store
        held = store.pos[row][store.valid[row]].cpu()
        seen = torch.isin(want, held) | (want >= window_start)
        if not bool(seen.all()):
            return False
    return True


@torch.no_grad()
def exact_matches(model: DecoderLM, examples, batch: int = 4, stats: dict | None = None):
    """Greedy exact match of each example's answer (examples of equal total length):
    a :class:`Trial` per example. A memory model runs the prompt up to its last token,
    notes which needles its memory still holds, then the rest (the same logits as one
    forward). ``stats``: gets the faiss indexes' recall counts added (``recall_hits``,
    ``recall_total``)."""
    was = model.training
    model.eval()
    device = model.embed.weight.device
    memory = bool(model.memory_layers())
    out: list[Trial] = []
    for i in range(0, len(examples), batch):
        group = examples[i : i + batch]
        seq = torch.tensor([e.prompt + e.answer for e in group], device=device)
        a = len(group[0].prompt)
        if not memory:
            hidden = model.hidden_states(seq[:, :-1])[:, a - 1 :]  # (b, len(answer), C)
            flags = [None] * len(group)
        else:
            state = model.new_state(len(group))
            model.hidden_states(seq[:, : a - 1], state)  # up to the question's last token
            flags = [needle_in_memory(state, e.needle, r) for r, e in enumerate(group)]
            hidden = model.hidden_states(seq[:, a - 1 : -1], state)  # (b, len(answer), C)
            if stats is not None:
                for layer_state in state.layers:
                    if isinstance(layer_state, MemoryState) and layer_state.store.index is not None:
                        index = layer_state.store.index
                        stats["recall_hits"] = stats.get("recall_hits", 0) + index.hits
                        stats["recall_total"] = stats.get("recall_total", 0) + index.total
        logits = model.head(hidden)  # the answer positions only
        for row, (e, flag) in enumerate(zip(group, flags)):
            pred = logits[row].argmax(dim=-1)
            out.append(Trial(pred.tolist() == e.answer, flag))
    model.train(was)
    return out


def _memory_settings(model: DecoderLM, capacity) -> dict | None:
    """The memory layers' settings as they are now (None: no memory layers)."""
    layers = model.memory_layers()
    if not layers:
        if capacity is not None:
            raise ValueError(
                "--memory-capacity applies to memory models; this model has attention "
                f"{model.cfg.attention.kind!r}"
            )
        return None
    first = layers[0]
    return {
        "capacity": first.capacity,
        "retrieval": first.retrieval,
        "faiss_index": first.faiss_index,
        "nprobe": first.nprobe,
        "recall_every": first.recall_every,
    }


def _summary(cells: list[dict]) -> dict:
    """Accuracy with its interval over cells, split by whether the needle was still in
    memory (for memory models)."""
    k, n = sum(c["correct"] for c in cells), sum(c["trials"] for c in cells)
    out = {"accuracy": k / n, "correct": k, "trials": n, "ci95": list(wilson_interval(k, n))}
    if "evicted" in cells[0]:
        out["evicted"] = sum(c["evicted"] for c in cells)
        for part in ("in_memory", "evicted"):
            kk = sum(c[f"correct_{part}"] for c in cells)
            nn = sum(c[f"trials_{part}"] for c in cells)
            out[f"accuracy_{part}"] = kk / nn if nn else None
            out[f"trials_{part}"] = nn
    return out


def evaluate_retrieval(
    model: DecoderLM,
    task: str,
    lengths: list[int],
    depths: list[float],
    trials: int,
    *,
    seed: int = 0,
    batch: int = 4,
    progress: bool = True,
    memory_capacity: int | str | None = None,
) -> dict:
    """Exact-match accuracy of ``task`` over lengths x depths, ``trials`` per cell (each
    with its 95% Wilson interval), and per length.

    For a memory model, each trial also records whether the needle was still in memory
    when the question was asked; accuracy is reported split by that, with a warning
    when needles were evicted; with ``faiss`` retrieval, the index's recall against
    exact top-k (on every ``RECALL_EVERY``-th query) is reported. ``memory_capacity``:
    entries per memory layer and row (an integer; "fit": each context length, so
    nothing is evicted; None: the model's own). The model's memory settings are
    restored afterwards."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if not lengths or not depths:
        raise ValueError("need at least one context length and one depth")
    if memory_capacity not in (None, "fit") and (
        isinstance(memory_capacity, bool)
        or not isinstance(memory_capacity, int)
        or memory_capacity < 1
    ):
        raise ValueError(
            f"memory capacity must be an integer >= 1 or 'fit', got {memory_capacity!r}"
        )
    settings = _memory_settings(model, memory_capacity)
    cells, by_length_seconds, stats = [], {}, {}
    total = len(lengths) * len(depths) * trials
    bar = Progress(total, f"eval {task}", unit="trial", enabled=progress)
    t0 = time.monotonic()
    try:
        for length in lengths:
            t_len = time.monotonic()
            if settings is not None:
                capacity = settings["capacity"] if memory_capacity is None else memory_capacity
                model.configure_memory(
                    capacity=length if capacity == "fit" else capacity,
                    recall_every=settings["recall_every"] or RECALL_EVERY,
                )
            for depth in depths:
                rng = random.Random(f"{seed}-{task}-{length}-{depth}")
                examples = [make_example(task, length, depth, rng) for _ in range(trials)]
                results: list[Trial] = []
                for i in range(0, trials, batch):
                    results += exact_matches(model, examples[i : i + batch], batch, stats)
                    bar.update(min(batch, trials - i))
                cells.append(_cell(length, depth, results))
            by_length_seconds[length] = time.monotonic() - t_len
    finally:
        bar.close()
        if settings is not None:
            model.configure_memory(
                capacity=settings["capacity"], recall_every=settings["recall_every"]
            )
    by_length = {}
    for length in lengths:
        entry = _summary([c for c in cells if c["length"] == length])
        entry["seconds_per_trial"] = by_length_seconds[length] / (len(depths) * trials)
        by_length[str(length)] = entry
    result = {
        "task": task,
        "lengths": lengths,
        "depths": depths,
        "trials_per_cell": trials,
        "seed": seed,
        "cells": cells,
        "by_length": by_length,
        "seconds": time.monotonic() - t0,
        "warnings": [],
    }
    if settings is not None:
        memory = dict(settings)
        memory["capacity"] = settings["capacity"] if memory_capacity is None else memory_capacity
        if stats.get("recall_total"):
            memory["recall"] = stats["recall_hits"] / stats["recall_total"]
            memory["recall_queries"] = stats["recall_total"] // model.memory_layers()[0].topk
        result["memory"] = memory
        for length, entry in by_length.items():
            if entry["evicted"]:
                acc = entry["accuracy_in_memory"]
                kept = "none was kept" if acc is None else f"accuracy on the rest {acc:.1%}"
                result["warnings"].append(
                    f"context {int(length):,}: {entry['evicted']} of {entry['trials']} needles "
                    f"were evicted from memory (capacity {memory['capacity']}) before the "
                    f"question ({kept}); use --memory-capacity fit (or a larger capacity) to "
                    "keep the whole context"
                )
    return result


def _cell(length: int, depth: float, results: list[Trial]) -> dict:
    k, n = sum(r.correct for r in results), len(results)
    lo, hi = wilson_interval(k, n)
    cell = {
        "length": length,
        "depth": depth,
        "trials": n,
        "correct": k,
        "accuracy": k / n,
        "ci95": [lo, hi],
    }
    if results[0].in_memory is not None:
        kept = [r for r in results if r.in_memory]
        cell["evicted"] = n - len(kept)
        cell["trials_in_memory"] = len(kept)
        cell["correct_in_memory"] = sum(r.correct for r in kept)
        cell["trials_evicted"] = n - len(kept)
        cell["correct_evicted"] = k - cell["correct_in_memory"]
    return cell


def plot_heatmap(result: dict, path: Path, title: str = "") -> Path:
    """Accuracy per (depth, length) cell as a heatmap PNG."""
    plt = pyplot()
    lengths, depths = result["lengths"], result["depths"]
    grid = torch.zeros(len(depths), len(lengths))
    for c in result["cells"]:
        grid[depths.index(c["depth"]), lengths.index(c["length"])] = c["accuracy"]
    fig, ax = plt.subplots(figsize=(1.4 * len(lengths) + 2, 0.6 * len(depths) + 1.8))
    im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n:,}" for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for c in result["cells"]:
        x, y = lengths.index(c["length"]), depths.index(c["depth"])
        ax.text(x, y, f"{c['accuracy']:.0%}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax, label="exact-match accuracy")
    ax.set_title(
        title or f"{result['task']} ({result['trials_per_cell']} trials per cell)", fontsize=9
    )
    fig.tight_layout()
    return save_figure(fig, path)


def write_results(result: dict, out_dir: Path, title: str = "", tag: str = "") -> tuple[Path, Path]:
    """Write ``<task><tag>.json`` and ``<task><tag>.png`` (the heatmap) under
    ``out_dir`` (``tag``: e.g. :func:`~longctx._util.settings_tag` of the memory
    settings used)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = result["task"].replace("-", "_") + tag
    js = atomic_write_json(out_dir / f"{name}.json", result)
    return js, plot_heatmap(result, out_dir / f"{name}.png", title)
