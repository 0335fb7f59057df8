"""Hyperparameters of the reduction methods and the two FiCoCo presets (docs/method-spec.md A1).

`paper` follows the v4 equations; `official` switches the choices where the official code differs from
the paper by design. Bugs of the official code (global buffers, score-sorted token order, the fixed
[0, 576) visual span, accumulating decode positions) are never reproduced.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

VARIANTS: tuple[str, ...] = ("none", "V", "L", "VL")  # where to reduce: nowhere, vision, decoder, both
METHODS: tuple[str, ...] = ("ficoco", "tome", "evit", "random", "pool", "fastv")
POSITIONS: tuple[str, ...] = ("compact", "original")  # decoder RoPE positions after a decoder reduction

Preset = Literal["paper", "official"]
PRESETS: tuple[str, ...] = ("paper", "official")


@dataclass(frozen=True)
class FiCoCoParams:
    # --- shared ---
    epsilon: float = 0.998  # ε: τ_i is the ε-quantile of source i's correlation row
    strict_threshold: bool = False  # target valid iff C_ij >= τ_i (paper) or C_ij > τ_i (official code)
    # --- FiCoCo-V (vision) ---
    v_lambda: float = 0.35  # λ, weight of the vision-aware redundancy VR_i in s^v (Eq. 1)
    v_cls_weight: float = 0.65  # 1 - λ, weight of the [CLS] (semantic) term
    v_l2_normalize: bool = False  # official: L2-normalise both terms over the patches first
    v_penalty: float = 2.0  # local-penalty coefficient on 2x2 windows (1 = no penalty)
    v_cls_is_target: bool = False  # may [CLS] receive recycled tokens?
    v_targets: Literal["kept", "all"] = "kept"  # top-K over kept patches (paper) or all columns, self included (official)
    v_start: int = 12  # first 0-based CLIP block with a step
    # --- FiCoCo-L (decoder) ---
    l_beta: float = 0.6  # β, weight of the visual redundancy term in s^l (Eq. 3)
    l_gamma: float = 0.6  # γ, weight of the direct term in C^l (Eq. 4)
    l_filter_reduce: Literal["mean", "sum"] = "mean"  # (1/N) Σ_j (paper) or Σ_j (official) over visual columns
    l_task_term: Literal["text_to_vision", "vision_to_text"] = "text_to_vision"  # causal-valid (paper) or pre-mask (official)
    l_indirect_scale: Literal["mean", "sum"] = "mean"  # (1/M) Σ_k (paper) or Σ_k (official) in the indirect term
    l_targets: Literal["kept", "all"] = "kept"  # top-K over kept columns (paper) or all but self (official)
    l_compress: Literal["normalized", "sum"] = "normalized"  # Eq. 2 (paper) or plain sum (official)
    l_start: int = 4  # first 0-based decoder block with a step


PAPER = FiCoCoParams()
OFFICIAL = replace(
    PAPER,
    strict_threshold=True,
    v_lambda=0.65,
    v_cls_weight=0.35,
    v_l2_normalize=True,
    v_targets="all",
    l_filter_reduce="sum",
    l_task_term="vision_to_text",
    l_indirect_scale="sum",
    l_targets="all",
    l_compress="sum",
    l_start=5,
)


def ficoco_params(preset: str) -> FiCoCoParams:
    if preset == "paper":
        return PAPER
    if preset == "official":
        return OFFICIAL
    raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")


@dataclass(frozen=True)
class ToMeParams:
    prop_attn: bool = True  # proportional attention: add log(size) to the attention logits of later blocks
    start: int = 12


@dataclass(frozen=True)
class EViTParams:
    start: int = 12


@dataclass(frozen=True)
class RandomParams:
    seed: int = 0  # fixes the patch order (ficoco.methods.random_prune.patch_order); same seed, same kept set
    start: int = 12  # first 0-based CLIP block with a step, as ToMe / EViT

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"the random-pruning seed must be an integer in [0, 2^32), got {self.seed!r}")


@dataclass(frozen=True)
class PoolParams:
    start: int = 12  # first 0-based CLIP block with a step, as ToMe / EViT


@dataclass(frozen=True)
class FastVParams:
    full_blocks: int = 2  # FastV's K: blocks 0..K-1 see every token; the step runs in block K-1 after attention


# Which stages each method can reduce.
METHOD_STAGES: dict[str, tuple[str, ...]] = {
    "ficoco": ("vision", "decoder"),
    "tome": ("vision",),
    "evit": ("vision",),
    "random": ("vision",),
    "pool": ("vision",),
    "fastv": ("decoder",),
}
