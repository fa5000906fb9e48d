"""Chunk overlap r(C) for RETRO's leakage analysis (Borgeaud et al., section 2.6): the
longest run of tokens an evaluation chunk shares with any of its retrieved neighbours,
over the chunk's length."""

from __future__ import annotations

import torch
from torch import Tensor

from ..data.tokenizer import PAD


def longest_common_run(chunks: Tensor, neighbours: Tensor) -> Tensor:
    """Length of the longest common substring (consecutive tokens) between each chunk
    (q, m) and any of its neighbours (q, k, L): (q,) int64. PAD matches nothing."""
    if chunks.dim() != 2 or neighbours.dim() != 3 or neighbours.shape[0] != chunks.shape[0]:
        raise ValueError(
            f"expected chunks (q, m) and neighbours (q, k, L), got {tuple(chunks.shape)} and "
            f"{tuple(neighbours.shape)}"
        )
    q, m = chunks.shape
    k, L = neighbours.shape[1:]
    best = torch.zeros(q, dtype=torch.long)
    run = torch.zeros(q, k, L + 1, dtype=torch.long)  # run[..., j + 1]: ending at token j
    for i in range(m):  # runs along diagonals: extend the previous row's run at j - 1
        a = chunks[:, i, None, None]  # (q, 1, 1)
        equal = (neighbours == a) & (a != PAD)  # (q, k, L)
        run = torch.cat([run.new_zeros(q, k, 1), (run[..., :-1] + 1) * equal], dim=-1)
        best = torch.maximum(best, run.amax(dim=(1, 2)))
    return best


def chunk_overlap(chunks: Tensor, neighbours: Tensor) -> Tensor:
    """r(C) in [0, 1] (q,) float64: :func:`longest_common_run` over the chunk length m
    (a chunk copied into the database has r = 1)."""
    return longest_common_run(chunks, neighbours).double() / chunks.shape[1]
