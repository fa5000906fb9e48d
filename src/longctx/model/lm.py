"""The decoder language model: one forward path for training, evaluation, memory windows,
crossbatch, prefill and decoding.

What differs between those uses is the *state* handed to :meth:`DecoderLM.forward`
(:class:`~longctx.nn.ModelState`, from :meth:`DecoderLM.new_state`): none for a plain
training forward; decode caches for prefill and decoding; memory stores for a memory model
(created on the fly when none is given); crossbatch contexts for crossbatch training. Each
layer's attention module reads and writes its own layer state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..nn import MemoryAttention, MultiHeadAttention, NgramEmbedding, RMSNorm, Router
from ..nn.chunking import token_chunks
from ..nn.longmem import SideNet
from ..nn.retro import ChunkedCrossAttention, NeighbourEncoder, RetroContext
from ..nn.state import ModelState, RetroState
from .config import ModelConfig

# names of the routers in a block, as logged ("layer{i}.<name>")
_ROUTER_NAMES = {"ffn.router": "ffn", "attn.q_router": "attn_q", "attn.kv_router": "attn_kv"}
CHECKPOINTING = ("off", "layer")


@dataclass
class LossTerms:
    """The terms of the training objective of one batch.

    ``lm``: cross-entropy in nats per target token; ``router_aux``: the sum of the causal
    CoLT5 routers' auxiliary losses (None without such routers); ``total``: what training
    minimises, ``lm + colt5_aux_weight * router_aux``."""

    lm: Tensor
    router_aux: Tensor | None
    total: Tensor


class DecoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + ffn(norm(x)).

    ``recompute``: the block's activations are recomputed in backward (when it holds no
    state: a state's writes must not be replayed). ``token_chunk``: its per-token work
    (norms, projections, a per-token feed-forward) runs in slices of that many tokens,
    each recomputed in backward. Both are set by
    :meth:`DecoderLM.set_activation_checkpointing`."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = cfg.attention.build(cfg.d_model, cfg.n_heads, layer, rope_base=cfg.rope_base)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = cfg.ffn.build(cfg.d_model, cfg.hidden)
        retro = layer in cfg.retro.layers  # RETRO: chunked cross-attention after attention
        self.cca_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if retro else None
        self.cca = (
            ChunkedCrossAttention(
                cfg.d_model,
                cfg.n_heads,
                cfg.retro.chunk,
                cfg.rope_base,
                cfg.retro.width(cfg.d_model),
            )  # fmt: skip
            if retro
            else None
        )
        self.layer = layer
        self.recompute = False
        self.token_chunk = 0
        self.routed = any(isinstance(m, Router) for m in self.modules())

    def forward(self, x: Tensor, positions: Tensor, state=None, retro=None) -> Tensor:
        """x (B, N, C) at ``positions`` (N,); ``state``: this layer's state or None;
        ``retro``: the forward's :class:`~longctx.nn.retro.RetroContext` (neighbours)."""
        if retro is not None and self.cca is not None:
            return self._forward(x, positions, state, retro)
        if self.recompute and state is None and torch.is_grad_enabled():
            if self.routed:
                # routers leave their auxiliary losses for the objective: the forward must
                # record them, so it runs under autograd (which then keeps nothing)
                return checkpoint(self._forward, x, positions, use_reentrant=False)
            # the forward runs without autograd (nested token chunks keep nothing either);
            # backward reruns it with autograd, chunks recomputed one at a time
            return checkpoint(self._forward, x, positions, use_reentrant=True)
        return self._forward(x, positions, state)

    def _forward(self, x: Tensor, positions: Tensor, state=None, retro=None) -> Tensor:
        if isinstance(self.attn, MultiHeadAttention):  # the norm is chunked with its input
            x = x + self.attn(x, positions, state, pre=self.attn_norm)
        else:
            x = x + self.attn(self.attn_norm(x), positions, state)
        if retro is not None and self.cca is not None:
            encoded, visible = retro.read(self.layer, x)  # the first such layer encodes
            if encoded is not None:
                x = x + self.cca(self.cca_norm(x), encoded, visible, int(positions[0]))
        chunk = self.token_chunk if getattr(self.ffn, "per_token", False) else 0
        return x + token_chunks(self._ffn, (x,), (1,), chunk, 1, recomputed=chunk > 0)

    def _ffn(self, x: Tensor) -> Tensor:
        return self.ffn(self.ffn_norm(x))


class DecoderLM(nn.Module):
    """Pre-norm decoder over byte tokens with tied input/output embeddings, or a separate
    output head ``lm_head`` when ``cfg.tie_embeddings`` is false (config:
    :class:`ModelConfig`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.ngram = (
            NgramEmbedding(cfg.vocab_size, cfg.d_model, cfg.ngram) if cfg.ngram > 1 else None
        )
        self.blocks = nn.ModuleList(DecoderBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.retro_encoder = (
            NeighbourEncoder(
                cfg.retro.width(cfg.d_model),
                cfg.n_heads,
                cfg.retro.encoder_layers,
                cfg.hidden * cfg.retro.width(cfg.d_model) // cfg.d_model,
                cfg.rope_base,
                cfg.norm_eps,
                cfg.d_model,
            )  # fmt: skip
            if cfg.retro.enabled
            else None
        )
        self.lm_head = (
            None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        )
        # LongMem: this model's own layers are the frozen backbone; the SideNet trains
        self.side = (
            SideNet(cfg, lambda layer: DecoderBlock(cfg, layer)) if cfg.longmem.enabled else None
        )
        # layers that keep a state even in a plain forward (memory, LongMem's bank)
        self.needs_state = self.side is not None or any(
            getattr(b.attn, "needs_state", False) for b in self.blocks
        )
        self.token_chunk = 0  # see set_activation_checkpointing
        self.reset_parameters()
        if self.side is not None:
            self.side.init_from(self)
            for module in self.backbone_modules():
                module.requires_grad_(False)
                module.eval()

    def backbone_modules(self) -> list[nn.Module]:
        """A LongMem model's frozen parts: the embedding(s), the backbone blocks, its final
        norm and output head (the whole model otherwise)."""
        parts = [self.embed, self.ngram, self.blocks, self.norm, self.lm_head]
        return [m for m in parts if m is not None]

    def train(self, mode: bool = True) -> DecoderLM:
        """Training mode, except a LongMem model's frozen backbone (always evaluation)."""
        super().train(mode)
        if self.side is not None:
            for module in self.backbone_modules():
                module.eval()
        return self

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual-branch outputs scaled down with depth
        (GPT-2); qkv projections at ``attn_init_std`` when it is set."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            scale = (
                1 / math.sqrt(2 * self.cfg.n_layers)
                if name.endswith(("proj.weight", "w2.weight"))
                else 1
            )
            if name.endswith("qkv.weight") and self.cfg.attn_init_std:
                scale = self.cfg.attn_init_std / std
            nn.init.normal_(p, mean=0.0, std=std * scale)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        tokens: Tensor,
        state: ModelState | None = None,
        *,
        positions: Tensor | None = None,
        start: int | None = None,
        last_only: bool = False,
        neighbours: Tensor | None = None,
    ) -> Tensor:
        """tokens (B, N) int64 -> logits (B, N, vocab) (float32, or float64 for a float64
        model); with ``last_only``, the last position's only (B, 1, vocab).

        The tokens sit at positions start..start+N-1: ``start`` defaults to what ``state``
        holds (0 without one). ``state`` (from :meth:`new_state`) continues earlier calls
        (prefill chunks, decoded tokens, memory windows) and is updated in place; a memory
        model without one gets a fresh memory. ``positions`` (N,): explicit global
        positions of the tokens (sequence parallelism), stateless only. ``neighbours``
        (B, l, k, r): a RETRO model's retrieved neighbours of chunks 0..l-1 (token ids,
        PAD = absent; see :mod:`longctx.nn.retro`), whole sequences from position 0."""
        x = self.hidden_states(
            tokens, state, positions=positions, start=start, neighbours=neighbours
        )
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        return self.head(x)

    def head(self, x: Tensor) -> Tensor:
        """Logits (B, N, vocab) of the last block's output x (B, N, C): the final norm and
        the output embedding (tied, or ``lm_head``); float32 (float64 for a float64
        model)."""
        w = self.embed.weight if self.lm_head is None else self.lm_head.weight
        norm = self.norm if self.side is None else self.side.norm
        logits = F.linear(norm(x), w)
        return logits if logits.dtype == torch.float64 else logits.float()

    def hidden_states(
        self,
        tokens: Tensor,
        state: ModelState | None = None,
        *,
        positions: Tensor | None = None,
        start: int | None = None,
        neighbours: Tensor | None = None,
    ) -> Tensor:
        """The last block's output (B, N, C) before the head (arguments as
        :meth:`forward`)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (batch, seq), got {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        B, N = tokens.shape
        if state is None and self.needs_state:
            if start:
                raise ValueError(self._fresh_state_error(start))
            state = self.new_state(B)
        if state is not None:
            if positions is not None:
                raise ValueError("explicit positions cannot be combined with a state")
            if (state.longmem is None) != (self.side is None):
                raise ValueError(
                    "the state was made by another model (LongMem states and others differ)"
                )
            if len(state.layers) != len(self.blocks):
                raise ValueError(
                    f"need one state per layer ({len(self.blocks)}), got {len(state.layers)}"
                )
            if start is not None and start != state.length:
                raise ValueError(
                    f"the state holds {state.length} positions; got input at position {start}"
                )
            start = state.length
        start = start or 0
        if self.side is not None:  # LongMem: the backbone and SideNet, segment by segment
            x = self.side(self, tokens, state.longmem)
            state.length = start + N
            return x
        history = None if state is None else state.history
        self._check_ngram(start, positions, history)
        x = self.embed_tokens(tokens, history)  # (B, N, C)
        if positions is None:
            positions = torch.arange(start, start + N, device=tokens.device)
        retro = self._retro_context(tokens, neighbours, state, start, positions)
        if state is None:
            for block in self.blocks:
                x = block(x, positions, None, retro)
        else:
            state.observe(tokens, start)
            for block, layer_state in zip(self.blocks, state.layers):
                x = block(x, positions, layer_state, retro)
            state.length = start + N
        return x

    def _retro_context(self, tokens, neighbours, state, start, positions):
        """The forward's RETRO context (None for a model without retrieval layers, or a
        stateless forward without neighbours), checked."""
        if self.retro_encoder is None:
            if neighbours is not None:
                raise ValueError(
                    "neighbours given, but the model has no retrieval layers (model.retro.layers)"
                )
            return None
        if state is not None:
            if neighbours is not None:
                raise ValueError("with a state, give the neighbours to new_state(neighbours=...)")
            retro = state.retro
        elif neighbours is None:
            return None
        else:
            if start or int(positions[0]) != 0:
                raise ValueError(
                    "a stateless RETRO forward with neighbours takes whole sequences from "
                    "position 0 (continue a sequence with a state)"
                )
            if neighbours.dim() != 4 or neighbours.shape[0] != tokens.shape[0]:
                raise ValueError(
                    f"neighbours must have shape ({tokens.shape[0]}, chunks, k, tokens), got "
                    f"{tuple(neighbours.shape)}"
                )
            retro = RetroState(self.cfg.retro.chunk, given=neighbours.to(tokens.device))
            retro.observe(tokens, 0)
        rc = self.cfg.retro
        return RetroContext(retro, self.embed, self.retro_encoder, min(rc.layers), rc.neighbours)

    def _check_ngram(self, start: int, positions: Tensor | None, history: Tensor | None) -> None:
        if self.ngram is None:
            return
        n = self.cfg.ngram
        if positions is not None:
            raise ValueError(
                f"model.ngram = {n} needs contiguous input: explicit positions (sequence "
                "parallelism) are not supported"
            )
        if start > 0 and history is None:
            raise ValueError(
                f"model.ngram = {n} embeds the {n - 1} tokens before each position: input "
                f"at position {start} needs ``history`` (the n-gram token history of a "
                "state from DecoderLM.new_state, carried from call to call)"
            )

    def _fresh_state_error(self, start: int) -> str:
        window = getattr(self.cfg.attention, "window", None)
        where = f" (its windows start at every multiple of {window})" if window else ""
        return (
            f"input at position {start} of a model with {self.cfg.attention.kind!r} "
            "attention needs the state of the positions before it: pass state= "
            f"(DecoderLM.new_state, carried from call to call); a new state starts at "
            f"position 0{where}"
        )

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

    def set_activation_checkpointing(self, mode: str = "off", token_chunk: int = 0) -> None:
        """How training trades compute for memory (``[train]`` keys of the same names).

        ``mode="layer"``: each block without a state is recomputed in backward, so only
        its input is kept between forward and backward. ``token_chunk`` > 0: the per-token
        work (norms, projections, rotary positions, a per-token feed-forward, the LM head
        and loss) runs in slices of that many tokens, each recomputed in backward, so no
        (N, hidden) or (N, vocab) tensor exists for all N at once. Results are those of
        the plain step up to float rounding order."""
        if mode not in CHECKPOINTING:
            raise ValueError(
                f"activation checkpointing must be one of {CHECKPOINTING}, got {mode!r}"
            )
        if isinstance(token_chunk, bool) or not isinstance(token_chunk, int) or token_chunk < 0:
            raise ValueError(f"token_chunk must be an integer >= 0 (0: off), got {token_chunk!r}")
        side = [] if self.side is None else list(self.side.blocks)
        for block in [*self.blocks, *side]:
            block.recompute = mode == "layer"
            block.token_chunk = token_chunk
            if isinstance(block.attn, MultiHeadAttention):
                block.attn.token_chunk = token_chunk
        self.token_chunk = token_chunk

    # ------------------------------------------------------------------ state

    def new_state(
        self,
        batch: int,
        *,
        cache: str = "full",
        capacity: int = 0,
        dtype=None,
        device=None,
        crossbatch: int | None = None,
        neighbours: Tensor | None = None,
        retriever=None,
    ) -> ModelState:
        """An empty state for ``batch`` rows: every layer's decode state under the cache
        policy ``cache`` (``"full"``, or ``"dilated"`` for dilated layers' bounded
        cache), full caches sized for ``capacity`` positions; memory layers get an empty
        memory. ``crossbatch=d``: instead, the training state of crossbatch (memory
        layers read the previous window of their row and of d other rows). A RETRO model's
        chunks read ``neighbours`` (B, l, k, r) given in advance for chunks below l, then
        what ``retriever`` (chunk ids (B, m) -> neighbours (B, k, r)) returns when a chunk
        completes, else nothing."""
        w = self.embed.weight
        dtype, device = dtype or w.dtype, device or w.device
        if self.side is not None:  # LongMem: its bank and segment caches
            if crossbatch is not None or neighbours is not None or retriever is not None:
                raise ValueError("a LongMem model takes no crossbatch, neighbours or retriever")
            longmem = self.side.new_state(self, batch, dtype, device)
            return ModelState([None] * len(self.blocks), None, None, longmem)
        policy, options = (
            (cache, {}) if crossbatch is None else ("crossbatch", {"negatives": crossbatch})
        )
        layers = [
            block.attn.new_state(batch, capacity, dtype, device, policy, **options)
            for block in self.blocks
        ]
        history = None
        if self.ngram is not None and crossbatch is None:
            history = torch.full((batch, self.cfg.ngram - 1), -1, dtype=torch.long, device=device)
        retro = None
        if self.retro_encoder is not None:
            if neighbours is not None and (neighbours.dim() != 4 or neighbours.shape[0] != batch):
                raise ValueError(
                    f"neighbours must have shape ({batch}, chunks, k, tokens), got "
                    f"{tuple(neighbours.shape)}"
                )
            given = None if neighbours is None else neighbours.to(device)
            retro = RetroState(self.cfg.retro.chunk, given=given, retriever=retriever)
        elif neighbours is not None or retriever is not None:
            raise ValueError(
                "neighbours or a retriever given, but the model has no retrieval layers"
            )
        return ModelState(layers, history, retro)

    def memory_layers(self) -> list[MemoryAttention]:
        """The memory layers (Focused Transformer), in order (empty for other models)."""
        return [b.attn for b in self.blocks if isinstance(b.attn, MemoryAttention)]

    def configure_memory(self, **settings) -> None:
        """Change how every memory layer keeps and reads its memory, for states made
        after this call: the keywords of :meth:`MemoryAttention.configure` (capacity,
        retrieval, topk, faiss_index, nprobe, recall_every, exact_below); no weight
        changes. A LongMem model takes capacity (tokens), topk, retrieval (dense: every
        chunk, topk: exact selection, faiss), faiss_index, nprobe and memory (False: the
        bank is never read) for its bank. A model without memory raises ValueError."""
        if self.side is not None:  # LongMem: its bank (retrieval named as memory layers do)
            keys = dict(settings)
            retrieval = keys.pop("retrieval", None)
            if retrieval == "dense":  # every chunk: exact attention over the bank
                keys["topk"] = 0
            elif retrieval is not None:
                keys["retrieval"] = "exact" if retrieval == "topk" else retrieval
            self.cfg.longmem = self.side.configure(**keys)
            return
        layers = self.memory_layers()
        if not layers:
            raise ValueError(
                f"this model has no memory layers (attention {self.cfg.attention.kind!r}): "
                "memory capacity and retrieval apply to kind = 'memory' models"
            )
        for layer in layers:
            layer.configure(**settings)

    def cache_note(self, policy: str) -> str:
        """Why a generation cache policy is not honoured as asked (empty when it is)."""
        return self.cfg.attention.cache_note(policy)

    def prefill_multiple(self) -> int:
        """Prefill chunks (of more than one token) must start at multiples of this."""
        return self.cfg.attention.prefill_multiple()

    # ------------------------------------------------------------------ objective

    def loss_terms(
        self,
        tokens: Tensor,
        targets: Tensor,
        *,
        state: ModelState | None = None,
        positions: Tensor | None = None,
        normalizer: Tensor | int | None = None,
        neighbours: Tensor | None = None,
    ) -> LossTerms:
        """The training objective's terms for (B, N) inputs and targets (-100: no loss).
        ``state``: e.g. a crossbatch state (:meth:`new_state`); ``positions``: the global
        positions of a sequence shard. ``normalizer``: the number of targets the
        cross-entropy is averaged over (default: this call's; a sequence shard passes the
        whole batch's, so that the shards' terms sum to the batch's). ``neighbours``: a
        RETRO model's retrieved neighbours (see :meth:`forward`)."""
        x = self.hidden_states(tokens, state, positions=positions, neighbours=neighbours)
        if self.token_chunk:
            nll = token_chunks(self._nll_sum, (x, targets), (1, 1), self.token_chunk, 0).sum()
            lm = nll / (normalizer if normalizer is not None else (targets != -100).sum())
        else:
            logits = self.head(x)  # (B, N, V)
            flat, y = logits.view(-1, logits.shape[-1]), targets.reshape(-1)
            if normalizer is None:
                lm = F.cross_entropy(flat, y)
            else:
                lm = F.cross_entropy(flat, y, reduction="sum") / normalizer
        aux = [r.aux_loss for r in self.routers().values() if r.aux_loss is not None]
        router_aux = torch.stack(aux).sum() if aux else None
        total = lm if router_aux is None else lm + self.cfg.colt5_aux_weight * router_aux
        return LossTerms(lm, router_aux, total)

    def _nll_sum(self, x: Tensor, targets: Tensor) -> Tensor:
        """Summed cross-entropy (shape (1,)) of a slice: x (B, n, C), targets (B, n)."""
        logits = self.head(x)
        return F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), reduction="sum")[None]

    def loss(self, tokens: Tensor, targets: Tensor) -> Tensor:
        """Training objective: mean cross-entropy (nats per token) of predicting targets
        (B, N), plus ``colt5_aux_weight`` times the CoLT5 routers' auxiliary loss."""
        return self.loss_terms(tokens, targets).total

    def routers(self) -> dict[str, Router]:
        """CoLT5 routers by name (``layer{i}.ffn``, ``layer{i}.attn_q``, ``layer{i}.attn_kv``)."""
        found = {}
        for i, block in enumerate(self.blocks):
            for name, module in block.named_modules():
                if isinstance(module, Router):
                    found[f"layer{i}.{_ROUTER_NAMES.get(name, name)}"] = module
        return found

    def routed_fractions(self) -> dict[str, float]:
        """Fraction of tokens each router sent to its heavy branch in the last forward."""
        return {
            name: float(r.routed_fraction)
            for name, r in self.routers().items()
            if r.routed_fraction is not None
        }

    @torch.no_grad()
    def nll_per_position(self, windows: Tensor, neighbours: Tensor | None = None) -> Tensor:
        """windows (B, N + 1) token ids -> NLL in nats of predicting token t + 1 from
        tokens 0..t, for each position t: (B, N) float64. ``neighbours``: a RETRO
        model's, of the inputs' chunks (see :meth:`forward`)."""
        logits = self(windows[:, :-1], neighbours=neighbours)
        nll = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")  # (B, N)
        return nll.double()

    # ------------------------------------------------------------------ size and cost

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters; ``non_embedding`` leaves out the token (and n-gram) tables and an
        untied output head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel()
            n -= 0 if self.lm_head is None else self.lm_head.weight.numel()
            n -= 0 if self.ngram is None else self.ngram.tables.numel()
        return n

    def num_trainable(self) -> int:
        """Parameters its training updates: a LongMem model's SideNet, a RETROfit
        model's retrieval layers (its base is frozen), else every parameter."""
        if self.side is not None:
            return sum(p.numel() for p in self.side.parameters())
        if self.cfg.retro.base:
            from ..nn.retro import is_retrieval_weight

            return sum(p.numel() for n, p in self.named_parameters() if is_retrieval_weight(n))
        return self.num_params()

    def flops_per_token(self, context: int) -> dict[str, float]:
        """Forward FLOPs per token at a context length: 2 per weight multiply-add (including
        the tied output head; routed layers at their capacities) plus each layer's
        attention FLOPs (its pattern's count) averaged over positions. Training (forward +
        backward) costs about three times the forward."""
        dense = 2 * (self.num_params(non_embedding=True) + self.embed.weight.numel())
        skipped = sum(m.skipped_params() for m in self.modules() if hasattr(m, "skipped_params"))
        attention = sum(b.attn.attention_flops(context) for b in self.blocks) / context
        forward = dense - 2 * skipped + attention
        return {"forward": forward, "train": 3 * forward, "attention_forward": attention}


__all__ = ["DecoderBlock", "DecoderLM", "LossTerms"]
