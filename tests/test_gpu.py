"""CUDA path (fused memory-efficient forward, blockwise backward) against the reference.

Marked ``gpu``; skipped where no CUDA device is present (CI never has one).
"""

import pytest
import torch

from conftest import check_against_reference, make_qkv, requires_cuda
from longctx import ops
from longctx.ops import reference as ref

pytestmark = [pytest.mark.gpu, requires_cuda]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "name,fn,ref_fn",
    [
        (
            "attention",
            lambda q, k, v, c: ops.attention(q, k, v, causal=c, return_lse=True),
            lambda q, k, v, c: ref.attention(q, k, v, causal=c),
        ),
        (
            "chunked",
            lambda q, k, v, c: ops.chunked_attention(
                q, k, v, causal=c, chunk_size=13, return_lse=True
            ),
            lambda q, k, v, c: ref.attention(q, k, v, causal=c),
        ),
        (
            "dilated",
            lambda q, k, v, c: ops.dilated_attention(
                q, k, v, [8, 16], [1, 3], causal=c, return_lse=True
            ),
            lambda q, k, v, c: ref.dilated_attention(q, k, v, [8, 16], [1, 3], causal=c),
        ),
        (
            "sliding",
            lambda q, k, v, c: ops.sliding_window_attention(q, k, v, 7, causal=c, return_lse=True),
            lambda q, k, v, c: ref.sliding_window_attention(q, k, v, 7, causal=c),
        ),
    ],
)
def test_cuda_matches_reference(dtype, causal, name, fn, ref_fn):
    q, k, v = (t.cuda() for t in make_qkv(2, 3, 45, 45, 16, dtype))
    check_against_reference(
        lambda q, k, v: fn(q, k, v, causal),
        lambda q, k, v: ref_fn(q, k, v, causal),
        q,
        k,
        v,
        dtype,
        seed=0,
        scale=10 if dtype == torch.float32 else 1,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_attention_cuda(dtype):
    q, k, v = (t.cuda() for t in make_qkv(2, 3, 37, 45, 16, dtype))
    mask = (torch.rand(2, 1, 37, 45, generator=torch.Generator().manual_seed(0)) < 0.5).cuda()
    check_against_reference(
        lambda q, k, v: ops.masked_attention(q, k, v, mask, return_lse=True),
        lambda q, k, v: ref.masked_attention(q, k, v, mask),
        q,
        k,
        v,
        dtype,
    )


@pytest.mark.parametrize("causal", [False, True])
def test_colt5_attention_cuda_matches_cpu(causal):
    from longctx.nn.colt5 import ConditionalAttention

    torch.manual_seed(0)
    attn = ConditionalAttention(64, 4, window=16, causal=causal).double()
    x = torch.randn(2, 300, 64, dtype=torch.float64)
    want = attn(x)
    got = attn.cuda()(x.cuda())
    torch.testing.assert_close(got.cpu(), want, atol=1e-10, rtol=0)
