"""Learned token routing (CoLT5, Ainslie et al. arXiv 2303.09752): a :class:`Router`
scores tokens and picks the ones a heavy branch processes; :func:`apply_routed` runs a
function on them and scatters the weighted result back.

Two routing modes:

- ``causal=False`` (the paper; encoders): the k tokens with the largest raw scores
  ``s_i = x_i . u`` are routed (k = ceil(capacity * N), or an absolute count), weighted by
  the paper's soft top-k normalisation of the scores (:func:`soft_topk`: CoDA's dual
  iteration, Lei et al. arXiv 2304.04947, epsilon 1.0 and 50 iterations by default,
  computed in float32 even under autocast). Unrouted tokens have weight 0.
- ``causal=True`` (decoders; the paper has none): top-k over the sequence lets a later
  token change whether an earlier one is routed, so it is not used. Instead token i is
  routed iff its score ``s_i = x_i . u + b`` is positive, with weight sigmoid(s_i): both
  depend on x_i alone. An auxiliary loss (as in Mixture-of-Depths, Raposo et al. arXiv
  2404.02258) teaches the gate to agree with top-k: binary cross-entropy of s_i against
  "i is among the capacity * N highest scores of its sequence", so the routed fraction
  tracks the capacity. The fraction actually routed is recorded per router
  (``routed_fraction``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.lowlevel import compute_dtype

# A shard cannot route as the whole sequence does: non-causal top-k, and the causal
# gate's auxiliary loss, rank the scores of the whole sequence; training without the
# auxiliary loss would let the routed fraction drift.
NO_SEQUENCE_PARALLEL = (
    "sequence parallelism does not support CoLT5 routing (model.ffn or model.attention "
    "kind 'colt5'): the routers' top-k and auxiliary loss rank the whole sequence's "
    "scores, which no shard holds; use a swiglu feed-forward and dense, dilated or "
    "sliding_window attention"
)
DEFAULT_EPSILON = 1.0
DEFAULT_ITERATIONS = 50


def soft_topk(
    scores: Tensor,
    k: int | Tensor,
    *,
    epsilon: float = DEFAULT_EPSILON,
    iterations: int = DEFAULT_ITERATIONS,
    valid: Tensor | None = None,
) -> Tensor:
    """Soft top-k weights lambda in [0, 1] of scores (B, N), summing (at convergence) to k
    per row: the solution of max <s, lambda> + epsilon * H(lambda) subject to
    sum(lambda) = k, 0 <= lambda <= 1, by CoDA's dual coordinate ascent (Lei et al.,
    arXiv 2304.04947, as used by CoLT5): from b = 0, repeat
    a = epsilon * (log k - logsumexp((s + b) / epsilon)); b = min(0, -(s + a)); then
    lambda = exp((s + a + b) / epsilon). Differentiable (the iterations are unrolled).

    ``k`` is an int or a (B,) tensor. ``valid`` (B, N) bool excludes positions (weight 0).
    With the paper's 50 iterations the result matches the constrained optimum to ~1e-6
    for scores of unit spread (tested); each iteration saturates only the few largest
    unsaturated scores, so scores spread over many multiples of epsilon need more.
    Rows with k = 0 get all zeros; rows with k >= their valid count get exactly 1 on every
    valid position. Computed in float32 (float64 inputs stay float64), autocast disabled.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape (batch, seq), got {tuple(scores.shape)}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    B, N = scores.shape
    with torch.autocast(scores.device.type, enabled=False):
        cd = compute_dtype(scores.dtype)
        s = scores.to(cd)
        if valid is None:
            valid = torch.ones(B, N, dtype=torch.bool, device=s.device)
        n_valid = valid.sum(dim=-1)  # (B,)
        kk = torch.as_tensor(k, device=s.device).expand(B).clamp(min=0)
        kk = torch.minimum(kk, n_valid)
        trivial = (kk == 0) | (kk >= n_valid)  # (B,) the answer is 0 or exactly 1
        if N == 0:
            return s
        # non-trivial rows: invalid positions at -inf; trivial rows computed on zeros
        s_it = torch.where(valid, s, torch.full_like(s, float("-inf")))
        s_it = torch.where(trivial.unsqueeze(-1), torch.zeros_like(s), s_it)
        log_k = torch.where(trivial, torch.zeros_like(kk), kk).to(cd).clamp_min(1).log()
        log_k = log_k.unsqueeze(-1)  # (B, 1)
        b = torch.zeros_like(s)
        a = torch.zeros_like(log_k)
        for _ in range(iterations):
            a = epsilon * (log_k - torch.logsumexp((s_it + b) / epsilon, dim=-1, keepdim=True))
            b = torch.clamp(-(s_it + a), max=0.0)
        lam = torch.exp((s_it + a + b) / epsilon)
        exact = (valid & (kk > 0).unsqueeze(-1)).to(cd)  # the trivial rows' answer
        lam = torch.where(trivial.unsqueeze(-1), exact, lam)
        return torch.where(valid, lam, torch.zeros_like(lam))


@dataclass
class Routing:
    """The tokens a router picked, per batch row, in increasing position order.

    ``indices`` (B, M) positions (padding slots hold 0), ``weights`` (B, M) the heavy
    branch's output scale (0 in padding slots), ``valid`` (B, M) which slots hold a routed
    token, ``scores`` (B, N) the raw router scores (float32)."""

    indices: Tensor
    weights: Tensor
    valid: Tensor
    scores: Tensor


def _check_capacity(capacity: float | int, causal: bool) -> float | int:
    if isinstance(capacity, bool) or not isinstance(capacity, (int, float)):
        raise TypeError(f"capacity must be a fraction (float) or a count (int), got {capacity!r}")
    if isinstance(capacity, float):
        if not 0.0 <= capacity <= 1.0 or math.isnan(capacity):
            raise ValueError(f"a capacity fraction must be in [0, 1], got {capacity}")
    elif capacity < 0:
        raise ValueError(f"a capacity count must be >= 0, got {capacity}")
    elif causal:
        raise ValueError(
            f"causal routing needs a capacity fraction (a float such as 0.0625), got the "
            f"count {capacity}: a per-token gate cannot promise a count on every prefix"
        )
    return capacity


def _compact(routed: Tensor) -> tuple[Tensor, Tensor]:
    """routed (B, N) bool -> (indices (B, M), valid (B, M)) with M = the largest count;
    each row's routed positions first, in increasing order."""
    B, N = routed.shape
    counts = routed.sum(dim=-1)
    M = int(counts.max()) if B and N else 0
    order = torch.sort((~routed).to(torch.uint8), dim=-1, stable=True).indices[:, :M]
    valid = torch.arange(M, device=routed.device).unsqueeze(0) < counts.unsqueeze(-1)
    return torch.where(valid, order, torch.zeros_like(order)), valid


def _topk_membership(scores: Tensor, k: Tensor, valid: Tensor) -> Tensor:
    """(B, N) bool: position is among the k[b] highest valid scores of its row."""
    kmax = int(k.max()) if k.numel() else 0
    member = torch.zeros_like(valid)
    if kmax == 0:
        return member
    top = scores.masked_fill(~valid, float("-inf")).topk(kmax, dim=-1).indices  # (B, kmax)
    keep = torch.arange(kmax, device=scores.device).unsqueeze(0) < k.unsqueeze(-1)
    return member.scatter(-1, top, keep) & valid


class Router(nn.Module):
    """Routes tokens to a heavy branch (module docstring): score s_i = x_i . u (+ b when
    causal); ``capacity`` a fraction of the tokens (float) or a count (int, non-causal)."""

    def __init__(
        self,
        dim: int,
        capacity: float | int = 1 / 16,
        *,
        causal: bool = False,
        epsilon: float = DEFAULT_EPSILON,
        iterations: int = DEFAULT_ITERATIONS,
    ):
        super().__init__()
        self.capacity = _check_capacity(capacity, causal)
        if epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
        self.causal = causal
        self.epsilon = epsilon
        self.iterations = iterations
        # scores of RMS-normalised inputs start with unit spread
        self.weight = nn.Parameter(torch.randn(dim) * dim**-0.5)
        if causal:
            # start near the capacity: P(N(0, 1) > -bias) = capacity
            c = min(max(float(capacity), 1e-4), 1 - 1e-4)
            self.bias = nn.Parameter(torch.tensor(-float(torch.special.ndtri(torch.tensor(1 - c)))))
        else:
            self.register_parameter("bias", None)
        self.aux_loss: Tensor | None = None  # causal, set by forward when grad is enabled
        self.routed_fraction: Tensor | None = None  # of the valid tokens, last forward

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}, causal={self.causal}"

    def sequence_parallel(self, sp) -> None:
        """Refused (see :data:`NO_SEQUENCE_PARALLEL`)."""
        raise ValueError(NO_SEQUENCE_PARALLEL)

    def num_routed(self, n: int | Tensor):
        """Tokens routed out of n (non-causal): ceil(capacity * n), or min(count, n)."""
        if isinstance(self.capacity, float):
            if isinstance(n, Tensor):
                return torch.ceil(n.to(torch.float64) * self.capacity).long()
            return math.ceil(n * self.capacity)
        return n.clamp(max=self.capacity) if isinstance(n, Tensor) else min(n, self.capacity)

    def scores(self, x: Tensor) -> Tensor:
        """Raw scores (B, N) in float32 (float64 for float64 inputs), autocast disabled."""
        with torch.autocast(x.device.type, enabled=False):
            cd = compute_dtype(x.dtype)
            s = torch.matmul(x.to(cd), self.weight.to(cd))
            return s if self.bias is None else s + self.bias.to(cd)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Routing:
        """x (B, N, C); ``mask`` (B, N) bool, False = padding (never routed)."""
        B, N, _ = x.shape
        valid_tok = _check_padding_mask(mask, B, N, x.device)
        s = self.scores(x)
        n_valid = valid_tok.sum(dim=-1)
        if self.causal:
            routed = (s > 0) & valid_tok
            indices, valid = _compact(routed)
            gate = torch.sigmoid(s)
            weights = gate.gather(-1, indices) * valid
            if torch.is_grad_enabled():
                target = _topk_membership(s.detach(), self.num_routed(n_valid), valid_tok)
                bce = F.binary_cross_entropy_with_logits(s, target.to(s.dtype), reduction="none")
                self.aux_loss = (bce * valid_tok).sum() / valid_tok.sum().clamp_min(1)
            else:
                self.aux_loss = None
        else:
            k = min(self.num_routed(N), N)
            masked = s.detach().masked_fill(~valid_tok, float("-inf"))
            indices = masked.topk(k, dim=-1).indices.sort(dim=-1).values  # (B, k)
            valid = valid_tok.gather(-1, indices)
            lam = soft_topk(
                s,
                self.num_routed(n_valid),
                epsilon=self.epsilon,
                iterations=self.iterations,
                valid=valid_tok,
            )
            weights = lam.gather(-1, indices) * valid
        self.routed_fraction = (valid.sum() / n_valid.sum().clamp_min(1)).detach()
        return Routing(indices, weights, valid, s)


def _check_padding_mask(mask: Tensor | None, B: int, N: int, device) -> Tensor:
    if mask is None:
        return torch.ones(B, N, dtype=torch.bool, device=device)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError("mask must be a bool tensor (B, N), True = a real token")
    if tuple(mask.shape) != (B, N):
        raise ValueError(f"mask must have shape (batch, seq) = {(B, N)}, got {tuple(mask.shape)}")
    return mask.to(device)


def apply_routed(x: Tensor, routing: Routing, fn) -> Tensor:
    """(B, N, C') zeros except at routed tokens: weight * fn(x of the routed tokens)."""
    B, N, C = x.shape
    flat = (routing.indices + torch.arange(B, device=x.device).unsqueeze(-1) * N)[routing.valid]
    h = fn(x.reshape(B * N, C)[flat])  # (T, C')
    h = h * routing.weights[routing.valid].unsqueeze(-1).to(h.dtype)
    out = h.new_zeros(B * N, h.shape[-1]).index_add_(0, flat, h)
    return out.view(B, N, -1)


def gather_rows(x: Tensor, indices: Tensor) -> Tensor:
    """x (B, N, C), indices (B, M) -> (B, M, C)."""
    return x.gather(1, indices.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


__all__ = [
    "DEFAULT_EPSILON",
    "NO_SEQUENCE_PARALLEL",
    "DEFAULT_ITERATIONS",
    "Router",
    "Routing",
    "apply_routed",
    "gather_rows",
    "soft_topk",
]
