"""Input embedding with a short token history ("n-gram embedding").

Position t's input is ``E_0[x_t] + sum_{i=1}^{n-1} E_i[x_{t-i}]``: one learned table per
offset, so the residual stream starts out knowing which token stood i places back. Offsets
before the first token contribute nothing. ``E_0`` is the model's ordinary (tied)
embedding; this module holds ``E_1 .. E_{n-1}``.

Why: a transformer matches a multi-token key (``?abcd=`` against ``abcd=1234;``) only
after one layer has copied the previous tokens into each position, and gradient descent
finds that circuit slowly (a long loss plateau). Short causal convolutions and token shifts
in front of attention (H3, Fu et al. 2023; RWKV; the "canon layers" of Allen-Zhu 2025)
remove that plateau; per-offset tables are the simplest such layer, with each (offset,
token) pair in its own direction from the start.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def previous_tokens(tokens: Tensor, n: int, history: Tensor | None = None) -> Tensor:
    """The ids at offsets 1..n-1 before each position: (B, N, n - 1), -1 where there is
    none. ``history`` (B, n - 1): the ids just before ``tokens`` (oldest first; -1 for
    none), or None for the start of a sequence."""
    B, N = tokens.shape
    if history is None:
        history = tokens.new_full((B, n - 1), -1)
    full = torch.cat([history.to(tokens.dtype), tokens], dim=1)  # (B, n - 1 + N)
    return torch.stack([full[:, n - 1 - i : n - 1 - i + N] for i in range(1, n)], dim=-1)


def no_sequence_parallel(n: int) -> str:
    """Why an n-gram embedding cannot run on sequence shards."""
    return (
        f"model.ngram = {n} is not supported with sequence parallelism (each shard would "
        "need the tokens before it); use model.ngram = 1"
    )


class NgramEmbedding(nn.Module):
    """Learned embeddings of the n - 1 tokens before each position, summed (see the
    module docstring). ``forward(tokens, history)`` returns that sum (B, N, dim), to add
    to the token embedding."""

    def __init__(self, vocab_size: int, dim: int, n: int):
        super().__init__()
        if n < 2:
            raise ValueError(f"an n-gram embedding needs n >= 2, got {n}")
        self.n = n
        self.vocab_size = vocab_size
        self.tables = nn.Parameter(torch.empty(n - 1, vocab_size, dim))
        nn.init.normal_(self.tables, std=0.02)

    def forward(self, tokens: Tensor, history: Tensor | None = None) -> Tensor:
        if history is not None and history.shape != (tokens.shape[0], self.n - 1):
            raise ValueError(
                f"history must have shape (batch, n - 1) = ({tokens.shape[0]}, {self.n - 1}), "
                f"got {tuple(history.shape)}"
            )
        prev = previous_tokens(tokens, self.n, history)  # (B, N, n - 1)
        out = None
        for i in range(self.n - 1):
            ids = prev[..., i]
            part = self.tables[i][ids.clamp(min=0)] * (ids >= 0).unsqueeze(-1)
            out = part if out is None else out + part
        return out

    def sequence_parallel(self, sp) -> None:
        """Refused: a sequence shard would need the tokens before it."""
        raise ValueError(no_sequence_parallel(self.n))

    @staticmethod
    def advance(history: Tensor, tokens: Tensor) -> None:
        """Update ``history`` (B, n - 1) in place to the ids just before the next chunk."""
        m = history.shape[1]
        history.copy_(torch.cat([history, tokens.to(history.dtype)], dim=1)[:, -m:])
