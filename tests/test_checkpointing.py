"""Activation checkpointing and token-chunked per-token work (DecoderLM.
set_activation_checkpointing): the same loss and gradients as the plain step."""

import pytest
import torch
import torch.nn.functional as F

from longctx.model import DecoderLM, ModelConfig
from longctx.nn.chunking import token_chunks

SMALL = {"d_model": 32, "n_layers": 2, "n_heads": 4}
ATTENTION = {
    "dense": {},
    "dilated": {
        "attention": {"kind": "dilated", "segment_lengths": [8, 16], "dilation_rates": [1, 2]}
    },
    "sliding": {"attention": {"kind": "sliding_window", "window": 7}},
    "colt5": {
        "n_heads": 4,
        "attention": {"kind": "colt5", "window": 8, "q_capacity": 0.3, "kv_capacity": 0.4},
        "ffn": {"kind": "colt5", "capacity": 0.3},
    },
    "memory": {
        "attention": {"kind": "memory", "layers": [1], "window": 16, "topk": 4},
        "ngram": 3,
    },
}


def _model(name: str, dtype: torch.dtype) -> DecoderLM:
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(**{**SMALL, **ATTENTION[name]})).to(dtype)
    for r in model.routers().values():  # routers start undecided; make routing matter
        r.bias.data.normal_()
    return model


def _loss_and_grads(model, tokens, targets, mode, chunk):
    model.set_activation_checkpointing(mode, chunk)
    model.zero_grad(set_to_none=True)
    terms = model.loss_terms(tokens, targets)
    terms.total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return terms.total.detach(), grads


@pytest.mark.parametrize("name", list(ATTENTION))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode,chunk", [("layer", 0), ("off", 7), ("layer", 11)])
def test_checkpointed_and_chunked_step_equals_plain(name, dtype, mode, chunk):
    model = _model(name, dtype)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (2, 48), generator=g)
    targets = torch.randint(0, 256, (2, 48), generator=g)
    targets[0, :5] = -100  # positions without a loss
    want_loss, want = _loss_and_grads(model, tokens, targets, "off", 0)
    loss, got = _loss_and_grads(model, tokens, targets, mode, chunk)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(loss, want_loss, atol=tol, rtol=tol)
    assert got.keys() == want.keys() and len(want) == len(list(model.parameters()))
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=tol, rtol=tol, msg=n)


def test_checkpointing_recomputes_and_chunking_bounds_the_slices():
    """Layer checkpointing really recomputes (the forward of a block runs again in
    backward), and with token chunks the feed-forward never sees more than the chunk."""
    model = _model("dense", torch.float64)
    seen: list[int] = []
    block = model.blocks[0]
    ffn = block.ffn.forward
    block.ffn.forward = lambda x: seen.append(x.shape[1]) or ffn(x)  # (hooks are not rerun)
    tokens = torch.randint(0, 256, (1, 40))
    model.set_activation_checkpointing("layer", 0)
    model.loss(tokens, tokens).backward()
    assert seen == [40, 40]  # the block's forward, then its recomputation in backward
    seen.clear()
    model.set_activation_checkpointing("layer", 16)
    model.loss(tokens, tokens).backward()
    assert seen[:3] == [16, 16, 8] and len(seen) > 3 and max(seen) == 16
    seen.clear()
    model.set_activation_checkpointing("off", 0)
    model.loss(tokens, tokens).backward()
    assert seen == [40]


def test_chunked_loss_equals_cross_entropy_over_full_logits():
    model = _model("dense", torch.float64)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 256, (3, 37), generator=g)
    targets = torch.randint(0, 256, (3, 37), generator=g)
    targets[1, 10:20] = -100
    logits = model(tokens)
    full = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1))
    model.set_activation_checkpointing("off", 5)
    torch.testing.assert_close(model.loss_terms(tokens, targets).lm, full, atol=1e-12, rtol=0)
    norm = 1000
    summed = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), reduction="sum") / norm
    got = model.loss_terms(tokens, targets, normalizer=norm).lm
    torch.testing.assert_close(got, summed, atol=1e-12, rtol=0)


def test_token_chunks_helper():
    x = torch.randn(2, 10, 3, dtype=torch.float64, requires_grad=True)
    pos = torch.arange(10)
    fn = lambda a, p: (a * 2 + p[:, None], a.sum(-1))  # noqa: E731
    want = fn(x, pos)
    for chunk in (0, 3, 10, 99):
        got = token_chunks(fn, (x, pos), (1, 0), chunk, (1, 1))
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
    got = token_chunks(lambda a: a * 3, (x,), (1,), 4, 1)
    got.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))


def test_bad_options_are_refused():
    model = _model("dense", torch.float32)
    with pytest.raises(ValueError, match="must be one of"):
        model.set_activation_checkpointing("block")
    with pytest.raises(ValueError, match="token_chunk"):
        model.set_activation_checkpointing("off", -1)
    from longctx.train import resolve_config

    with pytest.raises(ValueError, match="activation_checkpointing"):
        resolve_config("tiny", None, ["train.activation_checkpointing=full"])
    with pytest.raises(ValueError, match="token_chunk"):
        resolve_config("tiny", None, ["train.token_chunk=-2"])


def test_long_sequences_run_attention_head_group_by_head_group():
    """With token chunks shorter than the sequence, each layer's attention runs on groups
    of heads (each recomputed in backward) with their place in the layer: dilated head
    offsets and retention decays follow the global head index."""
    for name, attention in (
        ("dilated", ATTENTION["dilated"]["attention"]),
        ("retention", {"kind": "retention", "chunk": 8}),
    ):
        torch.manual_seed(0)
        model = DecoderLM(ModelConfig(**{**SMALL, "attention": attention})).double()
        tokens = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
        want = model.loss(tokens, tokens)
        calls = []
        pattern = model.blocks[0].attn.pattern

        def recorded(q, k, v, first, total, calls=calls, kernel=pattern.head_kernel):
            calls.append((q.shape[1], first, total))
            return kernel(q, k, v, first, total)

        pattern.head_kernel = recorded
        model.set_activation_checkpointing("off", 20)  # 4 heads x 20 / 40 tokens: pairs
        got = model.loss(tokens, tokens)
        # (the pattern object is shared by the layers)
        assert calls == [(2, 0, 4), (2, 2, 4)] * SMALL["n_layers"], name
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
