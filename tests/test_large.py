"""Realistic sizes against the reference, float64, forward and backward.

The small-size tests run the fused CPU kernel on single internal tiles; these sizes make it
split queries and keys into several internal blocks (it tiles at 256 x 512 rows), and give
the dilated views long row strides and shorter last segments. Marked slow (about a
minute on 2 cores, a few GB of memory for the O(N^2) oracle); CI runs them.
"""

import pytest
import torch

from conftest import check_against_reference, make_qkv
from longctx import ops
from longctx.ops import reference as ref

pytestmark = pytest.mark.slow

N = 2 * 2048 + 777  # not a multiple of any segment; the last segment is short


def _compare(fn, ref_fn, q, k, v):
    # both backward paths (without, then with an lse gradient); float64 to 1e-9
    check_against_reference(fn, ref_fn, q, k, v, torch.float64, seed=11, scale=10)


@pytest.mark.parametrize("causal", [False, True])
def test_dilated_realistic_sizes(causal):
    ws, rs = [512, 1024, 2048], [1, 2, 6]  # H = 3 heads: not a multiple of 2 or 6
    q, k, v = make_qkv(1, 3, N, N, 16)
    _compare(
        lambda q, k, v: ops.dilated_attention(q, k, v, ws, rs, causal=causal, return_lse=True),
        lambda q, k, v: ref.dilated_attention(q, k, v, ws, rs, causal=causal),
        q,
        k,
        v,
    )


@pytest.mark.parametrize("causal", [False, True])
def test_dense_chunked_sliding_realistic_sizes(causal):
    q, k, v = make_qkv(1, 2, 3001, 3001, 16)
    _compare(
        lambda q, k, v: ops.attention(q, k, v, causal=causal, return_lse=True),
        lambda q, k, v: ref.attention(q, k, v, causal=causal),
        q,
        k,
        v,
    )
    _compare(
        lambda q, k, v: ops.chunked_attention(
            q, k, v, causal=causal, chunk_size=700, return_lse=True
        ),
        lambda q, k, v: ref.attention(q, k, v, causal=causal),
        q,
        k,
        v,
    )
    _compare(
        lambda q, k, v: ops.sliding_window_attention(q, k, v, 700, causal=causal, return_lse=True),
        lambda q, k, v: ref.sliding_window_attention(q, k, v, 700, causal=causal),
        q,
        k,
        v,
    )
