"""longctx attention as transformers attention backends (``attn_implementation=``).

transformers calls a backend as ``fn(module, query, key, value, attention_mask,
dropout=, scaling=, **kwargs)`` with (B, H, N, D) queries after rotary positions, the
keys/values of the whole cache (B, H_kv, N_k, D) (grouped-query heads not yet repeated),
and the mask that the mask function registered under the same name made: bool
(B, 1, N, N_k), True = visible (causal and padding together), or None when plain causal
attention is meant (no padding; for N > 1 the keys past the N-th are empty slots of a
static cache, so "causal" is top-left after cropping them, as transformers' sdpa does).
It returns (out (B, N, H, D), None).

Dilated and sliding-window attention are defined on positions, so they are anchored at
the tokens' ``position_ids`` (a left-padded row sees what its unpadded self sees), never
at tensor indices.
"""

from __future__ import annotations

import functools
import json

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .. import ops
from ..nn.patterns import Pattern, make_pattern
from ..nn.state import DilatedKVCache
from .cache import TAG, DilatedLayer

# backend name -> the longctx attention pattern it computes
BACKENDS = {
    "longctx": "dense",
    "longctx_dilated": "dilated",
    "longctx_sliding": "sliding_window",
    "longctx_memory": "memory",  # set by longctx.hf.add_memory
}
CONFIG_KEY = "longctx_attention"  # the pattern's keys, on the model config


def register() -> None:
    """Register every backend together with its mask function (idempotent; done by
    ``import longctx.hf``). Registering both under one name is what makes transformers
    build the causal/padding mask for the backend: without a mask function it passes
    ``attention_mask=None`` silently."""
    for name, kind in BACKENDS.items():
        AttentionInterface.register(name, _backend(kind))
        AttentionMaskInterface.register(name, sdpa_mask)


def configure(model, kind: str = "dilated", **options) -> Pattern:
    """Set the attention of a transformers model to the longctx pattern ``kind``
    (``"dense"``, ``"dilated"``, ``"sliding_window"``) with its keys, e.g.
    ``configure(model, "dilated", segment_lengths=[2048, 4096], dilation_rates=[1, 2])``
    or ``configure(model, "sliding_window", window=4096)``. The keys are checked and kept
    on the config (``config.longctx_attention``, saved with it); the backend is
    selected with ``model.set_attn_implementation``, which changes the config object in
    place (models built from one config object change together). Returns the pattern."""
    pattern = make_pattern({"kind": kind, **options}, "longctx.hf.configure")
    names = {k: name for name, k in BACKENDS.items() if k != "memory"}
    if pattern.kind == "memory":
        raise ValueError("memory layers are added with longctx.hf.add_memory(model, layers=...)")
    if pattern.kind not in names:
        raise ValueError(
            f"no transformers backend for {pattern.kind!r} attention; choose from "
            f"{', '.join(names)}"
        )
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        setattr(config, CONFIG_KEY, pattern.to_dict())
    model.set_attn_implementation(names[pattern.kind])
    return pattern


@functools.lru_cache(maxsize=64)
def _parse(spec: str) -> Pattern:
    return make_pattern(json.loads(spec), f"config.{CONFIG_KEY}")


def layer_pattern(module, kind: str) -> Pattern:
    """The pattern a backend of ``kind`` computes for ``module``: the config's
    ``longctx_attention`` keys, or the pattern's defaults when there are none."""
    spec = getattr(getattr(module, "config", None), CONFIG_KEY, None)
    if spec is None:
        return _parse(json.dumps({"kind": kind}))
    if spec.get("kind") != kind:
        raise ValueError(
            f"the model config's {CONFIG_KEY} is for {spec.get('kind')!r} attention, but the "
            f"backend computes {kind!r}; call longctx.hf.configure(model, ...) to change both"
        )
    return _parse(json.dumps(spec, sort_keys=True))


# ---------------------------------------------------------------- inputs


def _bool_mask(mask: Tensor | None) -> Tensor | None:
    """A boolean visibility mask (an additive 0/-inf mask is converted; biases refused)."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    seen = mask > torch.finfo(mask.dtype).min / 2
    if bool((mask[seen] != 0).any()):
        raise ValueError("longctx backends take visibility masks, not attention biases")
    return seen


def _repeat_kv(module, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """Grouped-query attention: key/value heads repeated for their query heads."""
    n = getattr(module, "num_key_value_groups", 1)
    if n > 1:
        key, value = key.repeat_interleave(n, 1), value.repeat_interleave(n, 1)
    return key, value


def _positions(q: Tensor, k: Tensor, mask: Tensor | None, position_ids) -> tuple[Tensor, Tensor]:
    """Positions (B, N) of the queries and (B, N_k) of the keys.

    Without earlier keys they are ``position_ids`` (default 0..N-1). With a cache, a
    query's slot is N_k - N + i (or, under a mask, the last key its row sees: its own);
    a row's keys sit at their slot minus the row's shift slot - position (left padding
    shifts a row)."""
    B, N, Nk = q.shape[0], q.shape[2], k.shape[2]
    device = q.device
    pos = None if position_ids is None else position_ids.to(device).expand(B, N)
    if Nk == N:
        pos = torch.arange(N, device=device).expand(B, N) if pos is None else pos
        return pos, pos
    slots = torch.arange(Nk - N, Nk, device=device).expand(B, N)
    valid = torch.ones(B, N, dtype=torch.bool, device=device)
    if mask is not None:
        seen = mask[:, 0].expand(B, N, Nk)
        valid = seen.any(-1)
        last = Nk - 1 - seen.flip(-1).to(torch.int8).argmax(-1)  # the last visible key
        slots = torch.where(valid, last, slots)
    keys = torch.arange(Nk, device=device).expand(B, Nk)
    if pos is None:
        return slots, keys
    last_valid = (valid * torch.arange(1, N + 1, device=device)).argmax(-1, keepdim=True)
    shift = (slots - pos).gather(1, last_valid)  # (B, 1)
    return pos, keys - shift


def _starts_at_zero(position_ids, n: int) -> bool:
    if position_ids is None:
        return True
    return bool((position_ids == torch.arange(n, device=position_ids.device)).all())


# ---------------------------------------------------------------- the backends


def _backend(kind: str):
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
        if dropout:
            raise ValueError(
                f"the longctx backends have no attention dropout (got {dropout}); set the "
                "config's attention_dropout to 0"
            )
        pattern = layer_pattern(module, kind)
        mask = _bool_mask(attention_mask)
        layer = getattr(key, TAG, None)
        key, value = _repeat_kv(module, key, value)
        position_ids = kw.get("position_ids")
        if kind == "memory":
            from .memory import memory_attention

            out = memory_attention(
                pattern, module, query, key, value, mask, scaling, layer, position_ids
            )
        elif layer is not None:
            if not (kind == "dilated" and isinstance(layer, DilatedLayer)):
                raise ValueError(
                    f"a {type(layer).__name__} is for the {layer.backend!r} backend; this "
                    f"layer computes {kind!r} attention"
                )
            out = _bounded_dilated(pattern, layer, query, key, value, mask, scaling, position_ids)
        elif kind == "dense":
            out = _dense(query, key, value, mask, scaling, getattr(module, "is_causal", True))
        else:
            out = _positioned(pattern, query, key, value, mask, scaling, position_ids)
        return out.transpose(1, 2).contiguous(), None  # (B, N, H, D)

    attention.__name__ = f"longctx_{kind}_attention"
    attention.__doc__ = f"longctx {kind} attention as a transformers backend."
    return attention


def _dense(q, k, v, mask, scale, causal: bool) -> Tensor:
    N = q.shape[2]
    if mask is not None:
        return ops.masked_attention(q, k, v, mask, scale=scale)
    if not causal or N == 1:  # one query sees every key (sdpa's reading of None)
        return ops.attention(q, k, v, scale=scale)
    return ops.attention(q, k[:, :, :N], v[:, :, :N], causal=True, scale=scale)


def _fast_kernel(pattern: Pattern, q, k, v, scale) -> Tensor:
    """The position-planned op over a whole sequence at positions 0..N-1."""
    if pattern.kind == "dilated":
        ws, rs, offs = pattern.segment_lengths, pattern.dilation_rates, pattern.offsets
        return ops.dilated_attention(q, k, v, ws, rs, causal=True, offsets=offs, scale=scale)
    return ops.sliding_window_attention(q, k, v, pattern.window, causal=True, scale=scale)


def _visibility(pattern: Pattern, q_pos: Tensor, k_pos: Tensor, n_heads: int) -> list[Tensor]:
    """The pattern's visibility by position: per branch (B, H or 1, N, N_k)."""
    if pattern.kind == "dilated":
        return pattern.branch_masks(q_pos, k_pos, n_heads)
    return [pattern.mask(q_pos, k_pos)[:, None]]  # causal included


def _positioned(pattern: Pattern, q, k, v, mask, scale, position_ids) -> Tensor:
    """Dilated or sliding-window attention anchored at the tokens' positions."""
    N = q.shape[2]
    if mask is None and N > 1:  # plain causal from an empty cache: crop its empty slots
        k, v = k[:, :, :N], v[:, :, :N]
        if _starts_at_zero(position_ids, N):
            return _fast_kernel(pattern, q, k, v, scale)
    q_pos, k_pos = _positions(q, k, mask, position_ids)
    parts = []
    for seen in _visibility(pattern, q_pos, k_pos, q.shape[1]):
        seen = seen if mask is None else seen & mask
        parts.append(ops.masked_attention(q, k, v, seen, scale=scale, return_lse=True))
    return ops.merge(parts)[0]


def _bounded_dilated(pattern: Pattern, layer, q, k, v, mask, scale, position_ids) -> Tensor:
    """Dilated attention through a :class:`~longctx.hf.cache.DilatedLayer`: ``k``/``v``
    are the new tokens only; ``mask`` (if any) covers them only."""
    layer.pending = False
    B, H, N, D = q.shape
    past = layer.length - N
    valid = (
        torch.ones(B, N, dtype=torch.bool, device=q.device)
        if mask is None
        else mask[:, 0].expand(B, N, N).diagonal(dim1=-2, dim2=-1)  # a token sees itself
    )
    if position_ids is None:
        pos = torch.arange(past, past + N, device=q.device).expand(B, N)
    else:
        pos = position_ids.to(q.device).expand(B, N)
    if layer.state is None:
        ws, rs = pattern.segment_lengths, pattern.dilation_rates
        layer.state = DilatedKVCache(B, H, D, ws, rs, pattern.offsets, k.dtype, k.device)
    state = layer.state
    if past == 0 and N > 1:  # a prompt: attend within it, keep its last segments
        out = _positioned(pattern, q, k, v, mask, scale, pos)
        state.fill(k, v, pos, valid)
        return out
    outs = []  # token by token: store, then attend over what is kept
    for i in range(N):
        state.push(k[:, :, i], v[:, :, i], pos[:, i], valid[:, i])
        outs.append(pattern.decode_rows(q[:, :, i : i + 1], pos[:, i], state, scale))
    return torch.cat(outs, dim=2)
