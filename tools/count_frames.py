"""Count the Python frames between ``longctx`` commands and the attention kernel call.

    python tools/count_frames.py

Runs ``longctx train`` (the tiny preset, shrunk: 3 steps of 2 x 64 tokens on 200 kB of
the stdlib) and ``longctx generate`` from that run, and records the Python stack at the
first call of PyTorch's fused CPU attention kernel (a) in the second training step and
(b) for the third decoded token. Prints each chain from ``cli.main`` down to the kernel
call, and the number of frames per step (from the function that loops over steps or
tokens) in all and in longctx's own files (without PyTorch's module and autograd
dispatch frames).
"""

import sys
import tempfile
import traceback
from pathlib import Path

from longctx import cli
from longctx.ops import _kernels

captured: dict[str, list] = {}
phase = {"name": None}


class _Spy:
    """Stands for ``torch.ops.aten`` in the kernels module; records the stack."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        fn = getattr(self.real, name)
        if not name.startswith("_scaled_dot_product"):
            return fn

        def call(*args, **kwargs):
            key = phase["name"]
            if key and key not in captured:
                captured[key] = traceback.extract_stack()[:-1]
            return fn(*args, **kwargs)

        return call


def _chain(stack):
    first = next(
        i for i, f in enumerate(stack) if f.name == "main" and f.filename.endswith("cli.py")
    )
    return [(f.filename, f.lineno, f.name) for f in stack[first:]]


def _report(key: str, loop_function: str) -> None:
    chain = _chain(captured[key])
    print(f"\n{key}: {len(chain)} frames from cli.main to the kernel call")
    for filename, line, func in chain:
        print(f"  {Path(filename).name}:{line} {func}")
    start = max(i for i, (_, _, func) in enumerate(chain) if func == loop_function)
    per_step = chain[start:]
    own = [c for c in per_step if "/longctx/" in c[0]]
    print(
        f"  per {'step' if key == 'train' else 'token'} (from {loop_function}): "
        f"{len(per_step)} frames, {len(own)} in longctx's own files"
    )


def main() -> None:
    _kernels._aten = _Spy(_kernels._aten)
    out = Path(tempfile.mkdtemp()) / "run"
    import longctx.train  # noqa: F401 (loads the loop module)

    loop = sys.modules["longctx.train.loop"]
    real_lr, calls = loop.lr_at, {"n": 0}

    def lr_at(step, cfg):  # called once per step, before its forward
        calls["n"] += 1
        phase["name"] = "train" if calls["n"] == 2 else None
        return real_lr(step, cfg)

    loop.lr_at = lr_at
    sets = ["train.max_steps=3", "train.eval_every=0", "train.context=64"]
    sets += ["train.batch_size=2", "train.eval_windows=2", "data.max_bytes=200000"]
    cli.main(["train", "--out", str(out), "--no-eval", *sum((["--set", s] for s in sets), [])])
    phase["name"] = None
    gen = sys.modules["longctx.model.generate"]
    real_sample, n = gen._sample, {"k": 0}

    def sample(*args, **kwargs):  # called once per decoded token, before its forward
        n["k"] += 1
        phase["name"] = "decode" if n["k"] == 3 else None
        return real_sample(*args, **kwargs)

    gen._sample = sample
    argv = ["generate", str(out), "--prompt", "def f(x):", "--max-new-tokens", "5"]
    cli.main([*argv, "--temperature", "0"])
    loops = {"train": ("run", "_train"), "decode": ("generate",)}
    for key in captured:
        names = {f for _, _, f in _chain(captured[key])}
        _report(key, next(f for f in loops[key] if f in names))


if __name__ == "__main__":
    main()
