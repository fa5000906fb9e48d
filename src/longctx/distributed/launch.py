"""Starting P local processes joined in one process group (gloo on the CPU, NCCL with one
GPU per rank): the tests and ``longctx bench parallel`` use it (training uses torchrun).
Each process runs ``fn(rank, world, *args)``; what it returns comes back to the caller,
in rank order."""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .comm import backend_for


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, timeout_s, threads, out_dir, fn, args, device="cpu"):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(threads)
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend_for(device),
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(
    world: int,
    fn: Callable,
    args: tuple = (),
    *,
    timeout_s: float = 60.0,
    threads: int = 1,
    device: str = "cpu",
) -> list:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes (loopback; gloo on
    ``device="cpu"``, NCCL with GPU ``rank`` for ``"cuda"``) and return their results.
    A failing rank raises here with its traceback; the process group timeout bounds how
    long the others wait for it."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(
            f"NCCL needs one GPU per rank: {world} ranks, {torch.cuda.device_count()} "
            "CUDA device(s) here"
        )
    with tempfile.TemporaryDirectory(prefix="longctx-spawn-") as out_dir:
        mp.start_processes(
            _entry,
            args=(world, free_port(), timeout_s, threads, out_dir, fn, args, device),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]
