"""LongMem: the frozen backbone, the SideNet, the chunk bank, retrieval, fusion,
decoding, training on continuing rows, and the evaluation by segment (float64, tiny)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import write_word_corpus
from longctx.data.tokenizer import EOD
from longctx.model import DecoderLM, ModelConfig, generate
from longctx.nn.longmem import BankRead, LongMemConfig
from longctx.nn.rotary import apply_rotary
from longctx.nn.state import ChunkBank

S, CSZ = 8, 2  # segment, chunk


def make_model(seed=0, **longmem) -> DecoderLM:
    torch.manual_seed(seed)
    keys = {"side_layers": 2, "segment": S, "chunk": CSZ, "topk": 4, "capacity": 64, **longmem}
    cfg = ModelConfig(d_model=32, n_layers=4, n_heads=2, longmem=keys)
    return DecoderLM(cfg).double().eval()


def tokens(b=2, n=5 * S + 3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 250, (b, n), generator=g)


def backbone_logits(model: DecoderLM, x):
    """The backbone on each segment alone (positions from 0)."""
    outs = []
    for a in range(0, x.shape[1], S):
        h = model.embed(x[:, a : a + S])
        for block in model.blocks:
            h = block(h, torch.arange(h.shape[1]))
        outs.append(F.linear(model.norm(h), model.embed.weight))
    return torch.cat(outs, dim=1)


def silence(model):
    with torch.no_grad():
        for block in model.side.blocks:
            block.attn.proj.weight.zero_()
            block.ffn.w2.weight.zero_()


# ---------------------------------------------------------------- structure


def test_sidenet_starts_from_the_backbone_and_gate_at_half():
    model = make_model()
    side = model.side
    assert side.sources == [1, 3] and side.cached == 3 and side.memory_layer == 1
    for block, src in zip(side.blocks, side.sources):
        theirs = model.blocks[src].state_dict()
        for name, value in block.state_dict().items():
            if name.endswith("memory_bias"):
                continue
            assert torch.equal(value, theirs[name]), name
    assert torch.equal(side.memory.gate, torch.full((2,), 0.5, dtype=torch.float64))
    assert torch.equal(side.norm.weight, model.norm.weight)
    assert model.num_trainable() == sum(p.numel() for p in side.parameters())


def test_silenced_sidenet_telescopes_to_the_backbone():
    """Output projections zeroed: the SideNet ends at h_L, so its logits are the
    backbone's (memory full or not: the memory layer's output is projected away too)."""
    model = make_model()
    silence(model)
    x = tokens()
    assert (model(x) - backbone_logits(model, x)).abs().max() < 1e-12


def test_side_gain_starts_at_the_backbone_and_learns():
    """With side_gain, the layer gains start at 0: the SideNet's logits are exactly the
    backbone's (memory full or not) while its blocks keep the backbone's weights; the
    gains get a gradient, so training moves the SideNet off the backbone."""
    model = make_model(side_gain=True)
    x = tokens()
    assert torch.equal(model.side.gains, torch.zeros(2, dtype=torch.float64))
    assert (model(x) - backbone_logits(model, x)).abs().max() < 1e-12
    plain = make_model()  # same seed: the same blocks; gains at 1 are the paper's SideNet
    with torch.no_grad():
        model.side.gains.fill_(1.0)
    assert (model(x) - plain(x)).abs().max() < 1e-12
    with torch.no_grad():
        model.side.gains.zero_()
    model(x).logsumexp(-1).sum().backward()
    assert model.side.gains.grad.abs().min() > 0
    with pytest.raises(ValueError, match="side_gain must be true or false"):
        ModelConfig(n_layers=4, longmem={"side_layers": 2, "side_gain": 1})


def test_configuration_errors():
    with pytest.raises(ValueError, match="multiple of model.longmem.side_layers"):
        ModelConfig(n_layers=4, longmem={"side_layers": 3})
    with pytest.raises(ValueError, match="cache_layer must be a layer the SideNet starts from"):
        ModelConfig(n_layers=4, longmem={"side_layers": 2, "cache_layer": 2})
    with pytest.raises(ValueError, match="dense attention"):
        ModelConfig(n_layers=4, attention="sliding_window", longmem={"side_layers": 2})
    with pytest.raises(ValueError, match="multiple of model.longmem.chunk"):
        LongMemConfig(side_layers=1, chunk=4, topk=6)
    with pytest.raises(ValueError, match="fusion must be one of"):
        LongMemConfig(side_layers=1, fusion="sum")
    with pytest.raises(ValueError, match="shared"):
        LongMemConfig(side_layers=1, shared=True, retrieval="faiss")


# ---------------------------------------------------------------- the bank


def bank_with(n, capacity=8, chunk=2, batch=2):
    bank = ChunkBank(batch, 1, 3, capacity, chunk, torch.float64, "cpu")
    k = torch.randn(batch, 1, n, 3, dtype=torch.float64)
    v = torch.randn(batch, 1, n, 3, dtype=torch.float64)
    return bank, k, v


def test_bank_holds_the_last_tokens_in_order_and_chunk_means():
    bank, k, v = bank_with(14)
    for a in range(0, 14, 3):  # in pieces that split chunks: the tails carry over
        bank.add(k[:, :, a : a + 3], v[:, :, a : a + 3], torch.arange(a, min(a + 3, 14)))
    for row in range(2):
        bk, bv, pos = bank.tokens(row)
        assert pos.tolist() == list(range(6, 14))  # the last 8 of 14, oldest first
        assert torch.equal(bk, k[row, :, 6:14]) and torch.equal(bv, v[row, :, 6:14])
        keys, _, _ = bank.store.entries(row)
        assert torch.allclose(keys, k[row, :, 6:14].reshape(1, 4, 2, 3).mean(2), atol=0)


def test_bank_tail_waits_and_clear_touches_one_row():
    bank, k, v = bank_with(5)
    bank.add(k, v, torch.arange(5))
    assert bank.tokens(0)[2].tolist() == [0, 1, 2, 3]  # token 4 waits for its chunk
    bank.clear([1])
    assert bank.tokens(1)[2].tolist() == [] and bank.tokens(0)[2].tolist() == [0, 1, 2, 3]
    bank.add(k[:, :, :1], v[:, :, :1], torch.tensor([5]))
    assert bank.tokens(0)[2].tolist() == [0, 1, 2, 3, 4, 5]  # the tail joined
    assert bank.tokens(1)[2].tolist() == []  # the cleared row's tail was dropped
    with pytest.raises(ValueError, match="multiple of its chunk size"):
        ChunkBank(1, 1, 3, 7, 2, torch.float64, "cpu")


def test_document_separator_clears_only_its_row():
    model = make_model()
    x = tokens(n=3 * S)
    x[1, S + 3] = EOD  # row 1 starts a new document in segment 2
    state = model.new_state(2)
    model(x[:, : 2 * S], state)
    bank = state.longmem.bank
    assert bank.tokens(0)[2].tolist() == list(range(2 * S))
    assert bank.tokens(1)[2].tolist() == list(range(S + 4, 2 * S))  # after the separator


# ---------------------------------------------------------------- retrieval and fusion


def filled_state(model, n=3 * S, seed=1):
    state = model.new_state(2)
    model(tokens(n=n, seed=seed), state)
    return state


def test_retrieved_chunks_and_pairs_equal_brute_force():
    model = make_model()
    attn, bank = model.side.memory, filled_state(model).longmem.bank
    q = torch.randn(2, 2, 5, 16, dtype=torch.float64)
    idx = attn.select(q, bank)  # (B, H, n, topk / chunk)
    for b in range(2):
        keys, packed, _ = bank.store.entries(b)  # oldest first
        slots = bank.store.valid[b].nonzero().flatten()
        order = slots[bank.store.age[b, slots].argsort()]
        for h in range(2):
            scores = q[b, h] @ keys[h].T  # (n, chunks)
            best = order[scores.topk(2).indices]  # (n, 2) slots
            assert torch.equal(idx[b, h].sort().values, best.sort().values)
    out, lse = attn._read(q, bank, None)
    for b in range(2):  # attention over exactly the selected chunks' token pairs
        for h in range(2):
            for i in range(5):
                k, v = bank.unpack(bank.store.v[b, h, idx[b, h, i]])  # (2, m, D) each
                s = q[b, h, i] @ k.reshape(-1, 16).T * 16**-0.5
                ref = torch.softmax(s, -1) @ v.reshape(-1, 16)
                assert torch.allclose(out[b, h, i], ref, atol=1e-12)
                assert torch.allclose(lse[b, h, i], torch.logsumexp(s, -1), atol=1e-12)


def local_and_memory(model, state, x):
    """The memory layer's local (out, lse) and memory (out, lse) for x (B, n, C) at the
    segment's start, computed by the layer's own pieces."""
    attn = model.side.memory
    B, n, _ = x.shape
    qkv = attn.qkv(x).view(B, n, 3, 2, 16)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    pos = torch.arange(n)
    rot = [apply_rotary(t, pos, attn.rope_base) for t in (q, k)]
    s = rot[0] @ rot[1].transpose(-1, -2) * 16**-0.5
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    local = (torch.softmax(s, -1) @ v, torch.logsumexp(s, -1))
    return q, k, v, s, local, attn.read(q, state.longmem.bank, None)


def test_gated_output_is_exactly_the_mix_and_gate_zero_ignores_memory():
    model = make_model()
    state = filled_state(model)
    attn = model.side.memory
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    q, k, v, s, local, memory = local_and_memory(model, state, x)
    with torch.no_grad():
        attn.memory_bias.copy_(torch.tensor([0.3, -1.2]))
    g = torch.sigmoid(attn.memory_bias).view(1, 2, 1, 1)
    y = attn(x, torch.arange(5), BankRead(None, state.longmem.bank, None))
    mix = (1 - g) * local[0] + g * memory[0]
    assert torch.allclose(y, attn.proj(mix.transpose(1, 2).reshape(2, 5, 32)), atol=1e-12)
    with torch.no_grad():
        attn.memory_bias.fill_(float("-inf"))  # g = 0
    y0 = attn(x, torch.arange(5), BankRead(None, state.longmem.bank, None))
    empty = model.new_state(2).longmem.bank
    y_empty = attn(x, torch.arange(5), BankRead(None, empty, None))
    assert torch.equal(y0, y_empty)


def test_joint_with_k_above_the_bank_is_one_softmax_forward_and_backward():
    model = make_model(fusion="joint", topk=64)  # 32 chunks >= what the bank holds
    state = filled_state(model, n=2 * S)
    attn = model.side.memory
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    # the memory bias: 0 at the start (one plain softmax), then a per-head score offset
    for bias in ([0.0, 0.0], [0.7, -0.4]):
        with torch.no_grad():
            attn.memory_bias.copy_(torch.tensor(bias))
        y = attn(x, torch.arange(5), BankRead(None, state.longmem.bank, None))
        # reference: one softmax over [bank tokens (unrotated q . k) + b ; local (rotated)]
        q, k, v, s_local, _, _ = local_and_memory(model, state, x)
        outs = []
        for b in range(2):
            bk, bv, _ = state.longmem.bank.tokens(b)  # (H, t, D)
            s_mem = q[b] @ bk.transpose(-1, -2) * 16**-0.5  # (H, n, t)
            s_mem = s_mem + attn.memory_bias.view(2, 1, 1)
            p = torch.softmax(torch.cat([s_mem, s_local[b]], -1), -1)
            outs.append(p @ torch.cat([bv, v[b]], 1))
        ref = attn.proj(torch.stack(outs).transpose(1, 2).reshape(2, 5, 32))
        assert torch.allclose(y, ref, atol=1e-12)
        w = torch.randn_like(y)
        wrt = [x, attn.qkv.weight, attn.memory_bias]
        gy = torch.autograd.grad((y * w).sum(), wrt)
        gr = torch.autograd.grad((ref * w).sum(), wrt)
        for a, b in zip(gy, gr):
            assert torch.allclose(a, b, atol=1e-10)


def test_shared_bank_is_an_explicit_option():
    x = tokens(n=2 * S + 3)
    for shared in (False, True):
        model = make_model(shared=shared)
        y = model(x)
        x2 = x.clone()
        x2[1, :S] = (x2[1, :S] + 7) % 250  # row 1's first segment (in its bank)
        y2 = model(x2)
        moved = not torch.equal(y[0, S:], y2[0, S:])
        assert moved == shared  # row 0 reads row 1's bank only when shared


def test_faiss_flat_retrieval_equals_exact():
    pytest.importorskip("faiss")
    x = tokens(n=4 * S)
    exact = make_model()(x)
    flat = make_model(retrieval="faiss", faiss_index="flat")(x)
    assert torch.allclose(exact, flat, atol=1e-10)


# ---------------------------------------------------------------- causality and decoding


def test_segments_are_causal_and_never_retrieve_themselves():
    model = make_model()
    x = tokens(n=4 * S)
    y = model(x)
    x2 = x.clone()
    x2[:, 2 * S + 3] = (x2[:, 2 * S + 3] + 1) % 250
    y2 = model(x2)
    assert torch.equal(y[:, : 2 * S + 3], y2[:, : 2 * S + 3])
    assert not torch.equal(y[:, 2 * S + 3], y2[:, 2 * S + 3])
    # segment 1 reads an empty bank: it equals the SideNet with memory off
    off = make_model(memory=False)
    assert torch.equal(off(x)[:, :S], y[:, :S])
    assert not torch.equal(off(x)[:, S:], y[:, S:])


@pytest.mark.parametrize("side_gain", [False, True])
def test_streaming_in_any_pieces_equals_one_forward(side_gain):
    model = make_model(side_gain=side_gain)
    if side_gain:  # gains away from 0, so that the SideNet's blocks count
        with torch.no_grad():
            model.side.gains.copy_(torch.tensor([0.3, -0.5]))
    x = tokens(n=4 * S + 5)
    full = model(x)
    state = model.new_state(2)
    outs, a = [], 0
    for size in (3, 1, 13, 8, 2, 100):
        outs.append(model(x[:, a : a + size], state))
        a += size
    assert (torch.cat(outs, dim=1) - full).abs().max() < 1e-12


def test_generation_equals_the_full_forward_at_every_step():
    model = make_model()
    prompt = tokens(b=1, n=S + 3)[0].tolist()
    gen = generate(model, prompt, 2 * S, temperature=0, return_logits=True, prefill=5)
    seq = torch.tensor([prompt + gen.tokens])
    full = model(seq[:, :-1])
    for i, logits in enumerate(gen.logits):
        assert (logits[0] - full[0, len(prompt) - 1 + i]).abs().max() < 1e-10


def test_ngram_backbone_history_continues_across_segments():
    torch.manual_seed(0)
    keys = {"side_layers": 1, "segment": S, "chunk": CSZ, "topk": 4}
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, ngram=3, longmem=keys)
    model = DecoderLM(cfg).double().eval()
    x = tokens(n=3 * S)
    silence(model)
    plain = []
    history = torch.full((2, 2), -1, dtype=torch.long)  # the n-gram embedding's history
    for a in range(0, 3 * S, S):  # the backbone's attention on each segment alone
        h = model.embed_tokens(x[:, a : a + S], history)  # the history carries on
        for block in model.blocks:
            h = block(h, torch.arange(S))
        plain.append(F.linear(model.side.norm(h), model.embed.weight))
    assert (model(x) - torch.cat(plain, 1)).abs().max() < 1e-12
    state = model.new_state(2)
    steps = torch.cat([model(x[:, i : i + 1], state) for i in range(3 * S)], 1)
    assert (steps - model(x)).abs().max() < 1e-12


# ---------------------------------------------------------------- training


@pytest.fixture
def corpus(tmp_path):
    return write_word_corpus(tmp_path / "corpus", 24, 20, 120)


def run_config(corpus, **longmem):
    from longctx.train.config import RunConfig

    return RunConfig.from_dict(
        {
            "model": {"d_model": 32, "n_layers": 2, "n_heads": 2,
                      "longmem": {"segment": 16, "chunk": 2, "topk": 8, "capacity": 256,
                                  **longmem}},
            "train": {"context": 32, "batch_size": 2, "max_steps": 2, "warmup_steps": 0,
                      "eval_windows": 2, "log_every": 1, "eval_every": 0, "max_minutes": 0},
            "data": {"source": str(corpus)},
        }
    )  # fmt: skip


def test_training_moves_only_the_sidenet_and_rows_continue(corpus, tmp_path):
    from longctx.model.longmem import adopt_backbone
    from longctx.train.config import RunConfig
    from longctx.train.loop import Trainer

    base = Trainer(run_config(corpus), tmp_path / "base", progress=False)
    base.train_step()
    base.save()
    table = run_config(corpus).to_dict()
    table["model"]["d_model"] = 64  # ignored: the backbone's architecture is adopted
    table["model"]["longmem"] = {**table["model"]["longmem"], "side_layers": 1,
                                 "backbone": str(tmp_path / "base")}  # fmt: skip
    table["model"] = adopt_backbone(table["model"])
    assert table["model"]["d_model"] == 32
    trainer = Trainer(RunConfig.from_dict(table), tmp_path / "lm", progress=False)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    x0, _ = trainer.source.batch(0)
    x1, _ = trainer.source.batch(1)
    for _ in range(2):
        trainer.train_step()
    state = trainer.streams[0]
    assert state.length == 64 and state.longmem.bank.tokens(0)[2].numel() > 0
    changed = 0
    for name, p in trainer.model.named_parameters():
        if name.startswith("side."):
            changed += not torch.equal(p, before[name])
        else:  # the backbone, embedding and head: frozen, no gradient, the base's weights
            assert p.grad is None and not p.requires_grad, name
            assert torch.equal(p, before[name]) and torch.equal(p, base.model.state_dict()[name])
    assert changed > 0
    assert not any(m.training for m in trainer.model.backbone_modules())
    # rows continue: batch 1's row j starts where batch 0's row j ended
    assert torch.equal(trainer.source.batch(1)[0], x1)
    joined = torch.cat([x0, x1], dim=1)
    src = trainer.source
    for j in range(2):
        want = src.tokens[np.arange(src.starts[j], src.starts[j] + 64) % len(src.tokens)]
        assert joined[j].tolist() == want.tolist()


@pytest.mark.parametrize("preset", ["longmem-tiny", "longmem-tiny64"])
def test_stdlib_presets_train_on_a_backbone(preset, tmp_path):
    """The presets' [model.longmem] and [train] fit together: a 4-layer backbone (the
    SideNet copies its layers 1 and 3) and the preset's segments and context train."""
    from longctx.train.config import RunConfig, resolve_config
    from longctx.train.loop import Trainer

    corpus = write_word_corpus(tmp_path / "long", 12, 1500, 2500)  # files of 8-14 KB
    table = run_config(corpus).to_dict()
    table["model"]["n_layers"] = 4
    table["model"].pop("longmem")
    base = Trainer(RunConfig.from_dict(table), tmp_path / "base", progress=False)
    base.save()
    cfg = resolve_config(preset, None, [
        f"model.longmem.backbone={tmp_path / 'base'}", f"data.source={corpus}",
        "data.min_document=0", "train.batch_size=1", "train.max_steps=1",
    ])  # fmt: skip
    assert cfg.model.d_model == 32 and cfg.model.longmem.side_layers == 2
    trainer = Trainer(cfg, tmp_path / "lm", progress=False)
    trainer.train_step()
    segment = cfg.model.longmem.segment
    assert cfg.train.context % segment == 0
    assert trainer.streams[0].longmem.bank.tokens(0)[2].numel() > 0  # the bank filled


def test_training_refusals(corpus, tmp_path):
    from longctx.train.loop import Trainer

    with pytest.raises(ValueError, match="frozen backbone"):
        Trainer(run_config(corpus, side_layers=1), tmp_path / "a", progress=False)
    base = Trainer(run_config(corpus), tmp_path / "base", progress=False)
    base.save()
    cfg = run_config(corpus, side_layers=1, backbone=str(tmp_path / "base"), segment=24)
    with pytest.raises(ValueError, match="multiple of model.longmem.segment"):
        Trainer(cfg, tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="not a run or checkpoint"):
        from longctx.model.longmem import adopt_backbone

        adopt_backbone({"longmem": {"backbone": str(tmp_path / "nothing")}})


def test_task_stream_documents_continue_and_start_with_a_separator():
    from longctx.data.stream import TaskStream
    from longctx.data.tasks import TaskData

    data = TaskData("kv-retrieval", 16, question_fraction=0.5, local_fraction=0.3)
    src = TaskStream(data, 2, 32, 0, 2, document=128)
    rows = [src.batch(i) for i in range(5)]
    x = torch.cat([r[0] for r in rows], dim=1)  # (2, 160)
    y = torch.cat([r[1] for r in rows], dim=1)
    assert (x[:, 0] == EOD).all() and (x[:, 128] == EOD).all()
    assert (y[:, 0] == -100).all()
    assert not torch.equal(x[0, :128], x[1, :128])  # rows read different documents
    assert torch.equal(TaskStream(data, 2, 32, 0, 2, document=128).batch(3)[0], rows[3][0])
    with pytest.raises(ValueError, match="multiple of the context"):
        TaskStream(data, 2, 32, 0, 2, document=100)


def test_checkpoint_round_trip_and_segment_evaluation(corpus, tmp_path):
    from longctx.evaluate.longmem import (
        backbone_of,
        bits_by_segment,
        document_windows,
        evaluate_longmem,
    )
    from longctx.model import latest_checkpoint, load_model
    from longctx.train.loop import Trainer

    base = Trainer(run_config(corpus), tmp_path / "base", progress=False)
    base.save()
    cfg = run_config(corpus, side_layers=1, backbone=str(tmp_path / "base"))
    trainer = Trainer(cfg, tmp_path / "lm", progress=False)
    trainer.train_step()
    trainer.save()
    loaded, _ = load_model(latest_checkpoint(tmp_path / "lm" / "checkpoints"))
    x = trainer.source.batch(5)[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), trainer.model(x))
    # the backbone curve is the plain backbone on each segment alone
    plain = backbone_of(loaded)
    w = torch.randint(0, 250, (2, 3 * 16 + 1))
    curve = bits_by_segment(plain, w, 16, alone=True)
    with torch.no_grad():
        nll = plain.nll_per_position(w[:, 16:33])
    assert abs(curve[1] - float(nll.mean()) / np.log(2)) < 1e-5
    val = trainer.source.corpus.val
    res = evaluate_longmem(loaded, val, segments=2, windows=2)
    curves = res["bpb_by_segment"]
    assert set(curves) == {"backbone", "longmem", "memory_off"}
    assert len(curves["longmem"]) == 2
    # segment 1 has an empty bank, so reading it or not is the same; segment 2 reads it
    assert curves["memory_off"][0] == pytest.approx(curves["longmem"][0], abs=1e-9)
    assert curves["memory_off"][1] != pytest.approx(curves["longmem"][1], abs=1e-9)
    assert loaded.cfg.longmem.memory and loaded.side.memory.cfg.memory  # restored
    # the memory-off curve is the model with memory off from the start
    off = dataclasses.replace(loaded.cfg.longmem, memory=False)
    loaded.side.cfg = loaded.side.memory.cfg = loaded.cfg.longmem = off
    rows = document_windows(val, 2 * 16 + 1, 2)
    assert bits_by_segment(loaded, rows, 16) == pytest.approx(curves["memory_off"], abs=1e-9)


def test_memory_read_recomputed_in_blocks_has_the_same_gradients(monkeypatch):
    import longctx.nn.longmem as longmem

    model = make_model()
    state = filled_state(model)
    attn = model.side.memory
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    results = []
    for block in (1000, 2):  # one read, then blocks of 2 queries recomputed in backward
        monkeypatch.setattr(longmem, "QUERY_BLOCK", block)
        xi = x.clone().requires_grad_(True)
        y = attn(xi, torch.arange(7), BankRead(None, state.longmem.bank, None))
        grads = torch.autograd.grad((y * y).sum(), [xi, attn.qkv.weight, attn.memory_bias])
        results.append((y, grads))
    (y1, g1), (y2, g2) = results
    assert torch.allclose(y1, y2, atol=1e-13)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-12)


def test_eval_cli_longmem(corpus, tmp_path, capsys):
    from longctx.cli import main
    from longctx.train.loop import Trainer

    base = Trainer(run_config(corpus), tmp_path / "base", progress=False)
    base.save()
    for name, memory in (("lm", True), ("off", False)):
        cfg = run_config(corpus, side_layers=1, backbone=str(tmp_path / "base"), memory=memory)
        Trainer(cfg, tmp_path / name, progress=False).save()
    argv = ["eval", str(tmp_path / "lm"), "--task", "longmem", "--segments", "2",
            "--windows", "3", "--baseline", str(tmp_path / "off")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "backbone" in out and "baseline" in out and "longmem" in out
    first = tmp_path / "lm" / "eval" / "longmem.json"
    own = json.loads(first.read_text())
    assert own["bank"]["capacity"] == 256
    # --memory-* options set the bank for this evaluation and write their own files
    argv = ["eval", str(tmp_path / "lm"), "--task", "longmem", "--segments", "2",
            "--windows", "3", "--memory-capacity", "2", "--memory-retrieval", "dense"]  # fmt: skip
    assert main(argv) == 0
    tagged = tmp_path / "lm" / "eval" / "longmem.capacity-2.retrieval-dense.json"
    assert tagged.name in capsys.readouterr().out
    small = json.loads(tagged.read_text())
    assert small["bank"] == {"capacity": 2, "chunk": 2, "topk": 0, "retrieval": "exact"}
    assert json.loads(first.read_text()) == own  # the run's own result is kept
    assert (tmp_path / "lm" / "eval" / "longmem_segments.capacity-2.retrieval-dense.png").exists()
    # segment 1 reads no memory either way; later segments read a smaller bank
    mem, few = own["bpb_by_segment"]["longmem"], small["bpb_by_segment"]["longmem"]
    assert mem[0] == pytest.approx(few[0], abs=1e-9) and mem[1] != pytest.approx(few[1], abs=1e-9)
    assert main(["eval", str(tmp_path / "off"), "--task", "longmem", "--memory-topk", "4"]) != 0
    assert "has no bank" in capsys.readouterr().err


def test_export_hf_refuses_a_longmem_model():
    from longctx.model.hf import ConversionError, llama_config

    with pytest.raises(ConversionError, match="LongMem"):
        llama_config(make_model().cfg)


@pytest.mark.parametrize("shared", [False, True])
def test_dense_read_equals_selecting_every_chunk(shared):
    """topk = 0 reads the whole bank densely; it equals the selection path given every
    chunk (forward and gradient). Shared: every row reads every row's tokens (row 1
    holds fewer than row 0 here), which equals one softmax over all of them."""
    model = make_model(topk=0, shared=shared)
    state = filled_state(model)
    attn, bank = model.side.memory, state.longmem.bank
    if shared:
        bank.clear([1])
        bank.add(*(torch.randn(2, 2, 4, 16, dtype=torch.float64) for _ in "kv"), torch.arange(4))
    assert attn.reads_all(bank)
    q = torch.randn(2, 2, 5, 16, dtype=torch.float64, requires_grad=True)
    visible = torch.ones(2, 5, dtype=torch.bool)
    visible[1, 3:] = False
    dense = attn.read(q, bank, visible)
    picked = attn._read(q, bank, visible)  # the gather path, every chunk selected
    for a, b in zip(dense, picked):
        assert torch.allclose(a, b, atol=1e-12)
    w = torch.randn_like(dense[0])
    g1 = torch.autograd.grad((dense[0] * w).sum(), q)[0]
    g2 = torch.autograd.grad((picked[0] * w).sum(), q)[0]
    assert torch.allclose(g1, g2, atol=1e-12)
    assert torch.isneginf(dense[1][1, :, 3:]).all()  # hidden queries read nothing
    if shared:  # brute force: one softmax over both rows' tokens
        bk, bv = (torch.cat(t, dim=1) for t in zip(*(bank.tokens(b)[:2] for b in range(2))))
        assert bk.shape[1] == 3 * S + 2 * 4  # (H, all tokens, D): 28 of row 0, 4 of row 1
        p = torch.softmax(q @ bk.transpose(-1, -2) * 16**-0.5, dim=-1)  # (B, H, 5, t)
        assert torch.allclose(dense[0][0], (p @ bv)[0], atol=1e-12)
        assert torch.allclose(dense[0][1, :, :3], (p @ bv)[1, :, :3], atol=1e-12)


def test_configure_memory_changes_how_the_bank_is_read():
    model = make_model(topk=0)
    x = tokens(n=4 * S)
    dense = model(x)
    model.configure_memory(retrieval="topk", topk=2)
    assert model.cfg.longmem.topk == 2 and model.side.memory.cfg.topk == 2
    assert not torch.equal(model(x), dense)  # 1 chunk of 2 tokens per query now
    model.configure_memory(retrieval="dense")
    assert torch.equal(model(x), dense)
    with pytest.raises(ValueError, match="memory settings are"):
        model.configure_memory(recall_every=3)
    with pytest.raises(ValueError, match="multiple of model.longmem.chunk"):
        model.configure_memory(topk=3)


def test_document_spans_and_long_documents():
    from longctx.data.stream import document_spans, long_documents
    from longctx.evaluate.longmem import document_windows

    stream = np.array([1, 2, EOD, 3, 4, 5, 6, EOD, 7, 8, 9], dtype=np.uint16)
    assert document_spans(stream) == [(0, 3), (3, 8), (8, 11)]  # the last has no EOD
    assert long_documents(stream, 4).tolist() == [3, 4, 5, 6, EOD]
    assert long_documents(stream, 3).tolist() == stream.tolist()
    assert long_documents(stream, 1) is stream
    with pytest.raises(ValueError, match="no document"):
        long_documents(stream, 6)
    assert document_windows(stream, 4, 5).tolist() == [[3, 4, 5, 6]]
    assert document_windows(stream, 2, 5).tolist() == [[1, 2], [3, 4], [7, 8]]
    with pytest.raises(ValueError, match="no validation document"):
        document_windows(stream, 5, 5)
