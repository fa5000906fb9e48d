"""RETRO evaluation (Borgeaud et al., sections 2.6 and 4): bits per byte of validation
chunks with retrieval, without, with only the neighbours' chunks N or only their
continuations F, the leakage curve, and the oracle probe.

Validation windows of the training context are cut into chunks of m tokens; a chunk's
bits are those of predicting its tokens (the window's first token is never predicted,
and its last target, which starts a chunk of its own, is not evaluated).
Each window's chunks retrieve their neighbours from the run's database (validation text
is not in it). The leakage curve: for each evaluated chunk C, r(C) = the longest run of
tokens it shares with its 10 nearest database chunks [N, F], over m; bpb(alpha) is the
bits over the bytes of the chunks with r(C) <= alpha, with each bin's share of chunks,
for the model and (``baseline``) a model without retrieval on the same chunks. The
oracle probe gives each chunk the true next chunk as its neighbour's continuation: a
model that reads its neighbours at the right offset then nearly copies (chunks >= 2).
Copying: a token of chunk u >= 1 is copyable when it and the 8 tokens before it occur
in one of the neighbours chunk u reads; bits per byte on the copyable tokens and on the
rest, for each variant, say whether the model copies, and the copyable tokens' share of
the baseline's bits bounds what copying could buy. In-context copying: the decoder's
bits on a validation span fed a second time, against the first (does it copy at all?).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .._util import atomic_write_json, pyplot, save_figure
from ..data.corpus import eval_windows
from ..data.tokenizer import PAD
from ..model import DecoderLM
from ..retro import RetroDB, chunk_overlap, copyable

ALPHAS = (0.125, 0.25, 0.5, 0.75, 1.0)
OVERLAP_NEIGHBOURS = 10  # the paper's r(C) uses the 10 nearest chunks
COPY_CONTEXT = 8  # a token is copyable when it and the 8 tokens before it are in a neighbour
REPEAT_SPAN = 128  # in-context copying: validation spans of up to 128 tokens, fed twice
REPEAT_SPANS = 32


def oracle_neighbours(windows: Tensor, m: int, k: int) -> Tensor:
    """(B, l, k, 2m): for each chunk u of windows (B, N + 1), one neighbour [chunk u, the
    true next chunk] (PAD past the window's end), the other k - 1 absent."""
    B, n1 = windows.shape
    chunks = (n1 - 1) // m
    padded = torch.full((B, (chunks + 1) * m), PAD, dtype=torch.long)
    padded[:, : min(n1, padded.shape[1])] = windows[:, : padded.shape[1]]
    out = torch.full((B, chunks, k, 2 * m), PAD, dtype=torch.long)
    for u in range(chunks):
        out[:, u, 0] = padded[:, u * m : (u + 2) * m]
    return out


def only(neighbours: Tensor, part: str) -> Tensor:
    """Neighbours (..., 2m) with the other half absent: ``part`` "N" keeps the chunk,
    "F" keeps the continuation."""
    m = neighbours.shape[-1] // 2
    out = neighbours.clone()
    if part == "N":
        out[..., m:] = PAD
    else:
        out[..., :m] = PAD
    return out


def token_bits(model: DecoderLM, windows: Tensor, neighbours: Tensor | None, m: int) -> Tensor:
    """Bits (B, l, m) of predicting each token of each chunk (chunk u: tokens
    um..um+m-1 of the window; the first token of chunk 0 is not predicted: 0), on the
    CPU; the model runs on its own device."""
    device = model.embed.weight.device
    with torch.no_grad():
        nb = None if neighbours is None else neighbours.to(device)
        nll = model.nll_per_position(windows.to(device), nb)  # (B, N): predicts token t + 1
    B, N = nll.shape
    chunks = N // m
    padded = torch.cat([nll.new_zeros(B, 1), nll], dim=1)[:, : chunks * m]  # token j's NLL
    return padded.view(B, chunks, m).cpu() / math.log(2)


def chunk_bits(model: DecoderLM, windows: Tensor, neighbours: Tensor | None, m: int) -> Tensor:
    """Bits (B, l) of predicting each chunk's tokens (see :func:`token_bits`)."""
    return token_bits(model, windows, neighbours, m).sum(-1)


def repeat_bits(model: DecoderLM, val: np.ndarray, context: int) -> dict:
    """In-context copying of the decoder (no neighbours): REPEAT_SPANS validation spans
    of s = min(REPEAT_SPAN, context // 2) tokens, evenly spread, each fed twice in a row.
    Bits per token on the first copy (tokens 1..s-1) and on the repeat (tokens
    s+1..2s-1, each with the first copy and its own preceding tokens in context). A
    model that copies in context (an induction head) is far lower on the repeat; RETRO's
    copying from a neighbour is the same match, made through cross-attention."""
    s = min(REPEAT_SPAN, context // 2, len(val))
    if s < 2:
        raise ValueError(f"in-context copying needs spans of 2+ tokens (context {context})")
    starts = np.unique(np.linspace(0, len(val) - s, REPEAT_SPANS).round().astype(int))
    spans = torch.from_numpy(np.stack([val[a : a + s] for a in starts]).astype(np.int64))
    seq = torch.cat([spans, spans], dim=1)  # (n, 2s): each span twice in a row
    with torch.no_grad():  # (n, 2s - 1): column t predicts token t + 1
        nll = model.nll_per_position(seq.to(model.embed.weight.device))
    bits = nll.cpu() / math.log(2)
    return {
        "span": s,
        "spans": len(starts),
        "first": float(bits[:, : s - 1].mean()),
        "repeat": float(bits[:, s:].mean()),
    }


def copyable_in_windows(windows: Tensor, neighbours: Tensor, m: int, context: int) -> Tensor:
    """(B, l, m) bool: token j of chunk u >= 1 of each window (B, N + 1) is copyable
    (:func:`longctx.retro.copyable`) from the neighbours (B, l, k, 2m) that chunk reads,
    those retrieved by chunk u - 1; chunk 0 reads none."""
    B, l = neighbours.shape[:2]
    out = torch.zeros(B, l, m, dtype=torch.bool)
    if l < 2:
        return out
    # (B, l - 1, context + m): chunk u >= 1 with the context tokens before it
    rows = torch.stack([windows[:, u * m - context : (u + 1) * m] for u in range(1, l)], 1)
    found = copyable(rows.flatten(0, 1), neighbours[:, :-1].flatten(0, 1), context)
    out[:, 1:] = found.view(B, l - 1, m)
    return out


def evaluate_retro(
    model: DecoderLM,
    db: RetroDB,
    val: np.ndarray,
    context: int,
    *,
    windows: int = 64,
    k: int | None = None,
    baseline: DecoderLM | None = None,
    batch: int = 8,
) -> dict:
    """The figures of the module docstring for ``model`` (a RETRO model) on validation
    tokens ``val``, windows of ``context``; ``k`` neighbours (default the model's)."""
    m = model.cfg.retro.chunk
    db.check_compatible(chunk=m)
    k = k or model.cfg.retro.neighbours
    copy_context = min(COPY_CONTEXT, m)  # the copyable tokens' context
    model.eval()
    rows = torch.stack(eval_windows(val, context, windows))  # (W, N + 1)
    parts: dict[str, list[Tensor]] = {
        name: [] for name in ("retrieval", "off", "N only", "F only", "oracle", "baseline")
    }
    overlaps, sizes, copy = [], [], []
    for a in range(0, len(rows), batch):
        w = rows[a : a + batch]
        B = len(w)
        chunks = (w.shape[1] - 1) // m
        x_chunks = w[:, : chunks * m].reshape(B * chunks, m)
        # one search serves the model's k neighbours and r(C)'s 10 nearest (best first)
        near = db.sequence_neighbours(w[:, :-1], max(k, OVERLAP_NEIGHBOURS))
        nb = near[:, :, :k]
        parts["retrieval"].append(token_bits(model, w, nb, m))
        parts["off"].append(token_bits(model, w, None, m))
        parts["N only"].append(token_bits(model, w, only(nb, "N"), m))
        parts["F only"].append(token_bits(model, w, only(nb, "F"), m))
        parts["oracle"].append(token_bits(model, w, oracle_neighbours(w, m, k), m))
        if baseline is not None:
            parts["baseline"].append(token_bits(baseline, w, None, m))
        copy.append(copyable_in_windows(w, nb, m, copy_context))
        own = near[:, :, :OVERLAP_NEIGHBOURS].reshape(B * chunks, OVERLAP_NEIGHBOURS, 2 * m)
        overlaps.append(chunk_overlap(x_chunks, own).view(B, chunks))
        size = torch.full((B, chunks), float(m))
        size[:, 0] = m - 1  # the window's first token is not predicted
        sizes.append(size.double())
    per_token = {name: torch.cat(v) for name, v in parts.items() if v}  # (W, l, m)
    bits = {name: v.sum(-1) for name, v in per_token.items()}  # (W, l)
    r = torch.cat(overlaps)
    size = torch.cat(sizes)
    can_copy = torch.cat(copy)  # (W, l, m)

    def bpb(name: str, keep: Tensor) -> float | None:
        return float(bits[name][keep].sum() / size[keep].sum()) if keep.any() else None

    every = torch.ones_like(r, dtype=torch.bool)
    later = every.clone()
    later[:, :2] = False  # chunks >= 2
    result = {
        "chunks": int(r.numel()),
        "chunk": m,
        "neighbours": k,
        "windows": len(rows),
        "context": context,
        "bpb": {name: bpb(name, every) for name in bits},
        "oracle_bpb_chunks_from_2": bpb("oracle", later),
        "copying": copying_figures(per_token, can_copy, copy_context),
        "in_context_copying": {"model": repeat_bits(model, val, context)},
        "leakage": [],
    }
    if baseline is not None:
        result["in_context_copying"]["baseline"] = repeat_bits(baseline, val, context)
    for alpha in ALPHAS:
        keep = r <= alpha + 1e-12
        row = {"alpha": alpha, "share": float(keep.double().mean()), "bpb": bpb("retrieval", keep)}
        if "baseline" in bits:
            row["baseline_bpb"] = bpb("baseline", keep)
        result["leakage"].append(row)
    return result


def copying_figures(per_token: dict[str, Tensor], can_copy: Tensor, context: int) -> dict:
    """Bits per byte of each variant on the copyable tokens of chunks >= 1 and on the
    rest (``per_token``: name -> bits (W, l, m); ``can_copy`` (W, l, m)), with the
    copyable share: whether the model copies, and what copying could buy at most."""
    later = torch.zeros_like(can_copy)
    later[:, 1:] = True  # chunks >= 1: those that read neighbours
    out: dict = {"context": context, "share": float(can_copy[later].double().mean())}
    for key, keep in (("copyable", can_copy), ("rest", later & ~can_copy)):
        n = int(keep.sum())
        out[key] = {name: float(v[keep].sum() / n) if n else None for name, v in per_token.items()}
    return out


def write_retro_results(result: dict, out_dir, title: str):
    """eval/retro.json and a PNG of the leakage curves; returns (json path, png path)."""
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js = atomic_write_json(out / "retro.json", result)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    alphas = [row["alpha"] for row in result["leakage"]]
    for key, label in (("bpb", "RETRO"), ("baseline_bpb", "baseline")):
        values = [row.get(key) for row in result["leakage"]]
        if any(v is not None for v in values):
            ax.plot(alphas, [math.nan if v is None else v for v in values], "o-", label=label)
    ax.set_xlabel("max chunk overlap r(C) (alpha)")
    ax.set_ylabel("bits per byte of chunks with r(C) <= alpha")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = save_figure(fig, out / "retro_leakage.png")
    return js, png
