"""CoLT5 conditional computation (longctx.nn.colt5) and the masked-attention op under it."""

import pytest
import torch

from conftest import check_against_reference, make_qkv
from longctx import ops
from longctx.model.config import ModelConfig
from longctx.model.generate import generate
from longctx.model.lm import DecoderLM
from longctx.nn import (
    ConditionalAttention,
    ConditionalFeedForward,
    Router,
    apply_routed,
    soft_topk,
)
from longctx.nn.rotary import apply_rotary
from longctx.ops import reference

F64 = torch.float64


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # module initialisation is random: every test sees fixed weights


def _grads(x, module):
    """x's gradient, then every parameter's (zeros where none reached it)."""
    return [x.grad.clone()] + [
        torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in module.parameters()
    ]


def randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------- masked attention op


def _random_mask(shape, seed, p=0.6):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < p


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "mask_shape", [(2, 3, 7, 11), (2, 1, 7, 11), (1, 1, 1, 11), (11,), (7, 11)]
)
def test_masked_attention_matches_reference(dtype, mask_shape):
    q, k, v = make_qkv(2, 3, 7, 11, 8, dtype)
    mask = _random_mask(mask_shape, 1)
    if len(mask_shape) >= 2 and mask_shape[-2] > 2:
        mask[..., 2, :] = False  # a row that sees nothing
    check_against_reference(
        lambda q, k, v: ops.masked_attention(q, k, v, mask, return_lse=True),
        lambda q, k, v: reference.masked_attention(q, k, v, mask),
        q,
        k,
        v,
        dtype,
    )


@pytest.mark.parametrize("mask_shape", [(2, 1, 9, 11), (2, 1, 1, 11), (9, 1)])
@pytest.mark.parametrize("q_offset", [None, 0, 3, -2])
def test_masked_attention_causal_and_tiled(monkeypatch, q_offset, mask_shape):
    import longctx.ops.masked as masked

    # 2-4 query rows per tile: the mask's own batch and head sizes count, not q's
    monkeypatch.setattr(masked, "TILE_ELEMS", 2 * 11 * 2)
    q, k, v = make_qkv(2, 3, 9, 11, 8)
    # broadcast axes (key padding (B, 1, 1, Nk), a query mask (Nq, 1)) stay whole per tile
    mask = _random_mask(mask_shape, 2, p=0.8)
    want_mask = mask & reference.causal_mask(9, 11, q_offset)
    check_against_reference(
        lambda q, k, v: ops.masked_attention(
            q, k, v, mask, causal=True, q_offset=q_offset, return_lse=True
        ),
        lambda q, k, v: reference.masked_attention(q, k, v, want_mask),
        q,
        k,
        v,
        F64,
    )


def test_masked_attention_tiles_bound_the_mask(monkeypatch):
    """Query tiles bound the mask a tile materialises: a key-padding mask (the same for
    every query) runs as one tile; a per-query mask is cut by its own sizes."""
    import longctx.ops.masked as masked

    seen = []
    real = masked.tiled_masked_attention
    monkeypatch.setattr(
        masked,
        "tiled_masked_attention",
        lambda q, k, v, tiles, *a: seen.append(tiles) or real(q, k, v, tiles, *a),
    )
    monkeypatch.setattr(masked, "TILE_ELEMS", 2 * 11 * 3)
    q, k, v = make_qkv(2, 3, 9, 11, 8)
    ops.masked_attention(q, k, v, _random_mask((2, 1, 1, 11), 3))
    ops.masked_attention(q, k, v, _random_mask((2, 1, 9, 11), 3))
    assert [len(t) for t in seen] == [1, 3]  # 3 query rows of (2, 1, rows, 11) per tile


def test_masked_attention_bad_mask():
    q, k, v = make_qkv(1, 2, 4, 5, 8)
    with pytest.raises(TypeError, match="torch.bool"):
        ops.masked_attention(q, k, v, torch.ones(4, 5))
    with pytest.raises(ValueError, match="broadcast"):
        ops.masked_attention(q, k, v, torch.ones(4, 4, dtype=torch.bool))


# ----------------------------------------------------------------------- soft top-k


def _kkt_solution(s, k, eps):
    """lambda_i = min(1, exp((s_i + a) / eps)) with sum = k, a found by bisection."""
    lo, hi = -s.max().item() - 50 * eps, -s.min().item() + 50 * eps
    for _ in range(200):
        a = (lo + hi) / 2
        if torch.clamp(torch.exp((s + a) / eps), max=1).sum() > k:
            hi = a
        else:
            lo = a
    return torch.clamp(torch.exp((s + (lo + hi) / 2) / eps), max=1)


@pytest.mark.parametrize("n,k", [(40, 5), (300, 19), (1000, 63)])
def test_soft_topk_converges_to_the_constrained_optimum(n, k):
    s = randn(1, n, seed=n)
    lam = soft_topk(s, k)  # paper defaults: epsilon 1, 50 iterations
    assert float(lam.min()) >= 0 and float(lam.max()) <= 1 + 1e-12
    assert abs(float(lam.sum()) - k) < 1e-6
    torch.testing.assert_close(lam[0], _kkt_solution(s[0], k, 1.0), atol=1e-6, rtol=0)
    # scores well separated relative to epsilon give the hard top-k indicator
    top = torch.zeros(n, dtype=F64).index_fill_(0, s[0].topk(k).indices, 1.0)
    # (the dual iteration saturates a few scores per step: a wide spread needs more steps)
    hard = soft_topk((s + 2 * top) * 10, k, iterations=1000)
    torch.testing.assert_close(hard[0], top, atol=1e-6, rtol=0)


def test_soft_topk_gradcheck_float64():
    s = randn(2, 12, seed=3).requires_grad_()
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 4:7] = False
    assert torch.autograd.gradcheck(lambda s: soft_topk(s, 4, iterations=50), (s,))
    assert torch.autograd.gradcheck(lambda s: soft_topk(s, 4, valid=valid), (s,))


def test_soft_topk_edge_rows():
    s = randn(4, 6, seed=1)
    valid = torch.ones(4, 6, dtype=torch.bool)
    valid[1, 3:] = False  # 3 valid < k
    valid[2] = False  # all padding
    lam = soft_topk(s, torch.tensor([0, 4, 4, 6]), valid=valid)
    assert torch.equal(lam[0], torch.zeros(6, dtype=F64))  # k = 0
    assert torch.equal(lam[1], valid[1].to(F64))  # k >= valid count: exactly 1 on valid
    assert torch.equal(lam[2], torch.zeros(6, dtype=F64))  # no valid token
    assert torch.equal(lam[3], torch.ones(6, dtype=F64))  # k = N
    s.requires_grad_()
    soft_topk(s, 4, valid=valid).sum().backward()
    assert torch.isfinite(s.grad).all()


def test_soft_topk_float32_under_autocast():
    s = randn(2, 64, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lam = soft_topk(s.bfloat16(), 4)
    assert lam.dtype == torch.float32
    x = randn(2, 64, 16, dtype=torch.float32)
    router = Router(16, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = router(x)
    assert r.scores.dtype == torch.float32 and r.weights.dtype == torch.float32


# --------------------------------------------------------------- non-causal routing


@pytest.mark.parametrize("n,capacity,k", [(37, 1 / 16, 3), (64, 1 / 8, 8), (50, 7, 7), (5, 9, 5)])
def test_router_routes_exactly_k_top_scores(n, capacity, k):
    x = randn(3, n, 16)
    r = Router(16, capacity).double()(x)
    assert r.indices.shape == (3, k) and bool(r.valid.all())
    for b in range(3):
        assert len(set(r.indices[b].tolist())) == k
        assert set(r.indices[b].tolist()) == set(r.scores[b].topk(k).indices.tolist())
        assert torch.equal(r.indices[b], r.indices[b].sort().values)  # position order
    lam = soft_topk(r.scores, k)
    torch.testing.assert_close(r.weights, lam.gather(1, r.indices))


def test_router_bad_options():
    with pytest.raises(ValueError, match="fraction must be in"):
        Router(8, 1.5)
    with pytest.raises(ValueError, match="count must be >= 0"):
        Router(8, -1)
    with pytest.raises(TypeError, match="fraction"):
        Router(8, "half")
    with pytest.raises(ValueError, match="causal routing needs a capacity fraction"):
        Router(8, 4, causal=True)
    with pytest.raises(ValueError, match="epsilon"):
        Router(8, 0.5, epsilon=0)
    with pytest.raises(ValueError, match="mask must have shape"):
        Router(8, 0.5)(randn(2, 5, 8, dtype=torch.float32), torch.ones(2, 4, dtype=torch.bool))


def test_padding_is_never_routed():
    x = randn(2, 40, 16)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[0, 30:] = False
    mask[1, ::2] = False
    for causal in (False, True):
        r = Router(16, 0.5, causal=causal).double()
        if causal:
            r.bias.data.fill_(5.0)  # would route every token
        out = r(x, mask)
        routed = out.indices[out.valid]
        rows = torch.arange(2).unsqueeze(-1).expand_as(out.indices)[out.valid]
        assert bool(mask[rows, routed].all())
        assert float(out.weights[~out.valid].detach().abs().sum()) == 0


def _ffn_parts(ffn, x):
    r = ffn.router(x)
    return ffn.light(x), r


def test_ffn_light_everywhere_heavy_on_routed_times_weight():
    ffn = ConditionalFeedForward(16, 24, capacity=5).double()
    x = randn(2, 33, 16)
    y = ffn(x)
    light, r = _ffn_parts(ffn, x)
    routed = torch.zeros(2, 33, dtype=torch.bool)
    routed[torch.arange(2).unsqueeze(-1), r.indices] = True
    torch.testing.assert_close(y[~routed], light[~routed], atol=0, rtol=0)  # exactly light
    for b in range(2):
        idx = r.indices[b]
        heavy = ffn.heavy(x[b, idx]) * r.weights[b].unsqueeze(-1)
        torch.testing.assert_close(y[b, idx], light[b, idx] + heavy, atol=1e-12, rtol=0)


def test_ffn_capacity_extremes():
    x = randn(2, 20, 16)
    full = ConditionalFeedForward(16, 24, capacity=1.0).double()
    torch.testing.assert_close(full(x), full.light(x) + full.heavy(x), atol=1e-12, rtol=0)
    big = ConditionalFeedForward(16, 24, capacity=50).double()  # k > N
    torch.testing.assert_close(big(x), big.light(x) + big.heavy(x), atol=1e-12, rtol=0)
    none = ConditionalFeedForward(16, 24, capacity=0).double()
    assert torch.equal(none(x), none.light(x))


def test_router_gets_gradient_only_through_the_weights(monkeypatch):
    ffn = ConditionalFeedForward(16, 24, capacity=6).double()
    x = randn(2, 30, 16)
    ffn(x).pow(2).sum().backward()
    assert ffn.router.weight.grad is not None and float(ffn.router.weight.grad.abs().sum()) > 0
    # negative control: without the weighting, selection alone passes no gradient
    ffn.zero_grad(set_to_none=True)
    forward = Router.forward

    def unweighted(self, x, mask=None):
        r = forward(self, x, mask)
        r.weights = r.valid.to(x.dtype)
        return r

    monkeypatch.setattr(Router, "forward", unweighted)
    ffn(x).pow(2).sum().backward()
    assert ffn.router.weight.grad is None
    assert ffn.heavy.w2.weight.grad is not None  # the heavy branch itself still learns


def _split_heads(t, h):
    B, N, _ = t.shape
    return t.view(B, N, h, -1).transpose(1, 2)


def naive_colt5_attention(attn: ConditionalAttention, x, mask=None):
    """The module's definition written out row by row with the O(N^2) reference ops
    (routing decisions taken from the module's routers, whose rules are tested above)."""
    B, N, C = x.shape
    pos = torch.arange(N)
    D, Hl, Hh = attn.head_dim, attn.light_heads, attn.heavy_heads
    valid = torch.ones(B, N, dtype=torch.bool) if mask is None else mask
    q, k, v = (_split_heads(t, Hl) for t in (x @ attn.light_qkv.weight.T).split(Hl * D, -1))
    q, k = apply_rotary(q, pos, attn.rope_base), apply_rotary(k, pos, attn.rope_base)
    band = reference.sliding_window_mask(N, attn.window, causal=attn.causal)
    light, _ = reference.masked_attention(q, k, v, band & valid[:, None, None, :])
    y = light.transpose(1, 2).reshape(B, N, -1) @ attn.light_proj.weight.T
    rq, rkv = attn.q_router(x, mask), attn.kv_router(x, mask)
    heavy_rows = []
    for b in range(B):
        qi, wq = rq.indices[b][rq.valid[b]], rq.weights[b][rq.valid[b]]
        ki, wk = rkv.indices[b][rkv.valid[b]], rkv.weights[b][rkv.valid[b]]
        if len(qi) == 0 or len(ki) == 0:
            heavy_rows.append(torch.zeros(N, C, dtype=x.dtype))
            continue
        hq = _split_heads((x[b, qi] @ attn.heavy_q.weight.T)[None], Hh)
        kv = (x[b, ki] * wk[:, None]) @ attn.heavy_kv.weight.T
        hk, hv = (_split_heads(t[None], Hh) for t in kv.split(Hh * D, -1))
        hq = apply_rotary(hq, qi, attn.rope_base)
        hk = apply_rotary(hk, ki, attn.rope_base)
        allowed = torch.ones(len(qi), len(ki), dtype=torch.bool)
        if attn.causal:
            allowed = ki[None, :] <= qi[:, None]
        o, _ = reference.masked_attention(hq, hk, hv, allowed)
        o = o[0].transpose(0, 1).reshape(len(qi), -1) @ attn.heavy_proj.weight.T
        row = torch.zeros(N, C, dtype=x.dtype).index_add(0, qi, o * wq[:, None])
        heavy_rows.append(row)
    return y + torch.stack(heavy_rows), rq


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 37, 300])
def test_attention_matches_naive_forward_and_backward(causal, n):
    attn = ConditionalAttention(32, 4, window=16, causal=causal).double()
    if causal:
        attn.q_router.bias.data.fill_(0.0)  # route about half, so every case is busy
        attn.kv_router.bias.data.fill_(0.3)
    else:
        attn.q_router.capacity, attn.kv_router.capacity = 0.25, 0.5
    x = randn(2, n, 32, seed=n).requires_grad_()
    g = randn(2, n, 32, seed=99)
    y = attn(x)
    (y * g).sum().backward()
    got = _grads(x, attn)
    x.grad = None
    attn.zero_grad()
    want, _ = naive_colt5_attention(attn, x)
    (want * g).sum().backward()
    expect = _grads(x, attn)
    torch.testing.assert_close(y, want, atol=1e-10, rtol=1e-10)
    for a, b in zip(got, expect, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_attention_unrouted_queries_get_the_light_output_exactly():
    attn = ConditionalAttention(32, 4, window=8, q_capacity=4, kv_capacity=9).double()
    x = randn(2, 50, 32)
    y = attn(x)
    heavy_zeroed = ConditionalAttention(32, 4, window=8, q_capacity=0, kv_capacity=9).double()
    heavy_zeroed.load_state_dict(attn.state_dict())
    light = heavy_zeroed(x)  # k = 0: the light branch alone
    r = attn.q_router(x)
    routed = torch.zeros(2, 50, dtype=torch.bool)
    routed[torch.arange(2).unsqueeze(-1), r.indices] = True
    assert int(routed.sum()) == 8
    assert torch.equal(y[~routed], light[~routed])
    assert not torch.allclose(y[routed], light[routed])


def test_attention_routing_everything_is_light_plus_dense_heavy():
    attn = ConditionalAttention(32, 4, window=8, q_capacity=1.0, kv_capacity=1.0).double()
    x = randn(2, 40, 32)
    want, _ = naive_colt5_attention(attn, x)
    torch.testing.assert_close(attn(x), want, atol=1e-10, rtol=0)
    r = attn.kv_router(x)
    assert torch.equal(r.weights, torch.ones_like(r.weights))  # k >= N: weights exactly 1


def test_attention_padding_mask_and_all_padding_row():
    attn = ConditionalAttention(32, 4, window=8, q_capacity=0.25, kv_capacity=0.5).double()
    x = randn(3, 40, 32).requires_grad_()
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[0, 25:] = False
    mask[1] = False  # all padding
    y = attn(x, mask=mask)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    want, _ = naive_colt5_attention(attn, x.detach(), mask)
    torch.testing.assert_close(y, want, atol=1e-10, rtol=0)
    # padding keys are invisible: changing padded tokens leaves real tokens unchanged
    x2 = x.detach().clone()
    x2[0, 25:] += 10.0
    torch.testing.assert_close(attn(x2, mask=mask)[0, :25], y[0, :25], atol=1e-12, rtol=0)
    ffn = ConditionalFeedForward(32, 16, capacity=0.25).double()
    out = ffn(x, mask)
    assert torch.isfinite(out).all()


def test_attention_bad_options():
    with pytest.raises(ValueError, match="light_heads"):
        ConditionalAttention(32, 4, light_heads=4)
    with pytest.raises(ValueError, match="multiple"):
        ConditionalAttention(30, 4)
    attn = ConditionalAttention(32, 4)
    with pytest.raises(ValueError, match="decoding cache needs causal"):
        attn.new_state(1, 8, torch.float32, "cpu")


# -------------------------------------------------------------------- causal routing


def _causal_modules():
    attn = ConditionalAttention(32, 4, window=6, causal=True, q_capacity=0.3, kv_capacity=0.4)
    ffn = ConditionalFeedForward(32, 16, capacity=0.3, causal=True)
    for r in (attn.q_router, attn.kv_router, ffn.router):
        r.bias.data.zero_()  # about half routed: decisions on both sides of the threshold
    return attn.double(), ffn.double()


@pytest.mark.parametrize("j", [0, 5, 17, 39])
def test_causal_perturbing_a_token_leaves_earlier_outputs_unchanged(j):
    x = randn(2, 40, 32)
    x2 = x.clone()
    x2[:, j:] = randn(2, 40 - j, 32, seed=7)  # token j and everything after it
    for mod in _causal_modules():
        y, y2 = mod(x), mod(x2)
        # equal up to float64 rounding (the routed sets differ in length after j)
        torch.testing.assert_close(y[:, :j], y2[:, :j], atol=1e-13, rtol=0)
        assert not torch.allclose(y[:, j], y2[:, j])


def test_causal_every_prefix_equals_the_full_sequence():
    x = randn(2, 45, 32, seed=4)
    for mod in _causal_modules():
        full = mod(x)
        for n in range(1, 46):
            torch.testing.assert_close(mod(x[:, :n]), full[:, :n], atol=1e-12, rtol=0)


def test_causal_routing_is_the_sign_of_a_per_token_score():
    r = Router(16, 0.25, causal=True).double()
    x = randn(2, 64, 16)
    out = r(x)
    s = x @ r.weight + r.bias
    for b in range(2):
        assert out.indices[b][out.valid[b]].tolist() == (s[b] > 0).nonzero().flatten().tolist()
    torch.testing.assert_close(out.weights[out.valid], torch.sigmoid(s)[s > 0])
    assert r.aux_loss is not None
    with torch.no_grad():
        r(x)
    assert r.aux_loss is None


def test_causal_aux_loss_pulls_the_routed_fraction_to_capacity():
    torch.manual_seed(0)
    r = Router(16, 1 / 16, causal=True)
    r.bias.data.fill_(2.0)  # starts routing almost everything
    opt = torch.optim.Adam(r.parameters(), lr=0.05)
    x = randn(8, 256, 16, dtype=torch.float32)
    for _ in range(300):
        r(x)
        opt.zero_grad()
        r.aux_loss.backward()
        opt.step()
    r(randn(8, 256, 16, seed=5, dtype=torch.float32))  # held-out tokens
    assert abs(float(r.routed_fraction) - 1 / 16) < 0.02


# ------------------------------------------------------------------------- the model


def _colt5_model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(
        d_model=64,
        n_layers=2,
        n_heads=4,
        attention={"kind": "colt5", "window": 8, "q_capacity": 0.3, "kv_capacity": 0.4},
        ffn={"kind": "colt5", "capacity": 0.3},
        **kw,
    )
    model = DecoderLM(cfg).double()
    for r in model.routers().values():
        r.bias.data.zero_()
    return model


def test_model_colt5_is_causal_and_reports_routing():
    model = _colt5_model()
    tokens = torch.randint(0, 256, (2, 50), generator=torch.Generator().manual_seed(1))
    logits = model(tokens)
    for n in (1, 9, 31):
        torch.testing.assert_close(model(tokens[:, :n]), logits[:, :n], atol=1e-10, rtol=0)
    fractions = model.routed_fractions()
    assert sorted(fractions) == sorted(
        f"layer{i}.{r}" for i in range(2) for r in ("ffn", "attn_q", "attn_kv")
    )
    assert all(0 < f < 1 for f in fractions.values())
    terms = model.loss_terms(tokens[:, :-1], tokens[:, 1:])
    lm, aux = terms.lm, terms.router_aux
    assert aux is not None and float(aux.detach()) > 0
    total = model.loss(tokens[:, :-1], tokens[:, 1:])
    torch.testing.assert_close(total, lm + model.cfg.colt5_aux_weight * aux)
    total.backward()
    for r in model.routers().values():
        assert r.weight.grad is not None and float(r.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("prefill", [1, 7, 64])
def test_model_colt5_generation_equals_full_forward(prefill):
    model = _colt5_model()
    prompt = torch.randint(0, 256, (2, 23), generator=torch.Generator().manual_seed(2))
    g = generate(model, prompt, 25, temperature=0, return_logits=True, prefill=prefill)
    seq = torch.cat([prompt, g.batch], dim=1)
    full = model(seq)
    for i, step_logits in enumerate(g.logits):
        torch.testing.assert_close(step_logits, full[:, 22 + i], atol=1e-10, rtol=0)
    again = generate(model, prompt, 25, temperature=0, cache="none")
    assert torch.equal(again.batch, g.batch)
    assert g.cache_bytes[-1] > 0


def test_model_colt5_config_errors_and_flops():
    with pytest.raises(ValueError, match="model.ffn must be one of"):
        ModelConfig(ffn="moe")
    with pytest.raises(ValueError, match="colt5_q_capacity"):
        ModelConfig(attention="colt5", colt5_q_capacity=2.0)
    with pytest.raises(ValueError, match="heavy branch has heads"):
        ModelConfig(attention="colt5", n_heads=4, colt5_light_heads=4)
    dense = DecoderLM(ModelConfig(d_model=64, n_layers=2, n_heads=4))
    colt5 = DecoderLM(
        ModelConfig(d_model=64, n_layers=2, n_heads=4, attention="colt5", ffn="colt5")
    )
    assert colt5.num_params() > dense.num_params()  # heavy branches hold more weights ...
    f_dense, f_colt5 = dense.flops_per_token(16384), colt5.flops_per_token(16384)
    assert f_colt5["forward"] < f_dense["forward"] / 5  # ... but touch few tokens at 16k
    assert f_colt5["attention_forward"] < f_dense["attention_forward"] / 20


def test_apply_routed_scatters_weighted_rows():
    x = randn(2, 6, 3)
    from longctx.nn import Routing

    r = Routing(
        indices=torch.tensor([[1, 4], [2, 0]]),
        weights=torch.tensor([[0.5, 2.0], [3.0, 0.0]], dtype=F64),
        valid=torch.tensor([[True, True], [True, False]]),
        scores=torch.zeros(2, 6),
    )
    out = apply_routed(x, r, lambda t: t * 10)
    want = torch.zeros_like(x)
    want[0, 1], want[0, 4], want[1, 2] = 5 * x[0, 1], 20 * x[0, 4], 30 * x[1, 2]
    torch.testing.assert_close(out, want, atol=1e-13, rtol=0)
    assert torch.equal(out[1, 0], torch.zeros(3, dtype=F64))  # the padding slot adds nothing
