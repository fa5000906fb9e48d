"""Generation: one prefill/decode loop over the model's state, with four cache policies.

- ``full``: every layer's decode state holds all its keys and values (static buffers
  written by index); CoLT5 layers hold their light window and routed keys, memory layers
  their memory and current window.
- ``dilated``: dilated layers keep the bounded exact cache (per branch and head only the
  current segment's keys of the head's residue); other layers keep what ``full`` keeps,
  and the result's note says so.
- ``none``: no state between steps; every step recomputes the forward over all tokens
  (memory: one layer's activations for every token).
- ``recompute``: no state either, and memory that does not grow with the context: each
  step recomputes every layer's keys and values chunk by chunk from the token ids
  (:mod:`longctx.model.recompute`; time about (N / chunk) ** L chunk passes per token).

The prompt is prefilled in chunks (bounded memory; for dilated layers aligned to the lcm
of the segment lengths), then tokens are decoded one by one. Every step's logits equal
the full forward over the same tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .lm import DecoderLM
from .recompute import DEFAULT_CHUNK, check_recompute, recompute_logits

CACHE_POLICIES = ("full", "dilated", "none", "recompute")
DEFAULT_PREFILL = 1024


@dataclass
class Generation:
    """What :func:`generate` produced, with its timing and cache size per step."""

    tokens: list[int]  # the new tokens (batch row 0 for batched prompts: see ``batch``)
    batch: Tensor  # (B, n_new) all rows
    step_seconds: list[float] = field(default_factory=list)  # per new token
    cache_bytes: list[int] = field(default_factory=list)  # after each new token
    logits: list[Tensor] = field(default_factory=list)  # (B, vocab) per step, if asked
    prefill_seconds: float = 0.0
    stopped_by: str = "max_new_tokens"
    note: str = ""

    @property
    def tokens_per_s(self) -> float:
        """Decoded tokens per second (the new tokens' steps)."""
        total = sum(self.step_seconds)
        return len(self.step_seconds) / total if total > 0 else float("nan")


def prefill_chunk(model: DecoderLM, requested: int = DEFAULT_PREFILL) -> int:
    """Prefill chunk length: a multiple of what the model's layers need (dilated: the lcm
    of the segment lengths), as close to ``requested`` as that allows."""
    m = model.prefill_multiple()
    return m * max(1, requested // m)


def _sample(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, gen):
    """Next token ids (B,) from logits (B, V)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def _check_args(policy, max_new_tokens, temperature, top_k, top_p):
    if policy not in CACHE_POLICIES:
        raise ValueError(f"unknown cache policy {policy!r}; choose from {CACHE_POLICIES}")
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 0
    ):
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


@torch.no_grad()
def generate(
    model: DecoderLM,
    tokens: Sequence[int] | Tensor,
    max_new_tokens: int,
    *,
    cache: str = "full",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop: Sequence[Sequence[int]] = (),
    prefill: int = DEFAULT_PREFILL,
    return_logits: bool = False,
    on_token: Callable[[int], None] | None = None,
    recompute_chunk: int = DEFAULT_CHUNK,
    retriever: Callable[[Tensor], Tensor] | None = None,
) -> Generation:
    """Continue ``tokens`` (a prompt of ids, or (B, N) tensor) by up to max_new_tokens.

    ``cache``: ``full``, ``dilated``, ``none`` or ``recompute`` (module docstring;
    ``recompute_chunk``: its chunk of positions). ``temperature`` 0 is greedy. ``stop``:
    token-id sequences; generation ends when row 0 ends with one of them (included in
    the output). ``on_token`` is called with each new token of row 0 as it
    is produced (streaming). ``prefill``: the prompt's chunk length. ``retriever``: a
    RETRO model's neighbours of each chunk as it completes (chunk ids (B, m) ->
    neighbours (B, k, r); see :meth:`DecoderLM.new_state`).
    """
    _check_args(cache, max_new_tokens, temperature, top_k, top_p)
    prompt = torch.as_tensor(tokens, dtype=torch.long)
    if prompt.dim() == 1:
        prompt = prompt.unsqueeze(0)
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(
            f"the prompt must hold at least one token, got shape {tuple(prompt.shape)}"
        )
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    prompt = prompt.to(device)
    B, n = prompt.shape
    gen = torch.Generator(device=device).manual_seed(seed)
    if cache == "recompute":
        check_recompute(model)
        if isinstance(recompute_chunk, bool) or not isinstance(recompute_chunk, int):
            raise ValueError(f"recompute_chunk must be an integer >= 1, got {recompute_chunk!r}")
    stateless = cache in ("none", "recompute")
    if stateless and model.retro_encoder is not None:
        raise ValueError(
            f"cache={cache!r}: a RETRO model generates with a cache (full or dilated), "
            "which holds its retrieved and encoded neighbours"
        )

    def step_logits(seq: Tensor) -> Tensor:  # (B, V) of the last position, no state
        if cache == "recompute":
            return recompute_logits(model, seq, recompute_chunk)
        return model(seq, last_only=True)[:, -1]

    state = None
    if not stateless:
        state = model.new_state(B, cache=cache, capacity=n + max_new_tokens, retriever=retriever)
    note = "" if state is None else model.cache_note(cache)
    result = Generation(tokens=[], batch=prompt.new_zeros(B, 0), note=note)
    stops = [list(s) for s in stop if len(s)]
    seq = prompt  # all tokens so far: what a step without a state recomputes

    t0 = time.perf_counter()
    if state is None:
        logits = step_logits(prompt)  # (B, V)
    else:
        chunk = prefill_chunk(model, prefill)
        for a in range(0, n, chunk):
            logits = model(prompt[:, a : a + chunk], state, last_only=True)[:, -1]  # (B, V)
    result.prefill_seconds = time.perf_counter() - t0

    new: list[Tensor] = []
    for i in range(max_new_tokens):
        t = time.perf_counter()
        if return_logits:
            result.logits.append(logits.clone())
        nxt = _sample(logits, temperature, top_k, top_p, gen)  # (B,)
        new.append(nxt)
        result.tokens.append(int(nxt[0]))
        if on_token is not None:
            on_token(int(nxt[0]))
        done = any(result.tokens[-len(s) :] == s for s in stops if len(result.tokens) >= len(s))
        if i + 1 < max_new_tokens and not done:
            if state is None:
                seq = torch.cat([seq, nxt.unsqueeze(1)], dim=1)  # (B, N)
                logits = step_logits(seq)
            else:
                logits = model(nxt.unsqueeze(1), state, last_only=True)[:, -1]
        result.step_seconds.append(time.perf_counter() - t)
        result.cache_bytes.append(0 if state is None else state.nbytes)
        if done:
            result.stopped_by = "stop"
            break
    result.batch = torch.stack(new, dim=1) if new else prompt.new_zeros(B, 0)
    model.train(was_training)
    return result


__all__ = ["CACHE_POLICIES", "DEFAULT_PREFILL", "Generation", "generate", "prefill_chunk"]
