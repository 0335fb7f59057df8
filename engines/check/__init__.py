"""`ficoco-check`: the accuracy gate of a bundle against PyTorch (`run_check`; the levels are described in
`engines.check.runner`, the command line is `commands.check`)."""

from bundle.compare import OutputComparison, TokenAgreement, token_agreement
from engines.check.inputs import Sample, load_images, load_prompts, make_samples, reference_for_bundle
from engines.check.levels import TASK_IMAGES, TASK_MODELS, ReductionCost, TaskResult, first_token_kl
from engines.check.options import (
    DEFAULT_THRESHOLDS,
    CheckInputError,
    CheckOptions,
    Thresholds,
    bundle_kind,
    resolve_thresholds,
)
from engines.check.report import CheckReport, SampleResult, write_report
from engines.check.runner import run_check

__all__ = [
    "DEFAULT_THRESHOLDS", "TASK_IMAGES", "TASK_MODELS", "CheckInputError", "CheckOptions", "CheckReport",
    "OutputComparison", "ReductionCost", "Sample", "SampleResult", "TaskResult", "Thresholds", "TokenAgreement",
    "bundle_kind", "first_token_kl", "load_images", "load_prompts", "make_samples", "reference_for_bundle",
    "resolve_thresholds", "run_check", "token_agreement", "write_report",
]
