"""Spatial pooling in the paradigm (a baseline): keep a uniform lattice of patches, average every other
patch into its nearest kept one.

* filter: a fixed coarse-to-fine order of the G x G grid. With L = ceil(log2 G), the grid centred in the
  2^L x 2^L grid (o = (2^L - G) // 2, r' = row + o, c' = col + o) and bits r'_b, c'_b (b = 0 the least
  significant), patch p gets the key
      kappa(p) = sum_{b=0}^{L-1} d(r'_b, c'_b) · 4^(L-1-b),   d(0,0) = 0, d(1,1) = 1, d(0,1) = 2, d(1,0) = 3,
  a bit-reversed quadtree (Morton) code: the patches of the stride-2^m lattice r' ≡ c' ≡ 0 (mod 2^m)
  precede all others, and within a level the diagonal class comes first (a quincunx), then the two axis
  classes. Keys are distinct. s_i = kappa(pos_i), [CLS] (slot 0) gets -inf; S = TopK(s, r).
  On LLaVA's 24 x 24 grid, 144 kept patches are exactly those with even row and column (one in every
  2 x 2 block), 72 a quincunx, 36 one in every 4 x 4 block (rows and columns ≡ 0 mod 4).
* correlate: K = 1, J_i = {the kept patch j nearest to i on the grid}, by the squared distance
  (row_i - row_j)² + (col_i - col_j)² of the original positions, ties to the lowest kept index; [CLS] is
  never a target; alpha = 1.
* compress: ToMe's size-weighted mean x_j <- (m_j x_j + sum_{i in I_j} m_i x_i) / (m_j + sum_i m_i), sizes
  add; no proportional attention.

One step is average pooling over each kept patch's Voronoi cell (144 of 576: exactly 2 x 2 average
pooling). Kept sets nest over steps (prefixes of one order), and several steps pool hierarchically: each
step pools the tokens present into their nearest kept token, so a final token is the size-weighted mean
of the patches it absorbed, each as it was at the block where it left.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ficoco.paradigm import MergePlan, complement_sorted, compress_size_weighted, gather_tokens, stable_topk
from ficoco.schedule import ReductionStep

DIGIT = (0, 2, 3, 1)  # d(r'_b, c'_b) at index 2 r'_b + c'_b: d(0,0) = 0, d(0,1) = 2, d(1,0) = 3, d(1,1) = 1


def lattice_keys(grid_side: int) -> list[int]:
    """kappa(p) for p = 0..G²-1 in raster order (see the module docstring)."""
    levels = max(1, math.ceil(math.log2(grid_side)))
    offset = (2**levels - grid_side) // 2
    keys = []
    for p in range(grid_side * grid_side):
        r, c = divmod(p, grid_side)
        r, c = r + offset, c + offset
        keys.append(sum(DIGIT[2 * ((r >> b) & 1) + ((c >> b) & 1)] * 4 ** (levels - 1 - b) for b in range(levels)))
    return keys


def nearest_kept(pos: Tensor, sources: Tensor, kept: Tensor, grid_side: int) -> Tensor:
    """[B, r] slot in `kept` of each source's nearest kept patch (squared grid distance, ties -> lowest
    slot; slot 0 = [CLS] excluded). Integer grid coordinates; float32 distances are exact (< 2^24)."""
    ps = gather_tokens(pos, sources).clamp_min(0)
    pk = gather_tokens(pos, kept).clamp_min(0)
    dr = (ps // grid_side).unsqueeze(-1) - (pk // grid_side).unsqueeze(-2)  # [B, r, n - r]
    dc = (ps % grid_side).unsqueeze(-1) - (pk % grid_side).unsqueeze(-2)
    d2 = (dr * dr + dc * dc).to(torch.float32)
    cls = (torch.arange(kept.shape[1], device=kept.device) == 0).reshape(1, 1, -1)
    d2 = torch.where(cls, torch.full_like(d2, math.inf), d2)
    return torch.argmin(d2, dim=-1)  # first minimum on ties, in PyTorch and ONNX ArgMin alike


def plan(pos: Tensor, step: ReductionStep, grid_side: int) -> MergePlan:
    """pos: [B, n] original patch index of each token, [CLS] at slot 0 (pos -1)."""
    keys = torch.tensor(lattice_keys(grid_side), dtype=torch.float32, device=pos.device)
    s = keys[pos[:, 1:].clamp_min(0)]  # exact: keys < 4^L <= 2^24 for G <= 4096
    s = torch.cat([torch.full_like(s[:, :1], -math.inf), s], dim=1)
    sources = stable_topk(s, step.r)
    kept = complement_sorted(sources, step.n)
    targets = nearest_kept(pos, sources, kept, grid_side).unsqueeze(-1)  # [B, r, 1]
    weights = torch.ones(targets.shape, dtype=torch.float32, device=pos.device)
    return MergePlan(kept=kept, sources=sources, targets=targets, weights=weights)


def compress(x: Tensor, size: Tensor, merge: MergePlan) -> tuple[Tensor, Tensor]:
    return compress_size_weighted(x, size, merge)
