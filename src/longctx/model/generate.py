"""Generation with three cache policies.

- ``full``: static preallocated key/value buffers per layer, written by index.
- ``dilated``: for dilated-attention layers, the bounded exact cache (per branch and head
  only the current segment's keys of the head's residue); other layers fall back to
  ``full`` (the result says so).
- CoLT5 layers keep their own state under ``full`` and ``dilated``: the light heads' last
  window of keys, and the routed keys/values with their positions. Routing is causal, so
  decoding routes each new token exactly as the full forward would.
- ``none``: no state between steps; every step recomputes the forward over all tokens
  (attention is an RNN over its history: the memory/time trade-off taken to its end).
  The attention ops are memory-efficient, so peak memory is one layer's activations.

The prompt is prefilled in chunks (bounded memory), then tokens are decoded one by one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..nn.colt5 import ConditionalAttention, ConditionalAttentionCache
from .cache import DilatedKVCache, FullKVCache, MemoryDecodeState, dilated_chunk_multiple
from .lm import DecoderLM

CACHE_POLICIES = ("full", "dilated", "none")
DEFAULT_PREFILL = 1024


@dataclass
class Generation:
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
        total = sum(self.step_seconds)
        return len(self.step_seconds) / total if total > 0 else float("nan")


def prefill_chunk(model: DecoderLM, requested: int = DEFAULT_PREFILL) -> int:
    """Prefill chunk length: for dilated layers a multiple of lcm(segment lengths)."""
    if model.cfg.attention != "dilated":
        return requested
    m = dilated_chunk_multiple(model.cfg)
    return m * max(1, requested // m)


def make_caches(model: DecoderLM, policy: str, batch: int, capacity: int, dtype, device):
    if policy == "none":
        return None, ""
    if model.cfg.memory_layers:  # memory, plus a cache of the current window
        note = "" if policy == "full" else f"cache={policy!r}: memory models keep memory + window"
        return MemoryDecodeState(model, batch, dtype, device), note
    note = ""
    if policy == "dilated" and model.cfg.attention != "dilated":
        note = (
            f"cache='dilated' on a model with {model.cfg.attention!r} attention: no layer is "
            "dilated, so every layer uses the full cache"
        )
    caches = []
    for block in model.blocks:
        if isinstance(block.attn, ConditionalAttention):  # its own state, any policy
            caches.append(ConditionalAttentionCache(block.attn, batch, capacity, dtype, device))
        elif policy == "dilated" and model.cfg.attention == "dilated":
            caches.append(DilatedKVCache(model.cfg, batch, dtype, device))
        else:
            caches.append(FullKVCache(model.cfg, batch, capacity, dtype, device))
    return caches, note


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


def _cache_bytes(caches) -> int:
    if caches is None:
        return 0
    if isinstance(caches, MemoryDecodeState):
        return caches.nbytes
    return sum(c.nbytes for c in caches)


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
) -> Generation:
    """Continue ``tokens`` (a prompt of ids, or (B, N) tensor) by up to max_new_tokens.

    ``temperature`` 0 is greedy. ``stop``: token-id sequences; generation ends when row 0
    ends with one of them (included in the output). ``on_token`` is called with each new
    token of row 0 as it is produced (streaming).
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
    dtype = model.embed.weight.dtype
    prompt = prompt.to(device)
    B, n = prompt.shape
    gen = torch.Generator(device=device).manual_seed(seed)
    caches, note = make_caches(model, cache, B, n + max_new_tokens, dtype, device)
    result = Generation(tokens=[], batch=prompt.new_zeros(B, 0), note=note)
    stops = [list(s) for s in stop if len(s)]

    # prefill: the prompt in chunks; the logits of its last position start decoding
    t0 = time.perf_counter()
    if caches is None:
        logits = model(prompt, last_only=True)[:, -1]
    elif isinstance(caches, MemoryDecodeState):  # chunks that never cross a window
        W = model.cfg.memory_window
        a = 0
        while a < n:
            b = min(n, a + min(prefill, W - a % W))
            logits = model.forward_step(prompt[:, a:b], caches, a, last_only=True)[:, -1]
            a = b
    else:
        step = prefill_chunk(model, prefill)
        history = model.new_history(B, device)  # n-gram embedding (None: off)
        for a in range(0, n, step):
            chunk = prompt[:, a : a + step]
            logits = model(chunk, caches=caches, start=a, last_only=True, history=history)[:, -1]
    result.prefill_seconds = time.perf_counter() - t0

    seq = prompt
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
            pos = n + i
            if caches is None:
                seq = torch.cat([seq, nxt.unsqueeze(1)], dim=1)
                logits = model(seq, last_only=True)[:, -1]
            elif isinstance(caches, MemoryDecodeState):
                logits = model.forward_step(nxt.unsqueeze(1), caches, pos, last_only=True)[:, -1]
            else:
                logits = model(
                    nxt.unsqueeze(1), caches=caches, start=pos, last_only=True, history=history
                )[:, -1]
        result.step_seconds.append(time.perf_counter() - t)
        result.cache_bytes.append(_cache_bytes(caches))
        if done:
            result.stopped_by = "stop"
            break
    result.batch = torch.stack(new, dim=1) if new else prompt.new_zeros(B, 0)
    model.train(was_training)
    return result
