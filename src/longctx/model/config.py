"""The decoder's config: ``[model]`` scalars, ``[model.attention]`` (an attention pattern:
``kind`` and its keys) and ``[model.ffn]`` (a feed-forward kind).

Older configs (longctx 0.1, format version 1) kept every option in one flat ``[model]``
table (``attention = "dilated"``, ``segment_lengths``, ``colt5_window``,
``memory_layers``, ...). Those keys are still read, from presets, TOML files, ``--set``,
saved ``config.json`` files and the Python constructor: they are translated into the
nested tables with a :class:`FutureWarning` that says so (:func:`translate_legacy`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

from ..config import check_bools, from_dict, to_dict
from ..nn.feedforward import FeedForwardKind, SwiGLUFFN, make_ffn
from ..nn.longmem import LongMemConfig
from ..nn.patterns import Dense, Pattern, make_pattern
from ..nn.retro import RetroConfig

# flat keys of format 1, by the kind they configure, and their names in the nested table
_LEGACY_ATTENTION = {
    "dilated": {
        "segment_lengths": "segment_lengths",
        "dilation_rates": "dilation_rates",
        "dilated_offsets": "offsets",
    },
    "sliding_window": {"window": "window"},
    "colt5": {
        "colt5_light_heads": "light_heads",
        "colt5_window": "window",
        "colt5_q_capacity": "q_capacity",
        "colt5_kv_capacity": "kv_capacity",
    },
    "memory": {
        "memory_layers": "layers",
        "memory_window": "window",
        "memory_capacity": "capacity",
        "memory_retrieval": "retrieval",
        "memory_topk": "topk",
        "memory_positions": "positions",
        "memory_faiss_index": "faiss_index",
        "memory_separator": "separator",
    },
}
_LEGACY_FFN = {
    "colt5": {
        "colt5_capacity": "capacity",
        "colt5_light_hidden": "light_hidden",
        "colt5_heavy_hidden": "heavy_hidden",
    }
}
LEGACY_KEYS = frozenset(
    k for table in (*_LEGACY_ATTENTION.values(), *_LEGACY_FFN.values()) for k in table
)


def translate_legacy(data: dict[str, Any], where: str = "model") -> tuple[dict, dict[str, str]]:
    """Translate a format-1 flat ``[model]`` table into the nested one.

    Returns the new table and {new dotted key: old dotted key} for every translated key
    (so that an error about a value can name the key the user wrote). Flat keys that do
    not apply to the resulting kinds are dropped (format 1 saved every key, used or
    not). A table without flat keys is returned unchanged."""
    old = {k: v for k, v in data.items() if k in LEGACY_KEYS}
    if not old:
        return data, {}
    new = {k: v for k, v in data.items() if k not in LEGACY_KEYS}
    renamed: dict[str, str] = {}
    attention = _table(new.get("attention", "dense"), "dense")
    kind = attention.get("kind", "dense")
    if old.get("memory_layers"):
        if kind != "dense":
            raise ValueError(
                "memory layers process inputs window by window with dense attention inside "
                f"each window; model.attention must be 'dense', got {kind!r}"
            )
        kind = attention["kind"] = "memory"
    ffn = _table(new.get("ffn", "swiglu"), "swiglu")
    targets = (
        ("attention", attention, _LEGACY_ATTENTION.get(kind, {})),
        ("ffn", ffn, _LEGACY_FFN.get(ffn.get("kind", "swiglu"), {})),
    )
    for name, table, mapping in targets:
        for key, value in old.items():
            if key in mapping:
                table[mapping[key]] = value
                renamed[f"{where}.{name}.{mapping[key]}"] = f"{where}.{key}"
        new[name] = table
    warnings.warn(
        f"{where}: the flat keys of longctx 0.1 ({', '.join(sorted(old))}) are deprecated; "
        f"read as [{where}.attention] kind = {kind!r} and [{where}.ffn] kind = "
        f"{ffn.get('kind', 'swiglu')!r} (keys that do not apply to those kinds are "
        "dropped). Write the nested tables instead, e.g. [model.attention] with kind and "
        "its keys.",
        FutureWarning,
        stacklevel=3,
    )
    return new, renamed


def _table(value: Any, default_kind: str) -> dict:
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, str):
        return {"kind": value}
    if isinstance(value, (Pattern, FeedForwardKind)):
        return value.to_dict()
    return {"kind": default_kind} if value is None else value


@contextlib.contextmanager
def _naming_old_keys(renamed: dict[str, str]):
    """Errors about a translated key also name the key the user wrote."""
    try:
        yield
    except ValueError as exc:
        msg = str(exc)
        notes = [f"{new} was set as {old}" for new, old in renamed.items() if new in msg]
        if not notes:
            raise
        raise ValueError(f"{msg} ({'; '.join(notes)}, a deprecated key)") from None


@dataclass(init=False)
class ModelConfig:
    """Decoder LM: byte vocabulary, pre-norm blocks (RMSNorm, attention with rotary
    positions, feed-forward), tied input/output embeddings unless ``tie_embeddings`` is
    false (then the output head is its own matrix, as in most Llama checkpoints).

    ``attention`` is the attention pattern of the layers (a registered kind, a table
    ``{"kind": ..., **keys}`` or a :class:`~longctx.nn.Pattern`; default dense) and
    ``ffn`` the feed-forward kind (``swiglu`` or ``colt5``). Keyword arguments only;
    the flat keys of longctx 0.1 are translated with a warning."""

    vocab_size: int = 264  # 256 bytes + specials, padded to a multiple of 8
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    ffn_hidden: int = 0  # 0: about 8/3 * d_model, rounded up to a multiple of 64
    rope_base: float = 10000.0
    # n >= 2: each input also sums learned embeddings of the n - 1 tokens before it, one
    # table per offset (longctx.nn.ngram); 1: off
    ngram: int = 1
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # std of the fused query/key/value projections' initial weights (0: init_std); a larger
    # one shortens the loss plateau before attention learns to match content
    attn_init_std: float = 0.0
    colt5_aux_weight: float = 0.01  # weight of the CoLT5 routers' auxiliary loss
    tie_embeddings: bool = True  # false: a separate output head (lm_head)
    attention: Pattern = field(default_factory=Dense)
    ffn: FeedForwardKind = field(default_factory=SwiGLUFFN)
    # RETRO: chunked cross-attention layers reading retrieved neighbours (off by default)
    retro: RetroConfig = field(default_factory=RetroConfig)
    # LongMem: a frozen backbone (these keys), a SideNet and a memory bank (off by default)
    longmem: LongMemConfig = field(default_factory=LongMemConfig)

    def __init__(self, **kwargs):
        kwargs, renamed = translate_legacy(kwargs)
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(
                f"unknown key(s) {', '.join('model.' + k for k in unknown)}; valid keys in "
                f"model: {', '.join(sorted(names))}"
            )
        for f in dataclasses.fields(self):
            if f.name in kwargs:
                value = kwargs[f.name]
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                value = f.default
            setattr(self, f.name, value)
        with _naming_old_keys(renamed):
            self.__post_init__()

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
        for name in ("init_std", "attn_init_std", "colt5_aux_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"model.{name} must be a number >= 0, got {value!r}")
        check_bools(self, "model", "tie_embeddings")
        if self.init_std == 0:
            raise ValueError("model.init_std must be > 0")
        if self.ffn_hidden < 0:
            raise ValueError(f"model.ffn_hidden must be >= 0, got {self.ffn_hidden}")
        if self.rope_base <= 1:
            raise ValueError(f"model.rope_base must be > 1, got {self.rope_base}")
        self.attention = make_pattern(self.attention, "model.attention")
        self.ffn = make_ffn(self.ffn, "model.ffn")
        self.attention.check_model(self.d_model, self.n_heads, self.n_layers)
        if isinstance(self.retro, dict):
            self.retro = from_dict(RetroConfig, self.retro, "model.retro")
        self.retro.check_model(self.n_layers, self.d_model, self.n_heads)
        if isinstance(self.longmem, dict):
            self.longmem = from_dict(LongMemConfig, self.longmem, "model.longmem")
        self.longmem.check_model(self.n_layers, self.attention.kind, self.retro.enabled)

    def __getattr__(self, name: str):
        """Reading a flat key of longctx 0.1 (``cfg.segment_lengths``, ...) still works,
        with a FutureWarning: it reads the nested table's key (or, when the model's kind
        has no such key, the value longctx 0.1 would have had: that kind's default)."""
        for table, legacy in (("attention", _LEGACY_ATTENTION), ("ffn", _LEGACY_FFN)):
            for kind, mapping in legacy.items():
                if name not in mapping:
                    continue
                warnings.warn(
                    f"ModelConfig.{name} is deprecated; read model.{table}.{mapping[name]}",
                    FutureWarning,
                    stacklevel=2,
                )
                current = self.__dict__.get(table)
                if current is not None and current.kind == kind:
                    return getattr(current, mapping[name])
                if name == "memory_layers":
                    return []
                make = make_pattern if table == "attention" else make_ffn
                return getattr(make(kind), mapping[name])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def head_dim(self) -> int:
        """The size of one attention head."""
        return self.d_model // self.n_heads

    @property
    def hidden(self) -> int:
        """The feed-forward hidden size."""
        if self.ffn_hidden:
            return self.ffn_hidden
        return -(-(8 * self.d_model // 3) // 64) * 64

    @classmethod
    def from_dict(cls, data: dict, where: str = "model") -> ModelConfig:
        """From a ``[model]`` table (nested, or the flat keys of format 1)."""
        if not isinstance(data, dict):
            raise ValueError(f"{where} must be a table of keys, got {data!r}")
        data, renamed = translate_legacy(data, where)
        with _naming_old_keys(renamed):
            return from_dict(cls, data, where)

    def to_dict(self) -> dict:
        """The ``[model]`` table, nested (format 2)."""
        return to_dict(self)


__all__ = ["LEGACY_KEYS", "ModelConfig", "translate_legacy"]
