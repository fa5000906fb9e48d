"""Training, checkpoints, resume, evaluation and the train/eval/info commands (tiny runs)."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from longctx import cli
from longctx.data import DataConfig, load_corpus
from longctx.data.corpus import stdlib_files
from longctx.model.checkpoint import CheckpointError, list_checkpoints, load_model
from longctx.train import prepare_run, resolve_config, train

# constant learning rate: the schedule does not depend on max_steps, so a run can be
# stopped and resumed with another max_steps and still match an uninterrupted one
TINY = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "train.context=64",
    "train.batch_size=4",
    "train.warmup_steps=0",
    "train.min_lr_ratio=1.0",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_windows=4",
    "train.max_minutes=0",
    "train.threads=1",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    # 40 mid-sized standard-library files (always present, deterministic)
    files = [f for f in stdlib_files() if 4000 <= f.stat().st_size <= 12000][:40]
    for i, f in enumerate(files):
        (d / f"f{i:02d}.py").write_bytes(f.read_bytes())
    return d


def _cfg(data_dir, *extra):
    return resolve_config("tiny", None, [*TINY, f"data.source={data_dir}", *extra])


def _run(cfg, run_dir, **kw):
    prepare_run(run_dir, cfg, kw.get("resume", False))
    return train(cfg, run_dir, progress=False, **kw)


def _params(path):
    model, _ = load_model(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_loss_decreases(tmp_path, data_dir):
    cfg = _cfg(data_dir, "train.max_steps=60", "train.lr=3e-3", "train.save_every=60")
    result = _run(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < sum(losses[:5]) / 5 - 1.0
    assert result.val_bpb < result.unigram_bpb
    assert rows[-1]["final"] and rows[-1]["val_bpb"] == result.val_bpb


def test_checkpoint_round_trip(tmp_path, data_dir):
    cfg = _cfg(data_dir, "train.max_steps=3", "train.save_every=3")
    result = _run(cfg, tmp_path / "run")
    model, state = load_model(result.checkpoint)
    assert state["step"] == 3 and state["tokens"] == 3 * 4 * 64
    tokens = torch.randint(0, 256, (1, 20))
    again, _ = load_model(result.checkpoint)
    assert torch.equal(model(tokens), again(tokens))


def _spawn_train(run_dir, data_dir, *extra):
    cmd = [
        sys.executable,
        "-m",
        "longctx",
        "train",
        "--out",
        str(run_dir),
        "--no-eval",
        *sum((["--set", s] for s in [*TINY, f"data.source={data_dir}", *extra]), []),
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(proc, run_dir, timeout=120):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if list_checkpoints(run_dir / "checkpoints"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.stdout.read()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no checkpoint appeared")


def test_kill_and_resume_gives_the_same_parameters(tmp_path, data_dir):
    killed = tmp_path / "killed"
    proc = _spawn_train(killed, data_dir, "train.max_steps=100000", "train.save_every=4")
    _wait_for_checkpoint(proc, killed)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = list_checkpoints(killed / "checkpoints")[-1]
    step = json.loads((resumed_from / "state.json").read_text())["step"]
    target = step + 6
    cfg = prepare_run(killed, None, True, [f"train.max_steps={target}"])
    result = train(cfg, killed, resume=True, progress=False)
    assert result.step == target

    straight = _cfg(data_dir, f"train.max_steps={target}", "train.save_every=100000")
    ref_result = _run(straight, tmp_path / "straight")
    a, b = _params(result.checkpoint), _params(ref_result.checkpoint)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the metrics log has each step once, in order
    steps = [
        json.loads(x)["step"]
        for x in (killed / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(x)
    ]
    assert steps == list(range(1, target + 1))


def test_ctrl_c_saves_then_stops(tmp_path, data_dir):
    run = tmp_path / "run"
    proc = _spawn_train(run, data_dir, "train.max_steps=100000", "train.save_every=3")
    _wait_for_checkpoint(proc, run)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "continue with: longctx train --resume" in out
    last = list_checkpoints(run / "checkpoints")[-1]
    step = json.loads((last / "state.json").read_text())["step"]
    assert f"stopped at step {step}" in out


def test_corrupt_checkpoint_is_a_clear_error_and_earlier_ones_survive(tmp_path, data_dir):
    cfg = _cfg(data_dir, "train.max_steps=4", "train.save_every=2", "train.keep_checkpoints=3")
    run = tmp_path / "run"
    _run(cfg, run)
    first, last = list_checkpoints(run / "checkpoints")
    weights = last / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    cfg2 = prepare_run(run, None, True, ["train.max_steps=6"])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        train(cfg2, run, resume=True, progress=False)
    assert first.is_dir() and load_model(first)[1]["step"] == 2
    result = train(cfg2, run, resume=True, checkpoint=first, progress=False)
    assert result.step == 6
    (first / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="state.json is corrupt"):
        load_model(first)


def test_refuses_to_overwrite_a_run(tmp_path, data_dir):
    cfg = _cfg(data_dir, "train.max_steps=1")
    _run(cfg, tmp_path / "run")
    with pytest.raises(ValueError, match="already holds a run"):
        prepare_run(tmp_path / "run", cfg, False)
    with pytest.raises(ValueError, match="has no config.json"):
        prepare_run(tmp_path / "nothing", None, True)


def test_limits_by_tokens(tmp_path, data_dir):
    cfg = _cfg(data_dir, "train.max_steps=1000", f"train.max_tokens={5 * 4 * 64}")
    result = _run(cfg, tmp_path / "run")
    assert result.step == 5 and result.stopped_by == "max_tokens"


def test_cli_train_eval_info(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    args = [
        "train",
        "--out",
        str(run),
        *sum((["--set", s] for s in TINY), []),
        "--set",
        f"data.source={data_dir}",
        "--set",
        "train.max_steps=5",
    ]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "validation:" in out and "unigram baseline" in out and "bpb_by_position.png" in out
    res = json.loads((run / "eval" / "eval.json").read_text())
    assert [e["context"] for e in res["by_context"]] == [64, 128, 256]
    assert all(e["bpb"] > 0 for e in res["by_context"])
    assert (run / "eval" / "bpb_by_context.png").stat().st_size > 1000
    assert cli.main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert "parameters:" in out and "FLOPs per token at context 64" in out
    assert cli.main(["eval", str(run), "--contexts", "32,64", "--windows", "2"]) == 0
    assert cli.main(["train", "--out", str(run)]) == 2  # exists
    assert "already holds a run" in capsys.readouterr().err
    assert cli.main(["train", "--set", "model.nope=1", "--out", str(tmp_path / "x")]) == 2
    assert "model.nope" in capsys.readouterr().err
    assert cli.main(["info", str(tmp_path / "missing")]) == 2


def test_empty_corpus_error_via_cli(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = cli.main(["train", "--out", str(tmp_path / "r"), "--set", f"data.source={empty}"])
    assert rc == 2
    assert "is empty" in capsys.readouterr().err


def test_stdlib_default_corpus_loads():
    c = load_corpus(DataConfig(max_bytes=100_000))
    assert c.files > 0


def test_bf16_autocast_and_minutes_limit(tmp_path, data_dir):
    cfg = _cfg(data_dir, "train.max_steps=1000", "train.bf16=true", "train.max_minutes=0.0001")
    result = _run(cfg, tmp_path / "run")
    assert result.stopped_by == "max_minutes" and result.step == 1
    assert result.val_bpb is not None and result.val_bpb == result.val_bpb  # finite, not NaN
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] > 0


def test_minutes_count_across_resumes_and_the_time_schedule_decays_within_them(
    tmp_path, data_dir, monkeypatch
):
    from longctx.train import loop
    from longctx.train.optim import lr_at

    clock = [0.0]  # a fake wall clock: each step takes 6 seconds
    monkeypatch.setattr(loop.time, "monotonic", lambda: clock[0])
    real_step = loop.Trainer.train_step

    def timed_step(self):
        stats = real_step(self)
        clock[0] += 6.0
        return stats

    monkeypatch.setattr(loop.Trainer, "train_step", timed_step)
    budget = ["train.max_steps=1000", "train.max_minutes=1", "train.schedule=time"]
    cfg = _cfg(data_dir, *budget, "train.min_lr_ratio=0.1", "train.save_every=3")
    run = tmp_path / "run"
    prepare_run(run, cfg, False)
    trainer = loop.Trainer(cfg, run, progress=False)
    for _ in range(4):  # 4 steps (24 s), a checkpoint at step 3 (18 s), then killed
        trainer.train_step()
        if trainer.step % 3 == 0:
            trainer.save()
    state = json.loads((list_checkpoints(run / "checkpoints")[-1] / "state.json").read_text())
    assert state["step"] == 3 and state["seconds"] == 18.0
    result = _run(cfg, run, resume=True)  # 42 s left of the minute: 7 more steps
    assert result.stopped_by == "max_minutes" and result.step == 10
    assert result.seconds == 60.0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r and r["step"] > 3]
    # the cosine spans the minute: at 18 s it is at 30% of the way; at the end, the floor
    tc = cfg.train
    assert lrs[0] == pytest.approx(lr_at(3, tc, 18.0))
    assert lr_at(0, tc, 60.0) == pytest.approx(tc.lr * tc.min_lr_ratio)
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < lrs[0]
    again = _run(cfg, run, resume=True)  # no budget left: no step
    assert again.stopped_by == "max_minutes" and again.step == 10
    with pytest.raises(ValueError, match="max_minutes"):
        _cfg(data_dir, "train.schedule=time", "train.max_minutes=0")
    with pytest.raises(ValueError, match="train.schedule"):
        _cfg(data_dir, "train.schedule=tokens")


def test_gradient_accumulation_matches_a_larger_batch(tmp_path, data_dir, monkeypatch):
    from longctx.data import sources

    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 256, (4, 65), generator=g)

    def fixed_batch(tokens, batch, seq_len, seed, index):
        if batch == 4:  # the plain run: all rows at once
            chosen = rows
        else:  # accumulation: micro-step index 2*step + m takes rows 2m, 2m+1
            m = index % 2
            chosen = rows[2 * m : 2 * m + 2]
        return chosen[:, :-1], chosen[:, 1:]

    monkeypatch.setattr(sources, "sample_batch", fixed_batch)
    plain = _run(_cfg(data_dir, "train.max_steps=1", "train.batch_size=4"), tmp_path / "a")
    accum = _run(
        _cfg(data_dir, "train.max_steps=1", "train.batch_size=2", "train.grad_accum=2"),
        tmp_path / "b",
    )
    assert accum.tokens == plain.tokens == 4 * 64
    # Adam's first step is invariant to the gradient's scale, so also check the logged loss:
    # it must be the mean over all four rows (micro-losses divided by grad_accum)
    loss_a, loss_b = (
        json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[0])["loss"]
        for d in ("a", "b")
    )
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    a, b = _params(plain.checkpoint), _params(accum.checkpoint)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("bf16", [False, True])
def test_colt5_model_trains_and_logs_routing_per_layer(tmp_path, data_dir, bf16):
    cfg = _cfg(
        data_dir,
        "model.attention=colt5",
        "model.ffn=colt5",
        "model.colt5_window=16",
        "train.max_steps=6",
        "train.save_every=6",
        f"train.bf16={str(bf16).lower()}",
    )
    result = _run(cfg, tmp_path / "run")
    assert result.step == 6 and result.val_bpb == result.val_bpb  # finite
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 6
    for r in steps:
        assert sorted(r["routed_fraction"]) == sorted(
            f"layer{i}.{k}" for i in range(2) for k in ("ffn", "attn_q", "attn_kv")
        )
        assert all(0 <= f <= 1 for f in r["routed_fraction"].values())
        assert r["router_aux_loss"] > 0
    model, _ = load_model(result.checkpoint)
    assert model.cfg.attention.kind == "colt5" and model.cfg.ffn.kind == "colt5"
