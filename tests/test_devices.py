"""Devices: every command takes --device (auto, cpu, cuda, cuda:N); checkpoints load on
any device; resuming restores the device's random state. The CUDA cases are marked
``gpu`` and skip without a CUDA device."""

import hashlib
import json

import pytest
import torch

from conftest import requires_cuda
from longctx import cli
from longctx._util import resolve_device
from longctx.model import latest_checkpoint, load_checkpoint, load_model
from longctx.train import Trainer, prepare_run, resolve_config, train

TINY = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "train.context=64",
    "train.batch_size=2",
    "train.max_steps=3",
    "train.save_every=2",
    "train.log_every=1",
    "train.eval_windows=2",
    "train.max_minutes=0",
    "train.warmup_steps=0",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("def f(x):\n    return x + 1\n" * 300)
    return path


def _sets(*extra):
    return sum((["--set", s] for s in extra), [])


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == resolve_device("auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="--device must be auto"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available"):
            resolve_device("cuda:0")


def test_every_command_takes_a_device(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), "--device", "auto", "--no-eval"]
    assert cli.main([*argv, *_sets(*TINY, f"data.source={corpus}")]) == 0
    assert cli.main(["eval", str(run), "--windows", "2", "--device", "cpu"]) == 0
    argv = ["generate", str(run), "--prompt", "def", "--max-new-tokens", "3"]
    assert cli.main([*argv, "--device", "auto"]) == 0
    benches = {
        "attention": ["--min-n", "64", "--max-n", "64", "--methods", "sdpa", "--peak-size", "64"],
        "train": ["--min-context", "64", "--max-context", "64", "--patterns", "dense"]
        + ["--d-model", "32", "--layers", "1", "--tokens-per-step", "64", "--steps", "1"],
        "generate": ["--preset", "tiny", "--min-context", "64", "--max-context", "64"]
        + ["--tokens", "2", "--policies", "full"],
        "colt5": ["--min-n", "64", "--max-n", "64", "--d-model", "32", "--heads", "4"]
        + ["--components", "ffn", "--causal", "yes", "--min-time", "0"],
    }
    for name, args in benches.items():
        out = tmp_path / f"bench-{name}"
        assert cli.main(["bench", name, *args, "--device", "auto", "--out", str(out)]) == 0
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        assert rows and all(r["status"] == "ok" for r in rows), name
    capsys.readouterr()
    if not torch.cuda.is_available():
        assert cli.main(["eval", str(run), "--device", "cuda"]) == 2
        assert "no CUDA device is available" in capsys.readouterr().err


def test_a_checkpoint_loads_the_same_on_any_device_string(tmp_path, corpus):
    cfg = resolve_config("tiny", None, [*TINY, f"data.source={corpus}"])
    prepare_run(tmp_path / "run", cfg, False)
    result = train(cfg, tmp_path / "run", progress=False, device="cpu")
    states = [
        load_model(result.checkpoint, where)[0].state_dict()
        for where in ("cpu", "cpu:0", torch.device("cpu"), resolve_device("auto"))
    ]
    for other in states[1:]:
        for name, tensor in states[0].items():
            assert torch.equal(tensor, other[name].cpu()), name


def test_resuming_restores_the_random_state_of_the_device(tmp_path, corpus):
    cfg = resolve_config("tiny", None, [*TINY, f"data.source={corpus}"])
    run = tmp_path / "run"
    prepare_run(run, cfg, False)
    train(cfg, run, progress=False, device="cpu")
    ckpt = latest_checkpoint(run / "checkpoints")
    saved, _ = load_checkpoint(ckpt, ["rng"])
    trainer = Trainer(cfg, run, progress=False, device="cpu")
    torch.manual_seed(12345)  # anything else: resuming must restore the saved state
    torch.rand(7)
    assert not torch.equal(torch.get_rng_state(), saved["rng"]["cpu"])
    trainer.resume()
    assert torch.equal(torch.get_rng_state(), saved["rng"]["cpu"])
    # a checkpoint written on a GPU (its CUDA state saved too) resumes on the CPU
    from safetensors.torch import save_file

    rng = {"cpu": saved["rng"]["cpu"], "cuda": torch.zeros(16, dtype=torch.uint8)}
    save_file(rng, str(ckpt / "rng.safetensors"))
    state_path = ckpt / "state.json"
    state = json.loads(state_path.read_text())
    digest = hashlib.sha256((ckpt / "rng.safetensors").read_bytes()).hexdigest()
    state["files"]["rng.safetensors"] = digest
    state_path.write_text(json.dumps(state))
    Trainer(cfg, run, progress=False, device="cpu").resume()


# ------------------------------------------------------------------- CUDA (gpu marker)


@pytest.mark.gpu
@requires_cuda
def test_cuda_training_resumes_exactly(tmp_path, corpus):
    sets = [*TINY, f"data.source={corpus}", "train.bf16=false"]
    cfg = resolve_config("tiny", None, [*sets, "train.max_steps=4"])
    prepare_run(tmp_path / "straight", cfg, False)
    straight = train(cfg, tmp_path / "straight", progress=False, device="cuda")
    short = resolve_config("tiny", None, [*sets, "train.max_steps=2"])
    prepare_run(tmp_path / "resumed", short, False)
    train(short, tmp_path / "resumed", progress=False, device="cuda")
    cfg2 = prepare_run(tmp_path / "resumed", None, True, ["train.max_steps=4"])
    resumed = train(cfg2, tmp_path / "resumed", resume=True, progress=False, device="cuda")
    a, b = load_model(straight.checkpoint)[0], load_model(resumed.checkpoint)[0]
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=name)
    assert "cuda" in load_checkpoint(resumed.checkpoint, ["rng"])[0]["rng"]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("policy", ["full", "dilated", "none"])
def test_cuda_generation_equals_the_full_forward(policy):
    from longctx.model import DecoderLM, ModelConfig, generate

    torch.manual_seed(0)
    attention = {"kind": "dilated", "segment_lengths": [4, 8, 16], "dilation_rates": [1, 2, 4]}
    model = DecoderLM(ModelConfig(d_model=32, n_layers=2, n_heads=4, attention=attention))
    model = model.cuda()
    prompt = torch.randint(0, 256, (37,)).tolist()
    g = generate(model, prompt, 30, cache=policy, temperature=0, prefill=16, return_logits=True)
    full = model(torch.tensor([prompt + g.tokens], device="cuda"))[0]
    for i, step_logits in enumerate(g.logits):
        torch.testing.assert_close(step_logits[0], full[36 + i], atol=1e-4, rtol=1e-4)


def _gpu_check(*argv):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "tools" / "gpu_check.py"
    return subprocess.run(
        [sys.executable, str(script), *argv], capture_output=True, text=True, timeout=600
    )


def test_the_device_check_script_runs_on_the_cpu():
    done = _gpu_check("--device", "cpu", "--check-n", "40", "--max-n", "64", "--budget", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "parity: all within bounds" in done.stdout
    assert "folded" in done.stdout and "dilated" in done.stdout


@pytest.mark.gpu
@requires_cuda
def test_the_device_check_script_passes_on_cuda():
    done = _gpu_check("--device", "cuda", "--max-n", "65536", "--budget", "20")
    assert done.returncode == 0, done.stdout + done.stderr
