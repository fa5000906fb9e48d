from __future__ import annotations

from dataclasses import dataclass, field

from ..config import from_dict, to_dict
from ..nn.attention import ATTENTION_PATTERNS
from ..nn.memory import FAISS_INDEXES, MEMORY_POSITIONS, RETRIEVALS
from ..ops.dilated import OFFSET_MODES, check_branches

MODEL_ATTENTION = (*ATTENTION_PATTERNS, "colt5")
MODEL_FFN = ("swiglu", "colt5")


@dataclass
class ModelConfig:
    """Decoder LM: byte vocabulary, pre-norm blocks (RMSNorm, rotary multi-head attention,
    SwiGLU), tied embeddings. ``attention`` picks the pattern of every layer, ``ffn`` the
    feed-forward: ``swiglu``, or ``colt5`` (routed, causal; longctx.nn.colt5). The
    ``colt5_*`` keys size CoLT5 layers (0 = the paper's default)."""

    vocab_size: int = 264  # 256 bytes + specials, padded to a multiple of 8
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    ffn_hidden: int = 0  # 0: about 8/3 * d_model, rounded up to a multiple of 64
    attention: str = "dense"
    segment_lengths: list[int] = field(default_factory=lambda: [128, 256, 512])
    dilation_rates: list[int] = field(default_factory=lambda: [1, 2, 4])
    dilated_offsets: str = "paper"
    window: int = 256
    rope_base: float = 10000.0
    # n >= 2: each input also sums learned embeddings of the n - 1 tokens before it, one
    # table per offset (longctx.nn.ngram); 1: off
    ngram: int = 1
    ffn: str = "swiglu"
    colt5_capacity: float = 1 / 16  # fraction of tokens through the heavy feed-forward
    colt5_q_capacity: float = 1 / 16  # routed queries of the heavy attention
    colt5_kv_capacity: float = 1 / 8  # routed keys/values of the heavy attention
    colt5_light_heads: int = 0  # 0: n_heads // 4 (at least 1)
    colt5_window: int = 128  # light local attention: each token sees itself + 127 before
    colt5_light_hidden: int = 0  # 0: hidden // 2
    colt5_heavy_hidden: int = 0  # 0: 4 * hidden
    colt5_aux_weight: float = 0.01  # weight of the routers' auxiliary loss
    # memory attention (Focused Transformer): these layers read a memory of earlier
    # windows; inputs are processed window by window (longctx.nn.memory)
    memory_layers: list[int] = field(default_factory=list)
    memory_window: int = 256
    memory_capacity: int = 65536  # entries per layer and batch row (FIFO)
    memory_retrieval: str = "dense"
    memory_topk: int = 32
    memory_positions: str = "zero"
    memory_faiss_index: str = "flat"
    memory_separator: int = 256  # a token that ends a document (clears memory); -1: none
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # std of the fused query/key/value projections' initial weights (0: init_std); a larger
    # one shortens the loss plateau before attention learns to match content
    attn_init_std: float = 0.0

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be a multiple of model.n_heads "
                f"({self.n_heads})"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"head size d_model / n_heads = {self.d_model // self.n_heads} must be even "
                "(rotary positions rotate pairs of dimensions)"
            )
        if isinstance(self.ngram, bool) or not isinstance(self.ngram, int) or self.ngram < 1:
            raise ValueError(f"model.ngram must be an integer >= 1 (1 = off), got {self.ngram!r}")
        for name in ("init_std", "attn_init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"model.{name} must be a number >= 0, got {value!r}")
        if self.init_std == 0:
            raise ValueError("model.init_std must be > 0")
        if self.ffn_hidden < 0:
            raise ValueError(f"model.ffn_hidden must be >= 0, got {self.ffn_hidden}")
        if self.attention not in MODEL_ATTENTION:
            raise ValueError(
                f"model.attention must be one of {MODEL_ATTENTION}, got {self.attention!r}"
            )
        if self.ffn not in MODEL_FFN:
            raise ValueError(f"model.ffn must be one of {MODEL_FFN}, got {self.ffn!r}")
        self._check_colt5()
        self._check_memory()
        if self.dilated_offsets not in OFFSET_MODES:
            raise ValueError(
                f"model.dilated_offsets must be one of {OFFSET_MODES}, got {self.dilated_offsets!r}"
            )
        if self.attention == "dilated":
            check_branches(self.segment_lengths, self.dilation_rates, self.dilated_offsets)
            if 1 not in self.dilation_rates:
                raise ValueError(
                    "model.dilation_rates needs a branch with rate 1 so that every position "
                    f"is covered at every length, got {self.dilation_rates}"
                )
        if self.window < 1:
            raise ValueError(f"model.window must be >= 1, got {self.window}")
        if self.rope_base <= 1:
            raise ValueError(f"model.rope_base must be > 1, got {self.rope_base}")

    def _check_colt5(self) -> None:
        for name in ("colt5_capacity", "colt5_q_capacity", "colt5_kv_capacity"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"model.{name} must be a fraction in [0, 1], got {value!r}")
            if not 0 <= value <= 1:
                raise ValueError(f"model.{name} must be a fraction in [0, 1], got {value}")
            setattr(self, name, float(value))
        for name in ("colt5_light_heads", "colt5_light_hidden", "colt5_heavy_hidden"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"model.{name} must be >= 0 (0 = default), got {getattr(self, name)}"
                )
        if self.colt5_window < 1:
            raise ValueError(f"model.colt5_window must be >= 1, got {self.colt5_window}")
        if self.colt5_aux_weight < 0:
            raise ValueError(f"model.colt5_aux_weight must be >= 0, got {self.colt5_aux_weight}")
        if self.attention == "colt5":
            if self.n_heads < 2:
                raise ValueError(
                    "model.attention = 'colt5' needs n_heads >= 2 (light and heavy heads)"
                )
            if not self.colt5_light_heads < self.n_heads:
                raise ValueError(
                    f"model.colt5_light_heads ({self.colt5_light_heads}) must be < n_heads "
                    f"({self.n_heads}) so that the heavy branch has heads"
                )

    def _check_memory(self) -> None:
        layers = self.memory_layers
        if not isinstance(layers, list) or any(
            isinstance(i, bool) or not isinstance(i, int) for i in layers
        ):
            raise ValueError(f"model.memory_layers must be a list of layer indices, got {layers!r}")
        bad = [i for i in layers if not 0 <= i < self.n_layers]
        if bad or len(set(layers)) != len(layers):
            raise ValueError(
                f"model.memory_layers must hold distinct indices in [0, {self.n_layers - 1}], "
                f"got {layers}"
            )
        for name in ("memory_window", "memory_capacity", "memory_topk"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        for name, allowed in (
            ("memory_retrieval", RETRIEVALS),
            ("memory_positions", MEMORY_POSITIONS),
            ("memory_faiss_index", FAISS_INDEXES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"model.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        if layers and self.attention != "dense":
            raise ValueError(
                "memory layers process inputs window by window with dense attention inside "
                f"each window; model.attention must be 'dense', got {self.attention!r}"
            )

    @property
    def light_heads(self) -> int:
        return self.colt5_light_heads or max(1, self.n_heads // 4)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        return -(-(8 * self.d_model // 3) // 64) * 64

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        return from_dict(cls, data, "model")

    def to_dict(self) -> dict:
        return to_dict(self)
