"""The reduction methods, each a filter/correlate/compress triple, and the two entry points the models use.

`vision_step` runs one step inside a CLIP block (FiCoCo-V, ToMe, EViT, and the random / pool baselines);
`decoder_plan` + `decoder_compress` run one step inside a Llama block (FiCoCo-L, FastV). The reduced
PyTorch model and the exported graphs both call these, so the math exists once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ficoco.methods import evit, fastv, ficoco_l, ficoco_v, pool, random_prune, tome
from ficoco.paradigm import MergePlan, gather_tokens
from ficoco.params import PAPER, FiCoCoParams, RandomParams, ToMeParams, ficoco_params
from ficoco.schedule import ReductionStep

VISION_METHODS = ("ficoco", "tome", "evit", "random", "pool")
DECODER_METHODS = ("ficoco", "fastv")


@dataclass(frozen=True)
class MethodParams:
    """Hyperparameters of every method; the schedule says which method runs where."""

    ficoco: FiCoCoParams = PAPER
    tome: ToMeParams = field(default_factory=ToMeParams)
    random: RandomParams = field(default_factory=RandomParams)

    @classmethod
    def for_preset(cls, preset: str) -> MethodParams:
        return cls(ficoco=ficoco_params(preset))


@dataclass(frozen=True)
class VisionTokens:
    """What a vision step changes: hidden states [B, n, D], original patch index pos [B, n] ([CLS] = -1,
    an EViT fused token = -1), token sizes [B, n, 1] (ToMe's m; ones otherwise), and ToMe's sequence order
    [B, n] int64 (the slot of each token in facebookresearch/ToMe's own output order, which its next A/B
    split alternates over; None = ascending, i.e. before any ToMe step; `ficoco.methods.tome`)."""

    hidden: Tensor
    pos: Tensor
    size: Tensor
    order: Tensor | None = None


def vision_step(
    method: str,
    params: MethodParams,
    tokens: VisionTokens,
    q: Tensor,
    k: Tensor,
    step: ReductionStep,
    *,
    grid_side: int,
    scale: float,
    size_bias: Tensor | None = None,
    kept: Tensor | None = None,
) -> tuple[VisionTokens, MergePlan]:
    """One vision reduction step after a CLIP block's attention + residual. q, k: [B, H, n, d].

    `kept` [B, n - r]: follow this kept set instead of the method's filter (`ficoco.paradigm.choose_sources`;
    the checkers' fp32 reference making a bundle's choices). The random and pool baselines choose by
    position alone, not by the data, and ignore it."""
    x, pos, size = tokens.hidden, tokens.pos, tokens.size
    if method == "ficoco":
        merge = ficoco_v.plan(q, k, pos, step, params.ficoco, grid_side, scale, kept)
        return VisionTokens(ficoco_v.compress(x, merge), gather_tokens(pos, merge.kept), gather_tokens(size, merge.kept)), merge
    if method == "tome":
        merge, order = tome.plan(k, step, tokens.order, kept=kept)
        x2, size2 = tome.compress(x, size, merge)
        return VisionTokens(x2, gather_tokens(pos, merge.kept), size2, order), merge
    if method == "evit":
        merge = evit.plan(q, k, step, scale, size_bias, kept)
        fused_pos = pos[:, :1] * 0 - 1
        new_pos = gather_tokens(pos, merge.kept)
        return (
            VisionTokens(
                evit.compress(x, merge),
                torch.cat([new_pos, fused_pos], dim=1),
                torch.cat([gather_tokens(size, merge.kept), size[:, :1] * 0 + 1], dim=1),
            ),
            merge,
        )
    if method == "random":
        merge = random_prune.plan(pos, step, params.random.seed, grid_side)
        return VisionTokens(random_prune.compress(x, merge), gather_tokens(pos, merge.kept), gather_tokens(size, merge.kept)), merge
    if method == "pool":
        merge = pool.plan(pos, step, grid_side)
        x2, size2 = pool.compress(x, size, merge)
        return VisionTokens(x2, gather_tokens(pos, merge.kept), size2), merge
    raise ValueError(f"{method!r} is not a vision reduction method ({', '.join(VISION_METHODS)})")


def decoder_plan(
    method: str, params: MethodParams, q: Tensor, k: Tensor, image_offset: Tensor, step: ReductionStep, *, scale: float,
    kept: Tensor | None = None,
) -> MergePlan:
    """Filter + correlate for a decoder step. q, k: [B, H, L, d] with RoPE applied, KV heads repeated;
    `kept`: follow this kept set (as in `vision_step`)."""
    if method == "ficoco":
        return ficoco_l.plan(q, k, image_offset, step, params.ficoco, scale, kept)
    if method == "fastv":
        return fastv.plan(q, k, image_offset, step, scale, kept)
    raise ValueError(f"{method!r} is not a decoder reduction method ({', '.join(DECODER_METHODS)})")


def decoder_compress(method: str, params: MethodParams, x_visual: Tensor, merge: MergePlan) -> Tensor:
    """Compress the visual span [B, n, D] -> [B, n - r, D]."""
    if method == "ficoco":
        return ficoco_l.compress(x_visual, merge, params.ficoco)
    if method == "fastv":
        return fastv.compress(x_visual, merge)
    raise ValueError(f"{method!r} is not a decoder reduction method ({', '.join(DECODER_METHODS)})")
