"""Random pruning in the paradigm (a baseline): a fixed, seeded, image-independent order of the patches.

* filter: every patch p of the G x G grid gets a fixed rank rho(p) in 0..G²-1, its place when the patches
  are sorted by h(p) = SplitMix64(seed · 2^32 + p), where (all mod 2^64)
      z = x + 0x9E3779B97F4A7C15;  z = (z ^ z >> 30) · 0xBF58476D1CE4E5B9;
      z = (z ^ z >> 27) · 0x94D049BB133111EB;  SplitMix64(x) = z ^ z >> 31
  (a bijection of 64-bit integers, so no two patches tie). s_i = rho(pos_i), [CLS] (slot 0) gets -inf;
  S = TopK(s, r): the present patches that come last in the order leave first.
* correlate: K = 0 (no recycling).
* compress: drop S (as FastV).

The order is computed in Python when the step runs (at trace time in an export) and enters the graph as
a constant [G²] table gathered by `pos`: no random op runs in the graph, so PyTorch, ONNX Runtime and
repeated runs agree exactly. Because the order is fixed, steps nest: after any sequence of steps the
kept patches are the first n_out - 1 of the order, whatever the image and however the removal is spread
over blocks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ficoco.paradigm import MergePlan, complement_sorted, compress_prune, stable_topk
from ficoco.schedule import ReductionStep

MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """The SplitMix64 output for state x (x mod 2^64); SplitMix64(0) = 0xE220A8397B1DCDAF."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def patch_order(seed: int, num_patches: int) -> list[int]:
    """rho: rank[p] = the place of patch p when 0..num_patches-1 are sorted by SplitMix64(seed · 2^32 + p)."""
    if not 0 <= seed < 2**32:
        raise ValueError(f"the random-pruning seed must be an integer in [0, 2^32), got {seed!r}")
    order = sorted(range(num_patches), key=lambda p: splitmix64((seed << 32) + p))
    rank = [0] * num_patches
    for place, p in enumerate(order):
        rank[p] = place
    return rank


def plan(pos: Tensor, step: ReductionStep, seed: int, grid_side: int) -> MergePlan:
    """pos: [B, n] original patch index of each token, [CLS] at slot 0 (pos -1)."""
    rank = torch.tensor(patch_order(seed, grid_side * grid_side), dtype=torch.float32, device=pos.device)
    s = rank[pos[:, 1:].clamp_min(0)]  # exact: ranks < 2^24
    s = torch.cat([torch.full_like(s[:, :1], -math.inf), s], dim=1)
    sources = stable_topk(s, step.r)
    kept = complement_sorted(sources, step.n)
    empty = s.new_zeros(s.shape[0], step.r, 0)
    return MergePlan(kept=kept, sources=sources, targets=empty.long(), weights=empty)


def compress(x: Tensor, merge: MergePlan) -> Tensor:
    return compress_prune(x, merge)
