"""The CUDA tile path (``ops._cuda``) on a CPU, with the private CUDA ops replaced by an
emulation that enforces their contracts (``cuda_emulation``): kernel choice, head padding,
the lse-gradient fold, +inf/-inf lse mapping, the efficient kernel's lse and bias padding,
and the split of the batch and head axes. On a GPU the same checks run against the real
kernels (``test_gpu.py``)."""

import pytest
import torch

from conftest import check_against_reference, make_qkv
from cuda_emulation import EmulatedAten
from longctx import ops
from longctx.ops import _cuda, _kernels
from longctx.ops import reference as ref

MASK = torch.rand(45, 45, generator=torch.Generator().manual_seed(3)) < 0.6
MASK[7] = False  # a row with no visible key

OPS = {
    "dense": (
        lambda q, k, v: ops.attention(q, k, v, causal=False, return_lse=True),
        lambda q, k, v: ref.attention(q, k, v, causal=False),
    ),
    "causal": (
        lambda q, k, v: ops.attention(q, k, v, causal=True, return_lse=True),
        lambda q, k, v: ref.attention(q, k, v, causal=True),
    ),
    "chunked": (
        lambda q, k, v: ops.chunked_attention(q, k, v, causal=True, chunk_size=13, return_lse=True),
        lambda q, k, v: ref.attention(q, k, v, causal=True),
    ),
    "sliding": (
        lambda q, k, v: ops.sliding_window_attention(q, k, v, 9, return_lse=True),
        lambda q, k, v: ref.sliding_window_attention(q, k, v, 9),
    ),
    "dilated": (
        lambda q, k, v: ops.dilated_attention(q, k, v, [8, 16], [1, 2], return_lse=True),
        lambda q, k, v: ref.dilated_attention(q, k, v, [8, 16], [1, 2]),
    ),
    "masked": (
        lambda q, k, v: ops.masked_attention(q, k, v, MASK, return_lse=True),
        lambda q, k, v: ref.masked_attention(q, k, v, MASK),
    ),
}


class _Recorder:
    """EmulatedAten that also records which kernels ran."""

    def __init__(self):
        self.calls: list[str] = []

    def __getattr__(self, name):
        self.calls.append(name)
        return getattr(EmulatedAten, name)


@pytest.fixture
def cuda_path(monkeypatch):
    """Every tile takes the CUDA path, float64 included (so results compare to 1e-10);
    returns the recorder of kernel calls."""
    rec = _Recorder()
    monkeypatch.setattr(_cuda, "_aten", rec)
    monkeypatch.setattr(_kernels, "_backend", lambda q: "cuda")
    monkeypatch.setattr(_cuda, "FLASH_DTYPES", (torch.float64, torch.bfloat16, torch.float16))
    return rec


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("flash", [True, False], ids=["flash", "efficient"])
@pytest.mark.parametrize("d,dv", [(16, 16), (12, 12), (8, 5)])
def test_cuda_path_matches_reference(cuda_path, monkeypatch, op, flash, d, dv):
    if not flash:  # only the memory-efficient kernel
        monkeypatch.setattr(_cuda, "FLASH_DTYPES", ())
    fn, ref_fn = OPS[op]
    q, k, v = make_qkv(2, 3, 45, 45, d, dv=dv)
    check_against_reference(fn, ref_fn, q, k, v, torch.float64)
    ran = set(cuda_path.calls)
    # every tile of these two carries a bias at this size (window 9 < the 64-row block)
    biased = op in ("masked", "sliding")
    assert ("_scaled_dot_product_flash_attention_backward" in ran) == (flash and not biased)
    assert _kernels.last_backward_path in ("fused", "folded")


@pytest.mark.parametrize("nq,nk", [(5, 19), (19, 5)])
def test_flash_gets_only_square_causal_tiles(cuda_path, nq, nk):
    # A causal tile with Lq != Lk: flash would align its diagonal bottom-right; ours is
    # top-left, so the efficient kernel takes it (the planners rarely make such tiles).
    q, k, v = make_qkv(1, 2, nq, nk, 16)
    out, lse = _kernels.attn_fwd(q, k, v, 0.3, True, None)
    want_out, want_lse = _kernels._manual_fwd(q, k, v, 0.3, True, None)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=1e-12)
    dout = torch.randn_like(out)
    got = _kernels.attn_bwd(q, k, v, out, lse, dout, None, 0.3, True, None)
    want = _kernels._manual_bwd(q, k, v, out, lse, dout, None, 0.3, True, None)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert cuda_path.calls == [
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_efficient_attention_backward",
    ]


def test_folded_backward_choice_and_head_limit(cuda_path):
    # A gradient on lse adds a value column: a head size of 256 then exceeds flash's
    # limit, so the efficient kernel takes the backward.
    q, k, v = make_qkv(1, 1, 6, 6, 256)
    assert _cuda.kernel_for(q, k, v, True, None) == "flash"
    assert _cuda.kernel_for(q, k, v, True, None, extra=1) == "efficient"
    check_against_reference(
        lambda q, k, v: ops.attention(q, k, v, causal=True, return_lse=True),
        lambda q, k, v: ref.attention(q, k, v, causal=True),
        q,
        k,
        v,
        torch.float64,
        lse_grads=(True,),
    )
    assert _kernels.last_backward_path == "folded"
    assert _kernels.last_backward_kernel == "efficient"


def test_cuda_path_in_bfloat16(cuda_path):
    q, k, v = make_qkv(2, 2, 40, 40, 16)
    for name in ("causal", "dilated", "masked"):
        fn, ref_fn = OPS[name]
        if name == "masked":
            q, k, v = make_qkv(2, 2, 45, 45, 16)
        check_against_reference(fn, ref_fn, q, k, v, torch.bfloat16)


@pytest.mark.parametrize("emulated", [False, True], ids=["cpu", "cuda-path"])
def test_batch_and_head_axes_are_split_at_the_grid_limit(request, monkeypatch, emulated):
    if emulated:
        request.getfixturevalue("cuda_path")
    monkeypatch.setattr(_kernels, "GRID_LIMIT", 2)
    q, k, v = make_qkv(3, 5, 45, 45, 8)
    for name in ("causal", "dilated", "masked"):
        fn, ref_fn = OPS[name]
        check_against_reference(fn, ref_fn, q, k, v, torch.float64)
    # a bias broadcast over the batch and head axes is split correctly too
    bias = torch.zeros(45, 45, dtype=torch.float64).masked_fill(~MASK, float("-inf"))
    out, lse = _kernels.attn_fwd(q, k, v, 0.3, False, bias)
    want_out, want_lse = _kernels._manual_fwd(q, k, v, 0.3, False, bias)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=1e-12)
