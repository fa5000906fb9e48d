"""CUDA path (fused flash / memory-efficient kernels per tile) against the reference.

Marked ``gpu``; skipped where no CUDA device is present (CI never has one).
"""

import pytest
import torch

from conftest import check_against_reference, make_qkv, requires_cuda
from longctx import ops
from longctx.ops import _kernels
from longctx.ops import reference as ref

pytestmark = [pytest.mark.gpu, requires_cuda]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
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
        dtype if dtype != torch.float16 else torch.bfloat16,  # fp16: the relative bound
        seed=0,
        scale=10 if dtype == torch.float32 else 1,
    )
    want = "manual" if dtype == torch.float64 else ("folded", "fused")
    assert _kernels.last_backward_path in want


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lse_grad", [False, True])
def test_fused_flash_backward_runs_in_half_precision(dtype, lse_grad):
    """bf16/fp16 without a mask must not fall back to the blockwise backward: flash runs,
    with an lse gradient folded in when there is one."""
    q, k, v = (t.cuda() for t in make_qkv(2, 4, 128, 128, 64, dtype))
    check_against_reference(
        lambda q, k, v: ops.attention(q, k, v, causal=True, return_lse=True),
        lambda q, k, v: ref.attention(q, k, v, causal=True),
        q,
        k,
        v,
        torch.bfloat16,
        lse_grads=(lse_grad,),
        seed=0,
    )
    assert _kernels.last_backward_path == ("folded" if lse_grad else "fused")
    assert _kernels.last_backward_kernel == "flash"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_efficient_backward_runs_for_masked_tiles(dtype):
    q, k, v = (t.cuda() for t in make_qkv(2, 3, 37, 45, 16, dtype))
    mask = (torch.rand(2, 1, 37, 45, generator=torch.Generator().manual_seed(0)) < 0.5).cuda()
    mask[:, :, 5] = False  # a row with no visible key
    check_against_reference(
        lambda q, k, v: ops.masked_attention(q, k, v, mask, return_lse=True),
        lambda q, k, v: ref.masked_attention(q, k, v, mask),
        q,
        k,
        v,
        dtype,
        seed=0,
        scale=10 if dtype == torch.float32 else 1,
    )
    assert _kernels.last_backward_kernel == "efficient"


def test_grid_axes_beyond_65535_are_split():
    # 70,000 batch-heads of 16 tokens (a dilated plan at 2^20 tokens has this shape)
    q, k, v = (torch.randn(1, 70_000, 16, 64, device="cuda", dtype=torch.bfloat16) for _ in "qkv")
    out, lse = _kernels.attn_fwd(q, k, v, 0.125, True, None)
    want_out, want_lse = _kernels._manual_fwd(q.float(), k.float(), v.float(), 0.125, True, None)
    torch.testing.assert_close(out.float(), want_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, want_lse, atol=2e-2, rtol=2e-2)


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
