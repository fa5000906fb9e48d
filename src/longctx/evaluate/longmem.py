"""LongMem evaluation: bits per byte by segment index on long validation documents, for
(a) the frozen backbone on its own window (each segment alone), (b) a control run (the
SideNet trained the same way with memory off, ``--baseline``) and (c) the LongMem model.

Each window is the start of one validation document of at least ``segments`` x S + 1
tokens (S: the model's segment), so segment 1 has no past and segment s a memory of
s - 1 segments of its document. Segment 1's bits must be equal for (b) and (c) when
both are the same SideNet (nothing is in memory yet); below (a) and (b) on later
segments is what the memory buys.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .._util import atomic_write_json, nats_to_bits, pyplot, save_figure
from ..data.stream import document_spans
from ..model import DecoderLM, ModelConfig


def document_windows(tokens: np.ndarray, length: int, max_windows: int) -> Tensor:
    """(W, length) int64: the first ``length`` tokens of each EOD-separated document of
    at least ``length`` tokens, at most ``max_windows`` documents spread evenly."""
    starts = [a for a, b in document_spans(tokens) if b - a >= length + 1]  # + 1: its EOD
    if not starts:
        raise ValueError(f"no validation document has {length} tokens")
    pick = np.linspace(0, len(starts) - 1, num=min(len(starts), max_windows)).round()
    rows = [tokens[starts[int(i)] : starts[int(i)] + length] for i in sorted(set(pick.tolist()))]
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def backbone_of(model: DecoderLM) -> DecoderLM:
    """A LongMem model's frozen backbone as a plain decoder (the same weights)."""
    table = {k: v for k, v in model.cfg.to_dict().items() if k != "longmem"}
    plain = DecoderLM(ModelConfig.from_dict(table)).to(model.embed.weight)
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("side.")}
    plain.load_state_dict(weights)
    return plain.eval()


@torch.no_grad()
def bits_by_segment(
    model: DecoderLM, windows: Tensor, segment: int, *, alone: bool = False, batch: int = 4
) -> list[float]:
    """Bits per token of predicting each window's tokens 1.. (windows (W, s S + 1)), by
    segment index (s values). ``alone``: each segment is its own input (a plain model on
    its own window); otherwise each window is one input (a LongMem model streams it)."""
    W, n1 = windows.shape
    segments = (n1 - 1) // segment
    device = model.embed.weight.device
    total = torch.zeros(segments, dtype=torch.float64)
    for i in range(0, W, batch):
        rows = windows[i : i + batch].to(device)
        if alone:  # (b s, S + 1): segment k is tokens kS .. kS + S
            pieces = rows.unfold(1, segment + 1, segment).reshape(-1, segment + 1)
            nll = model.nll_per_position(pieces).view(len(rows), segments, segment)
        else:
            nll = model.nll_per_position(rows).view(len(rows), segments, segment)
        total += nll.sum(dim=(0, 2)).cpu()
    return [nats_to_bits(float(t) / (W * segment)) for t in total]


def evaluate_longmem(
    model: DecoderLM,
    val_tokens: np.ndarray,
    *,
    segments: int = 8,
    windows: int = 16,
    baseline: DecoderLM | None = None,
) -> dict:
    """Bits per byte by segment index (module doc): ``backbone``, ``longmem`` and, with
    ``baseline`` (a LongMem run of the same segment, e.g. with memory off),
    ``baseline``, and ``memory_off`` (the same model with its bank never read: what
    the bank buys this model, apart from how training with it changed the weights);
    the mean over segments >= 2 and the gaps per segment."""
    if model.side is None:
        raise ValueError("--task longmem evaluates a LongMem run (model.longmem.side_layers > 0)")
    S = model.cfg.longmem.segment
    other = None if baseline is None or baseline.side is None else baseline.cfg.longmem.segment
    if other is not None and other != S:
        raise ValueError(
            f"the baseline's segment ({other}) differs from the model's ({S}): compare runs "
            "with the same segments"
        )
    rows = document_windows(val_tokens, segments * S + 1, windows)
    model.eval()
    curves = {
        "backbone": bits_by_segment(backbone_of(model), rows, S, alone=True),
        "longmem": bits_by_segment(model, rows, S),
    }
    if model.cfg.longmem.memory:  # the same weights with the bank never read
        model.configure_memory(memory=False)
        try:
            curves["memory_off"] = bits_by_segment(model, rows, S)
        finally:
            model.configure_memory(memory=True)
    if baseline is not None:
        baseline.eval()
        curves["baseline"] = bits_by_segment(baseline, rows, S, alone=baseline.side is None)
    later = {name: float(np.mean(c[1:])) for name, c in curves.items()}
    gaps = {
        f"{name}_minus_longmem": [a - b for a, b in zip(c, curves["longmem"])]
        for name, c in curves.items()
        if name != "longmem"
    }
    return {
        "segment": S,
        "segments": segments,
        "documents": len(rows),
        "bpb_by_segment": curves,
        "bpb_segments_from_2": later,
        "gap_by_segment": gaps,
        "fusion": model.cfg.longmem.fusion,
        "gate": model.side.memory.gate.tolist() if model.cfg.longmem.fusion == "gate" else None,
    }


def write_longmem_results(result: dict, out_dir, title: str, tag: str = "") -> tuple[Path, Path]:
    """eval/longmem{tag}.json and a PNG of bits per byte by segment (``tag``: a suffix
    naming bank settings other than the run's own); (json path, png path)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js = atomic_write_json(out / f"longmem{tag}.json", result)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in result["bpb_by_segment"].items():
        xs = list(range(1, len(curve) + 1))
        ax.plot(
            xs, [math.nan if v is None else v for v in curve], "o-", label=name.replace("_", " ")
        )
    ax.set_xlabel(f"segment index ({result['segment']} tokens each)")
    ax.set_ylabel("bits per byte")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return js, save_figure(fig, out / f"longmem_segments{tag}.png")


__all__ = ["backbone_of", "bits_by_segment", "document_windows", "evaluate_longmem"]
