"""How training is spread over processes, as one object: :class:`SingleProcess` here (the
default, and the null object of the interface), and
:class:`longctx.distributed.training.ParallelTraining` for sequence (and data)
parallelism under torchrun. The training loop calls the same methods either way."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn


class Parallel(Protocol):
    """What the training loop asks of its parallel setup."""

    is_main: bool  # this process writes the run directory and prints
    dp_size: int  # replicas that train on different batches

    def prepare(self, model: nn.Module) -> None:
        """Make the model compute its share (e.g. swap attention kernels); refuse
        layers that cannot."""

    def batch_index(self, step: int, micro: int, grad_accum: int) -> int:
        """The index of this replica's batch for (step, micro-step)."""

    def shard(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor | None, int | None]:
        """This process's part of a batch: (inputs, targets, global positions or None,
        the number of targets the loss is averaged over or None for this part's own)."""

    def reduce_gradients(self, model: nn.Module) -> None:
        """Make every process's gradients those of the whole step."""

    def mean(self, values: list[float]) -> list[float]:
        """Per-replica sums of per-process values, averaged over replicas."""

    def any(self, flag: bool) -> bool:
        """True everywhere if true anywhere (stop decisions must agree)."""

    def barrier(self) -> None:
        """Wait for every process."""

    def broadcast(self, values: list) -> list:
        """The main process's values, on every process."""

    def describe(self) -> str:
        """A line about the setup for the log ("" for one process)."""

    def close(self) -> None:
        """Leave the process group (nothing for one process)."""


class SingleProcess(Parallel):
    """Training in this process alone."""

    is_main = True
    dp_size = 1

    def prepare(self, model: nn.Module) -> None:
        pass

    def batch_index(self, step: int, micro: int, grad_accum: int) -> int:
        return step * grad_accum + micro

    def shard(self, x: Tensor, y: Tensor):
        return x, y, None, None

    def reduce_gradients(self, model: nn.Module) -> None:
        pass

    def mean(self, values: list[float]) -> list[float]:
        return list(values)

    def any(self, flag: bool) -> bool:
        return flag

    def barrier(self) -> None:
        pass

    def broadcast(self, values: list) -> list:
        return list(values)

    def describe(self) -> str:
        return ""

    def close(self) -> None:
        pass


__all__ = ["Parallel", "SingleProcess"]
