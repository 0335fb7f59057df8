"""FiCoCo-V: filter, correlate, compress inside the CLIP vision encoder (docs/method-spec.md A1-A5, §2, §9).

At a reducing block with span [CLS, patches] of n tokens and l = head-mean scaled logits of the block
(l_ij = (1/H) sum_h q_hi k_hj / sqrt(d_h)):

* filter (Eq. 1): VR_i = (1/(n-1)) sum_{j>=1} l_ij (vision-aware redundancy, attention given) and
  a^CLS_i = l_0i (semantic term); s^v_i = lambda VR_i - (1 - lambda) a^CLS_i with lambda = 0.35
  (`paper`), or s^v_i = 0.65 VR_i/||VR|| - 0.35 a^CLS_i/||a^CLS|| (`official`, norms over patches).
  Local penalty: on the true patch grid (via each token's original patch index `pos`), in every 2x2
  window the most redundant remaining token's score s becomes c*s if s > 0 else s/c (c = 2).
  S = TopK(s^v, r); [CLS] (slot 0) is never a source.
* correlate: C = l[S] over all n columns; tau_i = eps-quantile of row i; targets = the top-K kept
  patches (`paper`), a target with C_ij < tau_i gets alpha = 0; alpha = softmax over valid targets (A3).
  `official` (v_targets = "all", as the official code): the top-K of all n columns, so a pick may be the
  source itself, [CLS] or another source; those picks keep their share of the softmax but receive nothing
  (sources leave; [CLS] is never a target, v_cls_is_target = False), so such a source recycles less than
  its whole mass.
* compress (Eq. 2): X_j <- (X_j + sum alpha_ij X_i) / (1 + sum alpha_ij); `pos` follows the kept tokens.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ficoco.paradigm import (
    MergePlan,
    choose_sources,
    complement_sorted,
    compress_self_preserving,
    gather_tokens,
    select_targets,
)
from ficoco.params import FiCoCoParams
from ficoco.schedule import ReductionStep
from ficoco.stats import head_mean_logits


def redundancy_scores(ell: Tensor, params: FiCoCoParams) -> Tensor:
    """s^v [B, n] from the head-mean logits [B, n, n]; slot 0 ([CLS]) gets -inf."""
    cls_term = ell[:, 0, 1:]  # a^CLS_i
    vr = ell[:, 1:, 1:].mean(dim=-1)  # VR_i
    if params.v_l2_normalize:
        vr = vr / vr.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        cls_term = cls_term / cls_term.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    s = params.v_lambda * vr - params.v_cls_weight * cls_term
    cls = torch.full_like(s[:, :1], -math.inf)
    return torch.cat([cls, s], dim=1)


def local_penalty(s: Tensor, pos: Tensor, grid_side: int, coef: float) -> Tensor:
    """Penalise the most redundant remaining token of every 2x2 patch window (A5), statically.

    s: [B, n] scores with slot 0 = [CLS] (left unchanged); pos: [B, n] original patch index of each
    token (row-major on the grid_side x grid_side grid; [CLS] holds -1). The scores are scattered into
    a full grid with -inf holes (padded to an even side), reshaped into windows, and the window argmax
    (first index on ties) is compared back with each token's own slot. coef = 1 disables the penalty.
    """
    if coef == 1.0:
        return s
    b = s.shape[0]
    side = grid_side + grid_side % 2
    half = side // 2
    p = pos[:, 1:]
    row, col = p // grid_side, p % grid_side
    cell = row * side + col
    grid = torch.full((b, side * side), -math.inf, dtype=s.dtype, device=s.device)
    grid = grid.scatter(1, cell, s[:, 1:])
    windows = grid.reshape(b, half, 2, half, 2).permute(0, 1, 3, 2, 4).reshape(b, half * half, 4)
    best = torch.argmax(windows, dim=-1)  # [B, windows]
    window = (row // 2) * half + (col // 2)
    slot = (row % 2) * 2 + (col % 2)
    is_max = torch.gather(best, 1, window) == slot
    sp = s[:, 1:]
    penalised = torch.where(sp > 0, sp * coef, sp / coef)
    return torch.cat([s[:, :1], torch.where(is_max, penalised, sp)], dim=1)


def plan(q: Tensor, k: Tensor, pos: Tensor, step: ReductionStep, params: FiCoCoParams, grid_side: int, scale: float,
         kept: Tensor | None = None) -> MergePlan:
    """Filter + correlate for one FiCoCo-V step. q, k: [B, H, n, d]; pos: [B, n]; `kept`: follow this kept set
    instead of filtering (`ficoco.paradigm.choose_sources`)."""
    ell = head_mean_logits(q, k, scale)  # [B, n, n]
    s = local_penalty(redundancy_scores(ell, params), pos, grid_side, params.v_penalty)
    sources = choose_sources(s, step.r, step.n, kept)
    kept = complement_sorted(sources, step.n)
    corr = gather_tokens(ell, sources)  # C = l[S] over all n columns: [B, r, n]
    column_ok = None
    if not params.v_cls_is_target:
        column_ok = torch.arange(step.n, device=q.device).unsqueeze(0).expand(q.shape[0], -1) > 0
    targets, weights = select_targets(
        corr, sources, kept, step.targets_per_source, params.epsilon, strict=params.strict_threshold, over=params.v_targets, column_ok=column_ok
    )
    return MergePlan(kept=kept, sources=sources, targets=targets, weights=weights)


def compress(x: Tensor, merge: MergePlan) -> Tensor:
    return compress_self_preserving(x, merge)
