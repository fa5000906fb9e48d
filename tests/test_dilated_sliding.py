"""dilated_attention (docs/spec.md, 2) and sliding_window_attention against the reference."""

import pytest
import torch

from conftest import check_against_reference, make_qkv
from longctx import ops
from longctx.ops import reference as ref
from longctx.ops.dilated import head_offsets

DTYPES = [torch.float64, torch.float32, torch.bfloat16]

# (heads, N, segment_lengths, dilation_rates)
DILATED_CASES = [
    (4, 64, [8, 16, 32], [1, 2, 4]),  # N a multiple of every segment
    (3, 50, [8, 16, 32], [1, 2, 4]),  # N a multiple of none; heads not a multiple of r
    (5, 37, [5, 12], [1, 3]),  # odd everything
    (2, 6, [8, 16], [1, 2]),  # N smaller than every segment
    (3, 23, [4, 64, 7], [1, 6, 2]),  # dilation larger than heads; w' = N for one branch
    (2, 1, [4], [1]),  # a single position
    (4, 40, [4, 4], [1, 1]),  # identical branches: every key counts twice
    (8, 48, [6, 12, 24, 48], [1, 2, 6, 12]),  # the paper's shape (r = 6, 12 with 8 heads)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,n,ws,rs", DILATED_CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("offsets", ["paper", "torchscale"])
def test_dilated_matches_reference(dtype, h, n, ws, rs, causal, offsets):
    q, k, v = make_qkv(2, h, n, n, 8, dtype)
    check_against_reference(
        lambda q, k, v: ops.dilated_attention(
            q, k, v, ws, rs, causal=causal, offsets=offsets, return_lse=True
        ),
        lambda q, k, v: ref.dilated_attention(q, k, v, ws, rs, causal=causal, offsets=offsets),
        q,
        k,
        v,
        dtype,
        seed=5,
    )


def test_dilated_mixing_gradient_is_exact_gradcheck():
    # The LongNet mixing weights are functions of lse; torchscale computes them under
    # no_grad. gradcheck compares against finite differences of the whole op.
    q, k, v = make_qkv(1, 3, 13, 13, 4)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: ops.dilated_attention(
            q, k, v, [4, 8], [1, 2], causal=True, return_lse=True
        ),
        (q, k, v),
    )


def test_multiplicity_mask_definition():
    # Spot checks of the oracle itself against docs/spec.md section 2, written out by hand.
    m = ref.dilated_multiplicity(6, 2, [4, 2], [2, 1], causal=False)
    # branch (4, 2): segments [0..3], [4, 5]; head 0 offset 0 -> rows {0, 2}, {4};
    # branch (2, 1): segments {0,1}, {2,3}, {4,5} all heads.
    expected_h0 = torch.zeros(6, 6, dtype=torch.int64)
    for i, j in [(0, 0), (0, 2), (2, 0), (2, 2), (4, 4)]:
        expected_h0[i, j] += 1
    for a in (0, 2, 4):
        expected_h0[a : a + 2, a : a + 2] += 1
    assert torch.equal(m[0], expected_h0)
    # head 1 offset 1 in branch (4, 2): rows {1, 3}, {5}
    assert m[1][1, 3] == 1 and m[1][3, 1] == 1 and m[1][5, 5] == 2 and m[1][0, 2] == 0


def test_head_offsets_rules():
    assert head_offsets(8, 6, "paper") == [0, 1, 2, 3, 4, 5, 0, 1]
    assert head_offsets(8, 12, "paper") == list(range(8))
    assert head_offsets(8, 2, "torchscale") == [0, 0, 0, 0, 1, 1, 1, 1]
    assert head_offsets(5, 3, "torchscale") == [0, 0, 1, 1, 2]


def test_flops_count_equals_mask_count():
    for causal in (False, True):
        for h, n, ws, rs in DILATED_CASES:
            m = ref.dilated_multiplicity(n, h, ws, rs, causal=causal)
            flops = ops.dilated_attention_flops(n, h, 8, ws, rs, causal=causal, batch=2)
            assert flops == 4 * 8 * 2 * int(m.sum())
    for n, w, causal in [(50, 7, True), (50, 7, False), (5, 9, True)]:
        mask = ref.sliding_window_mask(n, w, causal=causal)
        assert ops.sliding_window_flops(n, 3, 8, w, causal=causal) == 4 * 8 * 3 * int(mask.sum())


def test_dilated_uncovered_position_raises():
    q, k, v = make_qkv(1, 2, 16, 16, 4)
    with pytest.raises(ValueError, match="head 0 at position 1"):
        ops.dilated_attention(q, k, v, [4, 8], [2, 2])


@pytest.mark.parametrize(
    "ws,rs,kw,exc,match",
    [
        ([4, 8], [1], {}, ValueError, "same length"),
        ([0, 8], [1, 2], {}, ValueError, "segment_lengths\\[0\\]"),
        ([4, 8], [1, -2], {}, ValueError, "dilation_rates\\[1\\]"),
        ([], [], {}, ValueError, "must not be empty"),
        ([4], [1], {"offsets": "bogus"}, ValueError, "offsets"),
        (4, [1], {}, TypeError, "segment_lengths"),
    ],
)
def test_dilated_bad_options(ws, rs, kw, exc, match):
    q, k, v = make_qkv(1, 2, 16, 16, 4)
    with pytest.raises(exc, match=match):
        ops.dilated_attention(q, k, v, ws, rs, **kw)


def test_dilated_requires_self_attention_shapes():
    q, k, v = make_qkv(1, 2, 8, 16, 4)
    with pytest.raises(ValueError, match="same length"):
        ops.dilated_attention(q, k, v, [4], [1])


def test_dilated_non_contiguous_and_empty():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 21, 3, 3, 8, generator=g, dtype=torch.float64)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
    out = ops.dilated_attention(q, k, v, [4, 8], [1, 2], causal=True)
    rout, _ = ref.dilated_attention(q, k, v, [4, 8], [1, 2], causal=True)
    torch.testing.assert_close(out, rout, atol=1e-12, rtol=1e-12)
    q, k, v = make_qkv(1, 2, 0, 0, 4)
    assert ops.dilated_attention(q, k, v, [4], [2]).shape == (1, 2, 0, 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 9, 40])
@pytest.mark.parametrize("window", [1, 3, 8, 50])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block", [None, 4])
def test_sliding_matches_reference(dtype, n, window, causal, block):
    q, k, v = make_qkv(2, 3, n, n, 8, dtype)
    check_against_reference(
        lambda q, k, v: ops.sliding_window_attention(
            q, k, v, window, causal=causal, return_lse=True, block_size=block
        ),
        lambda q, k, v: ref.sliding_window_attention(q, k, v, window, causal=causal),
        q,
        k,
        v,
        dtype,
        lse_grads=(True,),
        seed=2,
    )


def test_sliding_bad_window():
    q, k, v = make_qkv(1, 2, 8, 8, 4)
    with pytest.raises(ValueError, match="window"):
        ops.sliding_window_attention(q, k, v, 0)
    with pytest.raises(ValueError, match="block_size"):
        ops.sliding_window_attention(q, k, v, 3, block_size=0)


@pytest.mark.parametrize("offsets", ["paper", "torchscale"])
def test_dilated_head_groups_computed_alone_equal_the_layer(offsets):
    q, k, v = make_qkv(1, 6, 100, 100, 8)
    ws, rs = [8, 16, 32], [1, 2, 4]
    full = ops.dilated_attention(q, k, v, ws, rs, causal=True, offsets=offsets)
    parts = [
        ops.dilated_attention(
            q[:, a:b], k[:, a:b], v[:, a:b], ws, rs, causal=True, offsets=offsets, heads=(a, 6)
        )
        for a, b in ((0, 1), (1, 4), (4, 6))
    ]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=0, rtol=0)
    with pytest.raises(ValueError, match="not in 0..5"):
        ops.dilated_attention(q[:, :2], k[:, :2], v[:, :2], ws, rs, heads=(5, 6))
