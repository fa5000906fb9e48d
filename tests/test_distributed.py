"""Sequence parallelism on a CPU gloo group of P local processes, against one process.

Marked ``distributed``; each test spawns its ranks (``longctx.distributed.launch``)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dist_workers
from longctx import ops
from longctx.distributed import default_strategy
from longctx.distributed.launch import free_port, spawn
from longctx.distributed.shard import (
    check_length,
    local_positions,
    shard,
    unshard,
)
from longctx.distributed.strategies import (
    check_longnet,
    check_ulysses,
    longnet_bytes,
    ring_bytes,
    strategy_layout,
    ulysses_bytes,
)
from longctx.model.checkpoint import load_model
from longctx.nn import make_kernel

pytestmark = pytest.mark.distributed

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def reference(case, q, k, v):
    """The single-process op, float64, (out, lse or None)."""
    q, k, v = (t.double().detach().requires_grad_() for t in (q, k, v))
    causal = case["causal"]
    if case["strategy"] == "longnet":
        out, lse = ops.dilated_attention(
            q, k, v, case["segments"], case["rates"], causal=causal, return_lse=True
        )
    elif case["strategy"] == "ring" or not causal:
        out, lse = ops.attention(q, k, v, causal=causal, return_lse=True)
    else:
        kernel = make_kernel(case.get("pattern", "dense"), **case.get("pattern_kw", {}))
        out, lse = kernel(q, k, v), None
    return (q, k, v), out, lse


def check_cases(world, cases, device="cpu"):
    results = spawn(world, dist_workers.op_parity, (cases, device), device=device)
    for i, case in enumerate(cases):
        (q, k, v), g_out, g_lse = dist_workers.full_inputs(case)
        layout = strategy_layout(case["strategy"], case["causal"])
        (q64, k64, v64), out, lse = reference(case, q, k, v)
        loss = (out * g_out).sum()
        if lse is not None and case.get("lse_grad", False):
            loss = loss + (lse * g_lse).sum()
        loss.backward()
        want = [out, q64.grad, k64.grad, v64.grad]
        got_out = unshard([r[i]["out"] for r in results], 2, layout)
        grads = [unshard([r[i]["grads"][j] for r in results], 2, layout) for j in range(3)]
        tol = TOL[case["dtype"]]
        for name, a, b in zip(("out", "dq", "dk", "dv"), [got_out, *grads], want, strict=True):
            assert a.dtype == case["dtype"], name
            torch.testing.assert_close(a.double(), b.detach(), atol=tol, rtol=tol, msg=name)
        if lse is not None and results[0][i]["lse"] is not None:
            got_lse = unshard([r[i]["lse"] for r in results], 2, layout)
            torch.testing.assert_close(got_lse.double(), lse.detach(), atol=tol, rtol=tol)
    return results


def _cases(world):
    f64, f32 = torch.float64, torch.float32
    N = 24 * world  # zigzag chunks of 12
    cases = []
    for causal in (False, True):
        for dtype in (f64, f32):
            cases.append(
                dict(strategy="ring", causal=causal, dtype=dtype, shape=(2, 3, N, 8), lse_grad=True)
            )
        heads = 3 if world == 3 else 2 * world  # odd heads per rank for P = 3
        cases.append(dict(strategy="ulysses", causal=causal, dtype=f64, shape=(2, heads, N, 8)))
    cases.append(
        dict(
            strategy="ulysses",
            causal=True,
            dtype=f64,
            shape=(1, world, N, 8),
            pattern="sliding_window",
            pattern_kw={"window": 7},
        )
    )
    # LongNet: N = 96; local length 48 / 32 / 24; a local branch, a gathered one, a clipped one
    segs = {2: ([8, 48, 192], [1, 2, 4]), 3: ([8, 32, 96], [1, 2, 4]), 4: ([8, 48, 192], [1, 2, 4])}
    ws, rs = segs[world]
    for causal in (False, True):
        for dtype in (f64, f32):
            cases.append(
                dict(
                    strategy="longnet",
                    causal=causal,
                    dtype=dtype,
                    shape=(2, 5, 96, 8),
                    segments=ws,
                    rates=rs,
                    lse_grad=True,
                )
            )
    if world == 4:  # a last segment shorter than the others: ranks {0, 1, 2} and {3}
        cases.append(
            dict(
                strategy="longnet",
                causal=True,
                dtype=f64,
                shape=(1, 4, 96, 8),
                segments=[8, 72],
                rates=[1, 3],
            )
        )
    return cases


@pytest.mark.parametrize("world", [2, 3, 4])
def test_strategies_equal_the_single_process_op(world):
    results = check_cases(world, _cases(world))
    cases = _cases(world)
    # bytes sent per rank match the formulas exactly (within 1%)
    for i, case in enumerate(cases):
        B, H, N, D = case["shape"]
        n = N // world
        e = torch.empty((), dtype=case["dtype"]).element_size()
        sent = [sum(r[i]["bytes"].values()) for r in results]
        if case["strategy"] == "ring":
            f = ring_bytes(B, H, n, D, world, e)
        elif case["strategy"] == "ulysses":
            f = ulysses_bytes(B, H, n, D, world, e)
        elif len(case["segments"]) == 3:
            f = longnet_bytes(B, H, n, D, world, e, case["segments"], case["rates"])
        else:
            continue  # uneven last group: ranks send different amounts
        want = f["forward"] + f["backward"]
        for s in sent:
            assert abs(s - want) <= 0.01 * want, (case["strategy"], s, want)


def test_longnet_bytes_per_rank_do_not_grow_with_n():
    """Local length fixed at 48: N = 96 on 2 ranks and N = 192 on 4 ranks send the same
    bytes per rank (branches w = 8, 48, 96); ring and Ulysses grow with N."""
    per_rank = {}
    for world in (2, 4):
        N = 48 * world
        case = dict(
            strategy="longnet",
            causal=True,
            dtype=torch.float64,
            shape=(1, 4, N, 8),
            segments=[8, 48, 96],
            rates=[1, 2, 4],
        )
        results = check_cases(world, [case])
        per_rank[world] = {sum(r[0]["bytes"].values()) for r in results}
    assert per_rank[2] == per_rank[4] and len(per_rank[2]) == 1
    assert ring_bytes(1, 4, 48, 8, 4, 8)["forward"] > ring_bytes(1, 4, 48, 8, 2, 8)["forward"]


@pytest.mark.parametrize("world,heads", [(3, 3), (3, 9), (2, 6)])
def test_ulysses_round_trip_with_odd_heads_per_rank(world, heads):
    results = spawn(world, dist_workers.round_trip, ((2, heads, 5, 4),))
    xs = [r[0] for r in results]
    full = torch.cat(xs, dim=2)  # (B, H, N, D)
    for rank, (x, heads_part, back, grad) in enumerate(results):
        hp = heads // world
        torch.testing.assert_close(heads_part, full[:, rank * hp : (rank + 1) * hp])
        assert torch.equal(back, x)
        assert torch.equal(grad, torch.ones_like(x))


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="cannot be split over 4 ranks"):
        check_ulysses(2, 4)
    with pytest.raises(ValueError, match="multiple of 4"):
        check_ulysses(6, 4)
    with pytest.raises(ValueError, match="must divide the local length"):
        check_longnet(96, 4, [16], [1])  # n = 24
    with pytest.raises(ValueError, match="multiple of the local length"):
        check_longnet(96, 2, [64], [1])
    with pytest.raises(ValueError, match="multiple of its dilation rate"):
        check_longnet(96, 4, [48], [5])
    with pytest.raises(ValueError, match="multiple of 8"):
        check_length(100, 4, "zigzag")
    with pytest.raises(ValueError, match="unknown sequence-parallel strategy"):
        strategy_layout("tree", True)
    assert default_strategy("dilated") == "longnet" and default_strategy("dense") == "ring"


def test_sharding_helpers_round_trip():
    x = torch.arange(2 * 24).view(2, 24)
    for layout in ("contiguous", "zigzag"):
        parts = [shard(x, 1, r, 3, layout) for r in range(3)]
        assert torch.equal(unshard(parts, 1, layout), x)
        pos = torch.cat([local_positions(24, r, 3, layout) for r in range(3)])
        assert sorted(pos.tolist()) == list(range(24))
        for r in range(3):
            assert torch.equal(shard(x, 1, r, 3, layout)[0], local_positions(24, r, 3, layout))
    assert local_positions(24, 0, 3, "zigzag").tolist() == [0, 1, 2, 3, 20, 21, 22, 23]


TRAIN = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "train.context=96",
    "train.batch_size=2",
    "train.max_steps=4",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_windows=2",
    "train.save_every=4",
    "train.warmup_steps=0",
    "train.threads=1",
    "train.max_minutes=0",
]


CHECKPOINTED = ["train.activation_checkpointing=layer", "train.token_chunk=20"]


def _losses(run_dir: Path):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["val_bpb"] for r in rows if "val_bpb" in r]


@pytest.mark.parametrize(
    "strategy,extra",
    [
        ("ring", []),
        ("ring", ["data.source=task:kv-retrieval", "data.task_window=32"]),  # sparse targets
        (
            "longnet",
            [
                "model.attention=dilated",
                "model.segment_lengths=[16, 48, 96]",
                "model.dilation_rates=[1, 2, 4]",
            ],
        ),
        # recomputed layers and token chunks on the ranks; the one process runs plain
        ("ring", [*CHECKPOINTED]),
        (
            "longnet",
            [
                "model.attention=dilated",
                "model.segment_lengths=[16, 48, 96]",
                "model.dilation_rates=[1, 2, 4]",
                *CHECKPOINTED,
            ],
        ),
    ],
)
def test_two_rank_training_matches_one_process(tmp_path, strategy, extra):
    from longctx.train import prepare_run, resolve_config, train

    overrides = [*TRAIN, *extra]
    spawn(2, dist_workers.train_run, (tmp_path / "sp", overrides, strategy), timeout_s=120)
    cfg = resolve_config("tiny", None, [o for o in overrides if o not in CHECKPOINTED])
    prepare_run(tmp_path / "one", cfg, False)
    single = train(cfg, tmp_path / "one", progress=False)
    sp_loss, sp_val = _losses(tmp_path / "sp")
    one_loss, one_val = _losses(tmp_path / "one")
    assert len(sp_loss) == len(one_loss) == 4
    torch.testing.assert_close(torch.tensor(sp_loss), torch.tensor(one_loss), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(sp_val), torch.tensor(one_val), atol=1e-4, rtol=0)
    # the checkpoint was written once and loads in a single process
    ckpts = sorted((tmp_path / "sp" / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step-00000004"]
    m_sp, _ = load_model(ckpts[0])
    m_one, _ = load_model(single.checkpoint)
    for (name, a), (_, b) in zip(m_sp.state_dict().items(), m_one.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_sequence_and_data_parallel_match_gradient_accumulation(tmp_path):
    """4 ranks = 2-way sequence parallel x 2 replicas: replica d trains on batch
    2 * step + d, exactly the two micro-batches of one process with grad_accum = 2."""
    from longctx.train import prepare_run, resolve_config, train

    extra = [
        "model.attention=dilated",
        "model.segment_lengths=[16, 48, 96]",
        "model.dilation_rates=[1, 2, 4]",
    ]
    spawn(4, dist_workers.train_run, (tmp_path / "sp", [*TRAIN, *extra], "longnet", 2))
    cfg = resolve_config("tiny", None, [*TRAIN, *extra, "train.grad_accum=2"])
    prepare_run(tmp_path / "one", cfg, False)
    train(cfg, tmp_path / "one", progress=False)
    sp_loss, sp_val = _losses(tmp_path / "sp")
    one_loss, one_val = _losses(tmp_path / "one")
    torch.testing.assert_close(torch.tensor(sp_loss), torch.tensor(one_loss), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(sp_val), torch.tensor(one_val), atol=1e-4, rtol=0)
    rows = [json.loads(x) for x in (tmp_path / "sp" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["tokens"] == 2 * 2 * 96  # both replicas' batches count


def _launch_rank(rank, world, port, run_dir, timeout=20):
    env = dict(
        os.environ,
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    cmd = [sys.executable, "-m", "longctx", "train", "--sequence-parallel", str(world)]
    cmd += ["--out", str(run_dir), "--no-eval", "--sp-timeout", str(timeout)]
    for o in TRAIN:
        if not o.startswith("train.max_steps"):
            cmd += ["--set", o]
    cmd += ["--set", "train.max_steps=100000", "--set", "train.save_every=100000"]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_dead_or_hung_rank_ends_the_others_within_the_timeout(tmp_path, how):
    """Rank 1 is killed (its peer sees the connection drop) or stopped (its peer waits out
    --sp-timeout 15): rank 0 exits with a clear error either way, never hangs."""
    port = free_port()
    run = tmp_path / "run"
    procs = [_launch_rank(r, 2, port, run, timeout=15) for r in range(2)]
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
            assert time.monotonic() < deadline, "training never started"
            assert procs[0].poll() is None, procs[0].communicate()[0]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        t0 = time.monotonic()
        out, _ = procs[0].communicate(timeout=90)
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == 1
    assert waited < 15 + 15  # the timeout, plus slack for a loaded machine
    assert "another rank probably died or timed out" in out, out[-2000:]


def test_cli_without_torchrun_says_how_to_launch(capsys):
    from longctx import cli

    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
    try:
        rc = cli.main(["train", "--sequence-parallel", "2", "--out", "/tmp/never"])
    finally:
        os.environ.update(env)
    assert rc == 2
    assert "torchrun" in capsys.readouterr().err


def test_bench_parallel_smoke(tmp_path, capsys):
    from longctx import cli

    out = tmp_path / "p"
    argv = ["bench", "parallel", "--local-length", "64", "--worlds", "2", "--world", "2"]
    argv += ["--global-ns", "128,256", "--reps", "1", "--heads", "2", "--head-dim", "8"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {(r["sweep"], r["strategy"], r["n"]) for r in rows} == {
        (sweep, s, n)
        for s in ("longnet", "ulysses", "ring")
        for sweep, n in (("local", 128), ("global", 128), ("global", 256))
    }
    for r in rows:  # the counted bytes are the formulas' (and every rank sends the same)
        assert r["bytes_per_rank"] == r["bytes_per_rank_min"]
        assert abs(r["formula_error"]) < 0.01
    ring = {r["n"]: r["bytes_per_rank"] for r in rows if r["strategy"] == "ring"}
    assert ring[256] == 2 * ring[128]  # ring bytes grow linearly in N at fixed P
    summary = json.loads((out / "summary.json").read_text())
    assert summary["max_formula_error"] < 0.01
    assert (out / "parallel.png").stat().st_size > 1000
    assert "largest deviation 0.00%" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL)")
def test_strategies_on_nccl_equal_the_single_process_op():
    """The same parity cases, one GPU per rank over NCCL (float32 and float64 on CUDA)."""
    check_cases(2, _cases(2), device="cuda")
