"""FastV in the paradigm (docs/method-spec.md A10, §5): prune visual tokens once, by the last token's attention.

* filter: a_i = head-mean softmax attention of the last prompt token to visual token i (the last query
  is causal-valid for every key); s_i = -a_i, S = TopK(s, r). This is the official FastV code's ranking
  (it takes the head-mean attention map of block K-1 and reads its last query row), not the paper's text, which
  ranks by the attention each visual token receives averaged over all queries (docs/method-spec.md A10).
* correlate: K = 0 (no recycling).
* compress: drop S (and, since the step sits in block K-1 after attention, their KV in every later block).
"""

from __future__ import annotations

from torch import Tensor

from ficoco.methods.ficoco_l import visual_index
from ficoco.paradigm import MergePlan, choose_sources, complement_sorted, compress_prune, gather_tokens
from ficoco.schedule import ReductionStep
from ficoco.stats import head_mean_attention_row


def plan(q: Tensor, k: Tensor, image_offset: Tensor, step: ReductionStep, scale: float, kept: Tensor | None = None) -> MergePlan:
    """q, k: [B, H, L, d] (RoPE applied, KV heads repeated); `kept`: follow this kept set (`choose_sources`)."""
    attn = head_mean_attention_row(q[:, :, -1:], k, scale)  # [B, L]
    a_vis = gather_tokens(attn, visual_index(image_offset, step.n))
    sources = choose_sources(-a_vis, step.r, step.n, kept)
    kept = complement_sorted(sources, step.n)
    empty = a_vis.new_zeros(a_vis.shape[0], step.r, 0)
    return MergePlan(kept=kept, sources=sources, targets=empty.long(), weights=empty)


def compress(x: Tensor, merge: MergePlan) -> Tensor:
    return compress_prune(x, merge)
