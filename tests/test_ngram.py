"""The n-gram input embedding (longctx.nn.ngram), its use in the model, and attn_init_std."""

import pytest
import torch

from longctx.model.config import ModelConfig
from longctx.model.lm import DecoderLM
from longctx.nn.ngram import NgramEmbedding, previous_tokens

F64 = torch.float64


def _naive(tables: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """sum_{i>=1} E_i[x_{t-i}] by explicit loops (offsets before the start skipped)."""
    B, N = tokens.shape
    out = torch.zeros(B, N, tables.shape[-1], dtype=tables.dtype) + 0 * tables.sum()
    for b in range(B):
        for t in range(N):
            for i in range(1, tables.shape[0] + 1):
                if t - i >= 0:
                    out[b, t] += tables[i - 1, tokens[b, t - i]]
    return out


@pytest.mark.parametrize("n, N", [(2, 1), (2, 9), (5, 3), (5, 17), (8, 8)])
def test_ngram_embedding_equals_naive_loops_forward_and_backward(n, N):
    emb = NgramEmbedding(11, 6, n).double()
    tokens = torch.randint(0, 11, (2, N), generator=torch.Generator().manual_seed(n * N))
    out = emb(tokens)
    ref = _naive(emb.tables, tokens)
    torch.testing.assert_close(out, ref, atol=1e-14, rtol=0)
    w = torch.randn_like(out)
    (g,) = torch.autograd.grad((out * w).sum(), emb.tables)
    (g_ref,) = torch.autograd.grad((_naive(emb.tables, tokens) * w).sum(), emb.tables)
    torch.testing.assert_close(g, g_ref, atol=1e-14, rtol=0)
    assert torch.autograd.gradcheck(
        lambda t: (NgramEmbedding.forward(_with_tables(emb, t), tokens) * w).sum(),
        (emb.tables.detach().clone().requires_grad_(),),
    )


def _with_tables(emb, tables):
    clone = NgramEmbedding(emb.vocab_size, tables.shape[-1], emb.n).double()
    del clone.tables
    clone.tables = tables
    return clone


def test_history_carries_chunks_exactly():
    emb = NgramEmbedding(11, 6, 4).double()
    tokens = torch.randint(0, 11, (3, 20), generator=torch.Generator().manual_seed(0))
    whole = emb(tokens)
    history = torch.full((3, 3), -1)
    parts = []
    for a, b in [(0, 1), (1, 3), (3, 10), (10, 20)]:  # chunks shorter and longer than n - 1
        parts.append(emb(tokens[:, a:b], history))
        NgramEmbedding.advance(history, tokens[:, a:b])
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=0, rtol=0)
    assert history.tolist() == tokens[:, -3:].tolist()
    assert previous_tokens(tokens[:, :2], 4).tolist()[0] == [[-1, -1, -1], [tokens[0, 0], -1, -1]]


def test_bad_input():
    with pytest.raises(ValueError, match="n >= 2"):
        NgramEmbedding(11, 6, 1)
    emb = NgramEmbedding(11, 6, 4)
    with pytest.raises(ValueError, match=r"history must have shape \(batch, n - 1\) = \(2, 3\)"):
        emb(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="model.ngram must be an integer >= 1"):
            ModelConfig(ngram=bad)


def _model(**kw):
    torch.manual_seed(0)
    return DecoderLM(ModelConfig(d_model=32, n_layers=2, n_heads=2, **kw)).double()


def test_model_ngram_is_causal_and_reaches_n_minus_1_back():
    model = _model(ngram=4)
    t = torch.randint(0, 250, (1, 12), generator=torch.Generator().manual_seed(0))
    t2 = t.clone()
    t2[0, 5] = (t[0, 5] + 1) % 250
    a, b = model(t), model(t2)
    torch.testing.assert_close(a[:, :5], b[:, :5], atol=0, rtol=0)
    assert not torch.allclose(a[:, 5], b[:, 5])
    # a model without attention mixing would see the change only 3 positions ahead:
    # check the embedding itself
    e1, e2 = model.embed_tokens(t), model.embed_tokens(t2)
    changed = (e1 - e2).abs().sum(-1)[0] > 0
    assert changed.tolist() == [i in (5, 6, 7, 8) for i in range(12)]


def test_model_chunked_input_needs_history():
    model = _model(ngram=3)
    t = torch.randint(0, 250, (2, 10), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="input at position 4 needs ``history``"):
        model(t[:, 4:], start=4)
    with pytest.raises(ValueError, match="explicit positions"):
        model(t, positions=torch.arange(10))
    assert _model().new_state(2).history is None
    p = _model(ngram=3)
    assert p.num_params() - p.num_params(non_embedding=True) == 3 * 264 * 32


def test_sequence_parallel_refuses_ngram():
    from longctx.distributed.training import check_model

    with pytest.raises(ValueError, match="not supported with sequence parallelism"):
        check_model(None, ModelConfig(ngram=2), 64)


def test_attn_init_std_sets_only_the_qkv_projections():
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(d_model=64, n_layers=2, n_heads=2, attn_init_std=0.1))
    for name, p in model.named_parameters():
        if name.endswith("qkv.weight"):
            assert 0.09 < float(p.detach().std()) < 0.11, name
        elif name.endswith("w1.weight"):
            assert 0.018 < float(p.detach().std()) < 0.022, name
    with pytest.raises(ValueError, match="model.attn_init_std must be a number >= 0"):
        ModelConfig(attn_init_std=-1)
    with pytest.raises(ValueError, match="model.init_std must be > 0"):
        ModelConfig(init_std=0)
