"""Chunk overlap r(C) for RETRO's leakage analysis (Borgeaud et al., section 2.6): the
longest run of tokens an evaluation chunk shares with any of its retrieved neighbours,
over the chunk's length; and which of a chunk's tokens could be copied from the
neighbours it reads (a bound on what retrieval buys by copying)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..data.tokenizer import PAD


def _check(tokens: Tensor, neighbours: Tensor) -> None:
    if tokens.dim() != 2 or neighbours.dim() != 3 or neighbours.shape[0] != tokens.shape[0]:
        raise ValueError(
            f"expected chunks (q, m) and neighbours (q, k, L), got {tuple(tokens.shape)} and "
            f"{tuple(neighbours.shape)}"
        )


def _runs(tokens: Tensor, neighbours: Tensor):
    """For each token i of ``tokens`` (q, n), in order: (q,) the longest run of tokens
    ending at i that also occurs, consecutively, in one of the neighbours (q, k, L)."""
    q = tokens.shape[0]
    k, L = neighbours.shape[1:]
    run = torch.zeros(q, k, L + 1, dtype=torch.long)  # run[..., j + 1]: ending at token j
    for i in range(tokens.shape[1]):  # runs along diagonals: extend row i-1's run at j-1
        a = tokens[:, i, None, None]  # (q, 1, 1)
        equal = (neighbours == a) & (a != PAD)  # (q, k, L)
        run = torch.cat([run.new_zeros(q, k, 1), (run[..., :-1] + 1) * equal], dim=-1)
        yield run.amax(dim=(1, 2))


def longest_common_run(chunks: Tensor, neighbours: Tensor) -> Tensor:
    """Length of the longest common substring (consecutive tokens) between each chunk
    (q, m) and any of its neighbours (q, k, L): (q,) int64. PAD matches nothing."""
    _check(chunks, neighbours)
    best = torch.zeros(chunks.shape[0], dtype=torch.long)
    for run in _runs(chunks, neighbours):
        best = torch.maximum(best, run)
    return best


def chunk_overlap(chunks: Tensor, neighbours: Tensor) -> Tensor:
    """r(C) in [0, 1] (q,) float64: :func:`longest_common_run` over the chunk length m
    (a chunk copied into the database has r = 1)."""
    return longest_common_run(chunks, neighbours).double() / chunks.shape[1]


def copyable(tokens: Tensor, neighbours: Tensor, context: int) -> Tensor:
    """Which tokens a copier could take from the neighbours: ``tokens`` (q, context + m)
    are a chunk's m tokens after the ``context`` tokens before it; token i of the chunk
    is copyable (q, m) bool when it and the ``context`` tokens before it occur,
    consecutively, in one of its neighbours (q, k, L) (a match of the context, followed
    by the right token). PAD matches nothing."""
    _check(tokens, neighbours)
    if not 0 <= context < tokens.shape[1]:
        raise ValueError(f"context must be in [0, {tokens.shape[1] - 1}], got {context}")
    runs = list(_runs(tokens, neighbours))[context:]
    return torch.stack(runs, dim=1) > context
