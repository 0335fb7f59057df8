"""The steps of one tower: spread a tower's removal evenly over its reduction blocks and check each step.

docs/method-spec.md A6. `ficoco.planner.plan` decides each tower's span lengths and block range; this
module turns one such request into a `TowerSchedule` whose every step the method can carry out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ficoco.paradigm import adaptive_targets
from ficoco.schedule import ReductionStep, TowerSchedule


class PlanError(ValueError):
    """A reduction plan that cannot be built; the message says why and what would work."""


def round_half_up(x: float) -> int:
    """Nearest integer, halves rounded up (so the result never depends on banker's rounding)."""
    return math.floor(x + 0.5)


def even_split(total: int, blocks: int) -> list[int]:
    """Spread `total` removals over `blocks` blocks: base = total // blocks, the first total % blocks
    blocks take base + 1."""
    if blocks <= 0:
        raise ValueError("blocks must be positive")
    base, rem = divmod(total, blocks)
    return [base + 1 if i < rem else base for i in range(blocks)]


def tokens_text(n: int) -> str:
    return f"{n} token{'s' if n != 1 else ''}"


@dataclass(frozen=True)
class TowerRequest:
    """What one tower must do: reduce `span_in` to `span_out` in blocks start..end with `method`."""

    tower: str
    method: str
    num_layers: int
    span_in: int
    span_out: int
    start: int
    end: int
    has_cls: bool = False  # vision: slot 0 is [CLS], never removed
    epsilon: float = 0.998


def _step_targets(method: str, n: int, epsilon: float) -> int:
    if method == "ficoco":
        return adaptive_targets(n, epsilon)
    if method in ("tome", "evit", "pool"):
        return 1
    return 0  # fastv, random: pure pruning


def _check_step(req: TowerRequest, layer: int, n: int, r: int, n_targets: int) -> None:
    """Raise PlanError if `method` cannot remove r of n tokens in one step."""
    hint = (
        "spread the removal over more blocks (an earlier start or a later end block) or keep more tokens"
        if req.method != "fastv"
        else "keep more tokens"
    )
    where = f"{req.method} {req.tower} step at block {layer}"
    if req.method == "tome":
        # Bipartite matching: set A = even slots (ceil(n/2), [CLS] included and protected), B = odd slots.
        limit = math.ceil(n / 2) - 1
        if r > limit:
            raise PlanError(
                f"{where} must merge {r} of {n} tokens, but ToMe's bipartite matching can merge at most "
                f"ceil(n/2) - 1 = {limit} per block; {hint}."
            )
    elif req.method == "evit":
        if n - r < 2:
            raise PlanError(
                f"{where} must remove {r} of {n} tokens, but EViT keeps [CLS] plus one fused token "
                f"(at most {n - 2} per block); {hint}."
            )
    elif req.method in ("random", "pool"):
        if n - r < 2:
            raise PlanError(
                f"{where} must remove {r} of {n} tokens, but {req.method} keeps [CLS] and at least one patch "
                f"(at most {n - 2} per block); keep more tokens."
            )
    elif req.method == "ficoco":
        floor_ = max(2, n_targets + 1) if req.has_cls else max(1, n_targets)
        if n - r < floor_:
            what = "[CLS] plus " if req.has_cls else ""
            raise PlanError(
                f"{where} must remove {r} of {n} tokens, leaving {n - r}; FiCoCo needs {what}at least "
                f"{max(1, n_targets)} kept token(s) as merge targets (K = {n_targets}), i.e. at most {n - floor_} per block; {hint}."
            )
    else:  # fastv
        if n - r < 1:
            raise PlanError(f"{where} would remove every visual token; keep at least 1.")


def build_tower(req: TowerRequest) -> TowerSchedule:
    removed = req.span_in - req.span_out
    if removed <= 0:
        return TowerSchedule(tower=req.tower, method="none", num_layers=req.num_layers, span_in=req.span_in)  # type: ignore[arg-type]
    layers = list(range(req.start, req.end + 1))
    steps: list[ReductionStep] = []
    n = req.span_in
    for layer, r in zip(layers, even_split(removed, len(layers)), strict=True):
        if r == 0:
            continue
        n_targets = _step_targets(req.method, n, req.epsilon)
        _check_step(req, layer, n, r, n_targets)
        steps.append(ReductionStep(layer=layer, n=n, r=r, targets_per_source=n_targets))
        n -= r
    return TowerSchedule(
        tower=req.tower,  # type: ignore[arg-type]
        method=req.method,
        num_layers=req.num_layers,
        span_in=req.span_in,
        steps=tuple(steps),
    )
