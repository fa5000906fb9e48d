"""LongMem (Wang et al., "Augmenting Language Models with Long-Term Memory", arXiv
2306.07174): a frozen backbone, a trainable residual side network (SideNet) and a cache
memory bank of the backbone's keys and values.

The input is processed in segments of ``segment`` positions (the backbone's window). For
each segment:

1. the frozen backbone runs on the segment alone (its attention sees positions
   0..segment-1 of the segment only), without autograd, keeping the input h_k of every
   block k and its last output h_L. An n-gram embedding (``model.ngram``) is part of a
   token's input, not of attention: it reads the tokens before the segment too, so a
   segment's first tokens embed, and their cached keys match, as in the whole stream;
2. the SideNet, S layers with stride s = L / S, starts from h_0 (the embedding output);
   its layer i (initialised from backbone layer s(i+1) - 1) adds the cross-network
   residual h_{s(i+1)} - h_{si} to its output, so with its blocks silenced the SideNet
   ends exactly at h_L (the sum telescopes). With ``side_gain``, layer i's own update
   is scaled by a learned scalar a_i started at 0 (x <- x + a_i (block(x) - x) +
   residual; ReZero, Bachlechner et al., arXiv 2003.04887): the SideNet then starts
   exactly at the backbone's output, and training moves it only where that helps;
3. one SideNet layer (initialised from the cached backbone layer, so that its queries
   start matched to the cached keys) also reads the bank: token-to-chunk retrieval
   (each query and head takes the top K/csz chunks by their mean keys, expanded to
   their K token pairs) with no positions on either side, fused with the local
   (in-segment, rotary) attention by a learned per-head gate,
   out = (1 - g) local + g memory, g = sigmoid(b) starting at 0.5; or, with ``fusion =
   "joint"``, one softmax over local and memory keys (``ops.merge``), each head's
   memory scores offset by a learned b (starting at 0: the plain softmax);
4. when the segment completes, the cached layer's keys (before rotation) and values go
   into the bank (:class:`~longctx.nn.state.ChunkBank`): read before write, so a segment
   never retrieves itself.

The bank is per batch row (``shared = true``: every row's queries search every row's
chunks) and per document: a row holding a document separator is cleared when its
segment is written, and only the tokens after the last separator are written; queries
after a separator read no memory.

The head is the backbone's (frozen embedding or output matrix) after the SideNet's own
final norm (initialised from the backbone's, trained).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..config import check_bools, check_choices
from .memory import document_rules, memory_visible, window_pieces
from .norm import RMSNorm
from .retrieval import FAISS_INDEXES, attend_gathered, gather_slots, store_index, torch_topk
from .rotary import apply_rotary
from .state import ChunkBank, KVCache, LongMemState

FUSIONS = ("gate", "joint")
LONGMEM_RETRIEVALS = ("exact", "faiss")
QUERY_BLOCK = 128  # memory reads in training: queries per recomputed block


@dataclasses.dataclass
class LongMemConfig:
    """``[model.longmem]``: a LongMem model (module doc) when ``side_layers`` > 0.

    ``backbone``: the trained run (or checkpoint) loaded frozen when training starts
    (its ``[model]`` keys become this model's); ``side_layers``: S SideNet layers (the
    paper: half the backbone's; L must be a multiple of S); ``cache_layer``: the backbone
    layer whose keys and values are cached (-1: the last; it must be one the SideNet
    layers start from, s(i+1) - 1, i.e. odd for S = L/2); ``segment``: positions per
    segment (the backbone's window); ``chunk``: tokens per bank chunk (csz);
    ``topk``: K token pairs each query reads (K/csz chunks; 0: every chunk, i.e. exact
    attention over the whole bank, as when K >= the bank); ``capacity``: tokens per
    row (first in, first out); ``fusion``: ``gate`` or ``joint``; ``retrieval``:
    ``exact`` (torch) or ``faiss`` (``faiss_index`` flat/ivf, ``nprobe``); ``shared``:
    rows read each other's banks; ``separator``: the document separator token (-1:
    none); ``memory``: false reads nothing (the SideNet alone: the control that the
    extra parameters are not what helps)."""

    backbone: str = ""
    side_layers: int = 0
    cache_layer: int = -1
    segment: int = 512
    chunk: int = 4
    topk: int = 64
    capacity: int = 16384
    fusion: str = "gate"
    retrieval: str = "exact"
    faiss_index: str = "flat"
    nprobe: int = 0
    shared: bool = False
    separator: int = 256
    memory: bool = True
    side_gain: bool = False

    def __post_init__(self):
        for name in ("side_layers", "segment", "chunk", "topk", "capacity", "nprobe"):
            value = getattr(self, name)
            low = 0 if name in ("side_layers", "nprobe", "topk") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"model.longmem.{name} must be an integer >= {low}, got {value!r}")
        if self.topk % self.chunk:  # 0: every chunk
            raise ValueError(
                f"model.longmem.topk ({self.topk}) must be a multiple of model.longmem.chunk "
                f"({self.chunk}): each query reads topk / chunk whole chunks"
            )
        if self.capacity % self.chunk:
            raise ValueError(
                f"model.longmem.capacity ({self.capacity}) must be a multiple of "
                f"model.longmem.chunk ({self.chunk})"
            )
        check_choices(
            self,
            "model.longmem",
            fusion=FUSIONS,
            retrieval=LONGMEM_RETRIEVALS,
            faiss_index=FAISS_INDEXES,
        )
        check_bools(self, "model.longmem", "shared", "memory", "side_gain")
        if self.shared and self.retrieval == "faiss":
            raise ValueError(
                "model.longmem.shared searches every row's chunks, which the per-row faiss "
                "indexes cannot: use retrieval = 'exact'"
            )

    @property
    def enabled(self) -> bool:
        """Whether the model is a LongMem model."""
        return self.side_layers > 0

    def bank_settings(self) -> dict:
        """How the bank is kept and read (recorded beside evaluation results)."""
        return {k: getattr(self, k) for k in ("capacity", "chunk", "topk", "retrieval")}

    def sources(self, n_layers: int) -> list[int]:
        """The backbone layer each SideNet layer starts from: s(i+1) - 1."""
        stride = n_layers // self.side_layers
        return [stride * (i + 1) - 1 for i in range(self.side_layers)]

    def cached(self, n_layers: int) -> int:
        """The cached backbone layer."""
        return n_layers - 1 if self.cache_layer == -1 else self.cache_layer

    def check_model(self, n_layers: int, attention_kind: str, retro: bool) -> None:
        """ValueError unless a backbone of ``n_layers`` layers fits these keys."""
        if not self.enabled:
            return
        if n_layers % self.side_layers:
            raise ValueError(
                f"model.n_layers ({n_layers}) must be a multiple of model.longmem.side_layers "
                f"({self.side_layers}): SideNet layer i adds the backbone's h[s(i+1)] - h[si]"
            )
        sources = self.sources(n_layers)
        if self.cached(n_layers) not in sources:
            raise ValueError(
                f"model.longmem.cache_layer must be a layer the SideNet starts from, "
                f"{sources} (-1: the last), so that the memory layer's queries start matched "
                f"to the cached keys; got {self.cache_layer}"
            )
        if attention_kind != "dense":
            raise ValueError(
                "LongMem's backbone must use dense attention (its SideNet copies the backbone "
                f"layers and attends within segments); got model.attention.kind = "
                f"{attention_kind!r}"
            )
        if retro:
            raise ValueError("a LongMem model cannot also have RETRO layers (model.retro.layers)")


class LongMemAttention(nn.Module):
    """The SideNet's memory-augmented attention: causal rotary attention within the
    segment, fused with a read of the bank (module doc). Its projections have the names
    and layout of :class:`~longctx.nn.MultiHeadAttention`'s, so it starts as a copy of
    a backbone layer; ``memory_bias`` b (H,) is the gate's logit (``gate``, 0: g = 0.5)
    or, with ``joint``, the offset of every memory score of its head (0: one plain
    softmax; learned, so a head can turn its share of memory up or down)."""

    def __init__(self, dim: int, n_heads: int, cfg: LongMemConfig, rope_base: float):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.cfg = cfg
        self.rope_base = rope_base
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.memory_bias = nn.Parameter(torch.zeros(n_heads))

    @property
    def gate(self) -> Tensor:
        """g (H,): the share of memory in each head's output (``gate`` fusion)."""
        return torch.sigmoid(self.memory_bias)

    def forward(self, x: Tensor, positions: Tensor, read) -> Tensor:
        """x (B, n, C), the next n positions of the segment (segment positions
        ``positions``); ``read``: a :class:`BankRead` (the segment's cache, the bank,
        which queries may read it)."""
        B, n, _ = x.shape
        qkv = self.qkv(x).view(B, n, 3, self.n_heads, self.head_dim)  # (B, n, 3, H, D)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, n, D) each
        q_rot = apply_rotary(q, positions, self.rope_base)
        k_rot = apply_rotary(k, positions, self.rope_base)
        if read.cache is not None:
            k_rot, v = read.cache.update(k_rot, v, read.cache.length)
        local = ops.attention(q_rot, k_rot, v, causal=True, return_lse=True)  # bottom-right
        memory = self.read(q, read.bank, read.visible)
        y = self.fuse(local, memory)
        return self.proj(y.transpose(1, 2).reshape(B, n, -1))  # (B, n, C)

    def fuse(self, local: tuple[Tensor, Tensor], memory: tuple[Tensor, Tensor]) -> Tensor:
        """The fused output (B, H, n, D) of the local and memory parts ((out, lse) each):
        ``gate``: (1 - g) local + g memory where a query read memory, local elsewhere;
        ``joint``: one softmax over both key sets, each head's memory scores offset by
        its ``memory_bias``."""
        if self.cfg.fusion == "joint":
            bias = self.memory_bias.to(memory[1].dtype).view(1, -1, 1)
            return ops.merge([local, (memory[0], memory[1] + bias)])[0]
        g = self.gate.to(local[0].dtype).view(1, -1, 1, 1)
        fused = (1 - g) * local[0] + g * memory[0]
        return torch.where(torch.isneginf(memory[1]).unsqueeze(-1), local[0], fused)

    def read(self, q: Tensor, bank: ChunkBank, visible: Tensor | None) -> tuple[Tensor, Tensor]:
        """(out, lse) (B, H, n, D) of unrotated queries q over the bank: each query and
        head reads the K = topk token pairs of its top topk / chunk chunks. ``visible``
        (B, n) hides the bank from some queries. In training the read is recomputed in
        backward, block by block (the gathered pairs are the large tensors)."""
        B, H, n, D = q.shape
        if not self.cfg.memory or bank.store.filled == 0:
            return torch.zeros_like(q), q.new_full((B, H, n), float("-inf"))
        if self.reads_all(bank):
            return self._read_all(q, bank, visible)
        if not torch.is_grad_enabled() or not q.requires_grad or n <= QUERY_BLOCK:
            return self._read(q, bank, visible)
        outs, lses = [], []
        for a in range(0, n, QUERY_BLOCK):
            b = min(n, a + QUERY_BLOCK)
            vis = None if visible is None else visible[:, a:b]
            o, lse = checkpoint(self._read, q[:, :, a:b], bank, vis, use_reentrant=False)
            outs.append(o)
            lses.append(lse)
        return torch.cat(outs, dim=2), torch.cat(lses, dim=2)

    def reads_all(self, bank: ChunkBank) -> bool:
        """Whether every chunk the bank holds is selected (``topk`` 0, or at least the
        chunks held), so that the read is dense attention over the bank's tokens."""
        held = bank.store.filled * (bank.batch if self.cfg.shared else 1)
        return self.cfg.topk == 0 or self.cfg.topk // bank.chunk >= held

    def _read_all(self, q: Tensor, bank: ChunkBank, visible: Tensor | None):
        """Dense attention over every token the bank holds (what selecting every chunk
        reads, without gathering per query); with ``shared``, every row's tokens. The
        bank is a key-padding mask (one tile); hidden queries are blanked afterwards."""
        store, m, used = bank.store, bank.chunk, bank.store.filled
        keys, values = bank.unpack(store.v[:, :, :used].to(q.dtype))  # (B, H, used, m, D)
        keys, values = keys.flatten(2, 3), values.flatten(2, 3)  # (B, H, used m, D)
        valid = store.valid[:, :used].repeat_interleave(m, dim=1)  # (B, used m) tokens
        B, H, n, D = q.shape
        if self.cfg.shared:  # every row's tokens, row-major, for every row's queries
            keys, values = (t.transpose(0, 1).reshape(1, H, -1, D) for t in (keys, values))
            qs = q.transpose(0, 1).reshape(1, H, B * n, D)  # (1, H, B n, D): rows as queries
            out, lse = ops.masked_attention(
                qs, keys, values, valid.reshape(1, 1, 1, -1), return_lse=True
            )
            out = out.view(H, B, n, D).transpose(0, 1)  # (B, H, n, D)
            lse = lse.view(H, B, n).transpose(0, 1)  # (B, H, n)
        else:
            out, lse = ops.masked_attention(q, keys, values, valid[:, None, None], return_lse=True)
        if visible is not None:  # a hidden query reads nothing: out 0, lse -inf
            hidden = ~visible[:, None, :]  # (B, 1, n)
            out = out.masked_fill(hidden.unsqueeze(-1), 0.0)
            lse = lse.masked_fill(hidden, float("-inf"))
        return out, lse

    def _read(self, q: Tensor, bank: ChunkBank, visible: Tensor | None):
        idx = self.select(q.detach(), bank)  # (B, H, n, K / csz) chunk slots, -1: none
        if visible is not None:
            idx = idx.masked_fill(~visible[:, None, :, None], -1)
        store, m = bank.store, bank.chunk
        packed = store.v.to(q.dtype)  # (B, H, C, 2 m D)
        if self.cfg.shared:  # every row's chunks: (1, H, B C, 2 m D)
            packed = packed.transpose(0, 1).flatten(1, 2).unsqueeze(0)
        (chunks,) = gather_slots(idx, packed)  # (B, H, n, K / m, 2 m D)
        ks, vs = bank.unpack(chunks)  # (B, H, n, K / m, m, D) each
        invalid = (idx < 0).repeat_interleave(m, dim=-1)  # (B, H, n, K)
        return attend_gathered(
            q, ks.flatten(3, 4), vs.flatten(3, 4), invalid, self.head_dim**-0.5
        )  # fmt: skip

    def select(self, q: Tensor, bank: ChunkBank) -> Tensor:
        """The chunk slots each query and head reads (B, H, n, topk / chunk), -1 for
        none: the top chunks by inner product with their mean keys (exact, or the
        store's faiss index). With ``shared``, slots index every row's chunks (row-major)."""
        store, used = bank.store, bank.store.filled
        kc = self.cfg.topk // bank.chunk or used * (bank.batch if self.cfg.shared else 1)
        if self.cfg.retrieval == "faiss":
            index = store_index(store, self.cfg.faiss_index, self.cfg.nprobe)
            return index.search(store, q, kc)
        keys, valid = store.k[:, :, :used].to(q.dtype), store.valid[:, :used]
        if self.cfg.shared:
            keys = keys.transpose(0, 1).flatten(1, 2).unsqueeze(0)  # (1, H, B used, D)
            valid = valid.flatten().unsqueeze(0)  # (1, B used)
            idx = torch_topk(keys, valid, q, kc)  # slot j of row r is r * used + j
            row, slot = idx.div(used, rounding_mode="floor"), idx % used
            return torch.where(idx < 0, idx, row * store.k.shape[2] + slot)
        return torch_topk(keys, valid, q, kc)


@dataclasses.dataclass
class BankRead:
    """What the memory layer reads in one call: the segment's key/value cache (None when
    the call holds the whole segment), the bank, and which queries may read it (B, n)."""

    cache: KVCache | None
    bank: ChunkBank
    visible: Tensor | None


class SideNet(nn.Module):
    """The SideNet (module doc): ``blocks`` built by ``make_block(layer)`` (the host
    model's block of that backbone layer), the memory layer's attention replaced by a
    :class:`LongMemAttention`, the final ``norm``, and with ``side_gain`` the gains
    a_i (S,) of the layers' own updates."""

    def __init__(self, cfg, make_block):
        super().__init__()
        lm = cfg.longmem
        self.cfg = lm
        self.n_layers = cfg.n_layers
        self.stride = cfg.n_layers // lm.side_layers
        self.sources = lm.sources(cfg.n_layers)
        self.cached = lm.cached(cfg.n_layers)
        self.memory_layer = self.sources.index(self.cached)
        blocks = []
        for i, src in enumerate(self.sources):
            block = make_block(src)
            if i == self.memory_layer:
                block.attn = LongMemAttention(cfg.d_model, cfg.n_heads, lm, cfg.rope_base)
            blocks.append(block)
        self.blocks = nn.ModuleList(blocks)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.gains = nn.Parameter(torch.zeros(lm.side_layers)) if lm.side_gain else None

    @torch.no_grad()
    def init_from(self, backbone) -> None:
        """SideNet layer i := backbone layer s(i+1) - 1, the final norm := the
        backbone's, the gates at 0.5, the layer gains (``side_gain``) at 0."""
        for block, src in zip(self.blocks, self.sources):
            missing, unexpected = block.load_state_dict(
                backbone.blocks[src].state_dict(), strict=False
            )
            if unexpected or any(not k.endswith("memory_bias") for k in missing):
                raise ValueError(f"SideNet block does not fit backbone layer {src}")
        self.norm.load_state_dict(backbone.norm.state_dict())
        self.blocks[self.memory_layer].attn.memory_bias.zero_()
        if self.gains is not None:
            self.gains.zero_()

    RUNTIME = ("capacity", "topk", "retrieval", "faiss_index", "nprobe", "memory")

    def configure(self, **settings) -> LongMemConfig:
        """Change how the bank is kept and read (``capacity``, ``topk``, ``retrieval``,
        ``faiss_index``, ``nprobe``; ``memory = False``: not read at all; no weight
        changes), for states made afterwards; returns the new config. Checked as the
        config is."""
        unknown = sorted(set(settings) - set(self.RUNTIME))
        if unknown:
            raise ValueError(
                f"a LongMem model's memory settings are {', '.join(self.RUNTIME)}; got "
                f"{', '.join(unknown)}"
            )
        new = dataclasses.replace(self.cfg, **settings)
        self.cfg = self.memory.cfg = new
        return new

    @property
    def memory(self) -> LongMemAttention:
        """The memory layer's attention."""
        return self.blocks[self.memory_layer].attn

    def new_state(self, backbone, batch: int, dtype, device) -> LongMemState:
        """An empty bank and segment state for ``batch`` rows."""
        lm, S = self.cfg, self.cfg.segment
        attn = self.memory
        H, D = attn.n_heads, attn.head_dim
        bank = ChunkBank(batch, H, D, lm.capacity, lm.chunk, dtype, device)
        caches = [
            [KVCache(batch, H, S, D, dtype, device) for _ in blocks]
            for blocks in (backbone.blocks, self.blocks)
        ]
        history = None
        if backbone.ngram is not None:
            n = backbone.cfg.ngram
            history = torch.full((batch, n - 1), -1, dtype=torch.long, device=device)
        return LongMemState(bank, S, lm.separator, caches[0], caches[1], history)

    def forward(self, backbone, tokens: Tensor, state: LongMemState) -> Tensor:
        """The SideNet's last output (B, n, C) for token ids (B, n) that continue
        ``state`` (any length: cut at segment boundaries)."""
        outs = []
        start, S = state.length, state.segment
        for a, b in window_pieces(state.held, tokens.shape[1], S):
            off, piece = state.held, tokens[:, a:b]
            if off == 0:
                state.start_segment()
            whole = off == 0 and b - a == S  # attend in place, no caches
            pos = torch.arange(off, off + b - a, device=tokens.device)
            hs, k, v = self._backbone(backbone, piece, pos, state, whole)
            state.append(k, v, piece)
            visible = memory_visible(state.tokens[:, : state.held], state.separator)
            read = BankRead(
                None if whole else state.side[self.memory_layer],
                state.bank,
                visible[:, off:],
            )
            x = hs[0]
            for i, block in enumerate(self.blocks):
                layer_state = read if i == self.memory_layer else None if whole else state.side[i]
                residual = hs[self.stride * (i + 1)] - hs[self.stride * i]
                y = block(x, pos, layer_state)
                if self.gains is not None:  # x + a_i (block(x) - x)
                    y = torch.lerp(x, y, self.gains[i].to(y.dtype))
                x = y + residual
            outs.append(x)
            if state.held == S:  # the segment is complete: into the bank
                self._write(state, start + a - off)
        state.length = start + tokens.shape[1]
        return torch.cat(outs, dim=1)

    @torch.no_grad()
    def _backbone(self, backbone, piece: Tensor, pos: Tensor, state: LongMemState, whole: bool):
        """The frozen backbone on the next piece of the segment: the inputs h_0..h_{L-1}
        of its blocks and its last output h_L, and the cached layer's keys (before
        rotation) and values (B, H, n, D)."""
        h = backbone.embed_tokens(piece, state.history)
        hs = [h]
        for block, cache in zip(backbone.blocks, state.backbone):
            h = block(h, pos, None if whole else cache)
            hs.append(h)
        src = backbone.blocks[self.cached]
        attn = src.attn
        B, n = piece.shape
        qkv = attn.qkv(src.attn_norm(hs[self.cached])).view(B, n, 3, attn.n_heads, attn.head_dim)
        _, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, n, D) each
        return hs, k, v

    def _write(self, state: LongMemState, first: int) -> None:
        """Move the completed segment (starting at position ``first``) into the bank,
        under the document rules."""
        _, keep, clear = document_rules(state.tokens, state.separator)
        if clear:
            state.bank.clear(clear)
        positions = torch.arange(first, first + state.segment, device=state.tokens.device)
        state.bank.add(state.k, state.v, positions, keep)
        state.held = 0


__all__ = ["BankRead", "LongMemAttention", "LongMemConfig", "SideNet"]
