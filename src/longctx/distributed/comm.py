"""The sequence-parallel group, its byte counters, and collectives with exact autograd.

Bytes are counted per rank as what the rank *sends*, at the algorithm level: an
all-to-all over P ranks sends (P - 1) / P of the tensor; an all-gather or reduce-scatter
over G ranks sends (G - 1) times the rank's chunk (what a bandwidth-optimal ring
implementation moves); a point-to-point send its tensor. The formulas the benchmark
checks against are in :mod:`longctx.distributed.strategies`.
"""

from __future__ import annotations

import datetime
import os
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_TIMEOUT_S = 120.0
# torch >= 2.13 renamed the tensor-in, tensor-out collectives
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def backend_for(device: torch.device | str) -> str:
    """gloo on CPU, NCCL on CUDA."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_from_env(device: torch.device | str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S):
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT),
    with a timeout so that a rank that dies or never arrives ends the job with an error
    on every rank instead of a hang. Returns (rank, world size)."""
    missing = [
        k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
    ]
    if missing:
        raise ValueError(
            f"the environment lacks {', '.join(missing)}: launch with torchrun, e.g. "
            "`torchrun --nproc-per-node 2 -m longctx train --sequence-parallel 2`"
        )
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


@dataclass
class SPGroup:
    """One sequence-parallel group: ``ranks`` (global ranks, in sequence order), this
    process's index ``rank`` in it, and its byte counters (by collective name)."""

    group: object
    ranks: list[int]
    rank: int
    bytes_sent: Counter = field(default_factory=Counter)
    _subgroups: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Ranks in the group."""
        return len(self.ranks)

    @classmethod
    def world(cls) -> SPGroup:
        """All ranks of the default group as one sequence-parallel group."""
        n = dist.get_world_size()
        return cls(dist.group.WORLD, list(range(n)), dist.get_rank())

    def count(self, name: str, nbytes: float) -> None:
        """Record ``nbytes`` sent by the collective ``name``."""
        self.bytes_sent[name] += int(round(nbytes))

    def reset_counts(self) -> None:
        """Forget the byte counts."""
        self.bytes_sent.clear()

    def segment_group(self, m: int):
        """(process group, first, stop) of the run of ``m`` consecutive SP ranks holding
        this rank (the last run may be shorter): the ranks of one LongNet segment.

        ``torch.distributed.new_group`` must be called by every process of the job, for
        every group, in the same order. So each process creates, in one fixed order, the
        groups of every run of every SP group (data-parallel replicas run the same code
        on the same shapes), and keeps its own."""
        if m not in self._subgroups:
            world, P = dist.get_world_size(), self.size
            mine = None
            for base in range(0, world, P):  # every replica, the same order everywhere
                for first in range(0, P, m):
                    stop = min(P, first + m)
                    g = dist.new_group(list(range(base + first, base + stop)))
                    if base == self.ranks[0] and first <= self.rank < stop:
                        mine = (g, first, stop)
            self._subgroups[m] = mine
        return self._subgroups[m]


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


# ------------------------------------------------------------------ all-to-all


def _seq_to_heads(x: Tensor, sp: SPGroup, name: str) -> Tensor:
    """(B, H, n, D) sequence shard -> (B, H / P, P * n, D) head shard (all positions)."""
    B, H, n, D = x.shape
    P = sp.size
    send = x.reshape(B, P, H // P, n, D).transpose(0, 1).contiguous()  # (P, B, H/P, n, D)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=sp.group)
    sp.count(name, _nbytes(send) * (P - 1) / P)
    return recv.permute(1, 2, 0, 3, 4).reshape(B, H // P, P * n, D)  # chunks in rank order


def _heads_to_seq(x: Tensor, sp: SPGroup, name: str) -> Tensor:
    """Inverse of :func:`_seq_to_heads`: (B, H / P, P * n, D) -> (B, H, n, D)."""
    B, Hp, N, D = x.shape
    P = sp.size
    n = N // P
    send = x.reshape(B, Hp, P, n, D).permute(2, 0, 1, 3, 4).contiguous()  # (P, B, H/P, n, D)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=sp.group)
    sp.count(name, _nbytes(send) * (P - 1) / P)
    return recv.transpose(0, 1).reshape(B, P * Hp, n, D)  # head groups in rank order


class SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sp):
        ctx.sp = sp
        return _seq_to_heads(x, sp, "all_to_all")

    @staticmethod
    def backward(ctx, g):
        return _heads_to_seq(g.contiguous(), ctx.sp, "all_to_all"), None


class HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sp):
        ctx.sp = sp
        return _heads_to_seq(x, sp, "all_to_all")

    @staticmethod
    def backward(ctx, g):
        return _seq_to_heads(g.contiguous(), ctx.sp, "all_to_all"), None


# ------------------------------------------------------------------ all-gather


class GroupAllGather(torch.autograd.Function):
    """x (...) on each of the G ranks of ``group`` -> (G, ...) in rank order; backward
    reduce-scatters (sums) the gradient back to each rank's slice."""

    @staticmethod
    def forward(ctx, x, group, size: int, sp: SPGroup):
        ctx.group, ctx.size, ctx.sp = group, size, sp
        x = x.contiguous()
        if size == 1:
            return x.unsqueeze(0)
        out = x.new_empty(size * x.shape[0], *x.shape[1:])  # chunks along dim 0
        _all_gather(out, x, group=group)
        sp.count("all_gather", _nbytes(x) * (size - 1))
        return out.view(size, *x.shape)

    @staticmethod
    def backward(ctx, g):
        if ctx.size == 1:
            return g[0], None, None, None
        out = g.new_empty(g.shape[1:])
        _reduce_scatter(out, g.reshape(-1, *g.shape[2:]).contiguous(), group=ctx.group)
        ctx.sp.count("reduce_scatter", _nbytes(out) * (ctx.size - 1))
        return out, None, None, None


# ------------------------------------------------------------------ ring exchange


def ring_exchange(send: Tensor, sp: SPGroup, name: str) -> Tensor:
    """Send ``send`` to the next rank of the ring and return what the previous one sent."""
    P = sp.size
    nxt, prv = sp.ranks[(sp.rank + 1) % P], sp.ranks[(sp.rank - 1) % P]
    send = send.contiguous()
    recv = torch.empty_like(send)
    ops = [dist.P2POp(dist.isend, send, nxt), dist.P2POp(dist.irecv, recv, prv)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    sp.count(name, _nbytes(send))
    return recv


class PendingExchange:
    """A ring exchange started now and finished by ``wait()`` (overlaps with compute)."""

    def __init__(self, send: Tensor, sp: SPGroup, name: str):
        P = sp.size
        nxt, prv = sp.ranks[(sp.rank + 1) % P], sp.ranks[(sp.rank - 1) % P]
        self.send = send.contiguous()
        self.recv = torch.empty_like(self.send)
        ops = [dist.P2POp(dist.isend, self.send, nxt), dist.P2POp(dist.irecv, self.recv, prv)]
        self.works = dist.batch_isend_irecv(ops)
        sp.count(name, _nbytes(self.send))

    def wait(self) -> Tensor:
        """Finish the exchange; what the previous rank sent."""
        for work in self.works:
            work.wait()
        return self.recv
