"""longctx: exact, fast long-context attention and tools to train and compare models.

Subpackages, from the bottom layer up (each imports only from those before it):
:mod:`longctx.ops` (attention functions), :mod:`longctx.nn` (modules, attention patterns,
states), :mod:`longctx.model` (the decoder LM, checkpoints, generation),
:mod:`longctx.data`, :mod:`longctx.distributed`, :mod:`longctx.train`,
:mod:`longctx.evaluate`, :mod:`longctx.bench`. ``import longctx`` imports a subpackage
the first time it is used (``longctx.nn.MultiHeadAttention``).
"""

import importlib

__version__ = "0.2.0"

_SUBPACKAGES = (
    "bench",
    "compare",
    "data",
    "distributed",
    "evaluate",
    "model",
    "nn",
    "ops",
    "train",
)
__all__ = ["__version__", *_SUBPACKAGES]


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
