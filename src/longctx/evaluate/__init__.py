"""``longctx eval RUN_DIR``: validation bits per byte overall, by token position, and at
context lengths beyond training (extrapolation). Writes eval/eval.json and PNG plots."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .._util import (
    LN2,
    Progress,
    atomic_write_json,
    pyplot,
    resolve_device,
    save_figure,
    settings_tag,
)
from ..data import Corpus, DataConfig, eval_windows, load_corpus, task_source
from ..model import DecoderLM, latest_checkpoint, load_checkpoint, load_model
from ..train import RunConfig


@torch.no_grad()
def bits_per_position(
    model: DecoderLM,
    windows: list[Tensor],
    batch: int,
    progress: Progress | None = None,
    neighbours=None,
) -> np.ndarray:
    """Mean bits per token (= per byte) at each position over equal-length windows of
    token ids (each (N + 1,)): a float64 numpy array (N,). ``progress`` counts batches.
    ``neighbours``: for a RETRO model, inputs (b, N) -> their chunks' neighbours
    (:func:`retro_neighbours`). The model's train/eval mode is left as it was."""
    was_training = model.training
    model.eval()
    total = None
    device = next(model.parameters()).device
    for i in range(0, len(windows), batch):
        rows = torch.stack(windows[i : i + batch])  # (b, N + 1)
        nb = None if neighbours is None else neighbours(rows[:, :-1]).to(device)
        nll = model.nll_per_position(rows.to(device), nb).sum(dim=0)  # (N,)
        total = nll if total is None else total + nll
        if progress is not None:
            progress.update(1)
    model.train(was_training)
    return (total / len(windows) / LN2).cpu().numpy()


def retro_neighbours(model: DecoderLM, retro_db: str | Path | None):
    """For a RETRO model, the function :func:`bits_per_position` takes: the model's k
    neighbours of each chunk from the database ``retro_db`` (its run's
    ``data.retro_db``). None for other models. A RETRO model without a database is an
    error (its figures without retrieval are those of ``longctx eval --task retro``)."""
    if not model.cfg.retro.enabled:
        return None
    if not retro_db:
        raise ValueError(
            "a RETRO model is evaluated with its retrieval database: the run has no data.retro_db"
        )
    from ..retro import RetroDB

    db = RetroDB.open(retro_db)
    db.check_compatible(chunk=model.cfg.retro.chunk)
    k = model.cfg.retro.neighbours
    return lambda x: db.sequence_neighbours(x, k)


def position_buckets(context: int, n_buckets: int) -> list[tuple[int, int]]:
    """Log-spaced [lo, hi) position ranges covering 0..context (first bucket is [0, 1))."""
    edges = np.unique(np.geomspace(1, context, num=n_buckets).round().astype(int))
    edges = [0, *[int(e) for e in edges if 0 < e < context], context]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def evaluate_run(
    run_dir: Path,
    *,
    contexts: list[int] | None = None,
    windows: int = 64,
    buckets: int = 12,
    batch: int = 4,
    progress: bool = True,
    model: DecoderLM | None = None,
    corpus: Corpus | None = None,
    device=None,
    memory: dict | None = None,
) -> dict:
    """Bits per byte of a run's latest checkpoint (or ``model``, e.g. the one just
    trained) on its validation text, by position and at several context lengths (default
    1x, 2x, 4x the training context); writes eval/eval.json and its plots (under
    ``memory`` settings eval.<key>-<value>.json, so that each keeps its own); returns the
    results. ``corpus``: the run's corpus if already loaded. ``device``: where the model
    runs when it is loaded here (auto, cpu, cuda, cuda:N). ``memory``: settings of a
    memory model's layers (``DecoderLM.configure_memory``; ``capacity="fit"``: the
    longest evaluated context)."""
    run_dir = Path(run_dir)
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if model is None:
        model, state = load_model(ckpt, resolve_device(device))
    else:
        state = load_checkpoint(ckpt, [])[1]  # its step and config
    model.eval()
    cfg = state["config"]
    train_ctx = int(cfg["train"]["context"])
    contexts = contexts or [train_ctx, 2 * train_ctx, 4 * train_ctx]
    if any(c < 1 for c in contexts):
        raise ValueError(f"contexts must be positive, got {contexts}")
    if windows < 1:
        raise ValueError(f"windows must be >= 1, got {windows}")
    tag = settings_tag(memory)  # other memory settings: their own files
    if memory:
        memory = dict(memory)
        if memory.get("capacity") == "fit":
            memory["capacity"] = max(contexts)
        model.configure_memory(**memory)
    task = task_source(cfg["data"]["source"])
    if task is not None:
        raise ValueError(
            f"{run_dir} was trained on {cfg['data']['source']}, not text: evaluate it with "
            f"--task {task}"
        )
    corpus = corpus or load_corpus(DataConfig.from_dict(cfg["data"]))
    neighbours = retro_neighbours(model, cfg["data"].get("retro_db"))
    results: dict = {
        "run_dir": str(run_dir),
        "checkpoint": str(ckpt),
        "step": state["step"],
        "train_context": train_ctx,
        "unigram_bpb": corpus.unigram_bits_per_token(),
        "retrieval": neighbours is not None,  # a RETRO model reads its database
        "by_context": [],
    }
    t0 = time.monotonic()
    for ctx in sorted(set(contexts)):
        try:
            wins = eval_windows(corpus.val, ctx, windows)
        except ValueError as exc:
            results["by_context"].append({"context": ctx, "skipped": str(exc)})
            continue
        steps = -(-len(wins) // batch)
        with Progress(steps, f"eval ctx={ctx}", enabled=progress, leave=False) as bar:
            per_pos = bits_per_position(model, wins, batch, bar, neighbours)
        entry = {
            "context": ctx,
            "windows": len(wins),
            "bpb": float(per_pos.mean()),
            "buckets": [
                {"positions": [a, b], "bpb": float(per_pos[a:b].mean())}
                for a, b in position_buckets(ctx, buckets)
            ],
        }
        if ctx == train_ctx:
            results["bpb"] = entry["bpb"]
            results["by_position"] = entry["buckets"]
        results["by_context"].append(entry)
    results["seconds"] = time.monotonic() - t0
    out = run_dir / "eval"
    out.mkdir(exist_ok=True)
    results["path"] = str(atomic_write_json(out / f"eval{tag}.json", results))
    results["plots"] = _plot(results, out, tag)
    return results


def _plot(results: dict, out: Path, tag: str = "") -> list[str]:
    plt = pyplot()
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for entry in results["by_context"]:
        if "buckets" not in entry:
            continue
        mids = [(b["positions"][0] + b["positions"][1] - 1) / 2 + 1 for b in entry["buckets"]]
        ax.plot(
            mids,
            [b["bpb"] for b in entry["buckets"]],
            marker="o",
            label=f"context {entry['context']}",
        )
    ax.axhline(results["unigram_bpb"], color="gray", ls=":", label="unigram baseline")
    ax.axvline(results["train_context"], color="k", ls="--", lw=0.8, label="training context")
    ax.set_xscale("log")
    ax.set_xlabel("token position (1 = first predicted token)")
    ax.set_ylabel("bits per byte")
    ax.set_title(f"validation bits per byte by position (step {results['step']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(str(save_figure(fig, out / f"bpb_by_position{tag}.png")))

    done = [e for e in results["by_context"] if "bpb" in e]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([e["context"] for e in done], [e["bpb"] for e in done], marker="o")
    ax.axvline(results["train_context"], color="k", ls="--", lw=0.8, label="training context")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation context length")
    ax.set_ylabel("bits per byte")
    ax.set_title("validation bits per byte vs context length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(str(save_figure(fig, out / f"bpb_by_context{tag}.png")))
    return paths


def run_info(run_dir: Path) -> dict:
    """Config, parameter counts and FLOPs per token of a run's latest checkpoint."""
    ckpt = latest_checkpoint(Path(run_dir) / "checkpoints")
    model, state = load_model(ckpt)
    ctx = int(state["config"]["train"]["context"])
    return {
        "checkpoint": str(ckpt),
        "step": state["step"],
        "tokens": state.get("tokens"),
        "config": RunConfig.from_dict(state["config"]).to_dict(),  # as read now
        "parameters": model.num_params(),
        "non_embedding_parameters": model.num_params(non_embedding=True),
        "context": ctx,
        "flops_per_token": model.flops_per_token(ctx),
    }


__all__ = ["bits_per_position", "evaluate_run", "position_buckets", "retro_neighbours", "run_info"]
