"""Pure attention functions on (B, H, N, D) tensors: no parameters, no torch.distributed.

The building blocks these are made of (tile kernels, plans, the plan runner) are public in
:mod:`longctx.ops.lowlevel`."""

from . import reference
from .attention import attention, attention_flops, chunked_attention, merge
from .dilated import dilated_attention, dilated_attention_flops
from .linear import linear_attention, retention
from .masked import masked_attention
from .sliding import sliding_window_attention, sliding_window_flops
from .streaming import StreamingAttention

__all__ = [
    "StreamingAttention",
    "attention",
    "attention_flops",
    "chunked_attention",
    "dilated_attention",
    "dilated_attention_flops",
    "linear_attention",
    "masked_attention",
    "merge",
    "reference",
    "retention",
    "sliding_window_attention",
    "sliding_window_flops",
]
