"""Memory attention and its store (longctx.nn.memory; docs/spec.md, section 5)."""

import builtins
import json

import pytest
import torch

from longctx.nn import (
    MemoryAttention,
    MemoryStore,
    MultiHeadAttention,
    document_rules,
    torch_topk,
)

F64 = torch.float64


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _pair(**kw):
    """A memory layer and a plain causal layer with the same weights."""
    mem = MemoryAttention(32, 4, **kw).double()
    full = MultiHeadAttention(32, 4, "dense").double()
    full.load_state_dict(mem.state_dict())
    return mem, full


def _windows(layer, x, window, memory, **kw):
    outs = []
    for a in range(0, x.shape[1], window):
        outs.append(layer(x[:, a : a + window], start=a, memory=memory, **kw))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("window", [1, 7, 16, 50])
def test_dense_absolute_equals_full_causal_attention(window):
    mem, full = _pair(retrieval="dense", positions="absolute")
    x = randn(2, 50, 32).requires_grad_()
    store = mem.new_memory(2, 64, F64, "cpu")
    got = _windows(mem, x, window, store)
    want = full(x)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    # gradients within each window (memory is read without gradient to past windows'
    # inputs: their keys were stored)
    g = randn(2, 50, 32, seed=1)
    (gx,) = torch.autograd.grad((got * g).sum(), x)
    assert torch.isfinite(gx).all()


@pytest.mark.parametrize("k", [50, 64, 1000])
def test_exact_topk_with_k_at_least_memory_equals_dense(k):
    dense, _ = _pair(retrieval="dense")
    top, _ = _pair(retrieval="topk", topk=k)
    top.load_state_dict(dense.state_dict())
    x = randn(2, 50, 32)
    a = _windows(dense, x, 10, dense.new_memory(2, 64, F64, "cpu"))
    b = _windows(top, x, 10, top.new_memory(2, 64, F64, "cpu"))
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("retrieval", ["dense", "topk"])
def test_reads_skip_unwritten_slots_without_changing_the_result(retrieval):
    mem, _ = _pair(retrieval=retrieval, topk=8)
    x = randn(2, 40, 32)
    big, exact = mem.new_memory(2, 1000, F64, "cpu"), mem.new_memory(2, 20, F64, "cpu")
    assert big.filled == 0
    for store in (big, exact):
        mem(x[:, :20], memory=store)
    assert big.filled == exact.filled == 20
    a = mem(x[:, 20:], start=20, memory=big, write=False)
    b = mem(x[:, 20:], start=20, memory=exact, write=False)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    exact.add(*(randn(2, 4, 5, 8, seed=s) for s in (1, 2)), torch.arange(20, 25))
    assert exact.filled == 20  # the ring wrapped: every slot is still in use
    big.clear([0])
    assert big.filled == 20  # row 1 still holds 20
    big.clear()
    assert big.filled == 0


def test_topk_selects_the_largest_inner_products():
    keys = randn(1, 2, 30, 8)
    valid = torch.ones(1, 30, dtype=torch.bool)
    valid[0, 5:9] = False
    q = randn(1, 2, 4, 8, seed=3)
    idx = torch_topk(keys, valid, q, 5)
    scores = torch.einsum("bhnd,bhcd->bhnc", q, keys).masked_fill(~valid[:, None, None], -1e9)
    want = scores.topk(5, dim=-1).indices
    assert torch.equal(idx.sort(-1).values, want.sort(-1).values)
    assert not bool(((idx >= 5) & (idx < 9)).any())
    few = torch_topk(keys, torch.arange(30).unsqueeze(0) < 3, q, 5)  # 3 valid < k
    assert bool((few[..., 3:] == -1).all()) and bool((few[..., :3] < 3).all())


def test_shuffling_memory_slots_changes_nothing():
    mem, _ = _pair(retrieval="dense")
    x = randn(1, 40, 32)
    store = mem.new_memory(1, 40, F64, "cpu")
    mem(x[:, :30], memory=store)  # fill 30 entries
    y = mem(x[:, 30:], start=30, memory=store, write=False)
    perm = torch.randperm(40)
    for name in ("k", "v"):
        setattr(store, name, getattr(store, name)[:, :, perm])
    for name in ("pos", "age", "valid"):
        setattr(store, name, getattr(store, name)[:, perm])
    y2 = mem(x[:, 30:], start=30, memory=store, write=False)
    torch.testing.assert_close(y, y2, atol=1e-12, rtol=0)


def test_batch_rows_never_see_each_others_memory():
    mem, _ = _pair(retrieval="dense")
    x = randn(2, 24, 32)
    store = mem.new_memory(2, 32, F64, "cpu")
    mem(x[:, :16], memory=store)
    y = mem(x[:, 16:], start=16, memory=store, write=False)
    # change row 1's history completely: row 0's output does not move
    x2 = x.clone()
    x2[1, :16] = randn(16, 32, seed=9)
    store2 = mem.new_memory(2, 32, F64, "cpu")
    mem(x2[:, :16], memory=store2)
    y2 = mem(x2[:, 16:], start=16, memory=store2, write=False)
    assert torch.equal(y[0], y2[0])
    assert not torch.allclose(y[1], y2[1])
    store.clear([1])  # clearing a row touches only that row
    y3 = mem(x[:, 16:], start=16, memory=store, write=False)
    assert torch.equal(y3[0], y[0])
    assert store.size(1) == 0 and store.size(0) == 16


def test_store_at_capacity_holds_exactly_the_last_c_entries():
    store = MemoryStore(2, 2, 4, capacity=10, dtype=F64, device="cpu")
    total = 0
    for n in (3, 4, 6, 12, 1):  # 26 entries in all, one write larger than C
        k = torch.arange(total, total + n, dtype=F64).view(1, 1, n, 1).expand(2, 2, n, 4)
        store.add(k, k + 0.5, torch.arange(total, total + n))
        total += n
    for row in range(2):
        k, v, pos = store.entries(row)
        assert pos.tolist() == list(range(16, 26))
        assert k[0, :, 0].tolist() == list(map(float, range(16, 26)))
        assert torch.equal(v, k + 0.5)
    keep = torch.tensor([[True, False, True], [False, False, False]])
    store.add(
        torch.zeros(2, 2, 3, 4, dtype=F64),
        torch.zeros(2, 2, 3, 4, dtype=F64),
        torch.tensor([26, 27, 28]),
        keep,
    )
    assert store.entries(0)[2].tolist() == [*range(18, 26), 26, 28]
    assert store.entries(1)[2].tolist() == list(range(16, 26))


def test_store_save_load_round_trip(tmp_path):
    store = MemoryStore(2, 3, 4, capacity=8, dtype=torch.float32, device="cpu")
    store.add(randn(2, 3, 11, 4).float(), randn(2, 3, 11, 4, seed=1).float(), torch.arange(11))
    store.clear([1])
    store.add(
        randn(2, 3, 2, 4).float(),
        randn(2, 3, 2, 4).float(),
        torch.arange(11, 13),
        torch.tensor([[False, False], [True, True]]),
    )
    store.save(tmp_path / "m.safetensors")
    again = MemoryStore.load(tmp_path / "m.safetensors")
    for row in range(2):
        for a, b in zip(store.entries(row), again.entries(row), strict=True):
            assert torch.equal(a, b)
    assert again.written == store.written and again.nbytes == store.nbytes
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="cannot read memory file"):
        MemoryStore.load(tmp_path / "bad.safetensors")


def test_memory_visible_hides_memory_from_queries():
    mem, _ = _pair(retrieval="dense")
    x = randn(1, 20, 32)
    store = mem.new_memory(1, 32, F64, "cpu")
    mem(x[:, :10], memory=store)
    vis = torch.tensor([[True] * 4 + [False] * 6])
    y = mem(x[:, 10:], start=10, memory=store, write=False, memory_visible=vis)
    alone = mem(x[:, 10:], start=10, memory=None)  # local attention only
    assert torch.allclose(y[:, 4:], alone[:, 4:], atol=1e-12)
    assert not torch.allclose(y[:, :4], alone[:, :4])


@pytest.mark.parametrize("positions", ["none", "zero"])
def test_relative_position_modes_ignore_where_memory_came_from(positions):
    """none/zero: memory keys carry no absolute position, so the same window after the
    same memory gives the same output whatever the absolute offset."""
    mem, _ = _pair(retrieval="dense", positions=positions)
    x = randn(1, 24, 32)
    outs = []
    for offset in (0, 1000):
        store = mem.new_memory(1, 32, F64, "cpu")
        mem(x[:, :12], start=offset, memory=store)
        outs.append(mem(x[:, 12:], start=offset + 12, memory=store, write=False))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-10, rtol=0)


def test_bad_options():
    with pytest.raises(ValueError, match="retrieval must be one of"):
        MemoryAttention(32, 4, retrieval="knn")
    with pytest.raises(ValueError, match="positions must be one of"):
        MemoryAttention(32, 4, positions="relative")
    with pytest.raises(ValueError, match="capacity"):
        MemoryStore(1, 1, 4, 0, F64, "cpu")
    store = MemoryStore(1, 2, 4, 4, F64, "cpu")
    with pytest.raises(ValueError, match="memory holds"):
        store.add(torch.zeros(1, 3, 2, 4), torch.zeros(1, 3, 2, 4), torch.arange(2))


def test_missing_faiss_names_the_extra(monkeypatch):
    real = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(ImportError, match=r"longctx\[faiss\]"):
        MemoryAttention(32, 4, retrieval="faiss")


def test_faiss_retrieval_matches_topk_attention():
    pytest.importorskip("faiss")
    top, _ = _pair(retrieval="topk", topk=6)
    fa, _ = _pair(retrieval="faiss", topk=6)
    fa.load_state_dict(top.state_dict())
    x = randn(1, 40, 32).float()
    top, fa = top.float(), fa.float()
    a = _windows(top, x, 10, top.new_memory(1, 64, torch.float32, "cpu"))
    b = _windows(fa, x, 10, fa.new_memory(1, 64, torch.float32, "cpu"))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------- the model


def _memory_model(ngram=1, **memory):
    """A 2-layer memory model with windows of 16; ``memory``: [model.attention] keys."""
    from longctx.model.config import ModelConfig
    from longctx.model.lm import DecoderLM

    torch.manual_seed(0)
    attention = {"kind": "memory", "window": 16, **memory}
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, ngram=ngram, attention=attention)
    return DecoderLM(cfg).double()


def _crossbatch(model, tokens, negatives):
    """The crossbatch training forward (memory layers read the previous window of their
    row and of ``negatives`` other rows)."""
    return model(tokens, model.new_state(tokens.shape[0], crossbatch=negatives))


def _tokens(B, N, seed=0):
    return torch.randint(0, 250, (B, N), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ngram", [1, 4])
@pytest.mark.parametrize("retrieval", ["dense", "topk"])
def test_model_window_by_window_equals_all_at_once(retrieval, ngram):
    model = _memory_model(layers=[1], retrieval=retrieval, topk=8, ngram=ngram)
    t = _tokens(2, 53)
    whole = model(t)
    state = model.new_state(2)
    parts = [model(t[:, a : a + 16], state, start=a) for a in range(0, 53, 16)]
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="multiple of 16"):
        model(t[:, :5], start=3)


@pytest.mark.parametrize("ngram", [1, 5])
@pytest.mark.parametrize("j", [0, 15, 16, 17, 40])
def test_model_is_causal_across_window_boundaries(j, ngram):
    model = _memory_model(layers=[0, 1], retrieval="dense", ngram=ngram)
    t = _tokens(2, 50)
    t2 = t.clone()
    t2[:, j:] = _tokens(2, 50 - j, seed=5)
    a, b = model(t), model(t2)
    torch.testing.assert_close(a[:, :j], b[:, :j], atol=1e-12, rtol=0)
    assert not torch.allclose(a[:, j], b[:, j])


def test_all_memory_layers_dense_absolute_equal_the_plain_model():
    """Every layer reading all earlier windows with absolute positions is full causal
    attention over the whole input: the same function as the model without memory."""
    from longctx.model.config import ModelConfig
    from longctx.model.lm import DecoderLM

    model = _memory_model(layers=[0, 1], retrieval="dense", positions="absolute")
    plain = DecoderLM(ModelConfig(d_model=32, n_layers=2, n_heads=2)).double()
    plain.load_state_dict(model.state_dict())
    t = _tokens(2, 70)
    torch.testing.assert_close(model(t), plain(t), atol=1e-10, rtol=0)


def test_document_separator_clears_the_row_and_hides_old_memory():
    model = _memory_model(layers=[1], retrieval="dense")
    t = _tokens(2, 48)
    t[0, 21] = 256  # row 0: a document ends inside the second window
    state = model.new_state(2)
    model(t, state)
    store = state.layers[1].store
    assert store.entries(0)[2].tolist() == list(range(22, 48))  # only the new document
    assert store.entries(1)[2].tolist() == list(range(48))
    visible, keep, clear = document_rules(t[:, 16:32], 256)
    assert visible[0].tolist() == [True] * 6 + [False] * 10 and bool(visible[1].all())
    assert keep[0].tolist() == [False] * 6 + [True] * 10 and clear == [0]
    # the new document's outputs do not depend on the old document (its window's tokens
    # after the separator see neither the old memory nor ... the old tokens beyond it)
    t2 = t.clone()
    t2[0, :16] = _tokens(1, 16, seed=7)  # a different first window of the old document
    a, b = model(t), model(t2)
    torch.testing.assert_close(a[0, 32:], b[0, 32:], atol=1e-12, rtol=0)


def test_memory_config_errors():
    from longctx.model.config import ModelConfig

    with pytest.raises(ValueError, match="distinct indices"):
        ModelConfig(n_layers=2, memory_layers=[2])
    with pytest.raises(ValueError, match="must be 'dense'"):
        ModelConfig(memory_layers=[0], attention="dilated")
    with pytest.raises(ValueError, match="memory_retrieval"):
        ModelConfig(memory_layers=[0], memory_retrieval="ann")


@pytest.mark.parametrize("ngram", [1, 3])
@pytest.mark.parametrize("prefill", [1, 5, 16, 100])
def test_model_generation_equals_the_full_forward(prefill, ngram):
    from longctx.model.generate import generate

    model = _memory_model(layers=[1], retrieval="dense", ngram=ngram)
    prompt = _tokens(2, 37)
    prompt[1, 20] = 256  # a document ends in row 1: memory cleared mid-prompt
    g = generate(model, prompt, 30, temperature=0, return_logits=True, prefill=prefill)
    full = model(torch.cat([prompt, g.batch], dim=1))
    for i, step_logits in enumerate(g.logits):
        torch.testing.assert_close(step_logits, full[:, 36 + i], atol=1e-10, rtol=0)
    again = generate(model, prompt, 30, temperature=0, cache="none")
    assert torch.equal(again.batch, g.batch)
    assert g.cache_bytes[-1] > 0


# ------------------------------------------------------------------------- crossbatch


@pytest.mark.parametrize("ngram", [1, 4])
def test_crossbatch_with_no_negatives_is_the_memory_forward_on_two_windows(ngram):
    model = _memory_model(layers=[1], positions="absolute", ngram=ngram)
    t = _tokens(3, 32)
    torch.testing.assert_close(_crossbatch(model, t, 0), model(t), atol=1e-12, rtol=0)


def _embedding_grads(model, t, negatives):
    outs = []

    def keep(module, inputs, out):
        out.retain_grad()
        outs.append(out)

    handle = model.embed.register_forward_hook(keep)
    try:
        logits = _crossbatch(model, t, negatives)
        logits[0, 16:].sum().backward()  # row 0, second window
    finally:
        handle.remove()
    return outs[0].grad[:, :16]  # first window's embeddings (B, 16, C)


def test_crossbatch_gradients_reach_the_negatives_memory_keys():
    model = _memory_model(layers=[1], positions="zero")
    t = _tokens(3, 32)
    g0 = _embedding_grads(model, t, 0)
    assert float(g0[0].abs().sum()) > 0  # the positive: own previous window
    assert float(g0[1:].abs().sum()) == 0  # no negatives, no gradient to other rows
    model.zero_grad()
    g2 = _embedding_grads(model, t, 2)
    assert float(g2[1].abs().sum()) > 0 and float(g2[2].abs().sum()) > 0
    # the first window has no memory: negatives change nothing there
    a, b = _crossbatch(model, t, 0), _crossbatch(model, t, 2)
    assert torch.equal(a[:, :16], b[:, :16]) and not torch.allclose(a[:, 16:], b[:, 16:])
    with pytest.raises(ValueError, match="negatives must be in"):
        _crossbatch(model, t, 3)


def test_crossbatch_schedule_and_config_errors():
    from longctx.train.config import CrossbatchConfig, resolve_config

    cb = CrossbatchConfig(negatives=6, start=1, ramp_steps=10)
    assert [cb.at(s) for s in (0, 5, 10, 50)] == [1, 3, 6, 6]
    late = CrossbatchConfig(negatives=6, start=0, ramp_steps=6, delay_steps=100)
    assert [late.at(s) for s in (0, 99, 100, 103, 106, 500)] == [0, 0, 0, 3, 6, 6]
    assert CrossbatchConfig(negatives=4, delay_steps=10).at(9) == 0  # no ramp: a step
    with pytest.raises(ValueError, match="delay_steps must be >= 0"):
        CrossbatchConfig(negatives=4, delay_steps=-1)
    assert CrossbatchConfig().at(3) is None
    with pytest.raises(ValueError, match="memory layers"):
        resolve_config("tiny", None, ["train.crossbatch.negatives=2"])
    with pytest.raises(ValueError, match="must be < train.batch_size"):
        resolve_config("tiny", None, ["model.memory_layers=[1]", "train.crossbatch.negatives=16"])
    with pytest.raises(ValueError, match="start"):
        CrossbatchConfig(negatives=1, start=2)


def test_crossbatch_training_runs_and_logs(tmp_path):
    import json

    from longctx.train import prepare_run, resolve_config, train

    overrides = [
        "model.d_model=32",
        "model.n_layers=2",
        "model.n_heads=2",
        "model.memory_layers=[1]",
        "model.memory_window=32",
        "train.context=96",
        "train.batch_size=4",
        "train.max_steps=4",
        "train.log_every=1",
        "train.eval_every=0",
        "train.eval_windows=2",
        "train.crossbatch.negatives=3",
        "train.crossbatch.start=1",
        "train.crossbatch.ramp_steps=3",
    ]
    cfg = resolve_config("tiny", None, overrides)
    prepare_run(tmp_path / "run", cfg, False)
    result = train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["crossbatch_negatives"] for r in rows if "loss" in r] == [1, 1, 2, 3]
    assert result.val_bpb == result.val_bpb


# ------------------------------------------------------------------- retrieval tasks


def test_task_examples_have_exact_lengths_and_answers():
    import random

    from longctx.data.tasks import make_example
    from longctx.data.tokenizer import decode

    rng = random.Random(0)
    for task in ("passkey", "kv-retrieval"):
        for length in (120, 1000, 4097):
            for depth in (0.0, 0.5, 1.0):
                e = make_example(task, length, depth, rng)
                assert len(e.prompt) + len(e.answer) == length
                text, answer = decode(e.prompt), decode(e.answer)
                if task == "passkey":
                    assert f"pass key is {answer}." in text and text.endswith("pass key is ")
                else:
                    key = text[-5:-1]
                    assert text.count(f"{key}=") == 2 and f"{key}={answer};" in text
                assert abs(e.depth - depth) < 0.1 or length < 200
    with pytest.raises(ValueError, match="must be >= "):
        make_example("passkey", 50, 0.5, rng)
    with pytest.raises(ValueError, match="unknown task"):
        make_example("needle", 100, 0.5, rng)
    with pytest.raises(ValueError, match="depth"):
        make_example("passkey", 1000, 1.5, rng)


def test_wilson_interval():
    from longctx.evaluate.retrieval import wilson_interval

    lo, hi = wilson_interval(95, 100)
    assert 0.8872 < lo < 0.8884 and 0.9780 < hi < 0.9792  # 0.8882, 0.9785
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] > 1 - 1e-12


def test_exact_match_accepts_exactly_the_greedy_answer():
    from longctx.data.tasks import Example
    from longctx.evaluate.retrieval import exact_matches

    class Copy(torch.nn.Module):  # predicts "the next token is the current token + 1"
        embed = torch.nn.Embedding(300, 1)

        def memory_layers(self):
            return []

        def hidden_states(self, tokens):
            return torch.nn.functional.one_hot((tokens + 1) % 300, 300).float()

        def head(self, x):
            return x

    model = Copy()
    good = Example(prompt=[5, 6, 7], answer=[8, 9], depth=0)
    bad = Example(prompt=[5, 6, 7], answer=[8, 10], depth=0)
    trials = exact_matches(model, [good, bad])
    assert [t.correct for t in trials] == [True, False]
    assert [t.in_memory for t in trials] == [None, None]  # no memory layers


def test_retrieval_eval_cli_writes_json_and_heatmap(tmp_path, capsys):
    import json

    from longctx import cli
    from longctx.train import prepare_run, resolve_config, train

    cfg = resolve_config(
        "tiny",
        None,
        [
            "model.d_model=32",
            "model.n_layers=2",
            "model.n_heads=2",
            "model.memory_layers=[1]",
            "model.memory_window=64",
            "train.context=64",
            "train.batch_size=2",
            "train.max_steps=1",
            "train.eval_windows=2",
        ],
    )
    prepare_run(tmp_path / "run", cfg, False)
    train(cfg, tmp_path / "run", progress=False)
    argv = ["eval", str(tmp_path / "run"), "--task", "kv-retrieval", "--lengths", "64,200"]
    assert cli.main([*argv, "--depths", "0,1", "--trials", "3"]) == 0
    out = json.loads((tmp_path / "run" / "eval" / "kv_retrieval.json").read_text())
    assert [(c["length"], c["depth"], c["trials"]) for c in out["cells"]] == [
        (64, 0.0, 3),
        (64, 1.0, 3),
        (200, 0.0, 3),
        (200, 1.0, 3),
    ]
    assert all(0 <= c["ci95"][0] <= c["accuracy"] <= c["ci95"][1] <= 1 for c in out["cells"])
    assert (tmp_path / "run" / "eval" / "kv_retrieval.png").stat().st_size > 1000
    assert "95% Wilson interval" in capsys.readouterr().out
    assert out["by_length"]["200"]["evicted"] == 0 and not out["warnings"]

    # a capacity below the context: depth-0 needles are evicted, and it says so
    small = [*argv, "--depths", "0,1", "--trials", "2", "--memory-capacity", "64"]
    first = (tmp_path / "run" / "eval" / "kv_retrieval.json").read_text()
    assert cli.main(small) == 0
    captured = capsys.readouterr()
    # other memory settings write their own files; the first result is kept
    assert (tmp_path / "run" / "eval" / "kv_retrieval.json").read_text() == first
    assert (tmp_path / "run" / "eval" / "kv_retrieval.capacity-64.png").exists()
    out = json.loads((tmp_path / "run" / "eval" / "kv_retrieval.capacity-64.json").read_text())
    assert out["memory"]["capacity"] == 64
    assert out["by_length"]["200"]["evicted"] == 2 and out["by_length"]["64"]["evicted"] == 0
    assert "evicted" in captured.err and "--memory-capacity fit" in captured.err
    assert "needle in memory" in captured.out
    with pytest.raises(SystemExit):
        cli.main([*argv, "--memory-capacity", "lots"])
    assert "integer >= 1 or 'fit'" in capsys.readouterr().err
    bpb = ["eval", str(tmp_path / "run"), "--contexts", "64,128", "--windows", "2"]
    assert cli.main([*bpb, "--memory-capacity", "fit"]) == 0
    printed = capsys.readouterr().out
    assert "context     128" in printed and "eval.capacity-fit.json" in printed
    assert (tmp_path / "run" / "eval" / "bpb_by_position.capacity-fit.png").exists()
    gen = ["generate", str(tmp_path / "run"), "--prompt", "abc=1234;", "--max-new-tokens", "3"]
    assert cli.main([*gen, "--memory-capacity", "fit", "--memory-retrieval", "topk"]) == 0


# ------------------------------------------------------------- kv-retrieval training data


@pytest.mark.parametrize("targets", ["answer", "question"])
def test_kv_training_example_targets_are_the_questions_values(targets):
    import random

    from longctx.data.tasks import kv_training_example

    x, y = kv_training_example(300, 64, random.Random(1), targets=targets)
    assert len(x) == len(y) == 300
    text = bytes(x).decode()
    records = dict(r.split("=") for r in text.split(";")[:-1] if r and r[0] != "?" and "=" in r)
    questions = [i for i, c in enumerate(text) if c == "?"]
    assert questions and min(questions) >= 64  # none in the first window
    marked = sorted(j for j in range(300) if y[j] >= 0)
    expected = []
    for i in questions:
        if i + 10 > 300:
            continue
        key, value = text[i + 1 : i + 5], text[i + 6 : i + 10]
        assert records[key] == value  # a question repeats an earlier record
        first = i + 1 if targets == "question" else i + 5  # y[t] is the token at t + 1
        expected += list(range(first, i + 9))
        for j in range(first, i + 9):
            assert y[j] == x[j + 1]
    assert marked[: len(expected)] == expected


@pytest.mark.parametrize("local", [0.0, 1.0])
def test_kv_training_questions_come_from_memory_or_the_local_window(local):
    import random

    from longctx.data.tasks import kv_training_example

    W = 64
    for seed in range(5):
        x, _ = kv_training_example(256, W, random.Random(seed), local_fraction=local)
        text = bytes(x).decode()
        starts, i = [], 0  # record starts, scanning item by item
        while i < len(text):
            if text[i] == "?":
                if i + 5 <= len(text):
                    where = text.index(text[i + 1 : i + 5] + "=")  # the record
                    near = [s for s in starts if s >= i - W]
                    far = [s for s in starts if s < i - W]
                    if near if local else far:  # else any record (nothing to choose)
                        assert (where >= i - W) == bool(local)
                i += 11
            else:
                starts.append(i)
                i += 10


@pytest.mark.parametrize("near", [0.0, 0.5, 1.0])
def test_kv_training_near_keys_differ_from_an_earlier_key_in_one_letter(near):
    import random

    from longctx.data.tasks import kv_training_example

    close, total = 0, 0
    for seed in range(20):
        x, y = kv_training_example(400, 64, random.Random(seed), near_fraction=near)
        text = bytes(x).decode()
        keys = [r.split("=")[0] for r in text.split(";")[:-1] if r and r[0] != "?"]
        keys = [k for k in keys if len(k) == 4]
        assert len(set(keys)) == len(keys)  # still distinct
        for i, k in enumerate(keys[1:], 1):
            close += any(sum(a != b for a, b in zip(k, e)) == 1 for e in keys[:i])
            total += 1
        # questions still repeat their record's value (the targets are right)
        records = dict(r.split("=") for r in text.split(";")[:-1] if r and r[0] != "?")
        for q in text.split("?")[1:]:
            if len(q) >= 9:
                assert records[q[:4]] == q[5:9]
    if near == 0.0:
        assert close / total < 0.05  # random keys: a 1-letter neighbour is rare
    else:
        assert abs(close / total - near) < 0.1
    base = kv_training_example(400, 64, random.Random(3))
    assert kv_training_example(400, 64, random.Random(3), near_fraction=0.0) == base


def test_task_data_is_deterministic_and_checks_its_options():
    from longctx.data import DataConfig
    from longctx.data.tasks import TaskData, kv_training_example, task_source

    data = TaskData("kv-retrieval", 32)
    a, b = data.batch(3, 96, 0, 5), data.batch(3, 96, 0, 5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], data.batch(3, 96, 0, 6)[0])
    assert a[0].shape == a[1].shape == (3, 96) and a[0].dtype == torch.int64
    assert 3.0 < data.chance_bits(256) < 3.33  # digits: about log2(10) bits
    assert task_source("task:kv-retrieval") == "kv-retrieval" and task_source("stdlib") is None
    with pytest.raises(ValueError, match="trainable tasks"):
        TaskData("passkey", 32)
    with pytest.raises(ValueError, match="window"):
        kv_training_example(64, 64, __import__("random").Random(0))
    with pytest.raises(ValueError, match="targets"):
        kv_training_example(128, 64, __import__("random").Random(0), targets="all")
    with pytest.raises(ValueError, match="task_local"):
        DataConfig(task_local=1.5)
    with pytest.raises(ValueError, match="task_near"):
        DataConfig(task_near=-0.1)
    with pytest.raises(ValueError, match="near_fraction"):
        kv_training_example(128, 64, __import__("random").Random(0), near_fraction=2)
    with pytest.raises(ValueError, match="task_targets"):
        DataConfig(task_targets="everything")


def test_training_on_the_kv_task_source(tmp_path, capsys):
    from longctx import cli
    from longctx.evaluate import evaluate_run
    from longctx.train import prepare_run, resolve_config, train

    cfg = resolve_config(
        "memory-tiny",
        None,
        [
            "model.d_model=32",
            "model.n_layers=2",
            "model.n_heads=2",
            "model.memory_window=32",
            "data.task_window=32",
            "train.context=64",
            "train.batch_size=4",
            "train.max_steps=3",
            "train.max_minutes=0",
            "train.eval_windows=4",
            "train.crossbatch.negatives=2",
            "train.crossbatch.delay_steps=1",
            "train.crossbatch.ramp_steps=1",
            "train.log_every=1",
        ],
    )
    run = tmp_path / "run"
    prepare_run(run, cfg, False)
    result = train(cfg, run, progress=False)
    assert result.step == 3 and result.unit == "bits/target token"
    assert result.baseline == "no-retrieval chance"
    assert 0 < result.val_bpb < 20 and 3.0 < result.unigram_bpb < 5.0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    expected = [cfg.train.crossbatch.at(s) for s in range(3)]
    assert expected == [0, 0, 2]  # held at 0 for the delay, then ramped
    assert [r.get("crossbatch_negatives") for r in rows if "loss" in r] == expected
    with pytest.raises(ValueError, match="--task kv-retrieval"):
        evaluate_run(run)
    cli._after_training_eval(run, trials=2)  # a short kv-retrieval evaluation, not bits per byte
    assert "kv-retrieval exact match" in capsys.readouterr().out
    assert (run / "eval" / "kv_retrieval.json").exists()
