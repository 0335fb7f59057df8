"""ToMe in the paradigm (docs/method-spec.md A10, §5): bipartite soft matching inside the vision encoder.

* filter: alternate the span into A (even slots, [CLS] at slot 0 included) and B (odd slots) of ToMe's own
  sequence order (below); with the head-mean keys k_bar normalised, s_i = max_{j in B} cos(k_bar_i, k_bar_j)
  for i in A ([CLS] gets -inf); S = TopK(s, r) within A.
* correlate: K = 1, J_i = {argmax_{j in B} cos} (B tokens are never sources, so always kept), alpha = 1.
* compress: size-weighted mean x_j <- (m_j x_j + sum m_i x_i) / (m_j + sum m_i); sizes add. With
  proportional attention later blocks add log(m) to their attention logits.

ToMe's sequence order. facebookresearch/ToMe's `bipartite_soft_matching` (class token on) outputs
[unmerged A tokens in A order | all B tokens in B order], and the next step alternates A/B over *that*
order. Our tokens stay in ascending original order (raster order for the LLM), so every token carries its
slot o_i in ToMe's order (`VisionTokens.order`, None = ascending): a step reads the ToMe sequence as the
permutation seq[o_i] = i, splits seq[0::2] / seq[1::2] (static slices), and gives each kept token its new
slot: unmerged A slot a -> #(unmerged A slots < a), B slot b -> (|A| - r) + b. [CLS] stays ToMe slot 0. Over
several steps the merge groups are ToMe's own (tests/test_reference_equivalence.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ficoco.paradigm import (
    MergePlan,
    choose_sources,
    complement_sorted,
    compress_size_weighted,
    gather_tokens,
    kept_rank,
    stable_topk,
)
from ficoco.schedule import ReductionStep
from ficoco.stats import head_mean_keys


def plan(k: Tensor, step: ReductionStep, order: Tensor | None = None, has_cls: bool = True,
         kept: Tensor | None = None) -> tuple[MergePlan, Tensor | None]:
    """k: [B, H, n, d] keys of the block; order: [B, n] int64 ToMe slot of each token (None = ascending);
    `kept`: follow this kept set (its sources must lie in A, as any ToMe selection's do).

    Returns the plan and the kept tokens' ToMe slots after the step ([B, n - r]; the input order if r = 0,
    as ToMe leaves a step without merges alone)."""
    n, b = step.n, k.shape[0]
    metric = head_mean_keys(k)
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    span = torch.arange(n, device=k.device).unsqueeze(0).expand(b, -1)
    if order is None:  # ToMe's order is the ascending one: strided slices
        a_idx, b_idx = span[:, 0::2], span[:, 1::2]
        ma, mb = metric[:, 0::2], metric[:, 1::2]
    else:
        seq = torch.zeros_like(order).scatter(1, order, span)  # seq[t] = span index at ToMe slot t
        a_idx, b_idx = seq[:, 0::2], seq[:, 1::2]
        ma, mb = gather_tokens(metric, a_idx), gather_tokens(metric, b_idx)
    scores = ma @ mb.transpose(1, 2)  # [B, |A|, |B|]
    if has_cls:  # [CLS] is ToMe slot 0, the first A token
        protect = (torch.arange(scores.shape[1], device=k.device) == 0).reshape(1, -1, 1)
        scores = torch.where(protect, torch.full_like(scores, -math.inf), scores)
    best = torch.argmax(scores, dim=-1)  # first max on ties
    node_max = torch.gather(scores, -1, best.unsqueeze(-1)).squeeze(-1)
    if kept is None:
        src_a = stable_topk(node_max, step.r)  # positions within A
    else:  # the followed sources' positions within A
        a_pos = torch.full((b, n), -1, dtype=torch.long, device=k.device).scatter(
            1, a_idx, torch.arange(a_idx.shape[1], device=k.device).unsqueeze(0).expand(b, -1))
        src_a = torch.gather(a_pos, 1, choose_sources(node_max, step.r, n, kept))
        if bool((src_a < 0).any()):
            raise ValueError("a followed ToMe kept set drops a B token; ToMe only merges A tokens")
    sources = torch.gather(a_idx, 1, src_a)
    dst = torch.gather(b_idx, 1, torch.gather(best, 1, src_a))  # span index of each source's target
    kept = complement_sorted(sources, n)
    targets = torch.gather(kept_rank(sources, n), 1, dst).unsqueeze(-1)
    weights = torch.ones(targets.shape, dtype=torch.float32, device=k.device)
    merge = MergePlan(kept=kept, sources=sources, targets=targets, weights=weights)
    if step.r == 0:
        return merge, order
    n_a, n_b = a_idx.shape[1], b_idx.shape[1]
    merged = torch.zeros(b, n_a, dtype=torch.float32, device=k.device).scatter(
        1, src_a, torch.ones_like(src_a, dtype=torch.float32)
    )
    a_slot = (torch.cumsum(1.0 - merged, dim=-1) - 1.0).clamp_min(0.0).to(torch.long)  # unmerged A, in A order
    b_slot = (n_a - step.r) + torch.arange(n_b, device=k.device).unsqueeze(0).expand(b, -1)  # then all of B
    slot = torch.zeros(b, n, dtype=torch.long, device=k.device).scatter(1, a_idx, a_slot).scatter(1, b_idx, b_slot)
    return merge, torch.gather(slot, 1, kept)


def compress(x: Tensor, size: Tensor, merge: MergePlan) -> tuple[Tensor, Tensor]:
    return compress_size_weighted(x, size, merge)
