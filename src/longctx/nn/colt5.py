"""CoLT5 conditional computation (Ainslie et al., "CoLT5: Faster Long-Range Transformers
with Conditional Computation", arXiv 2303.09752); SPEC section 3.

Every token takes a cheap *light* branch; a learned :class:`Router` picks the tokens that
also take an expensive *heavy* branch, whose output is scaled by the router's weight (the
weight is what carries gradient to the router: selection itself is not differentiable).

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
  (``routed_fraction``) and logged per layer during training.

:class:`ConditionalFeedForward`: y = FFN_light(x) + w * FFN_heavy(x) on routed tokens
(paper sizes: light hidden = hidden / 2, heavy hidden = 4 * hidden).

:class:`ConditionalAttention`: y = A_light(x) + w_q * A_heavy(x, w_kv * x). Light: local
attention (window radius 127: a causal query sees itself and the 127 keys before it) with
a quarter of the heads. Heavy: the other heads, full attention among the routed queries
over the routed keys/values (paper: N/16 queries, N/8 keys/values), keys and values
computed from the score-scaled inputs; in causal mode a routed query sees the routed keys
at positions <= its own. Three independent routers per layer (feed-forward, queries,
keys/values). An optional padding mask keeps padding out of routing and out of every
attention's keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops.masked import query_rows_per_tile, tiled_masked_attention
from .feedforward import SwiGLU
from .rotary import apply_rotary

DEFAULT_EPSILON = 1.0
DEFAULT_ITERATIONS = 50


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


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
        cd = _compute_dtype(scores)
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

    @property
    def counts(self) -> Tensor:
        return self.valid.sum(dim=-1)


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
            cd = _compute_dtype(x)
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


def _gather_rows(x: Tensor, indices: Tensor) -> Tensor:
    """x (B, N, C), indices (B, M) -> (B, M, C)."""
    return x.gather(1, indices.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class ConditionalFeedForward(nn.Module):
    """y = light(x) + w * heavy(x) on routed tokens (SwiGLU branches; module docstring)."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        light_hidden: int | None = None,
        heavy_hidden: int | None = None,
        capacity: float | int = 1 / 16,
        causal: bool = False,
        epsilon: float = DEFAULT_EPSILON,
        iterations: int = DEFAULT_ITERATIONS,
    ):
        super().__init__()
        self.light_hidden = light_hidden or max(1, hidden // 2)
        self.heavy_hidden = heavy_hidden or 4 * hidden
        self.light = SwiGLU(dim, self.light_hidden)
        self.heavy = SwiGLU(dim, self.heavy_hidden)
        self.router = Router(dim, capacity, causal=causal, epsilon=epsilon, iterations=iterations)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        routing = self.router(x, mask)
        return self.light(x) + apply_routed(x, routing, self.heavy)


def conditional_ffn_flops(dim: int, light_hidden: int, heavy_hidden: int, fraction: float) -> float:
    """Forward FLOPs per token (SwiGLU: 3 matrices; heavy on a fraction of the tokens)."""
    return 6 * dim * (light_hidden + fraction * heavy_hidden)


class ConditionalAttentionCache:
    """Decoding state of one causal :class:`ConditionalAttention` layer: the light heads'
    last ``window - 1`` keys/values (bounded), and the routed keys/values with their
    positions (slots: a chunk adds as many as its busiest row routed)."""

    def __init__(self, attn: ConditionalAttention, batch: int, capacity: int, dtype, device):
        if not attn.causal:
            raise ValueError("a decoding cache needs causal ConditionalAttention")
        D = attn.head_dim
        self.window = attn.window
        self.light_k = torch.zeros(batch, attn.light_heads, 0, D, dtype=dtype, device=device)
        self.light_v = torch.zeros_like(self.light_k)
        shape = (batch, attn.heavy_heads, capacity, D)
        self.heavy_k = torch.zeros(shape, dtype=dtype, device=device)
        self.heavy_v = torch.zeros(shape, dtype=dtype, device=device)
        self.heavy_pos = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        self.heavy_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.slots = 0
        self.length = 0

    @property
    def nbytes(self) -> int:
        tensors = (self.light_k, self.light_v, self.heavy_k, self.heavy_v)
        return sum(t.nbytes for t in tensors) + self.heavy_pos.nbytes + self.heavy_valid.nbytes

    def light(self, q: Tensor, k: Tensor, v: Tensor, start: int) -> Tensor:
        if start != self.length:
            raise ValueError(f"cache holds {self.length} positions; got a chunk at {start}")
        keys = torch.cat([self.light_k, k], dim=2)
        vals = torch.cat([self.light_v, v], dim=2)
        k_start = start - self.light_k.shape[2]
        out = ops.sliding.sliding_window_attention_at(q, keys, vals, self.window, start, k_start)
        first = max(0, keys.shape[2] - (self.window - 1))  # what later queries can see
        self.light_k = keys[:, :, first:].clone()
        self.light_v = vals[:, :, first:].clone()
        self.length = start + q.shape[2]
        return out

    def heavy(self, k: Tensor, v: Tensor, pos: Tensor, valid: Tensor):
        """Store a chunk's routed keys/values; return all stored (k, v, pos, valid)."""
        m = k.shape[2]
        end = self.slots + m
        if end > self.heavy_k.shape[2]:
            raise ValueError(
                f"the cache was made for {self.heavy_k.shape[2]} positions; it is full "
                "(raise the capacity)"
            )
        self.heavy_k[:, :, self.slots : end] = k
        self.heavy_v[:, :, self.slots : end] = v
        self.heavy_pos[:, self.slots : end] = pos
        self.heavy_valid[:, self.slots : end] = valid
        self.slots = end
        return (
            self.heavy_k[:, :, :end],
            self.heavy_v[:, :, :end],
            self.heavy_pos[:, :end],
            self.heavy_valid[:, :end],
        )


def _routed_attention(q, k, v, q_pos, k_pos, q_valid, k_valid, causal: bool) -> Tensor:
    """Attention of routed queries (B, H, Mq, D) over routed keys (B, H, Mk, D): a query
    sees the valid keys (at positions <= its own when causal); invalid query slots and
    queries that see nothing give 0."""
    B, H, Mq, _ = q.shape
    Mk = k.shape[2]
    if not causal and bool(q_valid.all()) and bool(k_valid.all()):
        return ops.attention(q, k, v)

    def mask_fn(q0: int, q1: int, k0: int, k1: int) -> Tensor:
        m = q_valid[:, q0:q1, None] & k_valid[:, None, k0:k1]
        if causal:
            m = m & (k_pos[:, None, k0:k1] <= q_pos[:, q0:q1, None])
        return m.unsqueeze(1)  # (B, 1, rows, keys)

    step = query_rows_per_tile(B, H, Mk)
    tiles = []
    for a in range(0, Mq, step):
        b = min(Mq, a + step)
        k1 = Mk
        if causal:  # trim the keys no query of the tile can see
            qmax = q_pos[:, a:b].masked_fill(~q_valid[:, a:b], -1).amax(dim=-1)  # (B,)
            seen = (k_valid & (k_pos <= qmax.unsqueeze(-1))).any(dim=0)  # (Mk,)
            hits = seen.nonzero()
            k1 = int(hits[-1]) + 1 if len(hits) else 0
        if k1 > 0:
            tiles.append((a, b, 0, k1))
    return tiled_masked_attention(q, k, v, tiles, mask_fn, q.shape[-1] ** -0.5)[0]


def _local_attention(q, k, v, window: int, causal: bool, key_valid: Tensor | None) -> Tensor:
    """Sliding-window attention; with ``key_valid`` (B, N), padding keys are hidden."""
    if key_valid is None or bool(key_valid.all()):
        return ops.sliding_window_attention(q, k, v, window, causal=causal)
    B, H, N, _ = q.shape
    step = max(1, min(window, N))

    def mask_fn(q0: int, q1: int, k0: int, k1: int) -> Tensor:
        i = torch.arange(q0, q1, device=q.device).unsqueeze(-1)
        j = torch.arange(k0, k1, device=q.device)
        band = (i - j).abs() < window
        if causal:
            band = band & (j <= i)
        return (band & key_valid[:, None, k0:k1]).unsqueeze(1)  # (B, 1, rows, keys)

    tiles = []
    for a in range(0, N, step):
        b = min(N, a + step)
        tiles.append((a, b, max(0, a - window + 1), b if causal else min(N, b + window - 1)))
    return tiled_masked_attention(q, k, v, tiles, mask_fn, q.shape[-1] ** -0.5)[0]


class ConditionalAttention(nn.Module):
    """CoLT5 attention (module docstring): light local heads + routed heavy heads."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        *,
        light_heads: int | None = None,
        window: int = 128,
        q_capacity: float | int = 1 / 16,
        kv_capacity: float | int = 1 / 8,
        causal: bool = False,
        rope_base: float = 10000.0,
        epsilon: float = DEFAULT_EPSILON,
        iterations: int = DEFAULT_ITERATIONS,
    ):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not a multiple of n_heads {n_heads}")
        light_heads = light_heads or max(1, n_heads // 4)
        if not 1 <= light_heads < n_heads:
            raise ValueError(
                f"light_heads must be in [1, n_heads - 1] = [1, {n_heads - 1}] so that both "
                f"branches have heads, got {light_heads} (n_heads = {n_heads})"
            )
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.head_dim = D = dim // n_heads
        self.light_heads = light_heads
        self.heavy_heads = n_heads - light_heads
        self.window = window
        self.causal = causal
        self.rope_base = rope_base
        self.light_qkv = nn.Linear(dim, 3 * light_heads * D, bias=False)
        self.light_proj = nn.Linear(light_heads * D, dim, bias=False)
        self.heavy_q = nn.Linear(dim, self.heavy_heads * D, bias=False)
        self.heavy_kv = nn.Linear(dim, 2 * self.heavy_heads * D, bias=False)
        self.heavy_proj = nn.Linear(self.heavy_heads * D, dim, bias=False)
        kw = dict(causal=causal, epsilon=epsilon, iterations=iterations)
        self.q_router = Router(dim, q_capacity, **kw)
        self.kv_router = Router(dim, kv_capacity, **kw)

    def forward(
        self,
        x: Tensor,
        positions: Tensor | None = None,
        cache: ConditionalAttentionCache | None = None,
        start: int = 0,
        mask: Tensor | None = None,
    ) -> Tensor:
        """x (B, N, C) at positions start..start+N-1 (or ``positions`` (N,)); ``cache`` for
        incremental decoding (causal only); ``mask`` (B, N) bool, False = padding."""
        B, N, C = x.shape
        if positions is None:
            positions = torch.arange(start, start + N, device=x.device)
        if cache is not None and mask is not None:
            raise ValueError("a padding mask cannot be combined with a decoding cache")
        return self._light(x, positions, cache, start, mask) + self._heavy(
            x, positions, cache, mask
        )

    def _light(self, x, positions, cache, start, mask) -> Tensor:
        B, N, _ = x.shape
        qkv = self.light_qkv(x).view(B, N, 3, self.light_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, Hl, N, D)
        q = apply_rotary(q, positions, self.rope_base)
        k = apply_rotary(k, positions, self.rope_base)
        if cache is not None:
            y = cache.light(q, k, v, start)
        else:
            y = _local_attention(q, k, v, self.window, self.causal, mask)
        return self.light_proj(y.transpose(1, 2).reshape(B, N, -1))

    def _heavy(self, x, positions, cache, mask) -> Tensor:
        B, N, C = x.shape
        H, D = self.heavy_heads, self.head_dim
        rq = self.q_router(x, mask)
        rkv = self.kv_router(x, mask)
        q_pos, k_pos = positions[rq.indices], positions[rkv.indices]  # (B, Mq), (B, Mk)
        xq = _gather_rows(x, rq.indices)  # (B, Mq, C)
        xkv = _gather_rows(x, rkv.indices) * rkv.weights.unsqueeze(-1).to(x.dtype)
        Mq, Mk = xq.shape[1], xkv.shape[1]
        q = self.heavy_q(xq).view(B, Mq, H, D).transpose(1, 2)  # (B, H, Mq, D)
        kv = self.heavy_kv(xkv).view(B, Mk, 2, H, D)
        k, v = (t.transpose(1, 2) for t in kv.unbind(2))  # (B, H, Mk, D)
        q = apply_rotary(q, q_pos, self.rope_base)
        k = apply_rotary(k, k_pos, self.rope_base)
        k_valid = rkv.valid
        if cache is not None:
            k, v, k_pos, k_valid = cache.heavy(k, v, k_pos, k_valid)
        if Mq == 0:
            return x.new_zeros(B, N, C)
        y = _routed_attention(q, k, v, q_pos, k_pos, rq.valid, k_valid, self.causal)
        y = self.heavy_proj(y.transpose(1, 2).reshape(B, Mq, H * D))
        y = y * rq.weights.unsqueeze(-1).to(y.dtype)  # 0 in padding slots
        return y.new_zeros(B, N, C).scatter_add_(1, rq.indices.unsqueeze(-1).expand(-1, -1, C), y)

    @property
    def routers(self) -> dict[str, Router]:
        return {"q": self.q_router, "kv": self.kv_router}


def conditional_attention_flops(
    n: int,
    dim: int,
    n_heads: int,
    light_heads: int,
    window: int,
    q_fraction: float,
    kv_fraction: float,
    causal: bool,
) -> float:
    """Expected forward FLOPs of a whole sequence of n tokens: projections (2 per
    multiply-add) and useful attention FLOPs (4 * D per visible pair), with the routed
    counts at their targets (causal: heavy pairs halved)."""
    D = dim // n_heads
    heavy = n_heads - light_heads
    mq, mk = q_fraction * n, kv_fraction * n
    proj = 2 * dim * D * (4 * light_heads * n + heavy * (2 * mq + 2 * mk))
    light = ops.sliding_window_flops(n, light_heads, D, window, causal=causal)
    pairs = mq * mk / 2 if causal else mq * mk
    return proj + light + 4 * D * heavy * pairs
