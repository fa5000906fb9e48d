"""The RETRO database: document-aligned chunks, continuations, frozen embedders, exact
search with exclusions, corrupt/mismatched databases, the chunk overlap r(C) and the
copyable tokens."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import write_word_corpus
from longctx.data.tokenizer import EOD, PAD
from longctx.model import DecoderLM, ModelConfig
from longctx.retro import (
    DatabaseError,
    RetroDB,
    SketchEmbedder,
    chunk_overlap,
    copyable,
    document_chunks,
    longest_common_run,
    make_embedder,
)

M = 8


@pytest.fixture
def corpus(tmp_path):
    """A directory of small text files (documents of varied lengths)."""
    return write_word_corpus(tmp_path / "corpus", 30, 3, 60)


@pytest.fixture
def db(corpus, tmp_path):
    return RetroDB.build(str(corpus), tmp_path / "db", chunk=M, progress=False)


def test_document_chunks_never_cross_documents():
    stream = np.array([1, 2, 3, EOD, 4, 5, 6, 7, 8, 9, 10, EOD, 11], dtype=np.uint16)
    tokens, docs = document_chunks(stream, 4)
    assert tokens.tolist() == [
        [1, 2, 3, PAD], [4, 5, 6, 7], [8, 9, 10, PAD], [11, PAD, PAD, PAD],
    ]  # fmt: skip
    assert docs.tolist() == [0, 1, 1, 2]


def test_continuation_is_the_true_next_chunk(db, corpus):
    from longctx.data.corpus import DataConfig, load_corpus

    stream = load_corpus(DataConfig(source=str(corpus))).train
    documents = [d for d in np.split(stream, np.flatnonzero(stream == EOD)) if len(d)]
    documents = [d[d != EOD] for d in documents]
    documents = [d for d in documents if len(d)]
    assert db.manifest["documents"] == len(documents)
    start = 0
    for doc in documents:
        n = -(-len(doc) // M)
        padded = np.full(n * M + M, PAD, dtype=np.uint16)  # one more chunk of PAD: F at the end
        padded[: len(doc)] = doc
        ids = np.arange(start, start + n)
        assert (db.tokens[ids] == padded[: n * M].reshape(n, M)).all()
        assert (db.continuation(ids) == padded[M : n * M + M].reshape(n, M)).all()
        values = db.neighbours(ids[None, :])[0].numpy()  # [N, F]
        assert (values[:, :M] == db.tokens[ids]).all() and (
            values[:, M:] == db.continuation(ids)
        ).all()
        start += n
    assert start == len(db)
    assert (db.neighbours(np.array([[-1]])) == PAD).all()


def test_exact_search_equals_brute_force_with_exclusions(db):
    g = torch.Generator().manual_seed(1)
    queries = torch.nn.functional.normalize(torch.randn(37, db.keys.shape[1], generator=g), dim=-1)
    keys = torch.from_numpy(np.asarray(db.keys, dtype=np.float32))
    docs = torch.from_numpy(np.asarray(db.docs, dtype=np.int64))
    k = 5
    scores, ids = db.search(queries, k, batch=10)
    full = queries @ keys.T
    ref = full.topk(k, dim=1)
    torch.testing.assert_close(scores, ref.values)
    assert torch.equal(full.gather(1, ids), ref.values)  # ties may permute ids
    own_docs = torch.randint(0, int(docs.max()) + 1, (37,), generator=g)
    own_ids = torch.randint(0, len(db), (37,), generator=g)
    scores, ids = db.search(queries, k, exclude_docs=own_docs, exclude_ids=own_ids)
    masked = full.masked_fill(docs[None, :] == own_docs[:, None], -torch.inf)
    masked = masked.scatter(1, own_ids[:, None], -torch.inf)
    torch.testing.assert_close(scores, masked.topk(k, dim=1).values)
    assert not (docs[ids] == own_docs[:, None]).any()  # no neighbour from the own document
    assert not (ids == own_ids[:, None]).any()
    # more neighbours than chunks: the rest are -1 with score -inf
    scores, ids = db.search(queries[:2], len(db) + 3)
    assert (ids[:, -3:] == -1).all() and torch.isneginf(scores[:, -3:]).all()


def test_a_database_chunk_finds_itself_unless_excluded(db):
    full = np.flatnonzero((db.tokens != PAD).all(1))  # chunks without padding
    ids = torch.from_numpy(full[[0, 7, -1]].astype(np.int64))
    keys = db.embed(torch.from_numpy(db.tokens[ids.numpy()].astype(np.int64)))
    _, found = db.search(keys, 1)
    scores = keys @ torch.from_numpy(np.asarray(db.keys, dtype=np.float32))[found[:, 0]].T
    assert torch.allclose(scores.diagonal(), torch.ones(3), atol=2e-3)  # itself or a copy
    _, found = db.search(keys, 3, exclude_ids=ids)
    assert not (found == ids[:, None]).any()


def test_embedders_are_deterministic_unit_vectors(db, tmp_path):
    chunks = torch.from_numpy(db.tokens[:50].astype(np.int64))
    a, b = SketchEmbedder()(chunks), make_embedder(db.manifest["embedder"])(chunks)
    assert torch.equal(a, b)
    assert torch.allclose(a.norm(dim=-1), torch.ones(50), atol=1e-5)
    torch.testing.assert_close(
        torch.from_numpy(db.keys[:50].astype(np.float32)), a, atol=1e-3, rtol=0
    )
    assert not torch.equal(SketchEmbedder(seed=1)(chunks), a)
    # the model embedder: a frozen checkpoint's mean-pooled middle-layer states
    from longctx.model import DecoderLM, ModelConfig, save_checkpoint

    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(d_model=32, n_layers=2, n_heads=2))
    run = tmp_path / "run"
    save_checkpoint(
        run / "checkpoints", 1, {"model": model.state_dict()},
        {"config": {"model": model.cfg.to_dict()}, "tokens": 0},
    )  # fmt: skip
    e1, e2 = make_embedder("model", run), make_embedder("model", run)
    x, y = e1(chunks), e2(chunks)
    assert x.shape == (50, 32) and torch.equal(x, y)
    assert torch.allclose(x.norm(dim=-1), torch.ones(50), atol=1e-5)
    db2 = RetroDB.build(
        str(tmp_path / "corpus"), tmp_path / "db-model", chunk=M, embedder="model",
        checkpoint=run, progress=False,
    )  # fmt: skip
    assert db2.manifest["embedder"]["kind"] == "model" and db2.keys.shape[1] == 32
    torch.testing.assert_close(db2.embed(chunks), x)


def test_bad_databases_are_clear_errors(db, tmp_path):
    with pytest.raises(DatabaseError, match="no manifest"):
        RetroDB.open(tmp_path / "nothing")
    with pytest.raises(FileExistsError, match="not empty"):
        RetroDB.build(str(tmp_path / "corpus"), db.path, chunk=M, progress=False)
    RetroDB.open(db.path)  # untouched
    manifest = json.loads((db.path / "manifest.json").read_text())
    with pytest.raises(DatabaseError, match="chunks of 8 tokens; the model uses 64"):
        db.check_compatible(chunk=64)
    with pytest.raises(DatabaseError, match="keyed by"):
        db.check_compatible(embedder={"kind": "sketch", "dim": 64})
    (db.path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(DatabaseError, match="format version 99"):
        RetroDB.open(db.path)
    (db.path / "manifest.json").write_text("{broken")
    with pytest.raises(DatabaseError, match="not valid JSON"):
        RetroDB.open(db.path)
    (db.path / "manifest.json").write_text(json.dumps({**manifest, "chunks": 5}))
    with pytest.raises(DatabaseError, match="shape"):
        RetroDB.open(db.path)
    (db.path / "manifest.json").write_text(json.dumps(manifest))
    keys = (db.path / "keys.npy").read_bytes()
    (db.path / "keys.npy").write_bytes(keys[: len(keys) // 2])
    with pytest.raises(DatabaseError, match="keys.npy"):
        RetroDB.open(db.path)
    (db.path / "keys.npy").unlink()
    with pytest.raises(DatabaseError, match="keys.npy is missing"):
        RetroDB.open(db.path)
    with pytest.raises(ValueError, match="shape"):
        db.embed(torch.zeros(2, M + 1, dtype=torch.long))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        RetroDB.build(str(empty), tmp_path / "db-empty", progress=False)


def test_chunk_overlap():
    rng = np.random.default_rng(0)
    chunk = torch.from_numpy(rng.integers(0, 50, (1, 16)))
    neighbours = torch.from_numpy(rng.integers(50, 100, (1, 3, 32)))  # a disjoint alphabet
    assert chunk_overlap(chunk, neighbours).item() == 0.0
    copied = neighbours.clone()
    copied[0, 1, 5:21] = chunk[0]  # the chunk copied into a neighbour
    assert chunk_overlap(chunk, copied).item() == 1.0
    # against a brute-force longest common substring on small random sequences
    for _ in range(20):
        a = rng.integers(0, 3, (2, 10))
        b = rng.integers(0, 3, (2, 2, 12))
        got = longest_common_run(torch.from_numpy(a), torch.from_numpy(b))
        for q in range(2):
            best = 0
            for nb in b[q]:
                for i in range(10):
                    for j in range(12):
                        n = 0
                        while i + n < 10 and j + n < 12 and a[q, i + n] == nb[j + n]:
                            n += 1
                        best = max(best, n)
            assert got[q].item() == best
    padded = torch.full((1, 4), PAD)
    assert longest_common_run(padded, torch.full((1, 1, 4), PAD)).item() == 0  # PAD: no match


def test_copyable_tokens():
    rng = np.random.default_rng(1)
    tokens = torch.from_numpy(rng.integers(0, 50, (1, 3 + 16)))  # 3 context + a 16-chunk
    neighbours = torch.from_numpy(rng.integers(50, 100, (1, 2, 32)))  # a disjoint alphabet
    assert not copyable(tokens, neighbours, 3).any()
    copied = neighbours.clone()
    copied[0, 1, 4:14] = tokens[0, 5:15]  # context + chunk tokens 2..11 copied
    got = copyable(tokens, copied, 3)
    # chunk token i is tokens[3 + i]; it needs tokens[i..3 + i] all inside 5..14
    assert got[0].nonzero().flatten().tolist() == list(range(5, 12))
    # against brute force on a small alphabet
    for _ in range(20):
        a = rng.integers(0, 3, (2, 2 + 6))
        b = rng.integers(0, 3, (2, 2, 9))
        got = copyable(torch.from_numpy(a), torch.from_numpy(b), 2)
        for q in range(2):
            for i in range(6):
                want = any(
                    list(a[q, i : i + 3]) == list(nb[j : j + 3]) for nb in b[q] for j in range(7)
                )
                assert bool(got[q, i]) == want
    pad = torch.full((1, 5), PAD)
    assert not copyable(pad, torch.full((1, 1, 5), PAD), 1).any()  # PAD: no match
    with pytest.raises(ValueError, match="context"):
        copyable(tokens, neighbours, 19)


def test_cli_build_search_info(corpus, tmp_path, capsys):
    from longctx.cli import main

    out = tmp_path / "cli-db"
    build = ["retro", "build-db", "--source", str(corpus), "--out", str(out)]
    assert main([*build, "--chunk", "16"]) == 0
    assert "chunks of 16 tokens" in capsys.readouterr().out
    assert main(["retro", "search", str(out), "--text", "alpha beta gamma", "-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "chunk" in lines[0]
    assert main(["retro", "info", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["chunk"] == 16
    assert main(build) == 2
    assert "--force" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_faiss_search_respects_exclusions_and_reports_recall(db, kind):
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, len(db), (40,), generator=g)
    queries = db.embed(torch.from_numpy(db.tokens[ids.numpy()].astype(np.int64)))
    docs = torch.from_numpy(np.asarray(db.docs, dtype=np.int64))
    scores, found = db.search(queries, 4, index=kind, exclude_docs=docs[ids], exclude_ids=ids)
    assert found.shape == (40, 4) and (found >= 0).all()
    assert not (docs[found] == docs[ids][:, None]).any()
    exact = db.search(queries, 4, exclude_docs=docs[ids], exclude_ids=ids)[0]
    assert (scores <= exact[:, :1] + 1e-4).all()  # never better than the exact best
    recall = db.recall(kind, queries, 4)
    assert 0.0 < recall <= 1.0
    if kind == "flat":
        assert recall >= 0.95  # exact up to float ties
        torch.testing.assert_close(scores, exact, atol=1e-4, rtol=0)
    scores, found = db.search(queries[:2], len(db) + 2, index=kind)
    assert (found[:, -2:] == -1).all()


# ---------------------------------------------------------------- training batches


def retro_run_config(corpus, db_path, **model):
    from longctx.train.config import RunConfig

    return RunConfig.from_dict(
        {
            "model": {"d_model": 32, "n_layers": 2, "n_heads": 2,
                      "retro": {"layers": [1], "chunk": M, "neighbours": 2, **model}},
            "train": {"context": 32, "batch_size": 4, "max_steps": 3, "warmup_steps": 0,
                      "eval_windows": 4, "log_every": 1, "eval_every": 0, "max_minutes": 0},
            "data": {"source": str(corpus), "retro_db": str(db_path)},
        }
    )  # fmt: skip


def test_training_batches_carry_neighbours_from_other_documents(db, corpus, tmp_path):
    from longctx.data.corpus import sample_windows
    from longctx.train.loop import Trainer

    trainer = Trainer(retro_run_config(corpus, db.path), tmp_path / "run", progress=False)
    x, y, nb = trainer.source.batch(3)
    assert x.shape == (4, 32) and nb.shape == (4, 32 // M, 2, 2 * M)
    # the same windows the plain source draws; no neighbour from the next chunk's document
    rows, starts = sample_windows(trainer.source.base.corpus.train, 4, 32, 0, 3)
    assert torch.equal(x, rows[:, :-1])
    ends = trainer.source.ends
    for b in range(4):
        for u in range(32 // M):
            doc = np.searchsorted(ends, starts[b] + (u + 1) * M, "left")
            for n in range(2):
                found = nb[b, u, n, :M].numpy()
                same = np.flatnonzero((db.tokens == found).all(1))  # chunks with those tokens
                assert len(same) and not (np.asarray(db.docs)[same] == doc).all()
    # neighbours are exactly the searched ones
    queries = db.embed(x.reshape(-1, M))
    docs = torch.from_numpy(
        np.searchsorted(ends, (starts[:, None] + (np.arange(4) + 1) * M).reshape(-1))
    )
    ids = db.search(queries, 2, exclude_docs=docs)[1]
    assert torch.equal(nb, db.neighbours(ids.view(4, 4, 2)))
    assert all(len(batch) == 3 for batch in trainer.source.val_batches)
    first = trainer.train_step().loss
    assert math.isfinite(first) and math.isfinite(trainer.evaluate())


def test_training_refuses_a_mismatched_database(db, corpus, tmp_path):
    from longctx.train.loop import Trainer

    with pytest.raises(DatabaseError, match="chunks of 8 tokens; the model uses 16"):
        Trainer(retro_run_config(corpus, db.path, chunk=16), tmp_path / "a", progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("alpha beta gamma " * 50)
    (other / "b.txt").write_text("delta eps zeta " * 50)
    cfg = retro_run_config(other, db.path)
    with pytest.raises(DatabaseError, match="data.source"):
        Trainer(cfg, tmp_path / "b", progress=False)
    cfg = retro_run_config(corpus, db.path)
    cfg.data.retro_db = ""
    with pytest.raises(ValueError, match="needs a retrieval database"):
        Trainer(cfg, tmp_path / "c", progress=False)


def test_generation_with_a_database_retriever(db):
    from longctx.model import DecoderLM, ModelConfig, generate

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2,
                      retro={"layers": [1], "chunk": M, "neighbours": 2})  # fmt: skip
    model = DecoderLM(cfg).double()
    retriever = db.retriever(2)
    prompt = db.tokens[3].astype(np.int64).tolist()[:5]
    gen = generate(model, prompt, 12, temperature=0, return_logits=True, retriever=retriever)
    seq = torch.tensor([prompt + gen.tokens])
    chunks = (len(prompt) + 11) // M
    nb = torch.stack([retriever(seq[:, u * M : (u + 1) * M]) for u in range(chunks)], 1)
    assert nb.shape == (1, chunks, 2, 2 * M)
    with torch.no_grad():
        full = model(seq, neighbours=nb)
    for i, logits in enumerate(gen.logits):
        torch.testing.assert_close(logits[0], full[0, len(prompt) - 1 + i], atol=1e-10, rtol=0)


def test_retrofit_trains_only_retrieval_and_keeps_the_base(db, corpus, tmp_path):
    from longctx.nn.retro import is_retrieval_weight
    from longctx.train.config import RunConfig
    from longctx.train.loop import Trainer

    plain = retro_run_config(corpus, db.path).to_dict()
    plain["model"]["retro"] = {}
    plain["data"]["retro_db"] = ""
    base = Trainer(RunConfig.from_dict(plain), tmp_path / "base", progress=False)
    base.train_step()
    base.save()
    fit = Trainer(retro_run_config(corpus, db.path, base=str(tmp_path / "base")),
                  tmp_path / "fit", progress=False)  # fmt: skip
    before = {n: p.detach().clone() for n, p in fit.model.named_parameters()}
    for _ in range(2):
        fit.train_step()
    changed = 0
    for name, p in fit.model.named_parameters():
        if is_retrieval_weight(name):
            changed += not torch.equal(p, before[name])
        else:  # the base: frozen, no gradient, bit-identical
            assert p.grad is None and not p.requires_grad, name
            assert torch.equal(p, before[name]) and torch.equal(p, base.model.state_dict()[name])
    assert changed > 0
    retrieval = sum(p.numel() for n, p in fit.model.named_parameters() if is_retrieval_weight(n))
    assert fit.model.num_trainable() == retrieval < fit.model.num_params()
    x = fit.source.batch(0)[0]
    with torch.no_grad():  # retrieval off: exactly the base model
        assert torch.equal(fit.model(x), base.model(x))
    other = retro_run_config(corpus, db.path, base=str(tmp_path / "base")).to_dict()
    other["model"]["d_model"] = 64
    with pytest.raises(ValueError, match="another decoder"):
        Trainer(RunConfig.from_dict(other), tmp_path / "bad", progress=False)


# ---------------------------------------------------------------- evaluation


def test_bits_per_byte_of_a_retro_run_read_its_database(db, corpus, tmp_path):
    from longctx.data.corpus import eval_windows
    from longctx.evaluate import bits_per_position, evaluate_run, retro_neighbours
    from longctx.train.loop import Trainer

    trainer = Trainer(retro_run_config(corpus, db.path), tmp_path / "run", progress=False)
    trainer.train_step()
    trainer.save()
    model = trainer.model.eval()
    res = evaluate_run(tmp_path / "run", contexts=[32], windows=3, progress=False)
    assert res["retrieval"] is True
    val = trainer.source.base.corpus.val
    wins = eval_windows(val, 32, 3)
    with torch.no_grad():
        want = bits_per_position(model, wins, 2, neighbours=retro_neighbours(model, db.path))
        off = bits_per_position(model, wins, 2)
    assert res["bpb"] == pytest.approx(float(want.mean()))
    assert res["bpb"] != pytest.approx(float(off.mean()))  # the neighbours count
    with pytest.raises(ValueError, match="retrieval database"):
        retro_neighbours(model, "")


def test_eval_cli_retro(db, corpus, tmp_path, capsys):
    from longctx.cli import main
    from longctx.train.loop import Trainer

    trainer = Trainer(retro_run_config(corpus, db.path), tmp_path / "run", progress=False)
    trainer.train_step()
    trainer.save()
    assert main(["eval", str(tmp_path / "run"), "--task", "retro", "--windows", "2"]) == 0
    out = capsys.readouterr().out
    assert "oracle on chunks >= 2" in out and "copyable (8-token context" in out
    assert "in-context copying (32 validation spans" in out
    saved = json.loads((tmp_path / "run" / "eval" / "retro.json").read_text())
    assert saved["windows"] == 2 and set(saved["copying"]["rest"]) >= {"retrieval", "off"}


def test_oracle_and_half_neighbours():
    from longctx.evaluate.retro import only, oracle_neighbours

    w = torch.arange(1, 2 * M + 4)[None]  # (1, 2m + 3): chunks 0 and 1, a partial chunk 2
    nb = oracle_neighbours(w, M, 2)
    assert nb.shape == (1, 2, 2, 2 * M)
    assert torch.equal(nb[0, 0, 0], w[0, : 2 * M])  # [chunk 0, the true chunk 1]
    assert torch.equal(nb[0, 1, 0, :M], w[0, M : 2 * M])
    assert torch.equal(nb[0, 1, 0, M : M + 3], w[0, 2 * M :])  # the window ends: PAD after
    assert (nb[0, 1, 0, M + 3 :] == PAD).all() and (nb[:, :, 1] == PAD).all()
    n_only, f_only = only(nb, "N"), only(nb, "F")
    assert torch.equal(n_only[..., :M], nb[..., :M]) and (n_only[..., M:] == PAD).all()
    assert torch.equal(f_only[..., M:], nb[..., M:]) and (f_only[..., :M] == PAD).all()


def test_retro_evaluation_accounts_every_chunk(db, corpus, tmp_path):
    from longctx.data.corpus import DataConfig, load_corpus
    from longctx.evaluate.retro import (
        ALPHAS,
        COPY_CONTEXT,
        chunk_bits,
        copyable_in_windows,
        evaluate_retro,
        oracle_neighbours,
        write_retro_results,
    )
    from longctx.model import DecoderLM, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2,
                      retro={"layers": [1], "chunk": M, "neighbours": 2})  # fmt: skip
    model = DecoderLM(cfg).double()
    plain = DecoderLM(ModelConfig(d_model=32, n_layers=2, n_heads=2)).double()
    val = load_corpus(DataConfig(source=str(corpus))).val
    res = evaluate_retro(model, db, val, 4 * M, windows=3, baseline=plain, batch=2)
    assert res["chunks"] == res["windows"] * 4
    curve = res["leakage"]
    assert [row["alpha"] for row in curve] == list(ALPHAS)
    shares = [row["share"] for row in curve]
    assert shares == sorted(shares) and shares[-1] == 1.0
    assert curve[-1]["bpb"] == pytest.approx(res["bpb"]["retrieval"])
    assert curve[-1]["baseline_bpb"] == pytest.approx(res["bpb"]["baseline"])
    # the chunks' bits add up to the bits of predicting the window's input tokens 1..N-1
    # (token 0 is not predicted; token N, the last target, starts a chunk not evaluated)
    from longctx.data.corpus import eval_windows

    w = torch.stack(eval_windows(val, 4 * M, 3))
    with torch.no_grad():
        nll = plain.nll_per_position(w)[:, :-1].sum() / math.log(2)
    torch.testing.assert_close(chunk_bits(plain, w, None, M).sum(), nll)
    predicted = len(w) * (4 * M - 1)
    assert res["bpb"]["baseline"] == pytest.approx(float(nll) / predicted)
    # copying: the copyable tokens and the rest split the bits of chunks >= 1
    cp = res["copying"]
    assert cp["context"] == COPY_CONTEXT and 0.0 <= cp["share"] <= 1.0
    later = len(w) * 3 * M  # the tokens of chunks 1..3 of each window
    n_copy = round(cp["share"] * later)
    total = float(chunk_bits(plain, w, None, M)[:, 1:].sum())
    split = (cp["copyable"]["baseline"] or 0.0) * n_copy
    split += cp["rest"]["baseline"] * (later - n_copy)
    assert split == pytest.approx(total)
    # with the oracle's neighbours every token of a complete chunk >= 1 is copyable
    wide = torch.stack(eval_windows(val, 4 * M, 3))
    can = copyable_in_windows(wide, oracle_neighbours(wide, M, 2), M, COPY_CONTEXT)
    assert can[:, 1:].all() and not can[:, 0].any()
    # a window of one chunk (and a partial one) reads no neighbours: nothing copyable
    short = wide[:, : M + 4]
    one = copyable_in_windows(short, oracle_neighbours(short, M, 2), M, COPY_CONTEXT)
    assert one.shape == (3, 1, M) and not one.any()
    js, png = write_retro_results(res, tmp_path / "eval", "test")
    assert json.loads(js.read_text())["chunks"] == res["chunks"] and png.exists()


class _Copier(DecoderLM):
    """A decoder whose forward copies in context perfectly: at position t it predicts
    the token that followed the latest earlier occurrence of token t (uniform if none)."""

    def __init__(self):
        super().__init__(ModelConfig(d_model=8, n_heads=2, n_layers=1))

    def forward(self, x, neighbours=None):
        B, N = x.shape
        logits = torch.zeros(B, N, self.cfg.vocab_size)
        for b in range(B):
            for t in range(N):
                earlier = (x[b, :t] == x[b, t]).nonzero().flatten()
                if len(earlier):
                    logits[b, t, x[b, earlier[-1] + 1]] = 30.0
        return logits


def test_repeat_bits_measures_in_context_copying():
    from longctx.evaluate.retro import REPEAT_SPANS, repeat_bits

    val = (np.arange(3000) * 7) % 256  # no token twice within 256 tokens
    copier = repeat_bits(_Copier(), val, context=512)
    assert copier["span"] == 128 and copier["spans"] == REPEAT_SPANS
    assert copier["repeat"] < 1e-6 and copier["first"] == pytest.approx(math.log2(264))
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(d_model=16, n_heads=2, n_layers=1)).double().eval()
    got = repeat_bits(model, val, context=20)  # spans of 10 tokens
    assert got["span"] == 10
    first, repeat = [], []
    for a in np.linspace(0, len(val) - 10, REPEAT_SPANS).round().astype(int):
        seq = torch.from_numpy(np.concatenate([val[a : a + 10]] * 2))
        with torch.no_grad():
            logp = model(seq[None, :-1])[0].log_softmax(-1)
        bits = [-float(logp[t - 1, seq[t]]) / math.log(2) for t in range(1, 20)]
        first += bits[:9]  # tokens 1..9
        repeat += bits[10:]  # tokens 11..19: the repeat after its first token
    assert got["first"] == pytest.approx(np.mean(first), rel=1e-9)
    assert got["repeat"] == pytest.approx(np.mean(repeat), rel=1e-9)
    with pytest.raises(ValueError, match="2\\+ tokens"):
        repeat_bits(model, val, context=3)


def test_eval_cli_retro_refuses_memory_options(tmp_path, capsys):
    from longctx.cli import main

    assert main(["eval", str(tmp_path), "--task", "retro", "--memory-topk", "4"]) != 0
    assert "reads its database" in capsys.readouterr().err
