"""The building blocks of the ops, for code that composes attention itself (sequence
parallel strategies, layers with decode caches, routed attention). Everything here is
public and documented; the underscore modules it comes from are not.

- Tile kernels on (B, G, L, D) tensors: :func:`attn_fwd` -> (out, lse) and
  :func:`attn_bwd`, :func:`accumulate_tile_grads` (the backward of one tile against the
  *global* out and lse, added into gradient views), :func:`merge_into` (in-place merge
  of a part into accumulators; ``first`` comes from the plan, never from the data).
- Plans: :class:`Block` and :class:`Tile` describe which (query, key) pairs are visible;
  :func:`span_tiles` cuts a causal block into mask-free tiles; :func:`run_plan` runs a
  plan with one exact autograd Function; :func:`plan_dilated` and :func:`plan_sliding`
  are the dilated and sliding-window planners.
- Positioned variants: :func:`sliding_window_attention_at` (queries and keys that start
  at given positions: decoding), :func:`tiled_masked_attention` (explicit masks per
  query tile) with :func:`query_rows_per_tile`.
- Checks and rules: :func:`check_qkv`, :func:`resolve_scale`, :func:`compute_dtype`,
  :func:`check_branches`, :func:`check_coverage`, :func:`head_offsets` and
  :func:`head_offset_groups` (the heads of each offset, as slices),
  :func:`causal_query_offset`.
"""

from ._blockwise import Block, Tile, run_plan, span_tiles
from ._kernels import accumulate_tile_grads, attn_bwd, attn_fwd, compute_dtype, merge_into
from ._validate import check_qkv, resolve_scale
from .attention import causal_query_offset
from .dilated import (
    check_branches,
    check_coverage,
    head_offset_groups,
    head_offsets,
    plan_dilated,
)
from .masked import query_rows_per_tile, tiled_masked_attention
from .sliding import plan_sliding, sliding_window_attention_at

__all__ = [
    "Block",
    "Tile",
    "accumulate_tile_grads",
    "attn_bwd",
    "attn_fwd",
    "causal_query_offset",
    "check_branches",
    "check_coverage",
    "check_qkv",
    "compute_dtype",
    "head_offset_groups",
    "head_offsets",
    "merge_into",
    "plan_dilated",
    "plan_sliding",
    "query_rows_per_tile",
    "resolve_scale",
    "run_plan",
    "sliding_window_attention_at",
    "span_tiles",
    "tiled_masked_attention",
]
