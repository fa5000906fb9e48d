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
from torch import Tensor, nn

from .._util import resolve_device
from ..nn.ngram import no_sequence_parallel as ngram_refusal
from ..nn.routing import NO_SEQUENCE_PARALLEL as ROUTING_REFUSAL
from . import SequenceParallel, default_strategy
from .comm import DEFAULT_TIMEOUT_S, SPGroup, init_from_env


@dataclass
class ParallelTraining:
    """Sequence parallelism within groups of P ranks, data parallelism across groups: the
    training loop's parallel interface (:class:`longctx.train.parallel.Parallel`)."""

    sp: SequenceParallel
    rank: int  # global
    world: int
    dp_rank: int
    dp_size: int
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (NCCL: GPU)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory and prints."""
        return self.rank == 0

    def prepare(self, model: nn.Module) -> None:
        """Every layer computes its share of a sequence (or refuses, with the reason)."""
        self.sp.parallelize(model)

    def batch_index(self, step: int, micro: int, grad_accum: int) -> int:
        """Index of this replica's batch (one process: step * accum + micro)."""
        return (step * grad_accum + micro) * self.dp_size + self.dp_rank

    def shard(self, x: Tensor, y: Tensor):
        """This rank's shard of every sequence, its global positions, and the batch's
        target count (so that the P ranks' losses sum to the batch's mean)."""
        positions = self.sp.positions(x.shape[1], x.device)
        return self.sp.shard(x, 1), self.sp.shard(y, 1), positions, int((y >= 0).sum())

    def mean(self, values: list[float]) -> list[float]:
        """Per-group sums of per-rank values, averaged over replicas (one all-reduce)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.dp_size).tolist()

    def reduce_gradients(self, model: nn.Module) -> None:
        """Sum gradients over all ranks, divide by the replicas (one all-reduce)."""
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
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        """Wait for every rank."""
        dist.barrier()

    def broadcast(self, values: list) -> list:
        """Rank 0's values, on every rank."""
        box = list(values)
        dist.broadcast_object_list(box, src=0)
        return box

    def describe(self) -> str:
        """The setup in one line, for the log."""
        sp = self.sp
        return (
            f"sequence parallel: {sp.size} ranks, strategy {sp.strategy} ({sp.layout} "
            f"layout); data parallel: {self.dp_size} replica(s)"
        )

    def close(self) -> None:
        """Leave the process group."""
        if dist.is_initialized():
            dist.destroy_process_group()


def setup_training(
    sequence_parallel: int,
    strategy: str | None,
    model_cfg,
    context: int,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    device=None,
) -> ParallelTraining:
    """Join the torchrun job and build the groups; clear errors for shapes that do not
    divide (checked before any training starts). ``device``: auto (default: this
    process's ``LOCAL_RANK`` GPU when CUDA is available, with NCCL; else the CPU with
    gloo), cpu, cuda or cuda:N."""
    if sequence_parallel < 1:
        raise ValueError(f"--sequence-parallel must be >= 1, got {sequence_parallel}")
    strategy = strategy or default_strategy(model_cfg.attention)
    check_model(None, model_cfg, context, strategy=strategy)  # before joining the job
    device = resolve_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL uses the current device
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
    return ParallelTraining(
        sp=sp, rank=rank, world=world, dp_rank=rank // P, dp_size=world // P, device=device
    )


def check_model(sp: SequenceParallel | None, cfg, context: int, *, strategy=None) -> None:
    """ValueError unless this model and context run under the strategy (``sp``'s, or
    ``strategy`` before the group exists): the model's layers and its attention pattern
    say what they refuse."""
    if cfg.ngram > 1:
        raise ValueError(ngram_refusal(cfg.ngram))
    if cfg.ffn.kind == "colt5":
        raise ValueError(ROUTING_REFUSAL)
    if cfg.retro.enabled and (sp is not None or strategy is not None):
        raise ValueError(
            "sequence parallelism does not support RETRO layers (a chunk's neighbours are "
            "encoded from the whole chunk); train RETRO without --sequence-parallel"
        )
    if sp is None:
        if strategy is not None:
            cfg.attention.check_sequence_parallel(strategy, 1, cfg.n_heads, context)
        return
    sp.check_length(context)
    cfg.attention.check_sequence_parallel(sp.strategy, sp.size, cfg.n_heads, context)
