"""Check the attention ops on a device, then time them.

    python tools/gpu_check.py                       # CUDA when available, else the CPU
    python tools/gpu_check.py --device cuda --max-n 1048576

1. Parity: every op (attention, chunked, sliding, dilated, masked) forward and backward
   in bf16, fp16 and fp32 against the float64 reference on the CPU, with and without a
   gradient on lse; prints the largest relative error of out, lse, dq, dk, dv and which
   backward ran (``fused``, ``folded`` or ``manual``, and the kernel: ``flash``,
   ``efficient``, ``cpu-flash`` or ``manual``). Exits 1 when an error is above its
   dtype's bound.
2. Timing: dense (``F.scaled_dot_product_attention`` and ``ops.attention``) and dilated
   attention (the paper's configuration), causal, forward and forward + backward, over
   powers of two up to ``--max-n``, with useful TFLOP/s and peak memory; a case whose
   predicted time exceeds ``--budget`` seconds ends its series.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from longctx import ops
from longctx._util import powers_of_two, resolve_device
from longctx.bench.common import PeakMemory, synchronize
from longctx.ops import _kernels
from longctx.ops import reference as ref

WS, RS = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12]  # LongNet's paper branches
BOUND = {torch.bfloat16: 5e-2, torch.float16: 1e-2, torch.float32: 1e-3}


def _ops(n: int):
    """(name, op (q, k, v) -> (out, lse), reference) for a sequence of n."""
    ws, rs = [8, 32, 64], [1, 2, 4]
    mask = torch.rand(n, n, generator=torch.Generator().manual_seed(0)) < 0.7
    return [
        (
            "attention",
            lambda q, k, v: ops.attention(q, k, v, causal=True, return_lse=True),
            lambda q, k, v: ref.attention(q, k, v, causal=True),
        ),
        (
            "chunked",
            lambda q, k, v: ops.chunked_attention(
                q, k, v, causal=True, chunk_size=37, return_lse=True
            ),
            lambda q, k, v: ref.attention(q, k, v, causal=True),
        ),
        (
            "sliding",
            lambda q, k, v: ops.sliding_window_attention(q, k, v, 33, return_lse=True),
            lambda q, k, v: ref.sliding_window_attention(q, k, v, 33),
        ),
        (
            "dilated",
            lambda q, k, v: ops.dilated_attention(q, k, v, ws, rs, causal=True, return_lse=True),
            lambda q, k, v: ref.dilated_attention(q, k, v, ws, rs, causal=True),
        ),
        (
            "masked",
            lambda q, k, v: ops.masked_attention(q, k, v, mask.to(q.device), return_lse=True),
            lambda q, k, v: ref.masked_attention(q, k, v, mask),
        ),
    ]


def _grads(fn, inputs, g_out, g_lse):
    q, k, v = (t.detach().requires_grad_() for t in inputs)
    out, lse = fn(q, k, v)
    loss = (out.double() * g_out.to(out.device)).sum()
    if g_lse is not None:
        finite = torch.isfinite(lse)
        loss = loss + (torch.where(finite, lse.double(), 0.0) * g_lse.to(lse.device)).sum()
    loss.backward()
    return [out, lse, q.grad, k.grad, v.grad]


def parity(device: torch.device, n: int) -> bool:
    """Print the parity table; True when every error is within its bound."""
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(2, 4, n, 64, generator=g, dtype=torch.float64) for _ in range(3)]
    g_out = torch.randn(2, 4, n, 64, generator=g, dtype=torch.float64)
    g_lse = torch.randn(2, 4, n, generator=g, dtype=torch.float64)
    ok = True
    print(f"parity against float64 (N = {n}, 4 heads of 64, batch 2), relative max error:")
    print(f"{'op':10s} {'dtype':9s} {'lse grad':8s} {'out':>8s} {'lse':>8s} {'dq':>8s} "
          f"{'dk':>8s} {'dv':>8s}  backward")  # fmt: skip
    for name, fn, ref_fn in _ops(n):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for with_lse in (False, True):
                gl = g_lse if with_lse else None
                want = _grads(ref_fn, base, g_out, gl)
                got = _grads(fn, [t.to(device, dtype) for t in base], g_out, gl)
                errs = []
                for a, b in zip(got, want, strict=True):
                    a, b = a.detach().double().cpu(), b.detach()
                    finite = torch.isfinite(b)
                    scale = b[finite].abs().max().clamp_min(1e-12)
                    errs.append(float((a[finite] - b[finite]).abs().max() / scale))
                bad = max(errs) > BOUND[dtype]
                ok &= not bad
                cells = " ".join(f"{e:8.1e}" for e in errs)
                path = f"{_kernels.last_backward_path}/{_kernels.last_backward_kernel}"
                flag = "  <-- above bound" if bad else ""
                print(f"{name:10s} {str(dtype)[6:]:9s} {str(with_lse):8s} {cells}  {path}{flag}")
    return ok


def timing(device: torch.device, max_n: int, budget: float, dtype: torch.dtype) -> None:
    """Print the timing table (useful TFLOP/s: 4 * D per visible pair; backward 2.5x)."""
    H, D = 8, 64
    cases = {
        "sdpa": (
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            lambda n: ops.attention_flops(n, H, D, causal=True),
        ),
        "attention": (
            lambda q, k, v: ops.attention(q, k, v, causal=True),
            lambda n: ops.attention_flops(n, H, D, causal=True),
        ),
        "dilated": (
            lambda q, k, v: ops.dilated_attention(q, k, v, WS, RS, causal=True),
            lambda n: ops.dilated_attention_flops(n, H, D, WS, RS, causal=True),
        ),
    }
    print(f"\ntiming, causal, B=1 H={H} D={D} {str(dtype)[6:]} on {device}:")
    print(f"{'op':10s} {'N':>9s} {'fwd ms':>9s} {'TFLOP/s':>8s} {'fwd+bwd ms':>11s} "
          f"{'TFLOP/s':>8s} {'peak GiB':>9s}")  # fmt: skip
    for name, (fn, flops) in cases.items():
        last = None
        for n in powers_of_two(min(4096, max_n), max_n):
            if last is not None and last[1] * flops(n) / last[0] > budget:
                print(f"{name:10s} {n:9,d}  skipped: predicted over {budget:g} s")
                break
            q, k, v = (
                torch.randn(1, H, n, D, device=device, dtype=dtype, requires_grad=True)
                for _ in range(3)
            )
            g = torch.randn(1, H, n, D, device=device, dtype=dtype)
            inputs = (q, k, v)

            def forward(fn=fn, inputs=inputs):
                return fn(*inputs)

            def both(fn=fn, inputs=inputs, g=g):
                torch.autograd.backward(fn(*inputs), g)

            with PeakMemory(device) as mem:
                with torch.no_grad():
                    t_f = _timed(forward, device)
                t_fb = _timed(both, device)
                peak = mem.peak() / 2**30
            f = flops(n)
            print(f"{name:10s} {n:9,d} {t_f * 1e3:9.1f} {f / t_f / 1e12:8.2f} "
                  f"{t_fb * 1e3:11.1f} {3.5 * f / t_fb / 1e12:8.2f} {peak:9.2f}")  # fmt: skip
            last = (f, t_fb)


def _timed(fn, device, reps: int = 3) -> float:
    fn()  # warm-up
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / reps


def main(argv: list[str] | None = None) -> int:
    """Run the check (module docstring); 1 when a parity error is above its bound."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--check-n", type=int, default=300, help="sequence length of the parity")
    p.add_argument("--max-n", type=int, default=1 << 20, help="largest N timed")
    p.add_argument("--budget", type=float, default=60.0, help="seconds per timed case")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    ok = parity(device, args.check_n)
    timing(device, args.max_n, args.budget, getattr(torch, args.dtype))
    print("\nparity: all within bounds" if ok else "\nparity: some errors above their bounds")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
