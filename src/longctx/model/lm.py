from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..nn import MultiHeadAttention, NgramEmbedding, RMSNorm, SwiGLU
from ..nn.attention import make_kernel
from ..nn.colt5 import ConditionalAttention, ConditionalFeedForward, Router
from ..nn.memory import MemoryAttention, MemoryStore
from .config import ModelConfig

LN2 = math.log(2.0)


@torch.no_grad()
def bits_per_position(model: DecoderLM, windows: list[Tensor], batch: int, wrap=iter):
    """Mean bits per token (= per byte) at each position over equal-length windows of
    token ids (each (N + 1,)): a float64 numpy array (N,). ``wrap`` may wrap the batch
    iterator (e.g. in a progress bar). The model's train/eval mode is left as it was."""
    was_training = model.training
    model.eval()
    total = None
    for i in wrap(range(0, len(windows), batch)):
        nll = model.nll_per_position(torch.stack(windows[i : i + batch])).sum(dim=0)  # (N,)
        total = nll if total is None else total + nll
    model.train(was_training)
    return (total / len(windows) / LN2).numpy()


def _attention(cfg: ModelConfig, layer: int) -> nn.Module:
    if layer in cfg.memory_layers:
        return MemoryAttention(
            cfg.d_model,
            cfg.n_heads,
            retrieval=cfg.memory_retrieval,
            topk=cfg.memory_topk,
            positions=cfg.memory_positions,
            rope_base=cfg.rope_base,
            faiss_index=cfg.memory_faiss_index,
        )
    if cfg.attention == "colt5":
        return ConditionalAttention(
            cfg.d_model,
            cfg.n_heads,
            light_heads=cfg.light_heads,
            window=cfg.colt5_window,
            q_capacity=cfg.colt5_q_capacity,
            kv_capacity=cfg.colt5_kv_capacity,
            causal=True,
            rope_base=cfg.rope_base,
        )
    kernel = make_kernel(
        cfg.attention,
        segment_lengths=cfg.segment_lengths,
        dilation_rates=cfg.dilation_rates,
        offsets=cfg.dilated_offsets,
        window=cfg.window,
    )
    return MultiHeadAttention(cfg.d_model, cfg.n_heads, kernel, cfg.rope_base)


def _feed_forward(cfg: ModelConfig) -> nn.Module:
    if cfg.ffn == "colt5":
        return ConditionalFeedForward(
            cfg.d_model,
            cfg.hidden,
            light_hidden=cfg.colt5_light_hidden or None,
            heavy_hidden=cfg.colt5_heavy_hidden or None,
            capacity=cfg.colt5_capacity,
            causal=True,
        )
    return SwiGLU(cfg.d_model, cfg.hidden)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = _attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = _feed_forward(cfg)

    def forward(
        self,
        x: Tensor,
        positions: Tensor | None = None,
        cache=None,
        start: int = 0,
        memory: dict | None = None,
    ):
        """``memory``: for a memory layer, the keyword arguments of MemoryAttention."""
        if memory is not None:
            return self.forward_with(x, lambda h: self.attn(h, positions, start=start, **memory))
        return self.forward_with(x, lambda h: self.attn(h, positions, cache, start))

    def forward_with(self, x: Tensor, attend) -> Tensor:
        """The block with ``attend(normed x)`` as its attention."""
        x = x + attend(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class DecoderLM(nn.Module):
    """Pre-norm decoder over byte tokens with tied input/output embeddings."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.ngram = (
            NgramEmbedding(cfg.vocab_size, cfg.d_model, cfg.ngram) if cfg.ngram > 1 else None
        )
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            # residual-branch outputs scaled down with depth (GPT-2)
            scale = (
                1 / math.sqrt(2 * self.cfg.n_layers)
                if name.endswith(("proj.weight", "w2.weight"))
                else 1
            )
            if name.endswith("qkv.weight") and self.cfg.attn_init_std:
                scale = self.cfg.attn_init_std / std
            nn.init.normal_(p, mean=0.0, std=std * scale)

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        *,
        caches: list | None = None,
        start: int = 0,
        last_only: bool = False,
        memories: list | None = None,
        history: Tensor | None = None,
    ) -> Tensor:
        """tokens (B, N) int64 at positions start..start+N-1 -> logits (B, N, vocab)
        (float32); with ``last_only``, logits of the last position only (B, 1, vocab).
        ``caches``: one per layer (longctx.model.cache) for incremental decoding.
        With memory layers the input is processed in windows of ``memory_window``
        (``start`` a multiple of it); ``memories`` (from :meth:`new_memories`) carries
        the memory from call to call (default: a fresh, empty memory). With
        ``model.ngram`` > 1, ``history`` (from :meth:`new_history`) carries the last
        tokens from call to call; it is needed for input that does not start at 0."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (batch, seq), got {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(f"need one cache per layer ({len(self.blocks)}), got {len(caches)}")
        if self.ngram is not None:
            if positions is not None:
                raise ValueError(
                    f"model.ngram = {self.cfg.ngram} needs contiguous input: explicit "
                    "positions (sequence parallelism) are not supported"
                )
            if start > 0 and history is None:
                raise ValueError(
                    f"model.ngram = {self.cfg.ngram} embeds the {self.cfg.ngram - 1} tokens "
                    f"before each position: input at position {start} needs ``history`` "
                    "(DecoderLM.new_history, carried from call to call)"
                )
        if self.cfg.memory_layers:
            if caches is not None or positions is not None:
                raise ValueError(
                    "a model with memory layers runs window by window: pass ``memories`` "
                    "(DecoderLM.new_memories), not caches or positions"
                )
            return self._forward_windows(tokens, memories, start, last_only, history)
        x = self.embed_tokens(tokens, history)  # (B, N, C)
        for i, block in enumerate(self.blocks):
            x = block(x, positions, None if caches is None else caches[i], start)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        x = self.norm(x)
        return F.linear(x, self.embed.weight).float()  # tied head, (B, N, V)

    def embed_tokens(self, tokens: Tensor, history: Tensor | None = None) -> Tensor:
        """Input vectors (B, N, C): the token embedding, plus with ``model.ngram`` > 1 the
        embeddings of the tokens before (``history``: those before ``tokens``, None at the
        start of a sequence; updated in place to precede the next chunk)."""
        x = self.embed(tokens)
        if self.ngram is not None:
            x = x + self.ngram(tokens, history)
            if history is not None:
                NgramEmbedding.advance(history, tokens)
        return x

    def new_history(self, batch: int, device=None) -> Tensor | None:
        """An empty token history for chunked input (None when ``model.ngram`` is 1)."""
        if self.ngram is None:
            return None
        device = device or self.embed.weight.device
        return torch.full((batch, self.cfg.ngram - 1), -1, dtype=torch.long, device=device)

    def new_memories(self, batch: int, dtype=None, device=None) -> list[MemoryStore | None]:
        """Empty memories, one per layer (None for layers without memory)."""
        w = self.embed.weight
        return [
            b.attn.new_memory(batch, self.cfg.memory_capacity, dtype or w.dtype, device or w.device)
            if isinstance(b.attn, MemoryAttention)
            else None
            for b in self.blocks
        ]

    def document_rules(self, chunk: Tensor):
        """For a window of token ids (B, n): which queries may read memory (none after a
        document separator), which tokens are written (those after the last
        separator), and which rows' memory is cleared (rows that hold a separator)."""
        sep = self.cfg.memory_separator
        B, n = chunk.shape
        is_sep = chunk == sep if sep >= 0 else torch.zeros_like(chunk, dtype=torch.bool)
        idx = torch.arange(n, device=chunk.device).expand(B, n)
        first = torch.where(is_sep, idx, n).amin(dim=1, keepdim=True)  # n: none
        last = torch.where(is_sep, idx, -1).amax(dim=1, keepdim=True)  # -1: none
        visible = idx <= first
        keep = idx > last
        clear = is_sep.any(dim=1).nonzero().flatten().tolist()
        return visible, keep, clear

    def _forward_windows(self, tokens, memories, start, last_only, history=None):
        W = self.cfg.memory_window
        if start % W:
            raise ValueError(f"a memory model's input must start at a multiple of {W}, got {start}")
        B, N = tokens.shape
        if memories is None:
            memories = self.new_memories(B)
        if len(memories) != len(self.blocks):
            raise ValueError(f"need one memory per layer ({len(self.blocks)}), got {len(memories)}")
        outs = []
        x_all = self.embed_tokens(tokens, history)  # (B, N, C)
        for a in range(0, N, W):
            chunk = tokens[:, a : a + W]  # (B, n)
            p0 = start + a
            pos = torch.arange(p0, p0 + chunk.shape[1], device=tokens.device)
            visible, keep, clear = self.document_rules(chunk)
            x = x_all[:, a : a + W]
            for block, mem in zip(self.blocks, memories):
                kw = None
                if mem is not None:
                    kw = dict(
                        memory=mem,
                        window_start=p0,
                        memory_visible=visible,
                        write_keep=keep,
                        clear_rows=clear,
                    )
                x = block(x, pos, None, p0, memory=kw)
            outs.append(x[:, -1:] if last_only else x)
        x = outs[-1] if last_only else torch.cat(outs, dim=1)
        x = self.norm(x)
        return F.linear(x, self.embed.weight).float()

    def forward_crossbatch(self, tokens: Tensor, negatives: int) -> Tensor:
        """Training forward of a memory model with crossbatch (Focused Transformer): the
        input (B, N) is cut into windows; in each window after the first, memory layers
        attend to the previous window of their own row and of ``negatives`` other rows,
        with gradients (``MemoryAttention.forward_crossbatch``); no memory store is used.
        Logits (B, N, vocab)."""
        W = self.cfg.memory_window
        previous = [None] * len(self.blocks)
        outs = []
        x_all = self.embed_tokens(tokens)
        for a in range(0, tokens.shape[1], W):
            x = x_all[:, a : a + W]
            pos = torch.arange(a, a + x.shape[1], device=tokens.device)
            for i, block in enumerate(self.blocks):
                if isinstance(block.attn, MemoryAttention):

                    def attend(h, i=i, block=block, pos=pos, a=a):
                        y, previous[i] = block.attn.forward_crossbatch(
                            h, pos, previous[i], negatives, window_start=a
                        )
                        return y

                    x = block.forward_with(x, attend)
                else:
                    x = block(x, pos, None, a)
            outs.append(x)
        return F.linear(self.norm(torch.cat(outs, dim=1)), self.embed.weight).float()

    def forward_step(self, tokens: Tensor, state, start: int, last_only: bool = False) -> Tensor:
        """Decoding for a model with memory layers: tokens (B, n) at start..start+n-1,
        within one window, continuing ``state`` (``longctx.model.cache.MemoryDecodeState``).
        When the window completes, its keys/values move into memory (the same rules as
        the window-by-window forward), so every step equals the full forward."""
        W = self.cfg.memory_window
        B, n = tokens.shape
        off = start % W
        if start != state.length:
            raise ValueError(f"the state holds {state.length} positions; got a chunk at {start}")
        if off + n > W:
            raise ValueError(f"a chunk must stay within one window of {W}; got {n} at {start}")
        p0 = start - off
        pos = torch.arange(start, start + n, device=tokens.device)
        state.tokens[:, off : off + n] = tokens
        visible = self.document_rules(state.tokens[:, : off + n])[0][:, off:]
        x = self.embed_tokens(tokens, state.history)
        for block, mem, win in zip(self.blocks, state.memories, state.windows):
            if mem is not None:

                def attend(h, block=block, mem=mem, win=win):
                    return block.attn.step(
                        h, pos, win, mem, window_start=p0, memory_visible=visible
                    )

            else:

                def attend(h, block=block, win=win):
                    return block.attn(h, pos, win, off)

            x = block.forward_with(x, attend)
        state.length = start + n
        if off + n == W:  # the window is complete: into memory, and a fresh window
            _, keep, clear = self.document_rules(state.tokens)
            window_pos = torch.arange(p0, p0 + W, device=tokens.device)
            for mem, win in zip(state.memories, state.windows):
                if mem is not None:
                    win.flush(mem, window_pos, keep, clear)
                else:
                    win.length = 0
        if last_only:
            x = x[:, -1:]
        return F.linear(self.norm(x), self.embed.weight).float()

    def loss(self, tokens: Tensor, targets: Tensor) -> Tensor:
        """Training objective: mean cross-entropy (nats per token) of predicting targets
        (B, N), plus ``colt5_aux_weight`` times the CoLT5 routers' auxiliary loss."""
        lm, aux = self.loss_parts(tokens, targets)
        return lm if aux is None else lm + self.cfg.colt5_aux_weight * aux

    def loss_parts(
        self, tokens: Tensor, targets: Tensor, crossbatch: int | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """(cross-entropy, summed router auxiliary loss or None without causal routers).
        ``crossbatch``: negatives per window for a memory model's crossbatch training."""
        if crossbatch is not None and self.cfg.memory_layers:
            logits = self.forward_crossbatch(tokens, crossbatch)
        else:
            logits = self(tokens)
        lm = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))
        aux = [r.aux_loss for r in self.routers().values() if r.aux_loss is not None]
        return lm, (torch.stack(aux).sum() if aux else None)

    def routers(self) -> dict[str, Router]:
        """CoLT5 routers by name (``layer{i}.ffn``, ``layer{i}.attn_q``, ``layer{i}.attn_kv``)."""
        found = {}
        for i, block in enumerate(self.blocks):
            if isinstance(block.ffn, ConditionalFeedForward):
                found[f"layer{i}.ffn"] = block.ffn.router
            if isinstance(block.attn, ConditionalAttention):
                found[f"layer{i}.attn_q"] = block.attn.q_router
                found[f"layer{i}.attn_kv"] = block.attn.kv_router
        return found

    def routed_fractions(self) -> dict[str, float]:
        """Fraction of tokens each router sent to its heavy branch in the last forward."""
        return {
            name: float(r.routed_fraction)
            for name, r in self.routers().items()
            if r.routed_fraction is not None
        }

    @torch.no_grad()
    def nll_per_position(self, windows: Tensor) -> Tensor:
        """windows (B, N + 1) token ids -> NLL in nats of predicting token t + 1 from
        tokens 0..t, for each position t: (B, N) float64."""
        logits = self(windows[:, :-1])
        nll = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")  # (B, N)
        return nll.double()

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters; ``non_embedding`` leaves out the token (and n-gram) tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel()
            n -= 0 if self.ngram is None else self.ngram.tables.numel()
        return n

    def _unrouted_params(self) -> float:
        """Expected weights per token that CoLT5 routing skips (heavy branches applied to
        a capacity fraction of the tokens)."""
        skipped = 0.0
        for block in self.blocks:
            if isinstance(block.ffn, ConditionalFeedForward):
                heavy = sum(p.numel() for p in block.ffn.heavy.parameters())
                skipped += (1 - block.ffn.router.capacity) * heavy
            if isinstance(block.attn, ConditionalAttention):
                a = block.attn
                cq, ckv = a.q_router.capacity, a.kv_router.capacity
                skipped += (1 - cq) * (a.heavy_q.weight.numel() + a.heavy_proj.weight.numel())
                skipped += (1 - ckv) * a.heavy_kv.weight.numel()
        return skipped

    def flops_per_token(self, context: int) -> dict[str, float]:
        """Forward FLOPs per token at a context length: 2 per weight multiply-add (including
        the tied output head) plus the attention pattern's useful FLOPs averaged over
        positions. Training (forward + backward) costs about three times the forward."""
        cfg = self.cfg
        dense = 2 * (self.num_params(non_embedding=True) + self.embed.weight.numel())
        dense -= 2 * self._unrouted_params()
        h, d = cfg.n_heads, cfg.head_dim
        if cfg.attention == "colt5":
            hl = cfg.light_heads
            pairs = cfg.colt5_q_capacity * cfg.colt5_kv_capacity * context * (context + 1) / 2
            attn = ops.sliding_window_flops(context, hl, d, cfg.colt5_window, causal=True)
            attn += 4 * d * (h - hl) * pairs
        elif cfg.attention == "dense":
            attn = 4 * d * h * context * (context + 1) / 2
        elif cfg.attention == "dilated":
            attn = ops.dilated_attention_flops(
                context,
                h,
                d,
                cfg.segment_lengths,
                cfg.dilation_rates,
                causal=True,
                offsets=cfg.dilated_offsets,
            )
        else:
            attn = ops.sliding_window_flops(context, h, d, cfg.window, causal=True)
        attn_per_token = cfg.n_layers * attn / context  # CoLT5: routed at the capacities
        forward = dense + attn_per_token
        return {"forward": forward, "train": 3 * forward, "attention_forward": attn_per_token}
