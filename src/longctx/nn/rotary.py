"""Rotary position embedding (Su et al., RoFormer, arXiv 2104.09864), rotate-half form."""

import torch
from torch import Tensor

from ..ops.lowlevel import compute_dtype


def rotary_angles(
    positions: Tensor, head_dim: int, base: float, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (N, head_dim // 2) for integer positions (N,), in ``dtype``
    (angles are formed in float64 so long positions keep their precision)."""
    inv_freq = base ** (
        -torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim
    )
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq  # (N, D/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotate (B, H, N, D) queries or keys by their (global) positions: (N,), or (B, N)
    when the rows of the batch sit at different positions (routed tokens)."""
    d = x.shape[-1]
    cd = compute_dtype(x.dtype)
    cos, sin = rotary_angles(positions, d, base, cd)  # (N, D/2) or (B, N, D/2)
    if positions.dim() == 2:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, N, D/2)
    xf = x.to(cd)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2 :]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
