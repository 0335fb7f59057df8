"""`ficoco-eval`'s library: answer accuracy of reduction methods and bundles on the easy-vqa test splits.

A *configuration* is one (variant, method, preset, budget) planned for the model; the grid is every method
at the paper's budgets (576 → 192 / 128 / 64 visual tokens) plus the unreduced model and the question-only
(blind) baseline. Each configuration runs the reduced PyTorch model (`ficoco.reduced_llava.ReducedLlava`,
the same code the bundles are exported from); a bundle runs through the runtime's backend. Answers are
scored by exact match of the first word (`ficoco.vqa.score`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ficoco import vqa
from ficoco.answering import Prompting, answer_split
from ficoco.geometry import LlavaGeometry
from ficoco.planner import plan
from ficoco.reduced_llava import ReducedLlava
from ficoco.schedule import Schedule

log = logging.getLogger(__name__)

#: The paper's Table 1 budgets (visual tokens kept of 576).
PAPER_BUDGETS: tuple[int, ...] = (192, 128, 64)


@dataclass(frozen=True)
class EvalConfig:
    """One row of the grid. `keep_tokens` None with variant "none" is the unreduced model."""

    variant: str
    method: str
    preset: str = "paper"
    keep_tokens: int | None = None
    ratio: float | None = None

    @property
    def label(self) -> str:
        if self.variant == "none":
            return "unreduced"
        name = {"ficoco": f"FiCoCo-{self.variant}", "tome": "ToMe", "evit": "EViT", "fastv": "FastV",
                "random": "random", "pool": "pooling"}.get(self.method, self.method)
        return f"{name} ({self.preset})" if self.method == "ficoco" else name

    def schedule(self, geometry: LlavaGeometry) -> Schedule:
        if self.variant == "none":
            return plan(geometry, "none")
        return plan(geometry, self.variant, self.method, ratio=self.ratio, keep_tokens=self.keep_tokens, preset=self.preset)


#: (variant, method, preset) of every method in the grid.
GRID_METHODS: tuple[tuple[str, str, str], ...] = (
    ("V", "ficoco", "paper"), ("L", "ficoco", "paper"), ("VL", "ficoco", "paper"),
    ("V", "ficoco", "official"), ("L", "ficoco", "official"), ("VL", "ficoco", "official"),
    ("V", "tome", "paper"), ("V", "evit", "paper"), ("L", "fastv", "paper"),
    ("V", "random", "paper"), ("V", "pool", "paper"),
)


def available_methods() -> set[str]:
    from ficoco.params import METHODS

    return set(METHODS)


def grid(budgets: Sequence[int] = PAPER_BUDGETS, ratio: float | None = None,
         methods: Sequence[tuple[str, str, str]] = GRID_METHODS) -> list[EvalConfig]:
    """The unreduced model, then every method at every budget (or at `ratio` instead of the budgets)."""
    have = available_methods()
    rows = [EvalConfig("none", "none")]
    for v, m, p in methods:
        if m not in have:
            log.warning("method %s is not available in this version; left out of the grid", m)
            continue
        if ratio is not None:
            rows.append(EvalConfig(v, m, p, ratio=ratio))
        else:
            rows.extend(EvalConfig(v, m, p, keep_tokens=b) for b in budgets)
    return rows


@dataclass
class EvalResult:
    label: str
    config: dict[str, Any]
    split: str
    visual_tokens: int | None
    tflops: float | None
    score: dict[str, Any]
    seconds: float
    predictions: list[str] = field(default_factory=list, repr=False)

    def to_dict(self, with_predictions: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_predictions:
            d.pop("predictions")
        return d


def evaluate_model(
    loaded: Any,
    configs: Sequence[EvalConfig],
    splits: Sequence[vqa.Split],
    *,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> list[EvalResult]:
    """Every configuration of the reduced PyTorch model on every split."""
    prompting = Prompting.of_model(loaded)
    geometry = loaded.geometry
    results = []
    for cfg in configs:
        sched = cfg.schedule(geometry)
        model = ReducedLlava(loaded.model, sched).eval()
        for split in splits:
            results.append(_run(cfg.label, asdict(cfg), model.stages(), prompting, split, sched, on_progress))
    return results


def evaluate_stages(label: str, stages: Any, prompting: Prompting, splits: Sequence[vqa.Split],
                    schedule: Schedule | None = None, config: dict[str, Any] | None = None,
                    on_progress: Callable[[str, int, int], None] | None = None) -> list[EvalResult]:
    """Any staged model (e.g. a bundle's backend) on every split."""
    return [_run(label, config or {}, stages, prompting, s, schedule, on_progress) for s in splits]


def _run(label: str, config: dict[str, Any], stages: Any, prompting: Prompting, split: vqa.Split,
         sched: Schedule | None, on_progress: Callable[[str, int, int], None] | None) -> EvalResult:
    n_images = len(split.image_keys())
    t0 = time.perf_counter()
    cb = None if on_progress is None else (lambda i: on_progress(f"{label} · {split.name}", i, n_images))
    preds = answer_split(stages, prompting, split, on_image=cb)
    sc = vqa.score(split.questions, preds)
    return EvalResult(
        label=label,
        config=config,
        split=split.name,
        visual_tokens=sched.visual_tokens_final if sched is not None else None,
        tflops=float(sched.flops["total"]) if sched is not None and sched.flops else None,
        score=sc.to_dict(),
        seconds=time.perf_counter() - t0,
        predictions=preds,
    )


def blind_results(splits: Sequence[vqa.Split]) -> list[EvalResult]:
    """The question-only baseline (no image): the training majority answer of each question string."""
    out = []
    for s in splits:
        preds = vqa.blind_answers(s.questions)
        out.append(EvalResult("question only (blind)", {"variant": "blind"}, s.name, 0, None,
                              vqa.score(s.questions, preds).to_dict(), 0.0, preds))
    return out
