"""Causal attention with a constant-size state: linear attention and retention.

**Linear attention** (Katharopoulos et al., "Transformers are RNNs", arXiv 2006.16236):
with the feature map phi(x) = elu(x) + 1,

    out_t = phi(q_t) S_t / (phi(q_t) . z_t),  S_t = sum_{s<=t} phi(k_s) v_s^T,
    z_t = sum_{s<=t} phi(k_s).

**Retention** (RetNet, Sun et al., arXiv 2307.08621), with a decay gamma_h per head:

    out_t = q_t S_t,  S_t = gamma S_{t-1} + (k_t / sqrt(D)) v_t^T,

i.e. out_t = sum_{s<=t} gamma^(t-s) (q_t . k_s / sqrt(D)) v_s.

Both are computed *chunkwise*: within a chunk of c positions the quadratic (parallel)
form, across chunks the recurrent state (S, and z for linear attention), carried in
from an optional ``state`` and returned with ``return_state``. c = 1 is the recurrent
form (one token at a time: decoding), c >= N the parallel form; all give the same result
(``ops.reference`` has the parallel and recurrent forms written out). Cost
O(N c D + N D Dv); state (B, H, D, Dv).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._kernels import compute_dtype
from ._validate import check_qkv, positive_int

# (S (B, H, D, Dv), z (B, H, D) or None) of the positions before the input
RecurrentState = tuple[Tensor, "Tensor | None"]


def feature_map(x: Tensor) -> Tensor:
    """phi(x) = elu(x) + 1 > 0 (Katharopoulos et al.)."""
    return F.elu(x) + 1


def retention_decays(num_heads: int) -> Tensor:
    """RetNet's per-head decays gamma_h = 1 - 2^(-5 - h), h = 0..H-1 (float64)."""
    return 1 - 2.0 ** (-5 - torch.arange(num_heads, dtype=torch.float64))


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    chunk: int = 64,
    state: RecurrentState | None = None,
    return_state: bool = False,
    eps: float = 1e-6,
):
    """Causal linear attention of q, k (B, H, N, D), v (B, H, N, Dv) (module docstring),
    continuing ``state`` (S, z) of earlier positions; with ``return_state``, also the
    state after the last position."""
    check_qkv(q, k, v, same_length=True)
    out, den, new = _chunkwise(feature_map(q), feature_map(k), v, None, chunk, state, True)
    out = out / (den.unsqueeze(-1) + eps)
    out = out.to(v.dtype)
    return (out, new) if return_state else out


def retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decays: Tensor,
    *,
    chunk: int = 64,
    state: RecurrentState | None = None,
    return_state: bool = False,
):
    """Causal retention of q, k (B, H, N, D), v (B, H, N, Dv) with per-head ``decays``
    (H,) in (0, 1] (module docstring), continuing ``state`` (S, None); with
    ``return_state``, also the state after the last position."""
    check_qkv(q, k, v, same_length=True)
    if decays.shape != (q.shape[1],):
        raise ValueError(f"decays must have shape (heads,) = ({q.shape[1]},), got {decays.shape}")
    k = k * q.shape[-1] ** -0.5
    out, _, new = _chunkwise(q, k, v, decays, chunk, state, False)
    out = out.to(v.dtype)
    return (out, new) if return_state else out


def _chunkwise(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decays: Tensor | None,
    chunk: int,
    state: RecurrentState | None,
    with_z: bool,
) -> tuple[Tensor, Tensor | None, RecurrentState]:
    """(sum of decayed q.k v, sum of q.k (with_z), final state), chunk by chunk."""
    chunk = positive_int(chunk, "chunk")
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    cd = compute_dtype(q.dtype)
    q, k, v = q.to(cd), k.to(cd), v.to(cd)
    if state is None:
        S = q.new_zeros(B, H, D, Dv)
        z = q.new_zeros(B, H, D) if with_z else None
    else:
        S, z = state[0].to(cd), (state[1].to(cd) if with_z else None)
    gamma = None if decays is None else decays.to(device=q.device, dtype=cd).view(1, H, 1, 1)
    outs, dens = [], []
    for a in range(0, N, chunk):
        b = min(N, a + chunk)
        c = b - a
        qc, kc, vc = q[:, :, a:b], k[:, :, a:b], v[:, :, a:b]  # (B, H, c, .)
        i = torch.arange(c, device=q.device, dtype=cd)
        lower = (i[:, None] >= i[None, :]).to(cd)  # (c, c): j <= i
        if gamma is None:
            weights, into, carry, keep = lower, 1.0, 1.0, 1.0
        else:
            gap = (i[:, None] - i[None, :]).clamp_min(0)
            weights = gamma**gap * lower  # (1, H, c, c): gamma^(i - j), j <= i
            into = gamma ** (i + 1).view(1, 1, c, 1)  # past state reaches query i
            carry = gamma ** (c - 1 - i).view(1, 1, c, 1)  # key j reaches the chunk end
            keep = gamma**c  # the past state at the chunk end
        scores = torch.matmul(qc, kc.transpose(-1, -2)) * weights  # (B, H, c, c)
        outs.append(torch.matmul(scores, vc) + into * torch.matmul(qc, S))
        if with_z:
            dens.append(scores.sum(-1) + torch.matmul(qc, z.unsqueeze(-1)).squeeze(-1))
            z = z + kc.sum(2)
        S = keep * S + torch.matmul((kc * carry).transpose(-1, -2), vc)  # (B, H, D, Dv)
    out = torch.cat(outs, dim=2) if outs else v.new_zeros(B, H, 0, Dv)
    den = (torch.cat(dens, dim=2) if dens else q.new_zeros(B, H, 0)) if with_z else None
    return out, den, (S, z)


__all__ = [
    "RecurrentState",
    "feature_map",
    "linear_attention",
    "retention",
    "retention_decays",
]
