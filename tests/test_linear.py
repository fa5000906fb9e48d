"""Linear attention and retention (ops.linear, nn.linear): parallel, chunkwise and
recurrent forms equal, causal, decoding equal to the full forward."""

import pytest
import torch

from conftest import make_qkv
from longctx import ops
from longctx.model import DecoderLM, ModelConfig, generate
from longctx.ops import linear as lin
from longctx.ops import reference as ref

FORMS = {
    "linear": (
        lambda q, k, v, **kw: lin.linear_attention(q, k, v, **kw),
        ref.linear_attention,
        ref.linear_attention_recurrent,
    ),
    "retention": (
        lambda q, k, v, **kw: lin.retention(q, k, v, lin.retention_decays(q.shape[1]), **kw),
        lambda q, k, v: ref.retention(q, k, v, lin.retention_decays(q.shape[1])),
        lambda q, k, v: ref.retention_recurrent(q, k, v, lin.retention_decays(q.shape[1])),
    ),
}


@pytest.mark.parametrize("kind", list(FORMS))
@pytest.mark.parametrize("chunk", [1, 5, 37, 64])
def test_parallel_chunkwise_and_recurrent_forms_are_equal(kind, chunk):
    chunkwise, parallel, recurrent = FORMS[kind]
    q, k, v = make_qkv(2, 3, 37, 37, 8, dv=6)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    g = torch.randn(2, 3, 37, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = []
    for fn in (lambda: chunkwise(q, k, v, chunk=chunk), lambda: parallel(q, k, v)):
        out = fn()
        results.append((out, *torch.autograd.grad((out * g).sum(), (q, k, v))))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(recurrent(q, k, v), results[1][0], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("kind", list(FORMS))
def test_state_continues_exactly_across_calls(kind):
    chunkwise, parallel, _ = FORMS[kind]
    q, k, v = make_qkv(1, 2, 30, 30, 8)
    first, state = chunkwise(q[:, :, :11], k[:, :, :11], v[:, :, :11], chunk=4, return_state=True)
    rest = chunkwise(q[:, :, 11:], k[:, :, 11:], v[:, :, 11:], chunk=7, state=state)
    torch.testing.assert_close(torch.cat([first, rest], 2), parallel(q, k, v), atol=1e-12, rtol=0)


def _model(kind, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    attention = {"kind": kind, "chunk": 6}
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, attention=attention, **kw)
    return DecoderLM(cfg).to(dtype)


@pytest.mark.parametrize("kind", ["linear", "retention"])
def test_models_are_causal_and_decode_equals_the_full_forward(kind):
    model = _model(kind)
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    full = model(tokens)
    changed = tokens.clone()
    changed[:, 25:] = (changed[:, 25:] + 7) % 256
    torch.testing.assert_close(model(changed)[:, :25], full[:, :25], atol=0, rtol=0)
    for policy in ("full", "dilated", "none"):
        gen = generate(model, tokens[0, :9].tolist(), 20, cache=policy, temperature=0,
                       prefill=4, return_logits=True)  # fmt: skip
        seq = torch.tensor(tokens[0, :9].tolist() + gen.tokens)
        want = model(seq[None])[0]
        for i, step in enumerate(gen.logits):
            torch.testing.assert_close(step[0], want[8 + i], atol=1e-10, rtol=1e-10)
        if policy != "none":  # the state does not grow with the context
            assert len(set(gen.cache_bytes)) == 1 and gen.cache_bytes[0] > 0
    with pytest.raises(ValueError, match="recompute"):
        generate(model, [1, 2], 2, cache="recompute")


def test_model_trains_a_step_and_bad_options():
    model = _model("retention", torch.float32)
    tokens = torch.randint(0, 256, (2, 33))
    loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert torch.isfinite(loss) and all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters()
    )
    with pytest.raises(ValueError, match="chunk"):
        ModelConfig(attention={"kind": "linear", "chunk": 0})
    with pytest.raises(ValueError, match="decays"):
        lin.retention(*make_qkv(1, 2, 4, 4, 8), torch.ones(3))
    with pytest.raises(ValueError, match="strateg"):
        ModelConfig(attention="retention").attention.check_sequence_parallel("ulysses", 2, 4, 64)
    assert ops.linear_attention is lin.linear_attention
