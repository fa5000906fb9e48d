"""Pure attention functions on (B, H, N, D) tensors: no parameters, no torch.distributed."""

from . import reference
from .attention import attention, chunked_attention, merge
from .dilated import dilated_attention, dilated_attention_flops
from .masked import masked_attention
from .sliding import sliding_window_attention, sliding_window_flops

__all__ = [
    "attention",
    "chunked_attention",
    "dilated_attention",
    "dilated_attention_flops",
    "masked_attention",
    "merge",
    "reference",
    "sliding_window_attention",
    "sliding_window_flops",
]
