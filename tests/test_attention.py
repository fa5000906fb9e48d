"""attention, chunked_attention and merge against the naive reference (docs/spec.md, 1)."""

import pytest
import torch

from conftest import check_against_reference, make_qkv
from longctx import ops
from longctx.ops import _kernels
from longctx.ops import reference as ref

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# (Nq, Nk): equal, 1, fewer queries than keys (bottom-right), more queries than keys
SHAPES = [(1, 1), (7, 7), (33, 33), (5, 19), (19, 5), (64, 64)]


def _check(fn, ref_fn, q, k, v, dtype, with_lse_grad=True, scale=1.0):
    check_against_reference(
        fn, ref_fn, q, k, v, dtype, lse_grads=(with_lse_grad,), seed=1, scale=scale
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nq,nk", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_reference(dtype, nq, nk, causal):
    q, k, v = make_qkv(2, 3, nq, nk, 16, dtype)
    _check(
        lambda q, k, v: ops.attention(q, k, v, causal=causal, return_lse=True),
        lambda q, k, v: ref.attention(q, k, v, causal=causal),
        q,
        k,
        v,
        dtype,
    )


@pytest.mark.parametrize("q_offset", [-4, 0, 3, 100])
def test_attention_explicit_query_offset(q_offset):
    q, k, v = make_qkv(1, 2, 9, 13, 8)
    _check(
        lambda q, k, v: ops.attention(q, k, v, causal=True, return_lse=True, q_offset=q_offset),
        lambda q, k, v: ref.attention(q, k, v, causal=True, q_offset=q_offset),
        q,
        k,
        v,
        torch.float64,
    )


@pytest.mark.parametrize("lse_grad", [False, True])
def test_both_backward_paths_are_exercised_and_exact(lse_grad):
    # Without a gradient on lse the CPU fused backward runs; with one, the same fused
    # backward with the lse gradient folded into one more head column.
    q, k, v = make_qkv(2, 2, 21, 21, 8)
    _check(
        lambda q, k, v: ops.attention(q, k, v, causal=True, return_lse=True),
        lambda q, k, v: ref.attention(q, k, v, causal=True),
        q,
        k,
        v,
        torch.float64,
        with_lse_grad=lse_grad,
    )
    assert _kernels.last_backward_path == ("folded" if lse_grad else "fused")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dv", [8, 5, 13])
def test_the_lse_gradient_fold_equals_the_blockwise_backward(causal, dv):
    """V' = [V, 0], O' = [O, 1], dO' = [dO, -dlse] through the fused CPU backward gives
    the blockwise backward's dq, dk, dv exactly (float64), with empty rows, a mask, and
    a value head size unlike the query's."""
    q, k, v = make_qkv(2, 3, 40, 33, 8, dv=dv)
    bias = torch.zeros(40, 33, dtype=torch.float64)
    bias[3, :] = float("-inf")  # an empty row
    bias[5, 10:] = float("-inf")
    g = torch.Generator().manual_seed(1)
    for b in (None, bias):
        out, lse = _kernels._manual_fwd(q, k, v, 0.3, causal, b)
        dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
        dlse = torch.randn(lse.shape, generator=g, dtype=torch.float64)
        for grad_lse in (dlse, None):
            folded = _kernels._folded_bwd(q, k, v, out, lse, dout, grad_lse, 0.3, causal, b)
            manual = _kernels._manual_bwd(q, k, v, out, lse, dout, grad_lse, 0.3, causal, b)
            for a, want in zip(folded, manual, strict=True):
                assert a.shape == want.shape and torch.isfinite(a).all()
                torch.testing.assert_close(a, want, atol=1e-12, rtol=1e-12)


def test_manual_kernels_match_fused():
    q, k, v = make_qkv(2, 3, 40, 40, 8)
    bias = torch.zeros(40, 40, dtype=torch.float64)
    bias[3, :] = float("-inf")  # an empty row
    bias[5, 10:] = float("-inf")
    for causal in (False, True):
        fo, fl = _kernels.attn_fwd(q, k, v, 0.3, causal, bias)
        mo, ml = _kernels._manual_fwd(q, k, v, 0.3, causal, bias)
        torch.testing.assert_close(fo, mo, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(fl, ml, atol=1e-12, rtol=1e-12)
        assert torch.isneginf(fl[..., 3]).all() and (fo[..., 3, :] == 0).all()
        dout = torch.randn_like(fo)
        fused = _kernels.attn_bwd(q, k, v, fo, fl, dout, None, 0.3, causal, bias)
        manual = _kernels._manual_bwd(q, k, v, fo, fl, dout, None, 0.3, causal, bias)
        for a, b in zip(fused, manual, strict=True):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_gradcheck_attention_with_lse():
    q, k, v = make_qkv(1, 2, 6, 9, 4)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def f(q, k, v):
        out, lse = ops.attention(q, k, v, causal=True, return_lse=True)
        return out, lse

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_custom_scale():
    q, k, v = make_qkv(1, 2, 10, 10, 8)
    _check(
        lambda q, k, v: ops.attention(q, k, v, causal=True, scale=0.7, return_lse=True),
        lambda q, k, v: ref.attention(q, k, v, causal=True, scale=0.7),
        q,
        k,
        v,
        torch.float64,
    )


def test_value_head_dim_may_differ():
    q, k, v = make_qkv(1, 2, 10, 12, 8, dv=5)
    _check(
        lambda q, k, v: ops.attention(q, k, v, causal=True, return_lse=True),
        lambda q, k, v: ref.attention(q, k, v, causal=True),
        q,
        k,
        v,
        torch.float64,
    )


def test_non_contiguous_inputs():
    # (B, N, H, D) tensors transposed to (B, H, N, D), as a model produces them
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 30, 3, 3, 8, generator=g, dtype=torch.float64)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    _check(
        lambda q, k, v: ops.chunked_attention(q, k, v, causal=True, chunk_size=7, return_lse=True),
        lambda q, k, v: ref.attention(q, k, v, causal=True),
        q,
        k,
        v,
        torch.float64,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 33, 70])
@pytest.mark.parametrize("chunk", [1, 3, 16, 64, 100])
@pytest.mark.parametrize("causal", [False, True])
def test_chunked_matches_reference(dtype, n, chunk, causal):
    q, k, v = make_qkv(1, 2, n, n, 8, dtype)
    _check(
        lambda q, k, v: ops.chunked_attention(
            q, k, v, causal=causal, chunk_size=chunk, return_lse=True
        ),
        lambda q, k, v: ref.attention(q, k, v, causal=causal),
        q,
        k,
        v,
        dtype,
    )


@pytest.mark.parametrize("nq,nk", [(5, 19), (19, 5), (1, 30)])
@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_chunked_bottom_right(nq, nk, chunk):
    q, k, v = make_qkv(1, 2, nq, nk, 8)
    _check(
        lambda q, k, v: ops.chunked_attention(
            q, k, v, causal=True, chunk_size=chunk, return_lse=True
        ),
        lambda q, k, v: ref.attention(q, k, v, causal=True),
        q,
        k,
        v,
        torch.float64,
    )


def test_zero_query_lse_exactly_zero_gives_v0():
    # q = 0: query 0 (causal) sees only key 0 with score 0, so lse = log(1) = 0 exactly.
    # An implementation that used lse == 0 as "empty" would return 0 instead of v0.
    q, k, v = make_qkv(1, 2, 12, 12, 8)
    q = torch.zeros_like(q)
    mult = ref.dilated_multiplicity(12, 2, [4, 8], [1, 2], causal=True)[:, 0, 0]  # (H,)
    dilated_lse0 = torch.log(mult.to(torch.float64)).unsqueeze(0)  # head 0: 2 branches
    for fn, lse0 in (
        (lambda: ops.attention(q, k, v, causal=True, return_lse=True), 0.0),
        (lambda: ops.chunked_attention(q, k, v, causal=True, chunk_size=5, return_lse=True), 0.0),
        (
            lambda: ops.dilated_attention(q, k, v, [4, 8], [1, 2], causal=True, return_lse=True),
            dilated_lse0,
        ),
        (lambda: ops.sliding_window_attention(q, k, v, 3, causal=True, return_lse=True), 0.0),
    ):
        out, lse = fn()
        assert torch.equal(lse[..., 0], torch.zeros_like(lse[..., 0]) + lse0)
        torch.testing.assert_close(out[..., 0, :], v[..., 0, :], atol=0, rtol=0)
        merged, mlse = ops.merge([(out, lse)])
        torch.testing.assert_close(merged[..., 0, :], v[..., 0, :], atol=1e-15, rtol=0)
    assert dilated_lse0[0, 1] == 0.0  # head 1: a single branch, lse exactly 0


def _perturb_later(x, pos):
    y = x.clone()
    y[:, :, pos:] += 1.0 + torch.randn_like(y[:, :, pos:])
    return y


@pytest.mark.parametrize(
    "fn",
    [
        lambda q, k, v: ops.attention(q, k, v, causal=True),
        lambda q, k, v: ops.chunked_attention(q, k, v, causal=True, chunk_size=6),
        lambda q, k, v: ops.dilated_attention(q, k, v, [8, 16, 32], [1, 2, 4], causal=True),
        lambda q, k, v: ops.sliding_window_attention(q, k, v, 5, causal=True),
    ],
    ids=["attention", "chunked", "dilated", "sliding"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_no_causal_leakage_bit_for_bit(fn, dtype):
    q, k, v = make_qkv(2, 3, 45, 45, 8, dtype)
    base = fn(q, k, v)
    for pos in (1, 17, 30, 44):
        out = fn(_perturb_later(q, pos), _perturb_later(k, pos), _perturb_later(v, pos))
        assert torch.equal(out[:, :, :pos], base[:, :, :pos]), f"leak into positions < {pos}"
        assert not torch.equal(out[:, :, pos:], base[:, :, pos:])


# ----------------------------------------------------------------------------- merge


def _parts(nparts, seed=0, shape=(2, 3, 10), dv=4):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(*shape, dv, generator=g, dtype=torch.float64),
            torch.randn(*shape, generator=g, dtype=torch.float64) * 3,
        )
        for _ in range(nparts)
    ]


def test_merge_matches_reference_and_is_order_independent():
    parts = _parts(4)
    parts[1][1][0, 0, :5] = float("-inf")  # some empty rows in one part
    out, lse = ops.merge(parts)
    rout, rlse = ref.merge(parts)
    torch.testing.assert_close(out, rout, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, rlse, atol=1e-12, rtol=1e-12)
    for perm in ([3, 2, 1, 0], [1, 3, 0, 2]):
        pout, plse = ops.merge([parts[i] for i in perm])
        torch.testing.assert_close(pout, out, atol=1e-13, rtol=1e-13)
        torch.testing.assert_close(plse, lse, atol=1e-13, rtol=1e-13)


def test_merge_of_key_parts_equals_full_attention():
    q, k, v = make_qkv(2, 2, 11, 30, 8)
    parts = [
        ops.attention(q, k[:, :, a:b], v[:, :, a:b], return_lse=True)
        for a, b in ((0, 7), (7, 8), (8, 30))
    ]
    out, lse = ops.merge(parts)
    rout, rlse = ref.attention(q, k, v)
    torch.testing.assert_close(out, rout, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, rlse, atol=1e-12, rtol=1e-12)


def test_merge_empty_parts_no_nan_forward_or_backward():
    parts = _parts(3)
    parts = [(o.requires_grad_(), lse.requires_grad_()) for o, lse in parts]
    # rows 0..3: every part empty; row 4: only part 2 non-empty
    with torch.no_grad():
        for _, lse in parts:
            lse[..., :4] = float("-inf")
        parts[0][1][..., 4] = float("-inf")
        parts[1][1][..., 4] = float("-inf")
    out, lse = ops.merge(parts)
    assert torch.isneginf(lse[..., :4]).all()
    assert (out[..., :4, :] == 0).all()
    torch.testing.assert_close(out[..., 4, :], parts[2][0][..., 4, :].detach())
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()).backward()
    for o, lse_i in parts:
        assert torch.isfinite(o.grad).all() and torch.isfinite(lse_i.grad).all()
        assert (o.grad[..., :4, :] == 0).all() and (lse_i.grad[..., :4] == 0).all()


def test_merge_gradcheck():
    parts = _parts(3, shape=(1, 2, 4), dv=3)
    flat = [t.requires_grad_() for p in parts for t in p]

    def f(*ts):
        return ops.merge([(ts[i], ts[i + 1]) for i in range(0, len(ts), 2)])

    assert torch.autograd.gradcheck(f, tuple(flat))


def test_merge_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        ops.merge([])
    with pytest.raises(ValueError, match="lse.shape"):
        ops.merge([(torch.zeros(2, 3, 4), torch.zeros(2, 4))])
    with pytest.raises(ValueError, match="like parts\\[0\\]"):
        ops.merge(
            [(torch.zeros(2, 3, 4), torch.zeros(2, 3)), (torch.zeros(2, 3, 5), torch.zeros(2, 3))]
        )
    with pytest.raises(TypeError):
        ops.merge(torch.zeros(3))


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        (
            (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)),
            {},
            ValueError,
            "shape",
        ),
        (
            (
                torch.zeros(1, 2, 3, 4),
                torch.zeros(1, 2, 3, 4, dtype=torch.float64),
                torch.zeros(1, 2, 3, 4),
            ),
            {},
            TypeError,
            "dtype",
        ),
        (
            (torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 5), torch.zeros(1, 2, 3, 5)),
            {},
            ValueError,
            "head_dim",
        ),
        (
            (torch.zeros(1, 2, 3, 4), torch.zeros(1, 3, 3, 4), torch.zeros(1, 3, 3, 4)),
            {},
            ValueError,
            "heads",
        ),
        (
            (torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 5, 4)),
            {},
            ValueError,
            "lengths",
        ),
        ((torch.zeros(1, 2, 3, 4, dtype=torch.long),) * 3, {}, TypeError, "floating"),
        ((torch.zeros(1, 2, 3, 4),) * 3, {"scale": float("nan")}, ValueError, "scale"),
        ((torch.zeros(1, 2, 3, 4),) * 3, {"q_offset": 1.5}, TypeError, "q_offset"),
    ],
)
def test_attention_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ops.attention(*args, **kwargs)


@pytest.mark.parametrize("chunk", [0, -3, 2.5, True])
def test_chunked_bad_chunk(chunk):
    q, k, v = make_qkv(1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        ops.chunked_attention(q, k, v, chunk_size=chunk)


def test_empty_sequences():
    q, k, v = make_qkv(1, 2, 0, 5, 4)
    out, lse = ops.attention(q, k, v, return_lse=True)
    assert out.shape == (1, 2, 0, 4) and lse.shape == (1, 2, 0)
    q, k, v = make_qkv(1, 2, 3, 0, 4)
    out, lse = ops.attention(q, k, v, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()
