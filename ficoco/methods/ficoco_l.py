"""FiCoCo-L: filter, correlate, compress inside the Llama decoder (docs/method-spec.md A1-A4, A6, §3, §9).

The visual span is [a, a + n) of the sequence (a = image offset, a runtime tensor); X is the text after
the image, [a + n, L), with M = L - a - n tokens. From the block's RoPE'd Q and K (head-mean scaled
logits, fp32): l_VV [n, n], l_XV (text queries -> visual keys, causal-valid) and l_VX (visual queries ->
text keys, pre-mask).

* filter (Eq. 3): s^l_i = beta (1/n) sum_{j in V} l_VV[i, j] - (1 - beta) (1/M) sum_{k in X} l_XV[k, i]
  with beta = 0.6 (`paper`); `official`: sum (not mean) over visual columns and the pre-mask
  l_VX[i, k] in the task term. S = TopK(s^l, r).
* correlate (Eq. 4): C_ij = gamma l_VV[i, j] + (1 - gamma) (1/M) sum_k l_VX[i, k] l_XV[k, j], gamma = 0.6,
  C_ii = -inf (`official`: no 1/M). tau_i = eps-quantile of row i; targets = top-K kept columns with
  C_ij >= tau_i (`paper`), or top-K of all columns with weights of source targets zeroed (`official`).
* compress: Eq. 2 (`paper`) or the plain sum X_j + sum alpha_ij X_i (`official`).

Text positions are selected with masks, not slices, so the image offset can stay a graph input and
every shape stays static in n and r (only L is dynamic).
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
    compress_sum,
    gather_tokens,
    select_targets,
)
from ficoco.params import FiCoCoParams
from ficoco.schedule import ReductionStep
from ficoco.stats import head_mean_logits


def visual_index(image_offset: Tensor, n: int) -> Tensor:
    """[B, n] sequence indices a + 0..n-1 of the visual span."""
    return image_offset.reshape(-1, 1) + torch.arange(n, device=image_offset.device)


def text_after_mask(image_offset: Tensor, n: int, length: int) -> Tensor:
    """[B, L] float32: 1 for the text tokens after the image (indices >= a + n), else 0."""
    idx = torch.arange(length, device=image_offset.device).unsqueeze(0)
    return (idx >= image_offset.reshape(-1, 1) + n).to(torch.float32)


def _heads_at(t: Tensor, index: Tensor) -> Tensor:
    """t [B, H, L, d] rows at index [B, m] -> [B, H, m, d]."""
    b, h, _, d = t.shape
    idx = index[:, None, :, None].expand(b, h, index.shape[1], d)
    return torch.gather(t, 2, idx)


def plan(q: Tensor, k: Tensor, image_offset: Tensor, step: ReductionStep, params: FiCoCoParams, scale: float,
         kept: Tensor | None = None) -> MergePlan:
    """Filter + correlate for one FiCoCo-L step. q, k: [B, H, L, d] (RoPE applied, KV heads repeated);
    `kept`: follow this kept set instead of filtering (`ficoco.paradigm.choose_sources`)."""
    n, length = step.n, q.shape[2]
    vis = visual_index(image_offset, n)
    qv, kv = _heads_at(q, vis), _heads_at(k, vis)
    text = text_after_mask(image_offset, n, length)  # [B, L]
    m = text.sum(dim=-1, keepdim=True).clamp_min(1.0)  # M, [B, 1]

    l_vv = head_mean_logits(qv, kv, scale)  # [B, n, n]
    l_xv = head_mean_logits(q, kv, scale) * text.unsqueeze(-1)  # [B, L, n], rows outside X zeroed
    l_vx = head_mean_logits(qv, k, scale) * text.unsqueeze(1)  # [B, n, L], columns outside X zeroed

    # filter
    vis_term = l_vv.sum(dim=-1) if params.l_filter_reduce == "sum" else l_vv.mean(dim=-1)
    if params.l_task_term == "text_to_vision":
        task = l_xv.sum(dim=1) / m
    else:
        task = l_vx.sum(dim=-1) / m
    s = params.l_beta * vis_term - (1.0 - params.l_beta) * task
    sources = choose_sources(s, step.r, n, kept)
    kept = complement_sorted(sources, n)

    # correlate (only the source rows of C are needed)
    indirect = gather_tokens(l_vx, sources) @ l_xv  # [B, r, n]
    if params.l_indirect_scale == "mean":
        indirect = indirect / m.unsqueeze(-1)
    corr = params.l_gamma * gather_tokens(l_vv, sources) + (1.0 - params.l_gamma) * indirect
    self_col = sources.unsqueeze(-1) == torch.arange(n, device=q.device)  # C_ii = -inf
    corr = torch.where(self_col, torch.full_like(corr, -math.inf), corr)
    targets, weights = select_targets(
        corr, sources, kept, step.targets_per_source, params.epsilon, strict=params.strict_threshold, over=params.l_targets
    )
    return MergePlan(kept=kept, sources=sources, targets=targets, weights=weights)


def compress(x: Tensor, merge: MergePlan, params: FiCoCoParams) -> Tensor:
    """x: the visual span [B, n, D] -> [B, n - r, D]."""
    if params.l_compress == "sum":
        return compress_sum(x, merge)
    return compress_self_preserving(x, merge)
