"""ToMe in the paradigm (docs/method-spec.md A10, §5): bipartite soft matching inside the vision encoder.

* filter: alternate the span into A (even indices, [CLS] at 0 included) and B (odd indices); with the
  head-mean keys k_bar normalised, s_i = max_{j in B} cos(k_bar_i, k_bar_j) for i in A ([CLS] gets
  -inf); S = TopK(s, r) within A.
* correlate: K = 1, J_i = {argmax_{j in B} cos} (B tokens are never sources, so always kept), alpha = 1.
* compress: size-weighted mean x_j <- (m_j x_j + sum m_i x_i) / (m_j + sum m_i); sizes add. With
  proportional attention later blocks add log(m) to their attention logits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ficoco.paradigm import MergePlan, complement_sorted, compress_size_weighted, kept_rank, stable_topk
from ficoco.schedule import ReductionStep
from ficoco.stats import head_mean_keys


def plan(k: Tensor, step: ReductionStep, has_cls: bool = True) -> MergePlan:
    """k: [B, H, n, d] keys of the block."""
    n = step.n
    metric = head_mean_keys(k)
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    # A = even span indices (2a), B = odd span indices (2b + 1): strided slices, no index tensors.
    scores = metric[:, 0::2] @ metric[:, 1::2].transpose(1, 2)  # [B, |A|, |B|]
    if has_cls:
        protect = (torch.arange(scores.shape[1], device=k.device) == 0).reshape(1, -1, 1)
        scores = torch.where(protect, torch.full_like(scores, -math.inf), scores)
    best = torch.argmax(scores, dim=-1)  # first max on ties
    node_max = torch.gather(scores, -1, best.unsqueeze(-1)).squeeze(-1)
    src_a = stable_topk(node_max, step.r)  # positions within A
    sources = 2 * src_a
    dst = 2 * torch.gather(best, 1, src_a) + 1  # span index of each source's target
    kept = complement_sorted(sources, n)
    targets = torch.gather(kept_rank(sources, n), 1, dst).unsqueeze(-1)
    weights = torch.ones(targets.shape, dtype=torch.float32, device=k.device)
    return MergePlan(kept=kept, sources=sources, targets=targets, weights=weights)


def compress(x: Tensor, size: Tensor, merge: MergePlan) -> tuple[Tensor, Tensor]:
    return compress_size_weighted(x, size, merge)
