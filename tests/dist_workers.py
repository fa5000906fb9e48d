"""Functions that run inside the processes of ``longctx.distributed.launch.spawn`` (they
must be importable by module name from a fresh process)."""

import torch

from longctx.distributed import SPGroup, longnet_attention, ring_attention, ulysses_attention
from longctx.distributed.shard import shard
from longctx.distributed.strategies import strategy_layout
from longctx.nn import make_kernel


def full_inputs(case, seed=0):
    """q, k, v (B, H, N, D) and upstream gradients, identical on every rank. The output
    gradient is a transposed (non-contiguous) tensor."""
    g = torch.Generator().manual_seed(seed)
    B, H, N, D = case["shape"]
    dtype = case["dtype"]
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3))
    g_out = torch.randn(B, N, H, D, generator=g, dtype=torch.float64).transpose(1, 2)
    g_lse = torch.randn(B, H, N, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v)], g_out, g_lse


def run_strategy(case, q, k, v, sp):
    strategy, causal = case["strategy"], case["causal"]
    if strategy == "ring":
        return ring_attention(q, k, v, sp, causal=causal, return_lse=True)
    if strategy == "longnet":
        ws, rs = case["segments"], case["rates"]
        return longnet_attention(q, k, v, sp, ws, rs, causal=causal, return_lse=True)
    kernel = make_kernel(case.get("pattern", "dense"), **case.get("pattern_kw", {}))
    if not causal:
        from longctx import ops

        kernel = lambda q, k, v: ops.attention(q, k, v)  # noqa: E731
    return ulysses_attention(q, k, v, sp, kernel), None


def op_parity(rank, world, cases, device="cpu"):
    """Each rank's (out, lse, dq, dk, dv) shards and bytes sent, per case (computed on
    ``device``: "cpu", or "cuda" for GPU ``rank``; returned on the CPU)."""
    sp = SPGroup.world()
    dev = torch.device(f"cuda:{rank}" if device == "cuda" else "cpu")
    results = []
    for case in cases:
        (q, k, v), g_out, g_lse = full_inputs(case)
        layout = strategy_layout(case["strategy"], case["causal"])
        ql, kl, vl = (
            shard(t, 2, rank, world, layout).to(dev).detach().requires_grad_() for t in (q, k, v)
        )
        out, lse = run_strategy(case, ql, kl, vl, sp)
        loss = (out.double() * shard(g_out, 2, rank, world, layout).to(dev)).sum()
        if lse is not None and case.get("lse_grad", False):
            loss = loss + (lse.double() * shard(g_lse, 2, rank, world, layout).to(dev)).sum()
        loss.backward()
        results.append(
            {
                "out": out.detach().cpu(),
                "lse": None if lse is None else lse.detach().cpu(),
                "grads": tuple(g.cpu() for g in (ql.grad, kl.grad, vl.grad)),
                "bytes": dict(sp.bytes_sent),
            }
        )
        sp.reset_counts()
    return results


def round_trip(rank, world, shape):
    """Ulysses all-to-all there and back, forward and backward."""
    from longctx.distributed.comm import HeadsToSeq, SeqToHeads

    sp = SPGroup.world()
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    heads = SeqToHeads.apply(x, sp)
    back = HeadsToSeq.apply(heads, sp)
    back.sum().backward()
    return x.detach(), heads.detach(), back.detach(), x.grad


def train_run(rank, world, run_dir, overrides, strategy, sequence_parallel=None):
    """A short training run under sequence (and data) parallelism, as ``longctx train``
    sets it up under torchrun."""
    from longctx.distributed.training import setup_training
    from longctx.train import prepare_run, resolve_config, train

    cfg = resolve_config("tiny", None, overrides)
    P = sequence_parallel or world
    par = setup_training(P, strategy, cfg.model, cfg.train.context)
    if par.is_main:
        prepare_run(run_dir, cfg, False)
    torch.distributed.barrier()
    result = train(cfg, run_dir, progress=False, parallel=par)
    return result.step
