"""What `ficoco-check` checks and how strictly: the options, the gates (`Thresholds`) and their defaults
per bundle kind (fp32, fp16, quantized)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bundle.compare import ERROR_STATS, TIE_MARGIN, OutputGates
from bundle.manifest import Manifest

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
DEFAULT_IMAGES: tuple[str, ...] = ("astronaut", "chelsea", "coffee")
DEFAULT_PROMPTS: tuple[str, ...] = ("What is in the picture?", "Describe the image in detail.")
DEFAULT_MAX_NEW_TOKENS = 16

ProgressCallback = Callable[[int, int, str], None]  # (samples done, total, label of the sample just done)


class CheckInputError(ValueError):
    """Bad input to the check (images, prompts, options, reference model); exit code 2."""


@dataclass(frozen=True)
class Thresholds:
    """The gates of one check.

    A stage output passes when (if `gate_tolerance`) it is within `atol`/`rtol` by Polygraphy's
    `check_error_stat` semantics (`bundle.compare`), and (if `min_cosine` is set) its cosine similarity
    to PyTorch is at least `min_cosine`. Free-running greedy tokens pass when the overall exact-match rate
    is >= `min_token_match`; teacher-forced tokens (`bundle.compare.forced_agreement`: the bundle's choice
    on the reference's own prefix, a mismatch whose reference margin is <= `tie_margin` logit standard
    deviations counting as a near-tie) when their rate is >= `min_forced_match`. None: reported, not
    gated. `max_kl` (mean first-token KL over samples) and `min_reduction_agreement`
    (overall greedy agreement of reduced vs unreduced PyTorch) gate level 3 only when set.
    """

    atol: float
    rtol: float
    check_error_stat: str
    min_token_match: float | None
    gate_tolerance: bool = True
    min_cosine: float | None = None
    #: |norm ratio - 1| of every stage output at most this (None: off)
    max_norm_deviation: float | None = None
    #: teacher-forced token agreement, near-ties counted as agreeing (None: reported, not gated)
    min_forced_match: float | None = None
    #: a mismatch is a near-tie when the reference's margin is at most this many logit standard deviations
    tie_margin: float = 0.0
    max_kl: float | None = None
    min_reduction_agreement: float | None = None
    #: level 4: the bundle's answer accuracy may fall at most this much (a fraction) below PyTorch's
    max_accuracy_drop: float = 0.0

    def output_gates(self) -> OutputGates:
        """The gates of one stage output (level 1), for `bundle.compare`."""
        return OutputGates(self.atol, self.rtol, self.check_error_stat, self.gate_tolerance, self.min_cosine,
                           self.max_norm_deviation)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Defaults per bundle kind. fp32: the exporter's own validation tolerances, identical free-running tokens.
#: fp16: the stage outputs (against the reference making the bundle's kept-token choices) by cosine >= 0.99
#: and |norm ratio - 1| <= 0.25 (TensorRT Edge-LLM's gates; an absolute tolerance means nothing across
#: outputs of different scales, so it is reported, not gated, unless --atol/--rtol is given); every
#: teacher-forced token must match or be a near-tie (TIE_MARGIN), free-running tokens are reported (after a
#: first near-tie flip the two paths leave each other's prefix, and what follows measures the model's
#: chaos, not the bundle); answers may drop one point. quantized (a non-empty manifest "quantization"):
#: cosine and norm ratio, half the free-running tokens; teacher-forced tokens reported.
DEFAULT_THRESHOLDS: dict[str, Thresholds] = {
    "fp32": Thresholds(atol=1e-4, rtol=1e-3, check_error_stat="elemwise", min_token_match=1.0),
    "fp16": Thresholds(atol=5e-2, rtol=5e-2, check_error_stat="mean", min_token_match=None, gate_tolerance=False,
                       min_cosine=0.99, max_norm_deviation=0.25, min_forced_match=1.0, tie_margin=TIE_MARGIN,
                       max_accuracy_drop=0.01),
    "quantized": Thresholds(
        atol=5e-2, rtol=5e-2, check_error_stat="mean", min_token_match=0.5, gate_tolerance=False, min_cosine=0.99,
        max_norm_deviation=0.25, tie_margin=TIE_MARGIN, max_accuracy_drop=0.02,
    ),
}


def bundle_kind(manifest: Manifest) -> str:
    """"quantized" when the manifest has a non-empty "quantization", else its precision (fp32 / fp16)."""
    if manifest.is_quantized:
        return "quantized"
    precision = manifest.precision
    return precision if precision in DEFAULT_THRESHOLDS else "fp16"  # bf16 and the like: judged as fp16


@dataclass
class CheckOptions:
    """What to check and how strictly. None thresholds take the bundle kind's default (DEFAULT_THRESHOLDS)."""

    backend: str = "auto"
    ort_provider: str = "auto"
    device: int = 0
    threads: int | None = None
    model: str | None = None  # reference model name/path; default: manifest["source_model"]["name"]
    images: Path | None = None  # a directory: every image file in it; default: DEFAULT_IMAGES
    prompts: Path | None = None  # one prompt per line; default: DEFAULT_PROMPTS
    num_samples: int | None = None  # cap on (image, prompt) pairs
    max_new_tokens: int | None = None  # default: DEFAULT_MAX_NEW_TOKENS capped by the bundle's limit
    atol: float | None = None
    rtol: float | None = None
    check_error_stat: str | None = None
    min_cosine: float | None = None
    max_norm_deviation: float | None = None
    min_token_match: float | None = None
    min_forced_match: float | None = None
    tie_margin: float | None = None
    max_kl: float | None = None
    min_reduction_agreement: float | None = None
    #: level 4: easy-vqa test images per split whose questions are answered (None: TASK_IMAGES for a model
    #: trained on easy-vqa, i.e. `shapes`, else 0 = off)
    task_images: int | None = None
    max_accuracy_drop: float | None = None  # fraction, e.g. 0.01 = one point
    verify: bool = True
    #: the command's --verbose (debug logging, in which `bundle.compare` logs every output it judges)
    verbose: bool = False

    def validate(self) -> None:
        """CheckInputError naming the bad option and the valid range."""
        if self.check_error_stat is not None and self.check_error_stat not in ERROR_STATS:
            raise CheckInputError(f"--check-error-stat must be one of {', '.join(ERROR_STATS)} (got {self.check_error_stat!r})")
        for name, v in (("--atol", self.atol), ("--rtol", self.rtol), ("--max-kl", self.max_kl), ("--tie-margin", self.tie_margin)):
            if v is not None and not (v >= 0 and math.isfinite(v)):
                raise CheckInputError(f"{name} must be a finite number >= 0 (got {v})")
        for name, v in (("--min-token-match", self.min_token_match), ("--min-forced-match", self.min_forced_match),
                        ("--min-reduction-agreement", self.min_reduction_agreement)):
            if v is not None and not 0.0 <= v <= 1.0:
                raise CheckInputError(f"{name} is a rate in [0, 1] (got {v})")
        if self.max_norm_deviation is not None and not (self.max_norm_deviation >= 0 and math.isfinite(self.max_norm_deviation)):
            raise CheckInputError(f"--max-norm-deviation must be a finite number >= 0, e.g. 0.25 (got {self.max_norm_deviation})")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise CheckInputError(f"--min-cosine is a cosine similarity in [-1, 1] (got {self.min_cosine})")
        if self.task_images is not None and self.task_images < 0:
            raise CheckInputError(f"--task-images must be >= 0 (0 turns the answer-accuracy gate off; got {self.task_images})")
        if self.max_accuracy_drop is not None and not 0.0 <= self.max_accuracy_drop <= 1.0:
            raise CheckInputError(f"--max-accuracy-drop is a fraction in [0, 1], e.g. 0.01 for one point (got {self.max_accuracy_drop})")
        if self.num_samples is not None and self.num_samples < 1:
            raise CheckInputError(f"--num-samples must be at least 1 (got {self.num_samples})")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise CheckInputError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")


def resolve_thresholds(manifest: Manifest, options: CheckOptions) -> Thresholds:
    """The bundle kind's defaults, with every threshold the options set explicitly put in its place.

    Setting --atol/--rtol/--check-error-stat turns the tolerance gate on also for a quantized bundle.
    """
    t = DEFAULT_THRESHOLDS[bundle_kind(manifest)]
    tol_given = any(v is not None for v in (options.atol, options.rtol, options.check_error_stat))
    return replace(
        t,
        atol=t.atol if options.atol is None else float(options.atol),
        rtol=t.rtol if options.rtol is None else float(options.rtol),
        check_error_stat=t.check_error_stat if options.check_error_stat is None else options.check_error_stat,
        gate_tolerance=t.gate_tolerance or tol_given,
        min_cosine=t.min_cosine if options.min_cosine is None else float(options.min_cosine),
        max_norm_deviation=(t.max_norm_deviation if options.max_norm_deviation is None
                            else float(options.max_norm_deviation)),
        min_token_match=t.min_token_match if options.min_token_match is None else float(options.min_token_match),
        min_forced_match=t.min_forced_match if options.min_forced_match is None else float(options.min_forced_match),
        tie_margin=t.tie_margin if options.tie_margin is None else float(options.tie_margin),
        max_kl=options.max_kl,
        min_reduction_agreement=options.min_reduction_agreement,
        max_accuracy_drop=t.max_accuracy_drop if options.max_accuracy_drop is None else float(options.max_accuracy_drop),
    )
