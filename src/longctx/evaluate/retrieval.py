"""Retrieval evaluations (docs/spec.md, "Evaluations"): passkey and kv-retrieval accuracy
over a grid of context lengths x needle depths, with a 95% Wilson confidence interval per
cell, a JSON file and a heatmap.

A trial counts as correct when the model's greedy continuation of the prompt is exactly
the answer. That is decided in one teacher-forced forward pass over prompt + answer: the
greedy continuation equals the answer iff the argmax at every answer position is the
answer token.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch

from .._util import Progress, atomic_write_json, pyplot, save_figure
from ..data.tasks import TASKS, make_example
from ..model import DecoderLM


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@torch.no_grad()
def exact_matches(model: DecoderLM, examples, batch: int = 4) -> list[bool]:
    """Greedy exact match of each example's answer (examples of equal total length)."""
    was = model.training
    model.eval()
    device = model.embed.weight.device
    out: list[bool] = []
    for i in range(0, len(examples), batch):
        group = examples[i : i + batch]
        seq = torch.tensor([e.prompt + e.answer for e in group], device=device)
        logits = model(seq[:, :-1])  # (b, L - 1, V)
        for row, e in enumerate(group):
            a = len(e.prompt)
            pred = logits[row, a - 1 : a - 1 + len(e.answer)].argmax(dim=-1)
            out.append(pred.tolist() == e.answer)
    model.train(was)
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
) -> dict:
    """Exact-match accuracy of ``task`` over lengths x depths, ``trials`` per cell (each
    with its 95% Wilson interval), and per length."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if not lengths or not depths:
        raise ValueError("need at least one context length and one depth")
    cells = []
    total = len(lengths) * len(depths) * trials
    bar = Progress(total, f"eval {task}", unit="trial", enabled=progress)
    t0 = time.monotonic()
    for length in lengths:
        for depth in depths:
            rng = random.Random(f"{seed}-{task}-{length}-{depth}")
            examples = [make_example(task, length, depth, rng) for _ in range(trials)]
            hits = []
            for i in range(0, trials, batch):
                hits += exact_matches(model, examples[i : i + batch], batch)
                bar.update(min(batch, trials - i))
            k = sum(hits)
            lo, hi = wilson_interval(k, trials)
            cells.append(
                {
                    "length": length,
                    "depth": depth,
                    "trials": trials,
                    "correct": k,
                    "accuracy": k / trials,
                    "ci95": [lo, hi],
                }
            )
    bar.close()
    by_length = {}
    for length in lengths:
        row = [c for c in cells if c["length"] == length]
        k, n = sum(c["correct"] for c in row), sum(c["trials"] for c in row)
        by_length[str(length)] = {
            "accuracy": k / n,
            "correct": k,
            "trials": n,
            "ci95": list(wilson_interval(k, n)),
        }
    return {
        "task": task,
        "lengths": lengths,
        "depths": depths,
        "trials_per_cell": trials,
        "seed": seed,
        "cells": cells,
        "by_length": by_length,
        "seconds": time.monotonic() - t0,
    }


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


def write_results(result: dict, out_dir: Path, title: str = "") -> tuple[Path, Path]:
    """Write ``<task>.json`` and ``<task>.png`` (the heatmap) under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = result["task"].replace("-", "_")
    js = atomic_write_json(out_dir / f"{name}.json", result)
    return js, plot_heatmap(result, out_dir / f"{name}.png", title)
