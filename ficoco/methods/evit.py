"""EViT in the paradigm (docs/method-spec.md A10, §5): inattentive tokens fuse into one new token.

* filter: a^CLS_i = head-mean softmax attention of [CLS] to token i; the r + 1 patches with the lowest
  a^CLS form S (so the span shrinks by r net), [CLS] is never a source.
* correlate: "convergent" — every source flows into one new fused token, with weight a^CLS_i.
* compress: X' = [X_T ; sum_{i in S} a^CLS_i X_i] (unnormalised weights, as the official code); the
  fused token is appended last and is an ordinary token for later blocks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ficoco.paradigm import MergePlan, choose_sources, complement_sorted, compress_fuse, gather_tokens
from ficoco.schedule import ReductionStep
from ficoco.stats import head_mean_attention_row


def plan(q: Tensor, k: Tensor, step: ReductionStep, scale: float, bias: Tensor | None = None,
         kept: Tensor | None = None) -> MergePlan:
    """q, k: [B, H, n, d]; [CLS] at span slot 0; `kept`: follow this kept set (`choose_sources`)."""
    attn = head_mean_attention_row(q[:, :, :1], k, scale, bias)  # [B, n]
    s = torch.cat([torch.full_like(attn[:, :1], -math.inf), -attn[:, 1:]], dim=1)
    sources = choose_sources(s, step.r + 1, step.n, kept)
    kept = complement_sorted(sources, step.n)
    weights = gather_tokens(attn, sources).unsqueeze(-1)  # [B, r + 1, 1]
    targets = torch.zeros(weights.shape, dtype=torch.long, device=q.device)
    return MergePlan(kept=kept, sources=sources, targets=targets, weights=weights)


def compress(x: Tensor, merge: MergePlan) -> Tensor:
    return compress_fuse(x, merge)
