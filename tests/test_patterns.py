"""Attention patterns as registered objects: a user-defined pattern trains, evaluates and
generates; the README's example runs; configs and runs of longctx 0.1 still load; every
loss term reaches both the single-process and the sequence-parallel step, or is refused."""

import dataclasses
import json
import re
import shutil
import warnings
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from conftest import check_against_reference, make_qkv
from longctx import cli, ops
from longctx.model import DecoderLM, ModelConfig, generate, latest_checkpoint, load_model
from longctx.nn import MultiHeadAttention, Pattern, make_pattern, pattern_names, register_pattern
from longctx.ops import reference as ref
from longctx.train import RunConfig, prepare_run, resolve_config, train

F64 = torch.float64
FIXTURES = Path(__file__).parent / "fixtures" / "runs-0.1"


@register_pattern
@dataclasses.dataclass
class Strided(Pattern):
    """Test pattern (mask only): a query sees the ``local`` keys up to itself and every
    ``stride``-th key before them (the 'fixed' pattern of Sparse Transformers)."""

    kind: ClassVar[str] = "test_strided"
    stride: int = 4
    local: int = 3

    def mask(self, q_pos, k_pos):
        gap = q_pos[:, None] - k_pos[None, :]
        return (gap < self.local) | (gap % self.stride == 0)


def _strided_model(**kw):
    torch.manual_seed(0)
    attention = {"kind": "test_strided", "stride": 3, "local": 2}
    return DecoderLM(ModelConfig(d_model=32, n_layers=2, n_heads=2, attention=attention, **kw))


def test_a_registered_pattern_is_found_by_name_with_its_keys_checked():
    assert "test_strided" in pattern_names()
    p = make_pattern({"kind": "test_strided", "stride": 5})
    assert isinstance(p, Strided) and p.stride == 5 and p.local == 3
    assert p.to_dict() == {"kind": "test_strided", "stride": 5, "local": 3}
    with pytest.raises(ValueError, match=r"model.attention.strid.*valid keys.*local, stride"):
        make_pattern({"kind": "test_strided", "strid": 2}, "model.attention")
    with pytest.raises(ValueError, match="model.attention must be one of"):
        ModelConfig(attention="no_such_pattern")
    with pytest.raises(TypeError, match="dataclass"):
        register_pattern(type("NotADataclass", (Pattern,), {"kind": "x"}))
    with pytest.raises(TypeError, match="kind"):
        register_pattern(dataclasses.dataclass(type("NoKind", (Pattern,), {})))


@pytest.mark.parametrize("n", [1, 7, 40])
def test_the_generic_kernel_equals_the_masked_reference(n):
    pattern = make_pattern({"kind": "test_strided", "stride": 3, "local": 2})
    q, k, v = make_qkv(2, 3, n, n, 8)
    pos = torch.arange(n)
    mask = pattern.mask(pos, pos) & (pos[None, :] <= pos[:, None])
    # the kernel returns out only; the reference's lse is not compared (no lse gradient)
    check_against_reference(
        lambda q, k, v: (pattern.kernel(q, k, v), torch.zeros(q.shape[:3], dtype=q.dtype)),
        lambda q, k, v: (ref.masked_attention(q, k, v, mask)[0], torch.zeros(q.shape[:3])),
        q,
        k,
        v,
        F64,
        lse_grads=(False,),
    )
    flops = pattern.flops(n, 3, 8)
    assert flops == 4 * 8 * 3 * int(mask.sum())


def test_a_user_pattern_trains_evaluates_and_generates_exactly(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x * 2\n" * 400)
    cfg = resolve_config(
        "tiny",
        None,
        [
            "model.d_model=32",
            "model.n_layers=2",
            "model.n_heads=2",
            "model.attention={'kind': 'test_strided', 'stride': 3, 'local': 2}",
            "train.context=48",
            "train.batch_size=4",
            "train.max_steps=3",
            "train.eval_windows=4",
            "train.max_minutes=0",
            f"data.source={corpus}",
        ],
    )
    run = tmp_path / "run"
    prepare_run(run, cfg, False)
    result = train(cfg, run, progress=False)
    assert result.step == 3 and 0 < result.val_bpb < 20
    assert json.loads((run / "config.json").read_text())["model"]["attention"] == {
        "kind": "test_strided",
        "stride": 3,
        "local": 2,
    }
    assert cli.main(["eval", str(run), "--contexts", "48,96", "--windows", "2"]) == 0
    model, _ = load_model(latest_checkpoint(run / "checkpoints"))
    assert isinstance(model.cfg.attention, Strided)
    model = model.double()
    prompt = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(3))
    for prefill in (1, 5, 64):
        g = generate(model, prompt, 20, temperature=0, return_logits=True, prefill=prefill)
        full = model(torch.cat([prompt, g.batch], dim=1))
        for i, step_logits in enumerate(g.logits):
            torch.testing.assert_close(step_logits, full[:, 12 + i], atol=1e-10, rtol=0)


def test_a_user_pattern_is_causal_and_counts_its_flops():
    model = _strided_model().double()
    t = torch.randint(0, 250, (1, 30), generator=torch.Generator().manual_seed(0))
    t2 = t.clone()
    t2[0, 17] += 1
    a, b = model(t), model(t2)
    assert torch.equal(a[:, :17], b[:, :17]) and not torch.allclose(a[:, 17], b[:, 17])
    attn = model.flops_per_token(64)["attention_forward"]
    assert attn == pytest.approx(2 * model.cfg.attention.flops(64, 2, 16) / 64)
    dense = DecoderLM(ModelConfig(d_model=32, n_layers=2, n_heads=2))
    assert attn < dense.flops_per_token(64)["attention_forward"]


def _readme_example() -> str:
    text = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    example = [b for b in blocks if "@register_pattern" in b]
    assert len(example) == 1, "the README shows one pattern-registration example"
    return example[0]


def test_the_readme_pattern_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_readme_example(), "README.md", "exec"), namespace)
    assert "generation" in namespace  # the example ends by generating


def test_multi_head_attention_takes_a_pattern_by_name_and_decodes():
    torch.manual_seed(0)
    attn = MultiHeadAttention(32, 4, "dilated", segment_lengths=[4, 8], dilation_rates=[1, 2])
    attn = attn.double()
    x = torch.randn(2, 20, 32, dtype=F64)
    full = attn(x)
    state = attn.new_state(2, 20)
    parts = [attn(x[:, :8], state=state)]  # a prefill chunk, then token by token
    parts += [attn(x[:, t : t + 1], state=state) for t in range(8, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="given by name"):
        MultiHeadAttention(32, 4, {"kind": "dilated"}, window=3)


# ------------------------------------------------------------------- older formats


def _old_run(tmp_path, name):
    run = tmp_path / name
    shutil.copytree(FIXTURES / name, run)
    return run


def test_flat_keys_of_0_1_are_translated_with_a_note():
    with pytest.warns(FutureWarning, match="flat keys of longctx 0.1"):
        cfg = ModelConfig(attention="dilated", segment_lengths=[4, 8], dilation_rates=[1, 2])
    assert cfg.attention == make_pattern(
        {"kind": "dilated", "segment_lengths": [4, 8], "dilation_rates": [1, 2]}
    )
    with pytest.warns(FutureWarning):
        cfg = ModelConfig(memory_layers=[1], memory_window=32, n_layers=2)
    assert cfg.attention.kind == "memory" and cfg.attention.window == 32
    with pytest.warns(FutureWarning, match="ModelConfig.memory_window is deprecated"):
        assert cfg.memory_window == 32
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="set as model.colt5_window"):
        ModelConfig(attention="colt5", colt5_window=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the nested form raises no note
        ModelConfig(attention={"kind": "sliding_window", "window": 8})
        ModelConfig(attention="colt5", ffn="colt5")


def test_a_future_format_version_is_a_clear_error(tmp_path):
    data = RunConfig().to_dict()
    assert data["format_version"] == 2
    data["format_version"] = 99
    with pytest.raises(ValueError, match="format version 99.*newer longctx"):
        RunConfig.from_dict(data)
    run = _old_run(tmp_path, "dilated")
    state_path = latest_checkpoint(run / "checkpoints") / "state.json"
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({**state, "format_version": 3}))
    with pytest.raises(ValueError, match="format version 3"):
        load_model(state_path.parent)


@pytest.mark.parametrize("name", ["dilated", "memory"])
def test_runs_of_0_1_load_and_compute_what_0_1_computed(tmp_path, name):
    from safetensors.torch import load_file

    run = _old_run(tmp_path, name)
    with pytest.warns(FutureWarning):
        model, state = load_model(latest_checkpoint(run / "checkpoints"))
    assert "format_version" not in state
    expected = load_file(str(run / "expected.safetensors"))
    with torch.no_grad():
        logits = model.eval()(expected["tokens"])
    torch.testing.assert_close(logits, expected["logits"], atol=2e-5, rtol=1e-4)
    kind = {"dilated": "dilated", "memory": "memory"}[name]
    assert model.cfg.attention.kind == kind


def test_a_run_of_0_1_evaluates_generates_and_resumes(tmp_path, capsys):
    run = _old_run(tmp_path, "dilated")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert cli.main(["info", str(run)]) == 0
        assert "attention dilated" in capsys.readouterr().out
        assert cli.main(["eval", str(run), "--contexts", "32", "--windows", "2"]) == 0
        argv = ["generate", str(run), "--prompt", "def", "--max-new-tokens", "5"]
        assert cli.main([*argv, "--cache", "dilated"]) == 0
        assert cli.main(["train", "--resume", "--out", str(run), "--no-eval",
                         "--set", "train.max_steps=3"]) == 0  # fmt: skip
    config = json.loads((run / "config.json").read_text())
    assert config["format_version"] == 2 and config["model"]["attention"]["kind"] == "dilated"
    assert (
        json.loads((run / "checkpoints" / "step-00000003" / "state.json").read_text())[
            "format_version"
        ]
        == 2
    )
    memory = _old_run(tmp_path, "memory")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        cfg = prepare_run(memory, None, True)
        assert cfg.data.task_window == 16  # 0.1 used the model's memory window
        argv = ["eval", str(memory), "--task", "kv-retrieval", "--lengths", "64"]
        assert cli.main([*argv, "--depths", "0.5", "--trials", "1"]) == 0


# ------------------------------------------------------------------- loss terms


def test_loss_terms_hold_every_term_of_the_objective():
    torch.manual_seed(0)
    colt5 = DecoderLM(ModelConfig(d_model=32, n_layers=1, n_heads=4, ffn="colt5"))
    t = torch.randint(0, 256, (2, 17))
    terms = colt5.loss_terms(t[:, :-1], t[:, 1:])
    assert terms.router_aux is not None and float(terms.router_aux.detach()) > 0
    torch.testing.assert_close(terms.total, terms.lm + 0.01 * terms.router_aux)
    half = colt5.loss_terms(t[:, :-1], t[:, 1:], normalizer=2 * t[:, 1:].numel())
    torch.testing.assert_close(half.lm, terms.lm / 2)
    memory = DecoderLM(
        ModelConfig(d_model=32, n_layers=2, n_heads=2, attention={"kind": "memory", "window": 8})
    )
    t = torch.randint(0, 256, (3, 25))
    plain = memory.loss_terms(t[:, :-1], t[:, 1:])
    cross = memory.loss_terms(t[:, :-1], t[:, 1:], state=memory.new_state(3, crossbatch=2))
    assert plain.router_aux is None and not torch.allclose(plain.lm, cross.lm)
    with pytest.raises(ValueError, match="crossbatch training needs a model with memory layers"):
        colt5.new_state(2, crossbatch=1)
    routed = DecoderLM(ModelConfig(d_model=32, n_layers=1, n_heads=4, attention="colt5"))
    with pytest.raises(ValueError, match="needs a model with memory layers.*'colt5'"):
        routed.new_state(2, crossbatch=1)
    with pytest.raises(ValueError, match="unknown cache policy 'paged'"):
        routed.new_state(2, cache="paged")


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["model.ffn='colt5'"], "does not support CoLT5 routing"),
        (["model.attention='colt5'"], "does not support CoLT5"),
        (["model.attention={'kind': 'memory', 'layers': [0]}"], "does not support memory"),
        (["model.ngram=3"], "not supported with sequence parallelism"),
    ],
)
def test_sequence_parallelism_refuses_what_a_shard_cannot_compute(overrides, match):
    from longctx.distributed.training import check_model

    cfg = resolve_config("tiny", None, overrides)
    with pytest.raises(ValueError, match=match):
        check_model(None, cfg.model, cfg.train.context, strategy="ulysses")


def test_parallelize_walks_any_module_and_asks_each_layer():
    from longctx.distributed import SequenceParallel

    class Group:  # enough of an SPGroup for building kernels
        size, rank = 2, 0

    sp = SequenceParallel(Group(), "ulysses")
    outer = torch.nn.Sequential(MultiHeadAttention(16, 2, "sliding_window", window=4))
    before = outer[0].kernel
    sp.parallelize(outer)
    assert outer[0].kernel is not before  # now the distributed kernel
    from longctx.nn import ConditionalFeedForward

    with pytest.raises(ValueError, match="CoLT5 routing"):
        sp.parallelize(torch.nn.Sequential(ConditionalFeedForward(16, 16, causal=True)))
    with pytest.raises(ValueError, match="strategies that do: longnet, ulysses"):
        SequenceParallel(Group(), "ring").parallelize(MultiHeadAttention(16, 2, "dilated"))


def test_the_cli_imports_a_module_that_registers_a_pattern(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_patterns.py").write_text(
        "import dataclasses\n"
        "from typing import ClassVar\n"
        "from longctx.nn import Pattern, register_pattern\n\n"
        "@register_pattern\n"
        "@dataclasses.dataclass\n"
        "class Banded(Pattern):\n"
        "    kind: ClassVar[str] = 'cli_banded'\n"
        "    width: int = 4\n\n"
        "    def mask(self, q_pos, k_pos):\n"
        "        return q_pos[:, None] - k_pos[None, :] < self.width\n"
    )
    (tmp_path / "corpus.txt").write_text("abc def ghi\n" * 300)
    monkeypatch.chdir(tmp_path)
    sets = ["model.attention=cli_banded", "model.d_model=16", "model.n_layers=1"]
    sets += ["model.n_heads=2", "train.context=32", "train.batch_size=2", "train.max_steps=2"]
    sets += ["train.eval_windows=2", "train.max_minutes=0", "data.source=corpus.txt"]
    argv = ["train", "--out", "run", "--no-eval", *sum((["--set", s] for s in sets), [])]
    assert cli.main(argv) == 2  # not registered yet
    assert "longctx --import MODULE" in capsys.readouterr().err
    assert cli.main(["--import", "my_patterns", *argv]) == 0
    assert cli.main(["--import", "my_patterns", "eval", "run", "--windows", "2"]) == 0
    assert cli.main(["--import", "no_such_module", "info", "run"]) == 2
    assert "--import no_such_module" in capsys.readouterr().err


# ------------------------------------------------------------------- hot path, helpers


@pytest.mark.parametrize(
    "op",
    [
        lambda q, k, v: ops.attention(q, k, v, causal=True, return_lse=True),
        lambda q, k, v: ops.chunked_attention(q, k, v, causal=True, chunk_size=7),
        lambda q, k, v: ops.sliding_window_attention(q, k, v, 5),
        lambda q, k, v: ops.dilated_attention(q, k, v, [4, 8, 16], [1, 2, 4], causal=True),
        lambda q, k, v: ops.masked_attention(q, k, v, torch.rand(30, 30) < 0.5),
    ],
    ids=["dense", "chunked", "sliding", "dilated", "masked"],
)
def test_the_attention_hot_path_never_reads_a_tensor_on_the_host(op, monkeypatch):
    """What the plan runner needs to know (e.g. where a tile writes first) comes from the
    plan, so forward and backward run without converting a tensor to a Python value."""
    q, k, v = (t.float().requires_grad_() for t in make_qkv(1, 2, 30, 30, 8))

    def refuse(*args, **kwargs):
        raise AssertionError("a host sync in the attention hot path")

    for name in ("__bool__", "__int__", "__float__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    out = op(q, k, v)
    out = out[0] if isinstance(out, tuple) else out
    out.sum().backward()


def test_merge_into_a_fresh_region_equals_the_copy_exactly():
    from longctx.ops.lowlevel import merge_into

    g = torch.Generator().manual_seed(0)
    out = torch.randn(2, 3, 5, 4, generator=g)
    lse = torch.randn(2, 3, 5, generator=g)
    lse[0, 0, 1] = float("-inf")  # an empty row
    out[0, 0, 1] = 0.0
    acc_out, acc_lse = torch.zeros(2, 3, 5, 4), torch.full((2, 3, 5), float("-inf"))
    merge_into(acc_out, acc_lse, out.clone(), lse.clone(), first=False)
    assert torch.equal(acc_out, out) and torch.equal(acc_lse, lse)
    copy_out, copy_lse = torch.zeros(2, 3, 5, 4), torch.full((2, 3, 5), float("-inf"))
    merge_into(copy_out, copy_lse, out.clone(), lse.clone(), first=True)
    assert torch.equal(copy_out, acc_out) and torch.equal(copy_lse, acc_lse)


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_in_a_log():
    import io

    from longctx._util import Progress

    log = io.StringIO()
    with Progress(100, "train", unit="step", interval=0.0, stream=log) as bar:
        for _ in range(3):
            bar.update(1, loss="1.0")
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and lines[0].startswith("train: 1/100 step (loss=1.0)")
    assert len(lines) == 3  # one per update (interval 0); the end repeats none
    quiet = io.StringIO()
    with Progress(100, "train", stream=quiet) as bar:
        bar.update(1)  # within the 30 s interval: nothing until the end
        assert quiet.getvalue() == ""
    assert quiet.getvalue().count("\n") == 1
