"""Memory beyond the training setup: capacity chosen at run time, the evicted-needle
flag of the retrieval evaluation, stores that grow, and the faiss index kept in step
with a store (exact when every list is probed; recall counted against brute force)."""

import json

import pytest
import torch

from longctx.data.tasks import Example
from longctx.evaluate.retrieval import evaluate_retrieval, exact_matches
from longctx.model.config import ModelConfig
from longctx.model.lm import DecoderLM
from longctx.nn import MemoryAttention, MemoryStore, torch_topk
from longctx.nn.retrieval import recall_at_k


def _model(capacity=64, window=8, **memory):
    torch.manual_seed(0)
    attention = {
        "kind": "memory",
        "window": window,
        "capacity": capacity,
        "separator": -1,
        "retrieval": "topk",
        "topk": 4,
        **memory,
    }
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, attention=attention)
    return DecoderLM(cfg).double()


def _tokens(B, N, seed=0):
    return torch.randint(0, 250, (B, N), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------- capacity


def test_capacity_override_changes_no_weights_and_equals_a_model_built_with_it():
    small, trained = _model(capacity=16), _model(capacity=64)
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    t = _tokens(2, 80)
    assert not torch.allclose(small(t), trained(t))  # 16 entries evict: a real difference
    trained.configure_memory(capacity=16)
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())
    torch.testing.assert_close(trained(t), small(t), atol=0, rtol=0)
    store = trained.new_state(2).layers[0].store
    assert store.capacity == 16


def test_a_store_larger_than_the_context_works_and_stays_small():
    fit, huge = _model(capacity=80), _model(capacity=10**7)
    t = _tokens(2, 80)
    torch.testing.assert_close(huge(t), fit(t), atol=0, rtol=0)
    state = huge.new_state(2)
    huge(t, state)
    store = state.layers[0].store
    assert store.capacity == 10**7 and store.k.shape[2] <= MemoryStore.FIRST_SLOTS
    assert store.size(0) == 80 - 80 % 8  # every completed window


def test_store_buffers_grow_and_keep_the_ring_order():
    store = MemoryStore(1, 1, 2, 10_000, torch.float64, "cpu")
    first = store.k.shape[2]
    n = first + 5
    k = torch.arange(n, dtype=torch.float64).view(1, 1, n, 1).expand(1, 1, n, 2)
    store.add(k, k, torch.arange(n))
    assert store.k.shape[2] >= n and store.size(0) == n
    ks, _, pos = store.entries(0)
    assert torch.equal(pos, torch.arange(n)) and torch.equal(ks[0, :, 0], k[0, 0, :, 0])


def test_configure_memory_errors():
    dense = DecoderLM(ModelConfig(d_model=32, n_layers=1, n_heads=2)).double()
    with pytest.raises(ValueError, match="no memory layers"):
        dense.configure_memory(capacity=8)
    with pytest.raises(ValueError, match="--memory-capacity applies to memory models"):
        evaluate_retrieval(dense, "passkey", [100], [0.5], 1, memory_capacity=64)
    model = _model()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="capacity must be an integer"):
            model.configure_memory(capacity=bad)
    with pytest.raises(ValueError, match="retrieval must be one of"):
        model.configure_memory(retrieval="hnsw")
    with pytest.raises(ValueError, match="integer >= 1 or 'fit'"):
        evaluate_retrieval(model, "passkey", [100], [0.5], 1, memory_capacity="all")


# ------------------------------------------------------------------- evicted flag


@pytest.mark.parametrize("shift, held", [(0, True), (-1, False), (1, True)])
def test_evicted_flag_at_the_capacity_boundary(shift, held):
    """The question's query (the prompt's last token, at position 43) reads memory
    holding the last C = 16 entries of the windows before its own (window 40..47):
    positions 24..39. A needle starting at 24 is held; at 23 it was evicted."""
    model = _model(capacity=16, window=8)
    prompt = _tokens(1, 44)[0].tolist()
    start = 40 - 16 + shift
    ex = Example(prompt=prompt, answer=[5, 6], depth=0.0, needle=(start, start + 4))
    (trial,) = exact_matches(model, [ex])
    assert trial.in_memory is held


def test_needle_in_the_current_window_is_not_evicted():
    model = _model(capacity=8, window=8)
    prompt = _tokens(1, 44)[0].tolist()
    ex = Example(prompt=prompt, answer=[5], depth=1.0, needle=(40, 43))
    assert exact_matches(model, [ex])[0].in_memory is True


def test_split_forward_of_the_evaluation_equals_one_forward():
    """The evaluation runs a memory model's prompt in two calls: its predictions are
    those of one forward over the whole sequence."""
    model = _model(capacity=16)
    seq = _tokens(2, 45)
    for _ in range(5):  # greedy decoding by full forwards
        seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], dim=1)
    examples = [Example(seq[r, :45].tolist(), seq[r, 45:].tolist(), 0.0, (0, 2)) for r in range(2)]
    assert all(t.correct for t in exact_matches(model, examples, batch=2))
    wrong = [Example(e.prompt, [*e.answer[:4], (e.answer[4] + 1) % 250], 0.0) for e in examples]
    assert not any(t.correct for t in exact_matches(model, wrong, batch=2))


def test_retrieval_eval_reports_evictions_and_fit_keeps_every_needle():
    model = _model(capacity=16, window=8)
    small = evaluate_retrieval(
        model, "kv-retrieval", [120], [0.0, 1.0], 2, progress=False, memory_capacity=16
    )
    cell0, cell1 = small["cells"]
    assert cell0["evicted"] == 2 and cell1["evicted"] == 0  # depth 0 is long gone
    entry = small["by_length"]["120"]
    assert entry["evicted"] == 2 and entry["trials_in_memory"] == 2
    assert entry["trials_in_memory"] + entry["trials_evicted"] == entry["trials"]
    assert small["warnings"] and "evicted" in small["warnings"][0]
    fit = evaluate_retrieval(
        model, "kv-retrieval", [120], [0.0, 1.0], 2, progress=False, memory_capacity="fit"
    )
    assert fit["by_length"]["120"]["evicted"] == 0 and not fit["warnings"]
    assert fit["memory"]["capacity"] == "fit"
    assert model.memory_layers()[0].capacity == 16  # restored
    json.dumps(fit)  # serialisable


# ---------------------------------------------------------------------- the index


def _filled_store(B=2, H=2, D=16, n=700, capacity=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    store = MemoryStore(B, H, D, capacity, torch.float32, "cpu")
    return store, g


def _write(store, g, n, B=2, H=2, D=16, start=0):
    k = torch.randn(B, H, n, D, generator=g)
    store.add(k, torch.randn(B, H, n, D, generator=g), torch.arange(start, start + n))


@pytest.mark.parametrize("kind", ["ivf", "flat"])
def test_index_probing_every_list_equals_exact_topk_through_evictions_and_clears(kind):
    pytest.importorskip("faiss")
    from longctx.nn.retrieval import FaissIndex

    store, g = _filled_store()
    store.index = FaissIndex(2, kind=kind, nprobe=10**6, exact_below=100)
    q = torch.randn(2, 2, 9, 16, generator=g)
    for step, n in enumerate([60, 90, 200, 300, 150]):  # crosses 100, regrows, wraps 512
        _write(store, g, n, start=step * 1000)
        if step == 3:
            store.clear([1])
        valid = store.valid[:, : store.filled]
        exact = torch_topk(store.k[:, :, : store.filled], valid, q, 8)
        found = store.index.search(store, q, 8)
        assert torch.equal(exact.sort(-1).values, found.sort(-1).values), step
    assert store.index.rows[0] is not None  # row 0 is searched through its index


def test_index_recall_is_counted_like_a_brute_force_count():
    pytest.importorskip("faiss")
    from longctx.nn.retrieval import FaissIndex

    store, g = _filled_store(capacity=4096)
    _write(store, g, 2000)
    store.index = FaissIndex(2, kind="ivf", nprobe=1, exact_below=0, recall_every=1)
    for row in range(2):
        store.index.build(store, row)
    q = torch.randn(2, 2, 40, 16, generator=g)
    found = store.index.search(store, q, 32)
    exact = torch_topk(store.k[:, :, :2000], store.valid[:, :2000], q, 32)
    hits = sum(
        len(set(e.tolist()) & set(f.tolist()))
        for e, f in zip(exact.reshape(-1, 32), found.reshape(-1, 32))
    )
    assert store.index.hits == hits and store.index.total == exact.numel()
    assert 0.0 < store.index.recall < 1.0  # one list of many: approximate
    assert recall_at_k(exact, exact) == (exact.numel(), exact.numel())


def test_layer_with_an_ivf_index_probing_everything_equals_topk():
    pytest.importorskip("faiss")
    from longctx.nn.retrieval import FaissIndex

    top = MemoryAttention(32, 4, retrieval="topk", topk=6, window=10)
    ivf = MemoryAttention(32, 4, retrieval="faiss", faiss_index="ivf", topk=6, window=10)
    ivf.load_state_dict(top.state_dict())
    x = torch.randn(2, 120, 32)
    mem_top = top.new_memory(2, 64)
    mem_ivf = ivf.new_memory(2, 64)
    mem_ivf.index = FaissIndex(2, kind="ivf", nprobe=10**6, exact_below=30)
    with torch.no_grad():
        for a in range(0, 120, 10):
            y_top = top(x[:, a : a + 10], start=a, memory=mem_top)
            y_ivf = ivf(x[:, a : a + 10], start=a, memory=mem_ivf)
            torch.testing.assert_close(y_ivf, y_top, atol=1e-5, rtol=1e-5)
    assert mem_ivf.index.rows[0] is not None


def test_a_model_with_faiss_retrieval_reports_recall_in_the_evaluation():
    pytest.importorskip("faiss")
    model = _model(capacity=256, window=8, topk=4)
    model.configure_memory(retrieval="faiss", faiss_index="ivf", nprobe=1, exact_below=32)
    res = evaluate_retrieval(model, "kv-retrieval", [200], [0.0], 2, progress=False)
    recall = res["memory"]["recall"]
    assert 0.0 <= recall <= 1.0 and res["memory"]["recall_queries"] > 0
    assert model.memory_layers()[0].recall_every == 0  # restored


def test_bench_memory_smoke(tmp_path, capsys):
    pytest.importorskip("faiss")
    from longctx import cli

    out = tmp_path / "bm"
    argv = ["bench", "memory", "--sizes", "256,512", "--windows", "1", "--decode", "2"]
    assert cli.main([*argv, "--exact-below", "128", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["retrieval"], r["entries"]) for r in rows] == [
        (m, n) for n in (256, 512) for m in ("dense", "topk", "ivf")
    ]
    assert all(r["eval_ms_per_token"] > 0 and r["decode_ms_per_token"] > 0 for r in rows)
    ivf = [r for r in rows if r["retrieval"] == "ivf"]
    assert all(0.0 <= r["recall"] <= 1.0 and r["index_bytes"] > 0 for r in ivf)
    assert (out / "memory.png").stat().st_size > 1000
    assert "recall" in capsys.readouterr().out
    assert cli.main([*argv, "--retrievals", "hnsw", "--out", str(out)]) == 2
    assert "unknown retrieval" in capsys.readouterr().err
    assert cli.main(["bench", "memory", "--sizes", "100", "--out", str(out)]) == 2
    assert "multiples of the memory window 64" in capsys.readouterr().err


def test_a_partly_grown_store_keeps_its_capacity_through_save_and_load(tmp_path):
    store = MemoryStore(1, 1, 2, 10_000, torch.float32, "cpu")
    g = torch.Generator().manual_seed(3)
    store.add(torch.randn(1, 1, 100, 2, generator=g), torch.randn(1, 1, 100, 2), torch.arange(100))
    assert store.k.shape[2] < store.capacity  # buffers smaller than the capacity
    store.save(tmp_path / "m.safetensors")
    again = MemoryStore.load(tmp_path / "m.safetensors")
    assert again.capacity == 10_000
    for a, b in zip(store.entries(0), again.entries(0), strict=True):
        assert torch.equal(a, b)
    more = torch.arange(100, 5000)
    k = torch.randn(1, 1, len(more), 2, generator=g)
    again.add(k, k, more)  # grows past the saved buffers
    assert again.size(0) == 5000 and torch.equal(again.entries(0)[2], torch.arange(5000))
