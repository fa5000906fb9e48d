"""RETRO's retrieval layers: chunked cross-attention and the neighbour encoder against
naive float64 references (forward and every parameter gradient), and the exact
properties of a RETRO decoder (alignment, causality, permutation, retrieval off)."""

import math

import pytest
import torch

from longctx.data.tokenizer import PAD
from longctx.model import DecoderLM, ModelConfig
from longctx.nn.retro import ChunkedCrossAttention, NeighbourEncoder
from longctx.nn.rotary import apply_rotary

M, K, H, C = 4, 2, 2, 16


def retro_model(layers=(1, 2), n_layers=3, seed=0, encoder_dim=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        d_model=C, n_heads=H, n_layers=n_layers,
        retro={"layers": list(layers), "chunk": M, "neighbours": K, "encoder_dim": encoder_dim},
    )  # fmt: skip
    return DecoderLM(cfg).double().eval()


def data(B=2, N=19, chunks=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (B, N), generator=g)
    nb = torch.randint(0, 256, (B, chunks, K, 2 * M), generator=g)
    nb[0, 1, 1, 5:] = PAD  # a continuation cut at a document end
    nb[1, 2, 0] = PAD  # a missing neighbour
    return x, nb


# ---------------------------------------------------------------- naive references


def rotate(v, position):
    """One vector per head (H, D) rotated to ``position``."""
    return apply_rotary(v[None, :, None, :], torch.tensor([position]))[0, :, 0]


def naive_attention(q, keys, values, q_pos, k_pos):
    """Softmax attention of one query (H, D) over (s, H, D) with rotary positions."""
    q = rotate(q, q_pos)
    ks = torch.stack([rotate(k, p) for k, p in zip(keys, k_pos, strict=True)])  # (s, H, D)
    scores = torch.einsum("hd,shd->hs", q, ks) / math.sqrt(q.shape[-1])
    return torch.einsum("hs,shd->hd", scores.softmax(-1), values)


def split_heads(t):
    return t.view(*t.shape[:-1], H, -1)


def naive_cross(attn, x_row, context, q_pos, k_pos, visible):
    """CrossAttention for one query row over context rows (s, C); hidden keys dropped."""
    keep = visible.nonzero().flatten().tolist()
    if not keep:
        return torch.zeros_like(x_row)
    q = split_heads(attn.q(x_row))
    kv = attn.kv(context[keep])
    k, v = split_heads(kv[:, :C]), split_heads(kv[:, C:])
    y = naive_attention(q, k, v, q_pos, [k_pos[i] for i in keep])
    return attn.proj(y.reshape(-1))


def naive_cca(cca, x, encoded, visible):
    """Position by position: t reads chunk u = (t + 1) // m - 1."""
    B, N, _ = x.shape
    out = torch.zeros_like(x)
    for b in range(B):
        for t in range(N):
            u = (t + 1) // M - 1
            if u < 0 or u >= encoded.shape[1]:
                continue
            i = t + 1 - (u + 1) * M
            ctx = encoded[b, u].reshape(-1, C)  # (k r, C)
            k_pos = [j for _ in range(encoded.shape[2]) for j in range(encoded.shape[3])]
            out[b, t] = naive_cross(
                cca.attn, x[b, t], ctx, M - 1 + i, k_pos, visible[b, u].reshape(-1)
            )
    return out


def naive_encoder(enc, emb, chunks, visible):
    """Neighbour by neighbour, token by token."""
    B, L, Kn, R, _ = emb.shape
    out = torch.zeros_like(emb)
    for b in range(B):
        for u in range(L):
            for n in range(Kn):
                h = emb[b, u, n]  # (r, C)
                for li, layer in enumerate(enc.layers):
                    hn = layer.self_norm(h)
                    qkv = layer.self_attn.qkv(hn)
                    q, k, v = (split_heads(t) for t in qkv.split(C, -1))
                    keep = visible[b, u, n].nonzero().flatten().tolist()
                    rows = []
                    for j in range(R):
                        if not keep:
                            rows.append(torch.zeros(C, dtype=h.dtype))
                            continue
                        y = naive_attention(q[j], k[keep], v[keep], j, keep)
                        rows.append(layer.self_attn.proj(y.reshape(-1)))
                    h = h + torch.stack(rows)
                    if li == 0:
                        hn = layer.cross_norm(h)
                        ones = torch.ones(M, dtype=torch.bool)
                        h = h + torch.stack(
                            [naive_cross(layer.cross, hn[j], chunks[b, u], j, list(range(M)), ones)
                             for j in range(R)]
                        )  # fmt: skip
                    h = h + layer.ffn(layer.ffn_norm(h))
                out[b, u, n] = enc.norm(h)
    return out


def grads(module, fn):
    module.zero_grad()
    out = fn() + 0 * sum(p.sum() for p in module.parameters())  # a graph even if all zero
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("N", [3, 8, 13])
def test_cca_equals_naive_reference(N):
    torch.manual_seed(0)
    cca = ChunkedCrossAttention(C, H, M).double()
    x = torch.randn(2, N, C, dtype=torch.float64)
    encoded = torch.randn(2, 3, K, 2 * M, C, dtype=torch.float64)
    visible = torch.rand(2, 3, K, 2 * M) > 0.2
    visible[1, 0] = False  # a chunk whose neighbours are all absent
    fast, g_fast = grads(cca, lambda: cca(x, encoded, visible))
    slow, g_slow = grads(cca, lambda: naive_cca(cca, x, encoded, visible))
    torch.testing.assert_close(fast, slow, atol=1e-12, rtol=0)
    for name, g in g_slow.items():
        torch.testing.assert_close(g_fast[name], g, atol=1e-12, rtol=0, msg=name)
    assert (fast[:, : M - 1] == 0).all()  # rows 0..m-2 read nothing: identity
    # any start: a suffix computed alone equals the same rows of the whole
    for s in range(1, N):
        torch.testing.assert_close(cca(x[:, s:], encoded, visible, start=s), fast[:, s:])


def test_encoder_equals_naive_reference():
    torch.manual_seed(0)
    enc = NeighbourEncoder(C, H, 2, 32).double()
    emb = torch.randn(1, 2, K, 2 * M, C, dtype=torch.float64)
    chunks = torch.randn(1, 2, M, C, dtype=torch.float64)
    visible = torch.rand(1, 2, K, 2 * M) > 0.2
    visible[0, 1, 1] = False  # a missing neighbour
    fast, g_fast = grads(enc, lambda: enc(emb, chunks, visible))
    slow, g_slow = grads(enc, lambda: naive_encoder(enc, emb, chunks, visible))
    torch.testing.assert_close(fast, slow, atol=1e-12, rtol=0)
    for name, g in g_slow.items():
        torch.testing.assert_close(g_fast[name], g, atol=1e-12, rtol=0, msg=name)


# ---------------------------------------------------------------- the RETRO decoder


def test_neighbours_of_chunk_j_reach_position_jm_plus_m_minus_1_first():
    m = retro_model()
    x, nb = data()
    with torch.no_grad():
        base = m(x, neighbours=nb)
        for j in range(nb.shape[1]):
            other = nb.clone()
            other[:, j] = torch.randint(0, 256, other[:, j].shape)
            changed = (m(x, neighbours=other) - base).abs().amax(dim=(0, 2))
            first = (j + 1) * M - 1
            assert (changed[:first] == 0).all()  # bit-identical before
            if first < x.shape[1]:
                assert changed[first] > 0
            else:
                assert (changed == 0).all()  # a chunk no position reads


def test_retro_decoder_is_causal_and_permutation_invariant():
    m = retro_model()
    x, nb = data()
    with torch.no_grad():
        base = m(x, neighbours=nb)
        for t in (0, 5, 11, 18):
            later = x.clone()
            later[:, t] = (later[:, t] + 7) % 256
            assert (m(later, neighbours=nb)[:, :t] == base[:, :t]).all()
        perm = nb[:, :, torch.tensor([1, 0])]
        torch.testing.assert_close(m(x, neighbours=perm), base, atol=1e-12, rtol=0)


def test_retrieval_off_equals_the_plain_decoder():
    m = retro_model()
    x, nb = data()
    plain_cfg = ModelConfig(d_model=C, n_heads=H, n_layers=3)
    plain = DecoderLM(plain_cfg).double().eval()
    missing, unexpected = plain.load_state_dict(m.state_dict(), strict=False)
    assert not missing and unexpected  # the retrieval weights are the extra ones
    with torch.no_grad():
        ref = plain(x)
        assert torch.equal(m(x), ref)  # no neighbours
        assert torch.equal(m(x, neighbours=torch.full_like(nb, PAD)), ref)  # all absent
    off = retro_model(layers=())  # no retrieval layers: the plain decoder, weight for weight
    torch.manual_seed(0)
    same_seed = DecoderLM(plain_cfg).double().eval()
    assert off.retro_encoder is None
    assert off.state_dict().keys() == same_seed.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(off(x), same_seed(x))


def test_retro_gradients_reach_the_retrieval_weights():
    m = retro_model().train()
    x, nb = data()
    logits = m(x, neighbours=nb)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                      x[:, 1:].reshape(-1)).backward()  # fmt: skip
    for name in ("retro_encoder.layers.0.cross.q.weight", "blocks.1.cca.attn.kv.weight",
                 "blocks.2.cca.attn.proj.weight"):  # fmt: skip
        assert dict(m.named_parameters())[name].grad.abs().sum() > 0, name


def test_retro_learns_to_copy_the_continuation_it_is_given():
    """Training end to end: on random tokens (nothing to predict without retrieval),
    each chunk given its true continuation as a neighbour (the oracle), the model learns
    to copy it: positions that read a chunk fall far below the uniform bits, those that
    read none (t < m - 1) stay at them; without neighbours nothing is predictable. An
    off-by-one-chunk alignment anywhere in training would leave nothing to copy."""
    from longctx.evaluate.retro import oracle_neighbours

    m, N, V = 8, 64, 32
    torch.manual_seed(0)
    cfg = ModelConfig(
        d_model=32, n_heads=2, n_layers=2,
        retro={"layers": [1], "chunk": m, "neighbours": 2, "encoder_layers": 1},
    )  # fmt: skip
    model = DecoderLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)

    def sample(batch):
        w = torch.randint(100, 100 + V, (batch, N + 1), generator=g)
        return w, oracle_neighbours(w, m, 2)[:, : N // m]

    for _ in range(200):
        w, nb = sample(16)
        loss = model.loss_terms(w[:, :-1], w[:, 1:], neighbours=nb).lm
        opt.zero_grad()
        loss.backward()
        opt.step()
    w, nb = sample(64)

    def bits(neighbours):  # (N,): mean bits per position
        with torch.no_grad():
            return model.nll_per_position(w, neighbours).mean(0) / math.log(2)

    uniform = math.log2(V)
    with_oracle, without = bits(nb), bits(None)
    assert with_oracle[: m - 1].min() > uniform - 0.3  # nothing read yet
    assert with_oracle[m - 1 :].mean() < 0.5  # copied: uniform is 5 bits
    assert without.min() > uniform - 0.3


def test_retro_errors():
    with pytest.raises(ValueError, match="retro.layers"):
        ModelConfig(d_model=C, n_heads=H, n_layers=2, retro={"layers": [2]})
    with pytest.raises(ValueError, match="chunk"):
        ModelConfig(d_model=C, n_heads=H, n_layers=2, retro={"layers": [1], "chunk": 0})
    with pytest.raises(ValueError, match="encoder_dim"):
        ModelConfig(d_model=C, n_heads=H, n_layers=2, retro={"layers": [1], "encoder_dim": 6})
    with pytest.raises(ValueError, match="unknown key"):
        ModelConfig.from_dict({"retro": {"layer": [1]}})
    x, nb = data()
    with pytest.raises(ValueError, match="no retrieval layers"):
        retro_model(layers=())(x, neighbours=nb)
    m = retro_model()
    with pytest.raises(ValueError, match="shape"):
        m(x, neighbours=nb[0])
    with pytest.raises(ValueError, match="position 0"):
        m(x, neighbours=nb, start=4)
    state = m.new_state(2, capacity=32)
    with pytest.raises(ValueError, match="new_state"):
        m(x, state, neighbours=nb)
    with pytest.raises(ValueError, match="shape"):
        m.new_state(2, neighbours=nb[0])
    with pytest.raises(ValueError, match="retriever must return"):
        m(x, m.new_state(2, capacity=32, retriever=lambda ids: ids))
    with pytest.raises(ValueError, match="no retrieval layers"):
        retro_model(layers=()).new_state(2, retriever=retriever)


def retriever(ids):
    """Deterministic neighbours (B, k, 2m) from a chunk's ids (B, m)."""
    out = []
    for row in ids:
        g = torch.Generator().manual_seed(int((row * torch.arange(1, M + 1)).sum()))
        out.append(torch.randint(0, 256, (K, 2 * M), generator=g))
    return torch.stack(out)


@pytest.mark.parametrize(
    "sizes,encoder_dim", [([19], 0), ([5, 14], 0), ([1] * 19, 0), ([3, 1, 8, 7], 8)]
)
def test_decoding_equals_the_full_forward(sizes, encoder_dim):
    m = retro_model(encoder_dim=encoder_dim)
    x, nb = data()
    with torch.no_grad():
        full = m(x, neighbours=nb)
        state = m.new_state(2, capacity=32, neighbours=nb)
        outs, a = [], 0
        for n in sizes:
            outs.append(m(x[:, a : a + n], state))
            a += n
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-12, rtol=0)
    assert state.retro.chunks == 4 and state.nbytes > 0


def test_generation_retrieves_at_each_chunk_end_and_equals_the_full_forward():
    from longctx.model import generate

    m = retro_model()
    calls = []

    def counting(ids):
        calls.append(ids.clone())
        return retriever(ids)

    prompt = data()[0][0, :6].tolist()
    gen = generate(m, prompt, 13, temperature=0, return_logits=True, retriever=counting)
    seq = torch.tensor([prompt + gen.tokens])
    assert len(calls) == (len(prompt) + 12) // M  # once per completed chunk, encoded once
    for u, ids in enumerate(calls):
        assert torch.equal(ids, seq[:, u * M : (u + 1) * M])
    nb = torch.stack([retriever(seq[:, u * M : (u + 1) * M]) for u in range(len(calls))], 1)
    with torch.no_grad():
        full = m(seq, neighbours=nb)
    for i, logits in enumerate(gen.logits):  # step i predicts position len(prompt) + i
        torch.testing.assert_close(logits[0], full[0, len(prompt) - 1 + i], atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="RETRO model generates with a cache"):
        generate(m, prompt, 2, cache="none", retriever=counting)
