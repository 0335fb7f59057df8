"""The schedule: which block reduces how many tokens. Data only; `ficoco.planner.plan` builds it.

Conventions (every later step reads these from the bundle manifest; nothing recomputes them):

* A step at block `layer` runs after that block's attention + residual and before its MLP, so the
  block's own attention (and, in the decoder, its KV cache) sees all `n` input tokens.
* Vision tower: the reduced span is the whole CLIP sequence, [CLS] at slot 0 included, so the first
  step of LLaVA-1.5 has n = 577. [CLS] is never removed.
* Decoder tower: the reduced span is the visual tokens only, [a, a + n) of the sequence, where the
  image offset a is a runtime input.
* `r` is the net number of tokens that leave the span at the step (EViT removes r + 1 and appends one
  fused token); `targets_per_source` is the static target budget K_l of each removed token (0 = pure pruning).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Tower = Literal["vision", "decoder"]
Variant = Literal["none", "V", "L", "VL"]
Positions = Literal["compact", "original"]


@dataclass(frozen=True)
class ReductionStep:
    layer: int  # 0-based block index
    n: int  # span length entering the step
    r: int  # tokens leaving the span (net)
    targets_per_source: int  # K_l: the static target budget of each removed token (0 = pure pruning)

    @property
    def n_out(self) -> int:
        return self.n - self.r


@dataclass(frozen=True)
class TowerSchedule:
    """The steps of one tower (vision or decoder): which block removes how many tokens of its span."""

    tower: Tower
    method: str  # "none", "ficoco", "tome", "evit", "random", "pool", "fastv"
    num_layers: int  # blocks this tower runs (vision: select_block + 1; decoder: all blocks)
    span_in: int  # span length entering block 0 (vision: CLS + patches; decoder: visual tokens)
    steps: tuple[ReductionStep, ...] = ()

    def __post_init__(self) -> None:
        n = self.span_in
        last = -1
        for s in self.steps:
            if s.layer <= last or not 0 <= s.layer < self.num_layers:
                raise ValueError(f"{self.tower} steps must be at increasing blocks in [0, {self.num_layers}): {s}")
            if s.n != n or s.r < 0 or s.r >= s.n or s.targets_per_source < 0:
                raise ValueError(f"{self.tower} step {s} does not follow from span length {n}")
            n -= s.r
            last = s.layer

    def step_at(self, layer: int) -> ReductionStep | None:
        for s in self.steps:
            if s.layer == layer:
                return s
        return None

    def span_at(self, layer: int) -> int:
        """Span length seen by block `layer`'s attention (and held by its KV cache in the decoder)."""
        n = self.span_in
        for s in self.steps:
            if s.layer < layer:
                n -= s.r
        return n

    @property
    def span_out(self) -> int:
        return self.span_in - sum(s.r for s in self.steps)

    @property
    def removed(self) -> int:
        return self.span_in - self.span_out


@dataclass(frozen=True)
class Schedule:
    """The full schedule of one model: both towers, the budget that produced them, and their cost."""

    variant: Variant
    method: str
    preset: str
    positions: Positions
    visual_tokens_in: int  # tokens the unreduced projector would give the decoder (576)
    vision: TowerSchedule
    decoder: TowerSchedule
    text_tokens: int = 60  # M, the text length assumed by the FLOPs figures
    flops: dict[str, float] = field(default_factory=dict)  # TFLOPs per part (vision, prefill, ...), see ficoco.flops

    @property
    def visual_tokens_to_decoder(self) -> int:
        """Visual tokens the projector hands to the decoder (after the vision tower, CLS dropped)."""
        return self.decoder.span_in

    @property
    def visual_tokens_final(self) -> int:
        return self.decoder.span_out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Schedule:
        def tower(s: dict[str, Any]) -> TowerSchedule:
            return TowerSchedule(
                tower=s["tower"],
                method=s["method"],
                num_layers=s["num_layers"],
                span_in=s["span_in"],
                steps=tuple(ReductionStep(**x) for x in s["steps"]),
            )

        return cls(
            variant=d["variant"],
            method=d["method"],
            preset=d["preset"],
            positions=d["positions"],
            visual_tokens_in=d["visual_tokens_in"],
            vision=tower(d["vision"]),
            decoder=tower(d["decoder"]),
            text_tokens=d.get("text_tokens", 60),
            flops=dict(d.get("flops", {})),
        )
