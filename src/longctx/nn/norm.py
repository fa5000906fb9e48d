"""RMS normalisation."""

import torch
from torch import Tensor, nn

from ..ops.lowlevel import compute_dtype


def rms_normalize(x: Tensor, eps: float) -> Tensor:
    """x / rms(x) over the last dimension, in the compute dtype (float32, float64 for
    float64 input); the caller casts back."""
    xf = x.to(compute_dtype(x.dtype))
    return xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (float64 for float64 input) (Zhang &
    Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        y = rms_normalize(x, self.eps)
        return (y * self.weight.to(y.dtype)).to(x.dtype)
