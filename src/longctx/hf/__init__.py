"""longctx inside Hugging Face ``transformers`` models (optional extra ``hf``:
``pip install 'longctx[hf]'``).

Importing this module registers three attention backends, each with its mask function
(so the causal and padding masks always reach it)::

    import longctx.hf
    model = LlamaForCausalLM.from_pretrained(path, attn_implementation="longctx")
    longctx.hf.configure(model, "dilated", segment_lengths=[2048, 4096],
                         dilation_rates=[1, 2])          # -> "longctx_dilated"
    out = model.generate(ids, cache=longctx.hf.DilatedCache(model), ...)

- ``longctx``: exact dense attention (longctx's kernels);
- ``longctx_dilated``: LongNet dilated attention, segments anchored at the tokens'
  positions (left-padded rows equal their unpadded selves);
  :class:`DilatedCache` decodes with a cache whose size does not grow with the context;
- ``longctx_sliding``: causal sliding-window attention.

:func:`add_memory` turns layers of such a model into Focused-Transformer memory layers
(backend ``longctx_memory``; :class:`MemoryCache` carries windows and memory across
calls and through ``generate``).
Checkpoints both ways: :func:`longctx.model.from_hf` and ``longctx export-hf``.
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "longctx.hf needs Hugging Face transformers >= 5: pip install 'longctx[hf]'"
    ) from exc

from .attention import BACKENDS, configure, register
from .cache import DilatedCache, MemoryCache
from .memory import add_memory

register()

__all__ = ["BACKENDS", "DilatedCache", "MemoryCache", "add_memory", "configure", "register"]
