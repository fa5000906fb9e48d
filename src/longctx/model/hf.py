"""Checkpoints both ways between longctx and the Llama architecture of Hugging Face
``transformers`` (read and written directly: config.json and safetensors, so neither
direction needs transformers installed).

A longctx decoder *is* a Llama: pre-norm RMSNorm blocks, rotary positions (rotate-half
form, the same frequencies), a SwiGLU feed-forward, no biases. The fused projections are
split (``qkv`` -> q/k/v, ``w13`` -> gate/up) and renamed; nothing is approximated.
Grouped-query checkpoints load with their key/value heads repeated for the query heads
that share them (the same function, more memory). Attention patterns other than dense
(``dilated``, ``sliding_window``) travel as a ``longctx_attention`` entry of config.json,
which the backends of :mod:`longctx.hf` read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .._util import atomic_dir
from ..data.tokenizer import BOS, EOD, PAD
from ..nn.patterns import make_pattern
from .config import ModelConfig
from .lm import DecoderLM

SUPPORTED = ("llama", "mistral")  # model_type values from_hf reads
EXPORTABLE = ("dense", "dilated", "sliding_window")  # attention kinds export_hf writes
WEIGHTS = "model.safetensors"


class ConversionError(ValueError):
    """A checkpoint or model that cannot be converted (the message says why)."""


# ---------------------------------------------------------------- longctx -> Llama


def llama_config(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json of the Llama equivalent of a longctx model config
    (ConversionError for what Llama cannot express)."""
    kind = cfg.attention.kind
    if kind not in EXPORTABLE:
        raise ConversionError(
            f"a model with {kind!r} attention has no Llama equivalent; export_hf writes "
            f"models with {', '.join(EXPORTABLE)} attention"
        )
    if cfg.ngram > 1:
        raise ConversionError(
            "the n-gram input embedding (model.ngram > 1) has no Llama equivalent"
        )
    if cfg.longmem.enabled:
        raise ConversionError(
            "a LongMem model (SideNet and memory bank) has no Llama equivalent; its backbone "
            "run (model.longmem.backbone) can be exported"
        )
    if cfg.ffn.kind != "swiglu":
        raise ConversionError(f"the {cfg.ffn.kind!r} feed-forward has no Llama equivalent")
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_base)},
        "max_position_embeddings": 1 << 20,  # rotary positions have no table: any length
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        # the byte tokenizer: ids 0-255 are bytes
        "bos_token_id": BOS,
        "eos_token_id": EOD,
        "pad_token_id": PAD,
        "dtype": "float32",
    }
    if kind != "dense":
        out["longctx_attention"] = cfg.attention.to_dict()
    return out


def llama_state_dict(model: DecoderLM) -> dict[str, Tensor]:
    """The weights of ``model`` under Llama names (contiguous copies)."""
    cfg, sd = model.cfg, model.state_dict()
    C, hidden = cfg.d_model, cfg.hidden
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = sd[src + "attn.qkv.weight"].split(C)  # (C, C) each
        gate, up = sd[src + "ffn.w13.weight"].split(hidden)  # (hidden, C) each
        out |= {
            dst + "input_layernorm.weight": sd[src + "attn_norm.weight"],
            dst + "self_attn.q_proj.weight": q,
            dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": sd[src + "attn.proj.weight"],
            dst + "post_attention_layernorm.weight": sd[src + "ffn_norm.weight"],
            dst + "mlp.gate_proj.weight": gate,
            dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": sd[src + "ffn.w2.weight"],
        }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {name: t.detach().contiguous().clone() for name, t in out.items()}


def export_hf(model: DecoderLM, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model`` as a ``LlamaForCausalLM`` directory (config.json and
    model.safetensors), loadable with ``transformers`` (``from_pretrained``) and with
    :func:`from_hf`. The directory is written whole or not at all; an existing export is
    replaced only with ``overwrite``."""
    config = llama_config(model.cfg)
    how = "overwrite=True, --force on the command line, replaces it"
    try:
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            save_file(llama_state_dict(model), tmp / WEIGHTS, metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    except FileExistsError as exc:
        raise FileExistsError(f"{exc} ({how})") from None
    return Path(out_dir)


# ---------------------------------------------------------------- Llama -> longctx


def _read_checkpoint(source) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config dict, state dict) of a checkpoint directory or a transformers model."""
    if hasattr(source, "config") and hasattr(source, "state_dict"):  # a transformers model
        return source.config.to_dict(), dict(source.state_dict())
    path = Path(source)
    if not path.is_dir():
        raise ConversionError(
            f"{path} is not a checkpoint directory (expected config.json and safetensors "
            "weights; nothing is downloaded)"
        )
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path} has no config.json") from None
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path}/config.json is not valid JSON: {exc}") from None
    index = path / f"{WEIGHTS}.index.json"
    if index.exists():  # sharded
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / WEIGHTS).exists():
        files = [WEIGHTS]
    else:
        raise ConversionError(
            f"{path} has no {WEIGHTS} (or sharded index); only safetensors weights are read"
        )
    weights: dict[str, Tensor] = {}
    for name in files:
        try:
            weights |= load_file(path / name)
        except Exception as exc:  # safetensors raises its own error types
            raise ConversionError(f"{path / name} cannot be read: {exc}") from None
    return config, weights


def rope_base_of(config: dict[str, Any]) -> float:
    """The rotary base of a Llama-style config.json (ConversionError for scaled rotary
    positions, which longctx does not compute)."""
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling")
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaled = scaling and scaling.get("rope_type", scaling.get("type")) != "default"
    if kind != "default" or scaled:
        raise ConversionError(
            f"rotary scaling {rope or scaling} is not supported (longctx uses plain rotary "
            "positions)"
        )
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def model_config_from_hf(config: dict[str, Any], attention=None) -> ModelConfig:
    """The longctx :class:`ModelConfig` of a Llama-architecture config.json
    (ConversionError for anything longctx does not compute exactly)."""
    kind = config.get("model_type")
    if kind not in SUPPORTED:
        arch = config.get("architectures") or [kind]
        raise ConversionError(
            f"unsupported architecture {arch[0]!r} (model_type {kind!r}); from_hf reads "
            f"Llama-architecture checkpoints: model_type {' or '.join(SUPPORTED)}"
        )
    C, H = config["hidden_size"], config["num_attention_heads"]
    checks = {
        "hidden_act": (config.get("hidden_act", "silu"), "silu"),
        "attention_bias": (bool(config.get("attention_bias", False)), False),
        "mlp_bias": (bool(config.get("mlp_bias", False)), False),
        "head_dim": (config.get("head_dim") or C // H, C // H),
        "pretraining_tp": (config.get("pretraining_tp", 1), 1),
    }
    for key, (value, needed) in checks.items():
        if value != needed:
            raise ConversionError(f"{key} = {value!r} is not supported (longctx needs {needed!r})")
    if attention is None:
        window = config.get("sliding_window") if kind == "mistral" else None
        attention = config.get("longctx_attention") or (
            {"kind": "sliding_window", "window": int(window)} if window else "dense"
        )
    try:
        return ModelConfig(
            vocab_size=config["vocab_size"],
            d_model=C,
            n_layers=config["num_hidden_layers"],
            n_heads=H,
            ffn_hidden=config["intermediate_size"],
            rope_base=rope_base_of(config),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            init_std=float(config.get("initializer_range", 0.02)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention=make_pattern(attention),
        )
    except KeyError as exc:
        raise ConversionError(f"config.json has no {exc.args[0]!r}") from None
    except ValueError as exc:
        raise ConversionError(f"the checkpoint's shape does not fit longctx: {exc}") from None


def _expand_kv(w: Tensor, heads: int, kv_heads: int) -> Tensor:
    """A (kv_heads * D, C) key/value projection repeated for the query heads sharing
    each key/value head (query head h reads key/value head h // (heads // kv_heads))."""
    if kv_heads == heads:
        return w
    if heads % kv_heads:
        raise ConversionError(f"{heads} query heads cannot share {kv_heads} key/value heads")
    D = w.shape[0] // kv_heads
    return w.view(kv_heads, D, -1).repeat_interleave(heads // kv_heads, 0).reshape(heads * D, -1)


def from_hf(source, *, attention=None, dtype: torch.dtype | None = None) -> DecoderLM:
    """A longctx :class:`DecoderLM` from a local Llama-architecture checkpoint directory
    (config.json + safetensors) or a loaded ``transformers`` model, with the same
    function (its logits equal the original's). ``attention``: a pattern to use instead
    of the checkpoint's (e.g. ``{"kind": "dilated", ...}`` to run its weights under
    dilated attention); ``dtype``: the parameters' dtype (default float32). Unsupported
    architectures and options raise :class:`ConversionError` naming them."""
    config, sd = _read_checkpoint(source)
    cfg = model_config_from_hf(config, attention)
    H = cfg.n_heads
    Hkv = config.get("num_key_value_heads") or H
    biases = sorted(name for name in sd if name.endswith(".bias"))
    if biases:
        raise ConversionError(f"biases are not supported (the checkpoint has {biases[0]}, ...)")
    out = {"embed.weight": sd.pop("model.embed_tokens.weight", None)}
    out["norm.weight"] = sd.pop("model.norm.weight", None)
    head = sd.pop("lm_head.weight", None)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = head
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        take = {key: sd.pop(src + key, None) for key in (
            "input_layernorm.weight", "post_attention_layernorm.weight",
            "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
            "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        )}  # fmt: skip
        missing = [src + key for key, t in take.items() if t is None]
        if missing:
            raise ConversionError(f"the checkpoint has no {missing[0]}")
        k = _expand_kv(take["self_attn.k_proj.weight"], H, Hkv)
        v = _expand_kv(take["self_attn.v_proj.weight"], H, Hkv)
        out |= {
            dst + "attn_norm.weight": take["input_layernorm.weight"],
            dst + "attn.qkv.weight": torch.cat((take["self_attn.q_proj.weight"], k, v)),
            dst + "attn.proj.weight": take["self_attn.o_proj.weight"],
            dst + "ffn_norm.weight": take["post_attention_layernorm.weight"],
            dst + "ffn.w13.weight": torch.cat(
                (take["mlp.gate_proj.weight"], take["mlp.up_proj.weight"])
            ),
            dst + "ffn.w2.weight": take["mlp.down_proj.weight"],
        }
    missing = [name for name, t in out.items() if t is None]
    if missing:
        raise ConversionError(f"the checkpoint has no weight for longctx's {missing[0]}")
    rest = sorted(name for name in sd if "rotary_emb" not in name)
    if rest:
        raise ConversionError(
            f"the checkpoint has weights longctx does not use ({', '.join(rest[:3])}, ...)"
        )
    model = DecoderLM(cfg)
    try:
        model.load_state_dict(out)
    except RuntimeError as exc:
        raise ConversionError(f"the weights do not fit their config: {exc}") from None
    return model.to(dtype or torch.float32)


__all__ = [
    "ConversionError",
    "export_hf",
    "from_hf",
    "llama_config",
    "llama_state_dict",
    "model_config_from_hf",
    "rope_base_of",
]
