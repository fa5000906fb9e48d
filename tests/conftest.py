import pytest
import torch

# Tolerances by dtype: (atol, rtol) for values of order 1.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: None,  # checked by relative norm, see assert_close_dtype
}
BF16_REL = 2e-2


def make_qkv(b, h, nq, nk, d, dtype=torch.float64, seed=0, dv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h, nk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, nk, dv or d, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def assert_close_dtype(actual, expected, dtype, scale=1.0):
    """Compare a result computed in ``dtype`` with a float64 reference."""
    actual = actual.to(torch.float64)
    expected = expected.to(torch.float64)
    finite = torch.isfinite(expected)
    # -inf must match exactly (empty rows)
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected))
    actual, expected = actual[finite], expected[finite]
    if dtype == torch.bfloat16:
        denom = expected.norm().clamp_min(1e-12)
        rel = float((actual - expected).norm() / denom)
        assert rel <= BF16_REL, f"relative error {rel:.3g} > {BF16_REL}"
    else:
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol * scale)


def grads_of(fn, q, k, v, g_out, g_lse):
    """(out, lse, dq, dk, dv) of fn(q, k, v) -> (out, lse) under the loss
    <out, g_out> + <lse, g_lse> (g_lse None: lse not used)."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, lse = fn(q, k, v)
    loss = (out.to(torch.float64) * g_out).sum()
    if g_lse is not None:
        finite = torch.isfinite(lse)
        loss = loss + (torch.where(finite, lse.to(torch.float64), 0.0) * g_lse).sum()
    loss.backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def check_against_reference(
    fn, ref_fn, q, k, v, dtype, *, lse_grads=(False, True), seed=1, scale=1.0
):
    """Compare (out, lse, dq, dk, dv) of ``fn`` (inputs in ``dtype``) with ``ref_fn`` on the
    same inputs in float64, under the loss <out, g_out> (+ <lse, g_lse> when the entry of
    ``lse_grads`` is True: that sends the backward through the lse path). Results must be
    on the inputs' device; tolerances per dtype (``assert_close_dtype``) times ``scale``."""
    g = torch.Generator().manual_seed(seed)
    g_out = torch.randn(*q.shape[:3], v.shape[-1], generator=g, dtype=torch.float64)
    g_lse = torch.randn(*q.shape[:3], generator=g, dtype=torch.float64)
    g_out, g_lse = g_out.to(q.device), g_lse.to(q.device)
    q64, k64, v64 = (t.to(torch.float64) for t in (q, k, v))
    for with_lse in lse_grads:
        got = grads_of(fn, q, k, v, g_out, g_lse if with_lse else None)
        want = grads_of(ref_fn, q64, k64, v64, g_out, g_lse if with_lse else None)
        for a, b in zip(got, want, strict=True):
            assert a.device == q.device
            assert_close_dtype(a.cpu(), b.cpu(), dtype, scale)


def cuda_available():
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def write_word_corpus(root, files, low, high, seed=0):
    """A directory of ``files`` small text files of ``low``..``high`` random words each
    (documents of varied lengths, ending with their own name); returns it."""
    import numpy as np

    rng = np.random.default_rng(seed)
    root.mkdir()
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota"]
    for i in range(files):
        text = " ".join(rng.choice(words, int(rng.integers(low, high)))) + f" doc{i}\n"
        (root / f"f{i:02d}.txt").write_text(text)
    return root
