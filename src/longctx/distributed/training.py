"""Training with sequence parallelism (and data parallelism over the remaining ranks).

World of W = D * P ranks launched by torchrun: ranks d * P .. d * P + P - 1 form
sequence-parallel group d and train on the same batch, each on its shard of every
sequence; the D groups (replicas) train on different batches. Each rank's loss is its
tokens' summed cross-entropy over the whole batch's token count, so the gradients of the P
ranks of a group sum to the gradient of the batch; gradients are summed over all ranks
and divided by D (the mean over replicas). Parameters stay identical on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import SequenceParallel, default_strategy
from .comm import DEFAULT_TIMEOUT_S, SPGroup, init_from_env
from .strategies import check_longnet, check_ulysses


@dataclass
class ParallelTraining:
    sp: SequenceParallel
    rank: int  # global
    world: int
    dp_rank: int
    dp_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def batch_index(self, step: int, micro: int, grad_accum: int) -> int:
        """Index of this replica's batch (one process: step * accum + micro)."""
        return (step * grad_accum + micro) * self.dp_size + self.dp_rank

    def local_loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """This rank's share of the batch's mean cross-entropy (the shares of the P ranks
        of a group sum to it)."""
        pos = self.sp.positions(x.shape[1], x.device)
        logits = model(self.sp.shard(x, 1), positions=pos)  # (B, n, V)
        yl = self.sp.shard(y, 1)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yl.reshape(-1), reduction="sum")
        return ce / y.numel()

    def replica_mean(self, values: list[float]) -> list[float]:
        """Per-group sums of per-rank values, averaged over replicas (one all-reduce)."""
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return (t / self.dp_size).tolist()

    def all_reduce_grads(self, model: nn.Module) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.dp_size
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank (stop decisions must agree)."""
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        dist.barrier()

    @torch.no_grad()
    def evaluate_bpb(self, model: nn.Module, windows: list[Tensor], batch: int) -> float:
        """Mean bits per token over validation windows (N + 1 tokens each), sharded like
        training; every replica evaluates all windows."""
        was = model.training
        model.eval()
        total, count = 0.0, 0
        for i in range(0, len(windows), batch):
            w = torch.stack(windows[i : i + batch])
            total += float(self.local_loss(model, w[:, :-1], w[:, 1:])) * w[:, 1:].numel()
            count += w[:, 1:].numel()
        model.train(was)
        (total,) = self.replica_mean([total])
        return total / count / torch.log(torch.tensor(2.0)).item()


def setup_training(
    sequence_parallel: int,
    strategy: str | None,
    model_cfg,
    context: int,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    device: str = "cpu",
) -> ParallelTraining:
    """Join the torchrun job and build the groups; clear errors for shapes that do not
    divide (checked before any training starts)."""
    if sequence_parallel < 1:
        raise ValueError(f"--sequence-parallel must be >= 1, got {sequence_parallel}")
    strategy = strategy or default_strategy(model_cfg.attention)
    rank, world = init_from_env(device, timeout_s)
    P = sequence_parallel
    if world % P:
        raise ValueError(
            f"the job has {world} processes; --sequence-parallel {P} must divide it "
            "(the remaining factor is data parallelism)"
        )
    groups = [dist.new_group(list(range(b, b + P))) for b in range(0, world, P)]
    base = (rank // P) * P
    sp = SequenceParallel(
        SPGroup(groups[rank // P], list(range(base, base + P)), rank - base), strategy
    )
    check_model(sp, model_cfg, context)
    return ParallelTraining(sp=sp, rank=rank, world=world, dp_rank=rank // P, dp_size=world // P)


def check_model(sp: SequenceParallel, cfg, context: int) -> None:
    """ValueError unless this model and context run under the strategy."""
    if cfg.ngram > 1:
        raise ValueError(
            f"model.ngram = {cfg.ngram} is not supported with sequence parallelism (each "
            "shard would need the tokens before it); use model.ngram = 1"
        )
    sp.kernel(cfg)  # pattern/strategy compatibility
    sp.check_length(context)
    if sp.strategy == "ulysses":
        check_ulysses(cfg.n_heads, sp.size)
    if sp.strategy == "longnet":
        check_longnet(context, sp.size, cfg.segment_lengths, cfg.dilation_rates)
