"""Key/value caches for generation, one object per attention layer.

Every cache implements ``attend(q, k, v, start) -> out`` for the queries, keys and values
(B, H, n, D) of positions start..start+n-1 (after rotary), returning the attention output
(B, H, n, D) of those queries over all earlier positions, and ``nbytes``.

- :class:`FullKVCache`: static buffers (B, H, capacity, D) written by index.
- :class:`DilatedKVCache`: for dilated attention, per branch b only what future queries
  can see: the current segment's keys of each head's residue, at most ceil(w_b / r_b)
  rows per head (SPEC section 2, "Decoding"), whatever the context length.

A chunk of n > 1 queries (prefill) must start at a multiple of every segment length for
the dilated pattern (``DecoderLM.prefill_chunk`` gives a valid size): such a chunk holds
whole segments of every branch, so its dilated attention involves no earlier key.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import ops
from ..nn.memory import WindowCache
from ..ops.attention import merge
from ..ops.dilated import head_offsets
from .config import ModelConfig


def dilated_chunk_multiple(cfg: ModelConfig) -> int:
    """Smallest chunk length that starts every branch's segments afresh: lcm of w_b."""
    return math.lcm(*cfg.segment_lengths)


class FullKVCache:
    """All keys and values so far, in preallocated buffers."""

    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, dtype, device):
        shape = (batch, cfg.n_heads, capacity, cfg.head_dim)
        self.cfg = cfg
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def attend(self, q: Tensor, k: Tensor, v: Tensor, start: int) -> Tensor:
        n = q.shape[2]
        end = start + n
        if start != self.length:
            raise ValueError(f"cache holds {self.length} positions; got a chunk at {start}")
        if end > self.k.shape[2]:
            raise ValueError(
                f"the cache was made for {self.k.shape[2]} positions; position {end - 1} "
                "does not fit (raise the capacity)"
            )
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        cfg = self.cfg
        if cfg.attention == "dense":
            return ops.attention(q, self.k[:, :, :end], self.v[:, :, :end], causal=True)
        if cfg.attention == "sliding_window":
            lo = max(0, start - cfg.window + 1)
            return ops.sliding.sliding_window_attention_at(
                q, self.k[:, :, lo:end], self.v[:, :, lo:end], cfg.window, start, lo
            )
        if n > 1:  # an aligned chunk: self-contained
            _check_aligned(cfg, start)
            return ops.dilated_attention(
                q,
                k,
                v,
                cfg.segment_lengths,
                cfg.dilation_rates,
                causal=True,
                offsets=cfg.dilated_offsets,
            )
        return _dilated_decode(cfg, q, start, self._branch_keys)

    def _branch_keys(self, b: int, heads: list[int], t: int) -> tuple[Tensor, Tensor]:
        """Keys/values of branch b visible to the query at t, for the given heads."""
        w, r = self.cfg.segment_lengths[b], self.cfg.dilation_rates[b]
        seg0 = (t // w) * w
        o = (t - seg0) % r
        idx = torch.arange(seg0 + o, t + 1, r, device=self.k.device)
        h = torch.tensor(heads, device=self.k.device)
        # select the few positions first: indexing heads first would copy the whole cache
        return self.k[:, :, idx].index_select(1, h), self.v[:, :, idx].index_select(1, h)


class DilatedKVCache:
    """Bounded exact cache of a dilated-attention layer (see module docstring)."""

    def __init__(self, cfg: ModelConfig, batch: int, dtype, device):
        if cfg.attention != "dilated":
            raise ValueError("DilatedKVCache needs a dilated-attention layer")
        self.cfg = cfg
        H, D = cfg.n_heads, cfg.head_dim
        self.offsets = [head_offsets(H, r, cfg.dilated_offsets) for r in cfg.dilation_rates]
        self.caps = [math.ceil(w / r) for w, r in zip(cfg.segment_lengths, cfg.dilation_rates)]
        self.k = [torch.zeros(batch, H, c, D, dtype=dtype, device=device) for c in self.caps]
        self.v = [torch.zeros(batch, H, c, D, dtype=dtype, device=device) for c in self.caps]
        self.count = [[0] * H for _ in self.caps]  # rows held per (branch, head)
        self.segment = [-1] * len(self.caps)  # segment index the buffers belong to
        self.length = 0

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k) + sum(t.nbytes for t in self.v)

    def _push(self, k: Tensor, v: Tensor, t: int) -> None:
        """Record the key/value of position t where future queries can see it."""
        for b, (w, r) in enumerate(zip(self.cfg.segment_lengths, self.cfg.dilation_rates)):
            seg = t // w
            if seg != self.segment[b]:
                self.segment[b] = seg
                self.count[b] = [0] * len(self.count[b])
            residue = (t - seg * w) % r
            for h, o in enumerate(self.offsets[b]):
                if o == residue:
                    c = self.count[b][h]
                    self.k[b][:, h, c] = k[:, h]
                    self.v[b][:, h, c] = v[:, h]
                    self.count[b][h] = c + 1

    def _fill_from_chunk(self, k: Tensor, v: Tensor, start: int, end: int) -> None:
        """After an aligned chunk start..end-1: per branch, keep the rows of the segment
        that is still open at position ``end`` (earlier segments are closed for good)."""
        for b, (w, r) in enumerate(zip(self.cfg.segment_lengths, self.cfg.dilation_rates)):
            seg0 = (end // w) * w  # >= start: chunks start on every segment boundary
            self.segment[b] = end // w
            for h, o in enumerate(self.offsets[b]):
                rows = range(seg0 + o - start, end - start, r)  # chunk-relative rows
                self.count[b][h] = len(rows)
                if len(rows):
                    self.k[b][:, h, : len(rows)] = k[:, h, rows.start : rows.stop : r]
                    self.v[b][:, h, : len(rows)] = v[:, h, rows.start : rows.stop : r]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, start: int) -> Tensor:
        n = q.shape[2]
        if start != self.length:
            raise ValueError(f"cache holds {self.length} positions; got a chunk at {start}")
        cfg = self.cfg
        if n > 1:  # an aligned chunk: self-contained; then keep what later queries need
            _check_aligned(cfg, start)
            out = ops.dilated_attention(
                q,
                k,
                v,
                cfg.segment_lengths,
                cfg.dilation_rates,
                causal=True,
                offsets=cfg.dilated_offsets,
            )
            self._fill_from_chunk(k, v, start, start + n)
            self.length = start + n
            return out
        self._push(k[:, :, 0], v[:, :, 0], start)
        self.length = start + 1
        return _dilated_decode(cfg, q, start, self._branch_keys)

    def _branch_keys(self, b: int, heads: list[int], t: int) -> tuple[Tensor, Tensor]:
        c = self.count[b][heads[0]]
        h = torch.tensor(heads, device=self.k[b].device)
        return self.k[b][:, h, :c], self.v[b][:, h, :c]


def _check_aligned(cfg: ModelConfig, start: int) -> None:
    multiple = dilated_chunk_multiple(cfg)
    if start % multiple:
        raise ValueError(
            f"a prefill chunk of a dilated layer must start at a multiple of {multiple} "
            f"(the lcm of the segment lengths), got {start}"
        )


def _dilated_decode(cfg: ModelConfig, q: Tensor, t: int, branch_keys) -> Tensor:
    """Output (B, H, 1, D) of the query at position t: per branch, the heads whose offset
    matches t's residue attend their visible keys; a branch's part has lse = -inf for the
    other heads, and the parts merge by lse in one call."""
    B, H, _, D = q.shape
    parts = []
    for b, (w, r) in enumerate(zip(cfg.segment_lengths, cfg.dilation_rates)):
        residue = (t % w) % r
        heads = [h for h, o in enumerate(head_offsets(H, r, cfg.dilated_offsets)) if o == residue]
        if not heads:
            continue
        kb, vb = branch_keys(b, heads, t)  # (B, Hg, L, D)
        o, lse = ops.attention(q[:, heads], kb, vb, return_lse=True)  # (B, Hg, 1, D), (B, Hg, 1)
        if len(heads) < H:
            idx = torch.tensor(heads, device=q.device)
            o = q.new_zeros(B, H, 1, D).index_copy_(1, idx, o)
            lse = lse.new_full((B, H, 1), float("-inf")).index_copy_(1, idx, lse)
        parts.append((o, lse))
    return merge(parts)[0]  # (B, H, 1, D); every head has the rate-1 branch


class MemoryDecodeState:
    """Decoding state of a model with memory layers (``DecoderLM.forward_step``): the
    memories of memory layers, every layer's cache of the current window (memory layers:
    :class:`~longctx.nn.memory.WindowCache`; others a full cache of one window), and the
    window's token ids (for the document-separator rules) and the n-gram embedding's
    token history."""

    def __init__(self, model, batch: int, dtype, device):
        cfg = model.cfg
        W = cfg.memory_window
        self.memories = model.new_memories(batch, dtype, device)
        self.windows = [
            WindowCache(batch, cfg.n_heads, cfg.head_dim, W, dtype, device)
            if mem is not None
            else FullKVCache(cfg, batch, W, dtype, device)
            for mem in self.memories
        ]
        self.tokens = torch.zeros(batch, W, dtype=torch.long, device=device)
        self.history = model.new_history(batch, device)  # n-gram embedding (None: off)
        self.length = 0

    @property
    def nbytes(self) -> int:
        mem = sum(m.nbytes for m in self.memories if m is not None)
        return mem + sum(w.nbytes for w in self.windows)
