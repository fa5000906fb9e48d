"""The ``recompute`` decode policy: exact logits in memory that does not grow with the
context (only the token ids do).

Nothing is cached. The last position's logits are computed from the token ids alone:
block l's output at a chunk of positions needs its attention over the keys and values of
block l at every visible earlier position, which are recomputed, one chunk of keys at a
time, from block l - 1's output at those positions, and so on down to the embeddings.
Each block's attention is an online-softmax state (:class:`longctx.ops.
StreamingAttention`) that takes the key chunks one by one under the pattern's
:meth:`~longctx.nn.Pattern.pair_counts`, so what is alive at any time is a few chunks
per layer: memory O(L * chunk), whatever N.

Cost: producing block l's output for one chunk runs block l - 1 on every key chunk it
sees, so one decoded token costs about (N / chunk) ** L chunk passes for L layers
(fewer for windows and dilated segments, whose queries see a bounded span): time far
above quadratic, memory constant — the trade-off of "attention is an RNN" taken to its
end (Su Jianlin, "Attention as a quadratic-complexity RNN", 2024).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..nn import MultiHeadAttention, Pattern
from ..ops import StreamingAttention
from .lm import DecoderLM

DEFAULT_CHUNK = 256


def check_recompute(model: DecoderLM) -> None:
    """ValueError unless every layer is a pattern attention the policy can stream
    (dense, dilated, sliding window, or a pattern with a mask)."""
    for i, block in enumerate(model.blocks):
        pattern = getattr(block.attn, "pattern", None)
        streamable = pattern is not None and (
            type(pattern).mask is not Pattern.mask
            or type(pattern).pair_counts is not Pattern.pair_counts
        )
        if not isinstance(block.attn, MultiHeadAttention) or not streamable:
            raise ValueError(
                f"cache='recompute' streams pattern attention (dense, dilated, sliding "
                f"window, or a registered pattern with a mask); layer {i} is "
                f"{type(block.attn).__name__} ({model.cfg.attention.kind!r})"
            )


@torch.no_grad()
def recompute_logits(model: DecoderLM, tokens: Tensor, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """Logits (B, vocab) of the last position of ``tokens`` (B, N), from the ids alone
    (module docstring); equal to ``model(tokens)[:, -1]``."""
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must have shape (batch, N >= 1), got {tuple(tokens.shape)}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
    check_recompute(model)
    n = tokens.shape[1]
    x = _hidden(model, tokens, len(model.blocks), n - 1, n, chunk)  # (B, 1, C)
    return model.head(x)[:, -1]


def _hidden(model: DecoderLM, tokens: Tensor, layer: int, a: int, b: int, chunk: int) -> Tensor:
    """The input of block ``layer`` (``len(blocks)``: the last block's output) at
    positions a..b-1: (B, b - a, C)."""
    if layer == 0:
        return _embed(model, tokens, a, b)
    x = _hidden(model, tokens, layer - 1, a, b, chunk)
    return _block(model, tokens, layer - 1, x, a, b, chunk)


def _embed(model: DecoderLM, tokens: Tensor, a: int, b: int) -> Tensor:
    history = None
    if model.ngram is not None:  # the n - 1 ids before a (-1 where there are none)
        m = model.cfg.ngram - 1
        history = tokens.new_full((tokens.shape[0], m), -1)
        before = tokens[:, max(0, a - m) : a]
        history[:, m - before.shape[1] :] = before
    return model.embed_tokens(tokens[:, a:b], history)


def _block(
    model: DecoderLM, tokens: Tensor, i: int, x: Tensor, a: int, b: int, chunk: int
) -> Tensor:
    """Block i's output at positions a..b-1 from its input x there; its attention streams
    the keys of every visible earlier position, recomputed chunk by chunk."""
    block = model.blocks[i]
    attn: MultiHeadAttention = block.attn
    pattern, device = attn.pattern, x.device
    pos = torch.arange(a, b, device=device)
    q, k, v = attn._project(x, pos, block.attn_norm)  # (B, H, b - a, Dh)
    state = StreamingAttention(q)
    for s in range(pattern.first_key(a), a, chunk):
        e = min(a, s + chunk)
        kpos = torch.arange(s, e, device=device)
        xs = _hidden(model, tokens, i, s, e, chunk)  # block i's input there
        _, ks, vs = attn._project(xs, kpos, block.attn_norm)
        state.update(ks, vs, pattern.pair_counts(pos, kpos, attn.n_heads))
    state.update(k, v, pattern.pair_counts(pos, pos, attn.n_heads))
    x = x + attn._output(state.read()[0])
    return x + block._ffn(x)


__all__ = ["DEFAULT_CHUNK", "check_recompute", "recompute_logits"]
