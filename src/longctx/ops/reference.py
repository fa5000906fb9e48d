"""Naive explicit-mask attention: the test oracle.

Every function here builds the full (Nq, Nk) score matrix and an explicit mask straight
from the definitions in docs/spec.md, with plain autograd (no custom Functions, no fused
kernels). It is O(N^2) in time and memory and meant for float64 checks on small inputs.
It shares no code with the fast ops beyond the head-offset rule of dilated attention,
which it re-derives itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def masked_attention(
    q: Tensor, k: Tensor, v: Tensor, multiplicity: Tensor, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """out = softmax(tau q k^T + log M) v and lse = logsumexp(tau q k^T + log M).

    ``multiplicity`` M is broadcastable to (B, H, Nq, Nk) with non-negative counts (a bool
    mask is M in {0, 1}). Rows with M = 0 everywhere give out = 0 and lse = -inf.
    """
    tau = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * tau
    m = multiplicity.to(scores.dtype)
    scores = scores + torch.log(m)  # log 0 = -inf
    empty = (m == 0).all(dim=-1, keepdim=True)  # rows that see no key
    # logsumexp of an all -inf row has a NaN gradient: compute it on zeros, then mask.
    lse = torch.logsumexp(torch.where(empty, torch.zeros_like(scores), scores), dim=-1)
    p = torch.exp(scores - lse.unsqueeze(-1))  # empty rows: exp(-inf - 0) = 0
    lse = torch.where(empty.squeeze(-1), torch.full_like(lse, float("-inf")), lse)
    out = torch.matmul(p, v)
    return out, lse


def causal_mask(nq: int, nk: int, q_offset: int | None = None, device=None) -> Tensor:
    """(Nq, Nk) bool: key j visible to query i iff j <= i + offset (bottom-right default)."""
    off = nk - nq if q_offset is None else q_offset
    i = torch.arange(nq, device=device).unsqueeze(-1)
    j = torch.arange(nk, device=device).unsqueeze(0)
    return j <= i + off


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    q_offset: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Naive (causal) attention: (out, lse)."""
    nq, nk = q.shape[2], k.shape[2]
    if causal:
        mask = causal_mask(nq, nk, q_offset, q.device)
    else:
        mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    return masked_attention(q, k, v, mask, scale)


def merge(parts: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The merge written literally: lse = log sum exp(lse_i); out = sum exp(lse_i - lse) o_i."""
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)
    out = torch.zeros_like(parts[0][0])
    for o, li in parts:
        w = torch.exp(li - lse)
        w = torch.where(torch.isneginf(li), torch.zeros_like(w), w)
        out = out + w.unsqueeze(-1) * o
    return out, lse


def dilated_multiplicity(
    n: int,
    num_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    causal: bool = False,
    offsets: str = "paper",
) -> Tensor:
    """M[h, i, j] = number of branches in which query i attends key j for head h
    (docs/spec.md, section 2)."""
    m = torch.zeros(num_heads, n, n, dtype=torch.int64)
    i = torch.arange(n).unsqueeze(-1)
    j = torch.arange(n).unsqueeze(0)
    for w, r in zip(segment_lengths, dilation_rates):
        wp = min(w, n)
        seg_i, seg_j = i // wp, j // wp
        p_i, p_j = i - seg_i * wp, j - seg_j * wp
        for h in range(num_heads):
            if offsets == "paper":
                o = h % r
            elif offsets == "torchscale":
                o = h // math.ceil(num_heads / r)
            else:
                raise ValueError(offsets)
            active = (seg_i == seg_j) & (p_i % r == o) & (p_j % r == o)
            if causal:
                active &= j <= i
            m[h] += active.long()
    return m


def dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    causal: bool = False,
    scale: float | None = None,
    offsets: str = "paper",
) -> tuple[Tensor, Tensor]:
    """Naive dilated attention through its multiplicity matrix: (out, lse)."""
    m = dilated_multiplicity(
        q.shape[2], q.shape[1], segment_lengths, dilation_rates, causal=causal, offsets=offsets
    )
    return masked_attention(q, k, v, m.to(q.device), scale)


def sliding_window_mask(n: int, window: int, *, causal: bool = True) -> Tensor:
    """(N, N) bool: the keys each query sees in a window of ``window``."""
    i = torch.arange(n).unsqueeze(-1)
    j = torch.arange(n).unsqueeze(0)
    mask = (i - j).abs() < window
    if causal:
        mask &= j <= i
    return mask


def sliding_window_attention(
    q: Tensor, k: Tensor, v: Tensor, window: int, *, causal: bool = True, scale=None
) -> tuple[Tensor, Tensor]:
    """Naive sliding-window attention: (out, lse)."""
    mask = sliding_window_mask(q.shape[2], window, causal=causal).to(q.device)
    return masked_attention(q, k, v, mask, scale)


def linear_attention(q: Tensor, k: Tensor, v: Tensor, eps: float = 1e-6) -> Tensor:
    """Causal linear attention, parallel form: (phi(Q) phi(K)^T, lower triangle) V, each
    row divided by its sum (+ eps); phi(x) = elu(x) + 1."""
    fq = torch.nn.functional.elu(q) + 1
    fk = torch.nn.functional.elu(k) + 1
    a = torch.matmul(fq, fk.transpose(-1, -2)).tril()  # (B, H, N, N)
    return torch.matmul(a, v) / (a.sum(-1, keepdim=True) + eps)


def linear_attention_recurrent(q: Tensor, k: Tensor, v: Tensor, eps: float = 1e-6) -> Tensor:
    """The same, one token at a time: S += phi(k) v^T, z += phi(k), out = phi(q) S / phi(q).z."""
    fq = torch.nn.functional.elu(q) + 1
    fk = torch.nn.functional.elu(k) + 1
    B, H, N, D = q.shape
    S = q.new_zeros(B, H, D, v.shape[-1])
    z = q.new_zeros(B, H, D)
    outs = []
    for t in range(N):
        S = S + fk[:, :, t, :, None] * v[:, :, t, None, :]
        z = z + fk[:, :, t]
        num = torch.einsum("bhd,bhde->bhe", fq[:, :, t], S)
        outs.append(num / ((fq[:, :, t] * z).sum(-1, keepdim=True) + eps))
    return torch.stack(outs, dim=2)


def retention(q: Tensor, k: Tensor, v: Tensor, decays: Tensor) -> Tensor:
    """Causal retention, parallel form: (Q K^T / sqrt(D) * G) V with
    G[h, n, m] = gamma_h^(n - m) for m <= n, else 0."""
    n = q.shape[2]
    i = torch.arange(n)
    gap = (i[:, None] - i[None, :]).to(q.dtype)
    g = decays.to(q.dtype).view(-1, 1, 1) ** gap.clamp_min(0) * (gap >= 0)  # (H, N, N)
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.matmul(scores * g, v)


def retention_recurrent(q: Tensor, k: Tensor, v: Tensor, decays: Tensor) -> Tensor:
    """The same, one token at a time: S = gamma S + k v^T / sqrt(D), out = q S."""
    B, H, N, D = q.shape
    gamma = decays.to(q.dtype).view(1, H, 1, 1)
    S = q.new_zeros(B, H, D, v.shape[-1])
    outs = []
    for t in range(N):
        S = gamma * S + (k[:, :, t, :, None] * D**-0.5) * v[:, :, t, None, :]
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], S))
    return torch.stack(outs, dim=2)
