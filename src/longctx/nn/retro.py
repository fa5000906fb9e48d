"""RETRO's retrieval layers (Borgeaud et al., arXiv 2112.04426, section 2.4 and App. B):
the neighbour encoder and chunked cross-attention (CCA).

A RETRO decoder reads, for its input cut into chunks of m tokens, the k retrieved
neighbours of each chunk: token ids (B, l, k, r) (r = 2m: a chunk and its continuation;
PAD = absent). The encoder turns them into E (B, l, k, r, C), once per forward, at the
first retrieval layer after its self-attention: bidirectional self-attention over each
neighbour, and (first encoder layer only) cross-attention to the activations of the
chunk that retrieved it. Each retrieval layer then adds CCA: position t reads E of
chunk u = floor((t + 1) / m) - 1 (nothing when u < 0 or the chunk has no neighbours),
the k neighbours' r tokens sharing one softmax. Positions are relative through rotary
angles: CCA query i of its group (i = t + 1 - (u + 1) m, 0..m-1) sits at m - 1 + i and
neighbour token j at j (the paper's distance i - j + m - 1); in the encoder, neighbour
token j at j and chunk token i at i. PAD neighbour tokens are never attended.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..data.tokenizer import PAD
from .feedforward import SwiGLU
from .norm import RMSNorm
from .rotary import apply_rotary
from .state import RetroState


@dataclasses.dataclass
class RetroConfig:
    """``[model.retro]``: the decoder layers with chunked cross-attention (``layers``,
    empty: no retrieval; the paper: every 3rd from the 6th), the chunk size ``chunk``
    (m), the neighbours per chunk in training ``neighbours`` (k), and the encoder's
    ``encoder_layers`` of width ``encoder_dim`` (0: the decoder's; a narrower encoder
    costs less: it reads k r tokens per m decoder tokens). ``base``: RETROfit, a trained
    run (or checkpoint) of the same decoder whose weights are loaded and frozen, so that
    only the encoder and the cross-attention train."""

    layers: list[int] = dataclasses.field(default_factory=list)
    chunk: int = 64
    neighbours: int = 2
    encoder_layers: int = 2
    encoder_dim: int = 0
    base: str = ""

    def __post_init__(self):
        if not isinstance(self.layers, list) or any(
            isinstance(i, bool) or not isinstance(i, int) for i in self.layers
        ):
            raise ValueError(
                f"model.retro.layers must be a list of layer indices, got {self.layers!r}"
            )
        for name in ("chunk", "neighbours", "encoder_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.retro.{name} must be an integer >= 1, got {value!r}")
        d = self.encoder_dim
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ValueError(f"model.retro.encoder_dim must be an integer >= 0, got {d!r}")

    @property
    def enabled(self) -> bool:
        return bool(self.layers)

    def width(self, d_model: int) -> int:
        """The encoder's width."""
        return self.encoder_dim or d_model

    def check_model(self, n_layers: int, d_model: int = 0, n_heads: int = 1) -> None:
        if self.enabled and d_model:
            w = self.width(d_model)
            if w % n_heads or (w // n_heads) % 2:
                raise ValueError(
                    f"model.retro.encoder_dim {w} must split into {n_heads} heads of an even "
                    "size (rotary positions)"
                )
        bad = [i for i in self.layers if not 0 <= i < n_layers]
        if bad or len(set(self.layers)) != len(self.layers):
            raise ValueError(
                f"model.retro.layers must hold distinct indices in [0, {n_layers - 1}], got "
                f"{self.layers}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def is_retrieval_weight(name: str) -> bool:
    """Whether a DecoderLM parameter name belongs to RETRO's retrieval layers (the
    encoder, a block's chunked cross-attention and its norm)."""
    return name.startswith("retro_encoder.") or ".cca." in name or ".cca_norm." in name


def _heads(x: Tensor, n_heads: int) -> Tensor:
    """(..., n, C) -> (..., H, n, C / H)."""
    *lead, n, c = x.shape
    return x.view(*lead, n, n_heads, c // n_heads).transpose(-3, -2)


def _merge_heads(y: Tensor) -> Tensor:
    """(..., H, n, D) -> (..., n, H * D)."""
    *lead, h, n, d = y.shape
    return y.transpose(-3, -2).reshape(*lead, n, h * d)


class CrossAttention(nn.Module):
    """Multi-head attention of queries x (..., n, C) over a context (..., s, C_kv) (width
    ``kv_dim``, default C), rotary positions on both sides (``q_pos`` (n,), ``k_pos``
    (s,)), keys hidden where ``visible`` (..., s) is false; no causality."""

    def __init__(self, dim: int, n_heads: int, rope_base: float = 10000.0, kv_dim: int = 0):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not a multiple of n_heads {n_heads}")
        self.n_heads, self.rope_base = n_heads, rope_base
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(kv_dim or dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, context, q_pos, k_pos, visible=None) -> Tensor:
        lead = x.shape[:-2]
        q = _heads(self.q(x), self.n_heads).flatten(0, -4)  # (b, H, n, D)
        k, v = (_heads(t, self.n_heads).flatten(0, -4) for t in self.kv(context).chunk(2, -1))
        q = apply_rotary(q, q_pos, self.rope_base)
        k = apply_rotary(k, k_pos, self.rope_base)
        if visible is None:
            y = ops.attention(q, k, v)
        else:
            y = ops.masked_attention(q, k, v, visible.flatten(0, -2)[:, None, None, :])
        return self.proj(_merge_heads(y).view(*lead, x.shape[-2], -1))


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention over (..., n, C) with rotary positions
    0..n-1; keys hidden where ``visible`` (..., n) is false."""

    def __init__(self, dim: int, n_heads: int, rope_base: float = 10000.0):
        super().__init__()
        self.n_heads, self.rope_base = n_heads, rope_base
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, visible: Tensor | None = None) -> Tensor:
        lead, n = x.shape[:-2], x.shape[-2]
        q, k, v = (_heads(t, self.n_heads).flatten(0, -4) for t in self.qkv(x).chunk(3, -1))
        pos = torch.arange(n, device=x.device)
        q, k = apply_rotary(q, pos, self.rope_base), apply_rotary(k, pos, self.rope_base)
        if visible is None:
            y = ops.attention(q, k, v)
        else:
            y = ops.masked_attention(q, k, v, visible.flatten(0, -2)[:, None, None, :])
        return self.proj(_merge_heads(y).view(*lead, n, -1))


class EncoderLayer(nn.Module):
    """Pre-norm: self-attention over a neighbour, cross-attention to its chunk's
    activations (``cross``: the first layer only), a SwiGLU feed-forward."""

    def __init__(self, dim, n_heads, hidden, cross: bool, rope_base: float, eps: float, kv_dim=0):
        super().__init__()
        self.self_norm = RMSNorm(dim, eps)
        self.self_attn = SelfAttention(dim, n_heads, rope_base)
        self.cross_norm = RMSNorm(dim, eps) if cross else None
        self.cross = CrossAttention(dim, n_heads, rope_base, kv_dim) if cross else None
        self.ffn_norm = RMSNorm(dim, eps)
        self.ffn = SwiGLU(dim, hidden)

    def forward(self, x: Tensor, chunk: Tensor, visible: Tensor) -> Tensor:
        """x (B, l, k, r, C) neighbour states, chunk (B, l, m, C), visible (B, l, k, r)."""
        x = x + self.self_attn(self.self_norm(x), visible)
        if self.cross is not None:  # the k neighbours of a chunk share its m keys
            B, l, k, r, C = x.shape
            queries = self.cross_norm(x).view(B, l, k * r, C)  # (B, l, k r, C)
            pos_r = torch.arange(r, device=x.device).repeat(k)  # each neighbour from 0
            pos_m = torch.arange(chunk.shape[-2], device=x.device)
            x = x + self.cross(queries, chunk, pos_r, pos_m).view(B, l, k, r, C)
        return x + self.ffn(self.ffn_norm(x))


class NeighbourEncoder(nn.Module):
    """RETRO's encoder: neighbour token embeddings (B, l, k, r, C) and the activations
    of the chunks that retrieved them (B, l, m, C) -> E (B, l, k, r, dim). A width
    ``dim`` other than the decoder's ``model_dim`` adds an input projection."""

    def __init__(
        self, dim, n_heads, n_layers, hidden, rope_base=10000.0, eps=1e-5, model_dim: int = 0
    ):
        super().__init__()
        model_dim = model_dim or dim
        self.inp = nn.Linear(model_dim, dim, bias=False) if model_dim != dim else None
        self.layers = nn.ModuleList(
            EncoderLayer(dim, n_heads, hidden, i == 0, rope_base, eps, model_dim)
            for i in range(n_layers)
        )
        self.norm = RMSNorm(dim, eps)

    def forward(self, x: Tensor, chunks: Tensor, visible: Tensor) -> Tensor:
        if self.inp is not None:
            x = self.inp(x)
        for layer in self.layers:
            x = layer(x, chunks, visible)
        return self.norm(x)


class ChunkedCrossAttention(nn.Module):
    """CCA (module docstring): x (B, N, C) at positions start..start+N-1 and E
    (B, l, k, r, C) of chunks 0..l-1 (``visible`` (B, l, k, r): non-PAD tokens) -> the
    residual update (B, N, C), zero where a position reads no chunk."""

    def __init__(
        self, dim: int, n_heads: int, chunk: int, rope_base: float = 10000.0, kv_dim: int = 0
    ):
        super().__init__()
        self.chunk = chunk
        self.attn = CrossAttention(dim, n_heads, rope_base, kv_dim)

    def forward(self, x: Tensor, encoded: Tensor, visible: Tensor, start: int = 0) -> Tensor:
        B, N, C = x.shape
        m, chunks = self.chunk, encoded.shape[1]
        out = x.new_zeros(B, N, C)
        first = max((start + 1) // m - 1, 0)  # the chunks read by positions in the input
        last = min((start + N) // m - 1, chunks - 1)
        if last < first:
            return out
        a = max(start, (first + 1) * m - 1)  # rows a..b-1 read chunks first..last
        b = min(start + N, (last + 2) * m - 1)
        G = last - first + 1
        front = a - ((first + 1) * m - 1)
        rows = F.pad(x[:, a - start : b - start], (0, 0, front, G * m - front - (b - a)))
        rows = rows.view(B, G, m, C)  # (B, G, m, C): group g = the m positions reading chunk
        e = encoded[:, first : last + 1]  # (B, G, k, r, C)
        k, r = e.shape[2], e.shape[3]
        q_pos = torch.arange(m - 1, 2 * m - 1, device=x.device)
        k_pos = torch.arange(r, device=x.device).repeat(k)  # each neighbour from 0
        seen = visible[:, first : last + 1].reshape(B, G, k * r)
        y = self.attn(rows, e.reshape(B, G, k * r, -1), q_pos, k_pos, seen)  # (B, G, m, C)
        out[:, a - start : b - start] = y.reshape(B, G * m, C)[:, front : front + b - a]
        return out


class RetroContext:
    """What the retrieval layers of one forward share: the model's
    :class:`~longctx.nn.state.RetroState`, the embedding and encoder that encode
    neighbours, and the first retrieval layer (where the chunks an input completes are
    encoded, from their rows after that layer's self-attention)."""

    def __init__(self, state: RetroState, embed, encoder: NeighbourEncoder, first: int, k: int):
        self.state, self.embed, self.encoder = state, embed, encoder
        self.first, self.k = first, k

    def read(self, layer: int, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """E (B, l, k, r, C) and visibility (B, l, k, r) of the chunks completed so far,
        for retrieval layer ``layer`` whose rows after self-attention are x (B, n, C)."""
        st = self.state
        if layer == self.first:
            done = st.take_chunks(x)
            if done is not None:
                ids, rows = done  # (B, c, m), (B, c, m, C)
                neighbours = self._neighbours(ids)
                visible = neighbours != PAD
                st.append(neighbours, self.encoder(self.embed(neighbours), rows, visible))
        if st.encoded is None:
            return None, None
        return st.encoded, st.neighbours != PAD

    def _neighbours(self, ids: Tensor) -> Tensor:
        """Neighbours (B, c, k, r) of the chunks ``ids`` (B, c, m) just completed."""
        st, m = self.state, self.state.chunk
        out = []
        for j in range(ids.shape[1]):
            u = st.chunks + j
            if st.given is not None and u < st.given.shape[1]:
                nb = st.given[:, u]
            elif st.retriever is not None:
                nb = torch.as_tensor(st.retriever(ids[:, j])).to(ids.device)
                if nb.dim() != 3 or nb.shape[0] != ids.shape[0]:
                    raise ValueError(
                        f"the retriever must return neighbours (batch, k, tokens), got "
                        f"{tuple(nb.shape)}"
                    )
            else:  # nothing retrieved: the chunk reads nothing
                r = m * 2 if st.given is None else st.given.shape[-1]
                k = self.k if st.given is None else st.given.shape[2]
                nb = torch.full((ids.shape[0], k, r), PAD, device=ids.device)
            out.append(nb.long())
        return torch.stack(out, dim=1)
