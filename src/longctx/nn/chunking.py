"""Per-token work in token chunks, recomputed in backward: what lets a training step's
memory grow by a small constant per token.

Feed-forward layers, norms, projections, rotary positions and the LM head act on each
token alone, so running them over slices of the sequence changes nothing but the order
of float rounding. Chunking alone does not save memory in training (autograd keeps every
slice's activations); with recomputation (``torch.utils.checkpoint``, non-reentrant)
each slice keeps only its inputs, and its activations live only while the slice runs,
forward or backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def recompute(fn: Callable, *args):
    """fn(*args), with its activations recomputed in backward when autograd records."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False)


def token_chunks(
    fn: Callable,
    args: Sequence[Tensor],
    dims: Sequence[int],
    chunk: int,
    out_dims: int | Sequence[int],
    *,
    recomputed: bool = True,
):
    """fn applied to slices of ``chunk`` tokens and the results concatenated.

    ``args[i]`` is sliced along ``dims[i]`` (its token axis; all the same length);
    ``fn`` returns a tensor or a tuple of tensors whose token axes are ``out_dims``.
    ``chunk`` <= 0 or >= the length: one call. ``recomputed``: each slice is recomputed
    in backward (module docstring)."""
    n = args[0].shape[dims[0]]
    call = (lambda *a: recompute(fn, *a)) if recomputed else fn
    if chunk <= 0 or chunk >= n:
        return call(*args)
    # split, not one narrow per slice: the backward of a split assembles the input's
    # gradient once, where each narrow's backward would allocate a full-size gradient
    pieces = [a.split(chunk, dim=d) for a, d in zip(args, dims, strict=True)]
    parts = [call(*slices) for slices in zip(*pieces, strict=True)]
    if isinstance(parts[0], Tensor):
        return torch.cat(parts, dim=out_dims)
    out_dims = [out_dims] * len(parts[0]) if isinstance(out_dims, int) else out_dims
    return tuple(torch.cat([p[i] for p in parts], dim=d) for i, d in enumerate(out_dims))


__all__ = ["recompute", "token_chunks"]
