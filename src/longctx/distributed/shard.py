"""Splitting a sequence over the P ranks of a sequence-parallel group.

Layouts:

- ``contiguous``: rank r holds positions [r * n, (r + 1) * n), n = N / P.
- ``zigzag`` (causal ring attention): the sequence is cut into 2P chunks of c = N / 2P
  and rank r holds chunks r and 2P - 1 - r, so every rank has the same causal work.

Inputs, labels and positions are sharded the same way; rotary positions are the global
positions of the local tokens (:func:`local_positions`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

LAYOUTS = ("contiguous", "zigzag")


def num_chunks(world: int, layout: str) -> int:
    """Chunks a sequence is cut into: P (contiguous) or 2P (zigzag)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return world if layout == "contiguous" else 2 * world


def chunk_ids(rank: int, world: int, layout: str) -> list[int]:
    """Global chunk indices held by ``rank``, in local order."""
    num_chunks(world, layout)
    return [rank] if layout == "contiguous" else [rank, 2 * world - 1 - rank]


def check_length(n: int, world: int, layout: str) -> int:
    """The chunk length; ValueError unless N splits into equal chunks."""
    c = num_chunks(world, layout)
    if n % c:
        raise ValueError(
            f"sequence length {n} does not split over {world} ranks in the {layout} layout: "
            f"it must be a multiple of {c}"
        )
    return n // c


def local_positions(n: int, rank: int, world: int, layout: str, device=None) -> Tensor:
    """Global positions (int64) of the tokens rank ``rank`` holds of a length-n sequence."""
    c = check_length(n, world, layout)
    parts = [
        torch.arange(i * c, (i + 1) * c, device=device) for i in chunk_ids(rank, world, layout)
    ]
    return torch.cat(parts)


def shard(x: Tensor, dim: int, rank: int, world: int, layout: str) -> Tensor:
    """The part of ``x`` (sequence along ``dim``) that ``rank`` holds (a copy only for
    zigzag)."""
    c = check_length(x.shape[dim], world, layout)
    parts = [x.narrow(dim, i * c, c) for i in chunk_ids(rank, world, layout)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def unshard(parts: Sequence[Tensor], dim: int, layout: str) -> Tensor:
    """Reassemble the full sequence from every rank's part (in rank order)."""
    world = len(parts)
    if layout == "contiguous":
        return torch.cat(list(parts), dim=dim)
    chunks: list[Tensor | None] = [None] * (2 * world)
    for r, part in enumerate(parts):
        a, b = part.chunk(2, dim=dim)
        lo, hi = chunk_ids(r, world, layout)
        chunks[lo], chunks[hi] = a, b
    return torch.cat(chunks, dim=dim)  # type: ignore[arg-type]
