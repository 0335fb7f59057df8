"""`ficoco-check`: the accuracy gate of a bundle against PyTorch, at four levels.

For a handful of (image, prompt) pairs, the bundle's backend (`Pipeline.from_bundle`, ONNX Runtime or
TensorRT) is compared with the reduced PyTorch model rebuilt from the manifest (`reference_for_bundle`):

1. **stages**: every graph on the PyTorch inputs of that graph, so each stage's error is its own
   (vision_encoder visual tokens; embed_tokens; decoder_prefill logits and every present K/V; one
   decoder_step's logits and presents). Polygraphy's `SimpleCompareFunc` (`--atol/--rtol/
   --check-error-stat`, Polygraphy's semantics) and `CosineSimilarityCompareFunc` judge each output.
2. **greedy tokens**: greedy generation through the runtime vs the reduced PyTorch model (the same loop,
   `ficoco.generation.generate_tokens`, no stop token): exact-match rate over positions, first divergence.
3. **what the reduction costs** (informational unless `--max-kl` / `--min-reduction-agreement`): the
   reduced PyTorch model vs the unreduced transformers model on the same inputs: KL(p_unreduced ||
   p_reduced) of the first generated token, its top-1 agreement, and greedy token agreement
   (`LlavaForConditionalGeneration.generate`).
4. **answers** (the `shapes` model): accuracy of the bundle vs the reduced PyTorch model on easy-vqa test
   questions (`--task-images`, `--max-accuracy-drop`).

Beside the gates, for information: the **selection flips** of every reduction step, i.e. how many kept
tokens of the bundle's ONNX graphs differ from the fp32 reference's (`engines.selection`), and how many
of those are ties between patches of identical pixels.

Default thresholds depend on the bundle (`DEFAULT_THRESHOLDS`: fp32, fp16, quantized); every one can be
overridden. The report goes to BUNDLE/reports/check.json and check.md (atomic writes; reports/ is not
part of the bundle's hashes).

    report = run_check("out/tiny-vl25", CheckOptions(num_samples=2, max_new_tokens=8))
    print(report.to_markdown()); assert report.passed
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from torch import Tensor

from engines.cli import CONTEXT, _guarded, _setup_logging
from engines.selection import SelectionCheck
from exporter.wrappers import EMBED, PREFILL, STEP, VISION
from ficoco.atomic import write_atomic

log = logging.getLogger(__name__)

ERROR_STATS = ("elemwise", "mean", "median", "max")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
DEFAULT_IMAGES: tuple[str, ...] = ("astronaut", "chelsea", "coffee")
DEFAULT_PROMPTS: tuple[str, ...] = ("What is in the picture?", "Describe the image in detail.")
DEFAULT_MAX_NEW_TOKENS = 16
REPORT_JSON = "check.json"
REPORT_MD = "check.md"

ProgressCallback = Callable[[int, int, str], None]  # (samples done, total, label of the sample just done)


class CheckInputError(ValueError):
    """Bad input to the check (images, prompts, options, reference model); exit code 2."""


# ---------------------------------------------------------------------------------------------------------
# thresholds
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Thresholds:
    """The gates of one check.

    A stage output passes when (if `gate_tolerance`) Polygraphy's simple check with `atol`/`rtol`/
    `check_error_stat` passes, and (if `min_cosine` is set) its cosine similarity to PyTorch is at
    least `min_cosine`. Greedy tokens pass when the overall exact-match rate is >= `min_token_match`.
    `max_kl` (mean first-token KL over samples) and `min_reduction_agreement` (overall greedy agreement
    of reduced vs unreduced PyTorch) gate level 3 only when set.
    """

    atol: float
    rtol: float
    check_error_stat: str
    min_token_match: float
    gate_tolerance: bool = True
    min_cosine: float | None = None
    max_kl: float | None = None
    min_reduction_agreement: float | None = None
    #: level 4: the bundle's answer accuracy may fall at most this much (a fraction) below PyTorch's
    max_accuracy_drop: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Defaults per bundle kind. fp32: the exporter's own validation tolerances, identical tokens.
#: fp16: fp16 rounding (and the reduction's top-k selections it can flip) moves single elements far, so
#: the mean error is checked loosely and the cosine similarity must stay >= 0.99; half the greedy tokens
#: must match. quantized (a non-empty manifest "quantization"): judged by cosine only, >= 0.99.
DEFAULT_THRESHOLDS: dict[str, Thresholds] = {
    "fp32": Thresholds(atol=1e-4, rtol=1e-3, check_error_stat="elemwise", min_token_match=1.0),
    "fp16": Thresholds(atol=5e-2, rtol=5e-2, check_error_stat="mean", min_token_match=0.5, min_cosine=0.99,
                       max_accuracy_drop=0.01),
    "quantized": Thresholds(
        atol=5e-2, rtol=5e-2, check_error_stat="mean", min_token_match=0.5, gate_tolerance=False, min_cosine=0.99,
        max_accuracy_drop=0.02,
    ),
}


def bundle_kind(manifest: dict[str, Any]) -> str:
    """"quantized" when the manifest has a non-empty "quantization", else its precision (fp32 / fp16)."""
    if manifest.get("quantization"):
        return "quantized"
    precision = str(manifest.get("precision") or "fp32")
    return precision if precision in DEFAULT_THRESHOLDS else "fp16"  # bf16 and the like: judged as fp16


def resolve_thresholds(manifest: dict[str, Any], options: CheckOptions) -> Thresholds:
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
        min_token_match=t.min_token_match if options.min_token_match is None else float(options.min_token_match),
        max_kl=options.max_kl,
        min_reduction_agreement=options.min_reduction_agreement,
        max_accuracy_drop=t.max_accuracy_drop if options.max_accuracy_drop is None else float(options.max_accuracy_drop),
    )


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
    min_token_match: float | None = None
    max_kl: float | None = None
    min_reduction_agreement: float | None = None
    #: level 4: easy-vqa test images per split whose questions are answered (None: TASK_IMAGES for a model
    #: trained on easy-vqa, i.e. `shapes`, else 0 = off)
    task_images: int | None = None
    max_accuracy_drop: float | None = None  # fraction, e.g. 0.01 = one point
    verify: bool = True
    verbose: bool = False

    def validate(self) -> None:
        """CheckInputError naming the bad option and the valid range."""
        if self.check_error_stat is not None and self.check_error_stat not in ERROR_STATS:
            raise CheckInputError(f"--check-error-stat must be one of {', '.join(ERROR_STATS)} (got {self.check_error_stat!r})")
        for name, v in (("--atol", self.atol), ("--rtol", self.rtol), ("--max-kl", self.max_kl)):
            if v is not None and not (v >= 0 and math.isfinite(v)):
                raise CheckInputError(f"{name} must be a finite number >= 0 (got {v})")
        for name, v in (("--min-token-match", self.min_token_match), ("--min-reduction-agreement", self.min_reduction_agreement)):
            if v is not None and not 0.0 <= v <= 1.0:
                raise CheckInputError(f"{name} is a rate in [0, 1] (got {v})")
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


# ---------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One (image, prompt) pair; `image` is a PIL image, `image_name` what the report calls it."""

    image_name: str
    image: Any
    prompt: str


def load_prompts(path: Path | None) -> list[str]:
    """The prompts of a file (one per non-blank line), or DEFAULT_PROMPTS; CheckInputError if none."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CheckInputError(f"cannot read the prompt file {path}: {err}; give a UTF-8 text file with one prompt per line") from err
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise CheckInputError(f"the prompt file {path} has no prompts; write one prompt per line")
    return prompts


def load_images(directory: Path | None) -> list[tuple[str, Any]]:
    """(name, RGB image) for every image file in `directory` (sorted), or the bundled test photos."""
    if directory is None:
        from ficoco.images import test_image

        return [(n, test_image(n)) for n in DEFAULT_IMAGES]
    from ficoco.preprocess import load_image

    d = Path(directory)
    if not d.is_dir():
        raise CheckInputError(f"--images {d}: not a directory; give a directory of image files")
    try:
        files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as err:
        raise CheckInputError(f"--images {d}: cannot list the directory ({err})") from err
    if not files:
        raise CheckInputError(f"--images {d}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it")
    return [(p.name, load_image(p)) for p in files]  # ImageError (exit 2) names an unreadable file


def make_samples(images: Sequence[tuple[str, Any]], prompts: Sequence[str], num_samples: int | None) -> list[Sample]:
    """Every image with every prompt (image-major), capped at `num_samples`."""
    pairs = [Sample(name, im, p) for name, im in images for p in prompts]
    return pairs if num_samples is None else pairs[:num_samples]


# ---------------------------------------------------------------------------------------------------------
# the PyTorch reference
# ---------------------------------------------------------------------------------------------------------


def reference_for_bundle(manifest: dict[str, Any], model: str | None = None) -> tuple[Any, Any]:
    """(LoadedModel, ReducedLlava) in fp32: the source model (or `model`, e.g. a moved local directory)
    with the manifest's schedule. CheckInputError when the model cannot be found or does not fit."""
    from ficoco.models import ModelNotFoundError, load_model
    from ficoco.reduced_llava import ReducedLlava
    from ficoco.schedule import Schedule

    source = manifest.get("source_model") or {}
    name = model or source.get("name")
    if not name:
        raise CheckInputError("the manifest names no source model; pass --model NAME_OR_DIR")
    try:
        loaded = load_model(str(name), dtype=torch.float32)
    except ModelNotFoundError as err:
        hint = "" if model else " (a bundle exported from a local directory that moved: pass --model DIR)"
        raise CheckInputError(f"reference model {name!r} not found{hint}: {err}") from err
    want = source.get("revision")
    if want and loaded.revision != want:
        log.warning("reference model %s is revision %s, the bundle was exported from %s", name, loaded.revision, want)
    try:
        schedule = Schedule.from_dict(manifest["schedule"])
        reduced = ReducedLlava(loaded.model, schedule).eval()
    except (KeyError, TypeError) as err:
        raise CheckInputError(f"the manifest's schedule cannot be read ({err}); re-export the bundle") from err
    except ValueError as err:
        raise CheckInputError(f"the bundle does not fit the reference model {name!r}: {err}") from err
    return loaded, reduced


# ---------------------------------------------------------------------------------------------------------
# level 1: stages
# ---------------------------------------------------------------------------------------------------------


@dataclass
class OutputComparison:
    """One graph output of one sample against PyTorch."""

    name: str  # "<graph>:<output>"
    shape: list[int]
    max_abs_err: float
    mean_abs_err: float
    median_abs_err: float
    max_rel_err: float
    cosine: float
    within_tolerance: bool  # Polygraphy's simple check (atol / rtol / check_error_stat)
    passed: bool  # the gates of the thresholds

    @property
    def graph(self) -> str:
        return self.name.split(":")[0]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def _polygraphy_quiet(verbose: bool) -> Iterator[None]:
    from polygraphy.logger import G_LOGGER

    if verbose:
        yield
        return
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        yield


def _simple_compare_func(t: Thresholds) -> Any:
    import polygraphy.comparator as pc

    if hasattr(pc, "SimpleCompareFunc"):  # polygraphy >= 0.50 (CompareFunc.simple is deprecated there)
        return pc.SimpleCompareFunc(atol=t.atol, rtol=t.rtol, check_error_stat=t.check_error_stat)
    return pc.CompareFunc.simple(atol=t.atol, rtol=t.rtol, check_error_stat=t.check_error_stat)


def _cosine(got: np.ndarray, ref: np.ndarray) -> float:
    import polygraphy.comparator as pc

    if hasattr(pc, "CosineSimilarityCompareFunc"):
        res = pc.CosineSimilarityCompareFunc(cosine_similarity_threshold=-1.0)(
            pc.IterationResult({"x": got}, runner_name="backend"), pc.IterationResult({"x": ref}, runner_name="pytorch")
        )["x"]
        return float(res.cosine_similarity)
    a, b = got.astype(np.float64).ravel(), ref.astype(np.float64).ravel()  # older Polygraphy: no cosine metric
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def _np32(t: Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def compare_outputs(
    got: dict[str, Tensor], ref: dict[str, Tensor], thresholds: Thresholds, *, verbose: bool = False
) -> list[OutputComparison]:
    """Compare backend outputs with PyTorch outputs of the same names (Polygraphy's simple check + cosine)."""
    from polygraphy.comparator import IterationResult

    g = {k: _np32(v) for k, v in got.items()}
    r = {k: _np32(ref[k]) for k in got}
    with _polygraphy_quiet(verbose):
        results = _simple_compare_func(thresholds)(
            IterationResult(g, runner_name="backend"), IterationResult(r, runner_name="pytorch")
        )
        out: list[OutputComparison] = []
        for name in g:
            res = results.get(name, False)
            if g[name].shape != r[name].shape or isinstance(res, bool):
                nan = float("nan")
                out.append(OutputComparison(name, list(g[name].shape), nan, nan, nan, nan, nan, False, False))
                continue
            finite = bool(np.isfinite(g[name]).all())
            within = bool(res) and finite
            cos = _cosine(g[name], r[name]) if finite else float("nan")
            ok = (within or not thresholds.gate_tolerance) and finite
            if thresholds.min_cosine is not None:
                ok = ok and cos >= thresholds.min_cosine  # NaN fails
            out.append(
                OutputComparison(
                    name=name,
                    shape=list(g[name].shape),
                    max_abs_err=float(res.max_absdiff),
                    mean_abs_err=float(res.mean_absdiff),
                    median_abs_err=float(res.median_absdiff),
                    max_rel_err=float(res.max_reldiff),
                    cosine=cos,
                    within_tolerance=within,
                    passed=ok,
                )
            )
    return out


def _kv(prefix: str, flat: Sequence[Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}:present.{i // 2}.{'key' if i % 2 == 0 else 'value'}": t for i, t in enumerate(flat)}


@dataclass
class StageCheck:
    """Level 1 of one sample, and the reference's intermediate results that levels 2 and 3 reuse."""

    comparisons: list[OutputComparison]
    ref_visual: Tensor
    ref_logits: Tensor  # [B, V] prefill logits
    ref_past: list[Tensor]


def check_stages(
    backend: Any, reference: Any, pixel_values: Tensor, input_ids: Tensor, image_offset: Tensor,
    thresholds: Thresholds, *, verbose: bool = False,
) -> StageCheck:
    """Level 1: every graph of `backend` (a StagedModel, e.g. `Pipeline.stages`) on the PyTorch inputs of
    that graph against `reference` (`ReducedLlava.stages()`)."""
    got: dict[str, Tensor] = {}
    ref: dict[str, Tensor] = {}
    with torch.inference_mode():
        ref_visual = reference.encode_image(pixel_values)
        ref[f"{VISION}:visual_tokens"], got[f"{VISION}:visual_tokens"] = ref_visual, backend.encode_image(pixel_values)
        ref_embeds = reference.embed(input_ids)
        ref[f"{EMBED}:inputs_embeds"], got[f"{EMBED}:inputs_embeds"] = ref_embeds, backend.embed(input_ids)
        ref_logits, ref_past = reference.prefill(ref_embeds, ref_visual, image_offset)
        got_logits, got_past = backend.prefill(ref_embeds, ref_visual, image_offset)
        ref[f"{PREFILL}:logits"], got[f"{PREFILL}:logits"] = ref_logits, got_logits
        ref.update(_kv(PREFILL, ref_past))
        got.update(_kv(PREFILL, got_past))
        nxt = torch.argmax(ref_logits, dim=-1, keepdim=True)
        b = int(input_ids.shape[0])
        position = torch.full((b,), int(input_ids.shape[1]) + int(ref_visual.shape[1]), dtype=torch.long)
        tok = reference.embed(nxt)
        ref_step, ref_step_past = reference.step(tok, position, ref_past)
        got_step, got_step_past = backend.step(tok, position, ref_past)
        ref[f"{STEP}:logits"], got[f"{STEP}:logits"] = ref_step, got_step
        ref.update(_kv(STEP, ref_step_past))
        got.update(_kv(STEP, got_step_past))
    return StageCheck(compare_outputs(got, ref, thresholds, verbose=verbose), ref_visual, ref_logits.float(), ref_past)


# ---------------------------------------------------------------------------------------------------------
# levels 2 and 3: tokens and the reduction's cost
# ---------------------------------------------------------------------------------------------------------


class _Precomputed:
    """A StagedModel whose vision stage and prefill already ran on these inputs (in `check_stages`):
    `encode_image` and `prefill` return those results, `embed` and `step` run as usual."""

    def __init__(self, stages: Any, visual: Tensor, prefill: tuple[Tensor, list[Tensor]]) -> None:
        self.stages, self.visual, self._prefill = stages, visual, prefill

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        return self.visual

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.stages.embed(input_ids)

    def prefill(self, embeds: Tensor, visual: Tensor, image_offset: Tensor) -> tuple[Tensor, list[Tensor]]:
        return self._prefill

    def step(self, embeds: Tensor, position: Tensor, past: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        return self.stages.step(embeds, position, past)


@dataclass
class TokenAgreement:
    """Two greedy token sequences of one sample: exact-match rate over positions and the first divergence."""

    match_rate: float
    first_divergence: int | None  # index of the first differing token; None when identical
    tokens: list[int]  # the candidate's (backend / reduced)
    reference_tokens: list[int]  # the reference's (reduced PyTorch / unreduced transformers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def token_agreement(tokens: Sequence[int], reference: Sequence[int]) -> TokenAgreement:
    """Positions beyond the shorter sequence count as mismatches."""
    a, b = list(map(int, tokens)), list(map(int, reference))
    n = max(len(a), len(b))
    same = [i < len(a) and i < len(b) and a[i] == b[i] for i in range(n)]
    first = next((i for i, s in enumerate(same) if not s), None)
    return TokenAgreement(sum(same) / n if n else 1.0, first, a, b)


def first_token_kl(unreduced_logits: Tensor, reduced_logits: Tensor) -> float:
    """KL(p_unreduced || p_reduced) in nats of the next-token distributions (logits [V] or [1, V])."""
    lp = torch.log_softmax(unreduced_logits.double().reshape(-1), dim=-1)
    lq = torch.log_softmax(reduced_logits.double().reshape(-1), dim=-1)
    return max(0.0, float(torch.sum(lp.exp() * (lp - lq))))


@dataclass
class ReductionCost:
    """Level 3 of one sample: the reduced PyTorch model against the unreduced transformers model."""

    kl: float
    top1_agree: bool
    tokens: TokenAgreement

    def to_dict(self) -> dict[str, Any]:
        return {"kl": self.kl, "top1_agree": self.top1_agree, **{f"token_{k}": v for k, v in self.tokens.to_dict().items()}}


def reduction_cost(
    loaded: Any, pixel_values: Tensor, input_ids: Tensor, image_offset: int,
    reduced_logits: Tensor, reduced_tokens: Sequence[int], max_new_tokens: int,
) -> ReductionCost:
    """Run the unreduced transformers LLaVA on the same inputs (one sample, batch 1)."""
    from ficoco.inputs import PromptInputs, hf_input_ids

    prompt = PromptInputs(text_ids=input_ids, image_offset=int(image_offset))
    ids = hf_input_ids(prompt, loaded.image_token_id, loaded.geometry.visual_tokens)
    hf = loaded.model
    with torch.inference_mode():
        out = hf.generate(
            input_ids=ids, pixel_values=pixel_values, attention_mask=torch.ones_like(ids), do_sample=False,
            max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, eos_token_id=None,
            pad_token_id=0, num_beams=1, return_dict_in_generate=True, output_logits=True,
        )
    gen = out.sequences[0, ids.shape[1]:]
    logits = out.logits[0][0].float()  # the raw first-step logits (before any logits processor)
    return ReductionCost(
        kl=first_token_kl(logits, reduced_logits),
        top1_agree=bool(int(torch.argmax(logits)) == int(torch.argmax(reduced_logits))),
        tokens=token_agreement(reduced_tokens, gen.tolist()),
    )


# ---------------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------------


@dataclass
class SampleResult:
    image: str
    prompt: str
    stages: list[OutputComparison]
    greedy: TokenAgreement
    reduction: ReductionCost
    seconds: float
    selection: SelectionCheck | None = None  # kept-set flips per reduction step (None: not measured)

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "prompt": self.prompt,
            "stages_passed": all(c.passed for c in self.stages),
            "stages": {c.name: c.to_dict() for c in self.stages},
            "greedy": self.greedy.to_dict(),
            "reduction": self.reduction.to_dict(),
            "selection": None if self.selection is None else self.selection.to_dict(),
            "seconds": round(self.seconds, 3),
        }


def _stage_group(name: str) -> str:
    graph, _, out = name.partition(":")
    return f"{graph}:present" if out.startswith("present.") else name


def _nanmax(xs: Sequence[float]) -> float:
    vals = [x for x in xs if not math.isnan(x)]
    return max(vals) if len(vals) == len(xs) and vals else float("nan")


def _nanmin(xs: Sequence[float]) -> float:
    vals = [x for x in xs if not math.isnan(x)]
    return min(vals) if len(vals) == len(xs) and vals else float("nan")


@dataclass
class TaskResult:
    """Level 4 on one split: answer accuracy of the bundle and of the reduced PyTorch model, same questions."""

    split: str
    n: int
    bundle_accuracy: float
    reference_accuracy: float
    same_answers: int


#: Level 4's default: easy-vqa test images per split (each with its ~10 or 6 questions).
TASK_IMAGES = 4
#: Models trained on easy-vqa, for which level 4 is on by default.
TASK_MODELS = ("shapes",)


def check_task(pipe: Any, ref_stages: Any, loaded: Any, n_images: int) -> list[TaskResult]:
    """Answer the questions of the first `n_images` images of each easy-vqa test split with both models."""
    from ficoco import vqa
    from ficoco.answering import Prompting, answer_split

    out = []
    for name in vqa.SPLITS:
        split = vqa.test_split(name).limit(n_images)
        got = answer_split(pipe.stages, Prompting.of_frontend(pipe), split, max_batch=pipe.max_decoder_batch)
        ref = answer_split(ref_stages, Prompting.of_model(loaded), split)
        same = sum(vqa.normalize_answer(a) == vqa.normalize_answer(b) for a, b in zip(got, ref, strict=True))
        out.append(TaskResult(name, len(split.questions), vqa.score(split.questions, got).accuracy,
                              vqa.score(split.questions, ref).accuracy, same))
    return out


@dataclass
class CheckReport:
    """Everything `ficoco-check` found; `passed` is the verdict, `failures` says which gates failed."""

    bundle: str
    backend: str
    device: str
    bundle_kind: str
    thresholds: Thresholds
    max_new_tokens: int
    reference: dict[str, Any]
    samples: list[SampleResult]
    tool_versions: dict[str, str]
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    task: list[TaskResult] = field(default_factory=list)
    selection_note: str = ""  # why kept-set flips were not (fully) measured

    # -- aggregates --------------------------------------------------------------------------------------------
    def stage_summary(self) -> dict[str, dict[str, Any]]:
        """Per stage group (the K/V presents of a graph form one group): worst numbers over every sample."""
        groups: dict[str, list[OutputComparison]] = {}
        for s in self.samples:
            for c in s.stages:
                groups.setdefault(_stage_group(c.name), []).append(c)
        out: dict[str, dict[str, Any]] = {}
        for g, cs in groups.items():
            failed = sorted({c.name for c in cs if not c.passed})
            out[g] = {
                "outputs": len({c.name for c in cs}),
                "max_abs_err": _nanmax([c.max_abs_err for c in cs]),
                "mean_abs_err": float(np.mean([c.mean_abs_err for c in cs])),
                "max_rel_err": _nanmax([c.max_rel_err for c in cs]),
                "min_cosine": _nanmin([c.cosine for c in cs]),
                "within_tolerance": all(c.within_tolerance for c in cs),
                "passed": not failed,
                "failed_outputs": failed,
            }
        return out

    def greedy_summary(self) -> dict[str, Any]:
        rates = [s.greedy.match_rate for s in self.samples]
        lengths = [max(len(s.greedy.tokens), len(s.greedy.reference_tokens)) for s in self.samples]
        matched = sum(r * n for r, n in zip(rates, lengths, strict=True))
        divs = [s.greedy.first_divergence for s in self.samples if s.greedy.first_divergence is not None]
        rate = matched / sum(lengths) if sum(lengths) else 1.0
        return {
            "match_rate": rate,
            "min_sample_match_rate": min(rates) if rates else 1.0,
            "identical_samples": sum(1 for s in self.samples if s.greedy.first_divergence is None),
            "first_divergence": min(divs) if divs else None,
            "passed": rate >= self.thresholds.min_token_match,
        }

    def reduction_summary(self) -> dict[str, Any]:
        kls = [s.reduction.kl for s in self.samples]
        t = self.thresholds
        lengths = [max(len(s.reduction.tokens.tokens), len(s.reduction.tokens.reference_tokens)) for s in self.samples]
        matched = sum(s.reduction.tokens.match_rate * n for s, n in zip(self.samples, lengths, strict=True))
        agreement = matched / sum(lengths) if sum(lengths) else 1.0
        kl_mean = float(np.mean(kls)) if kls else 0.0
        passed = (t.max_kl is None or kl_mean <= t.max_kl) and (
            t.min_reduction_agreement is None or agreement >= t.min_reduction_agreement
        )
        divs = [s.reduction.tokens.first_divergence for s in self.samples if s.reduction.tokens.first_divergence is not None]
        return {
            "kl_mean": kl_mean,
            "kl_max": float(max(kls)) if kls else 0.0,
            "top1_agreement": float(np.mean([s.reduction.top1_agree for s in self.samples])) if self.samples else 1.0,
            "token_agreement": agreement,
            "first_divergence": min(divs) if divs else None,
            "gated": t.max_kl is not None or t.min_reduction_agreement is not None,
            "passed": passed,
        }

    def selection_summary(self) -> list[dict[str, Any]]:
        """Per reduction step (in order): kept tokens, flips summed and worst over samples, tie flips summed."""
        rows: dict[tuple[str, int], dict[str, Any]] = {}
        for s in self.samples:
            for st in (s.selection.steps if s.selection else []):
                r = rows.setdefault((st.stage, st.block), {"stage": st.stage, "block": st.block, "kept": st.kept,
                                                           "samples": 0, "flips": 0, "max_flips": 0, "tie_flips": 0})
                r["samples"] += 1
                r["flips"] += st.flips
                r["max_flips"] = max(r["max_flips"], st.flips)
                r["tie_flips"] += st.tie_flips
        return list(rows.values())

    def judge(self) -> None:
        """Fill `failures` (one line per failed gate, naming the stage / level and the numbers)."""
        t = self.thresholds
        fails: list[str] = []
        stat = {"mean": "mean_abs_err", "median": "median_abs_err"}.get(t.check_error_stat, "max_abs_err")
        for g, s in self.stage_summary().items():
            if s["passed"]:
                continue
            why = []
            if t.gate_tolerance and not s["within_tolerance"]:
                worst = _nanmax([getattr(c, stat) for smp in self.samples for c in smp.stages
                                 if _stage_group(c.name) == g and not c.within_tolerance])
                label = "max" if t.check_error_stat == "elemwise" else t.check_error_stat
                why.append(f"{label} |err| {worst:.3g} (atol {t.atol:g}, rtol {t.rtol:g}, check-error-stat {t.check_error_stat})")
            if t.min_cosine is not None and not s["min_cosine"] >= t.min_cosine:
                why.append(f"cosine {s['min_cosine']:.6f} < {t.min_cosine:g}")
            if not why:
                why.append("non-finite output or shape mismatch")
            outs = s["failed_outputs"]
            which = "" if outs == [g] else f" ({', '.join(outs[:4])}{', ...' if len(outs) > 4 else ''})"
            fails.append(f"stage {g} failed{which}: {'; '.join(why)}")
        gs = self.greedy_summary()
        if not gs["passed"]:
            fails.append(
                f"greedy tokens: match rate {gs['match_rate']:.3f} < {t.min_token_match:g} "
                f"(first divergence at step {gs['first_divergence']})"
            )
        rs = self.reduction_summary()
        if t.max_kl is not None and rs["kl_mean"] > t.max_kl:
            fails.append(f"reduction: mean first-token KL {rs['kl_mean']:.4g} > --max-kl {t.max_kl:g}")
        if t.min_reduction_agreement is not None and rs["token_agreement"] < t.min_reduction_agreement:
            fails.append(
                f"reduction: greedy agreement with the unreduced model {rs['token_agreement']:.3f} < "
                f"--min-reduction-agreement {t.min_reduction_agreement:g}"
            )
        for tr in self.task:
            if tr.bundle_accuracy < tr.reference_accuracy - t.max_accuracy_drop - 1e-12:
                fails.append(
                    f"answers ({tr.split}, {tr.n} questions): bundle accuracy {100 * tr.bundle_accuracy:.1f} % is more than "
                    f"{100 * t.max_accuracy_drop:g} points below PyTorch's {100 * tr.reference_accuracy:.1f} % (--max-accuracy-drop)"
                )
        self.failures = fails

    @property
    def passed(self) -> bool:
        return not self.failures

    # -- output ----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "tool": "ficoco-check",
            "passed": self.passed,
            "failures": list(self.failures),
            "bundle": self.bundle,
            "backend": self.backend,
            "device": self.device,
            "bundle_kind": self.bundle_kind,
            "thresholds": self.thresholds.to_dict(),
            "num_samples": len(self.samples),
            "max_new_tokens": self.max_new_tokens,
            "reference": dict(self.reference),
            "aggregate": {
                "stages": self.stage_summary(),
                "greedy": self.greedy_summary(),
                "reduction": self.reduction_summary(),
                "task": [asdict(tr) for tr in self.task],
                "selection": self.selection_summary(),
            },
            "selection_note": self.selection_note,
            "samples": [s.to_dict() for s in self.samples],
            "tool_versions": dict(self.tool_versions),
            "seconds": round(self.seconds, 2),
        }

    def to_markdown(self) -> str:
        t = self.thresholds
        gates = []
        if t.gate_tolerance:
            gates.append(f"atol {t.atol:g}, rtol {t.rtol:g}, {t.check_error_stat}")
        if t.min_cosine is not None:
            gates.append(f"cosine >= {t.min_cosine:g}")
        lines = [
            f"# ficoco-check: {'PASS' if self.passed else 'FAIL'}",
            "",
            f"{self.bundle} ({self.bundle_kind}) on {self.backend} ({self.device}), {len(self.samples)} samples, "
            f"{self.max_new_tokens} new tokens; stages: {'; '.join(gates)}; tokens: match >= {t.min_token_match:g}",
            "",
            "| stage | max abs err | mean abs err | min cosine | pass |",
            "|---|---:|---:|---:|:---:|",
        ]
        for g, s in self.stage_summary().items():
            name = f"{g} ({s['outputs']})" if g.endswith(":present") else g
            lines.append(
                f"| {name} | {s['max_abs_err']:.3g} | {s['mean_abs_err']:.3g} | {s['min_cosine']:.6f} | "
                f"{'yes' if s['passed'] else '**NO**'} |"
            )
        gs = self.greedy_summary()
        rs = self.reduction_summary()
        fd = "-" if gs["first_divergence"] is None else str(gs["first_divergence"])
        lines += [
            "",
            "| greedy tokens (backend vs reduced PyTorch) | match rate | identical samples | first divergence | pass |",
            "|---|---:|---:|---:|:---:|",
            f"| all samples | {gs['match_rate']:.3f} | {gs['identical_samples']}/{len(self.samples)} | {fd} | "
            f"{'yes' if gs['passed'] else '**NO**'} |",
            "",
            "| reduction (reduced vs unreduced PyTorch) | KL mean | KL max | top-1 agreement | token agreement | pass |",
            "|---|---:|---:|---:|---:|:---:|",
            f"| all samples | {rs['kl_mean']:.4g} | {rs['kl_max']:.4g} | {rs['top1_agreement']:.3f} | "
            f"{rs['token_agreement']:.3f} | {('yes' if rs['passed'] else '**NO**') if rs['gated'] else 'info'} |",
            "",
            "| sample | image | prompt | token match | first divergence | KL | top-1 | reduction agreement |",
            "|---:|---|---|---:|---:|---:|:---:|---:|",
        ]
        for i, s in enumerate(self.samples):
            prompt = s.prompt if len(s.prompt) <= 40 else s.prompt[:37] + "..."
            prompt = prompt.replace("|", "\\|")
            d = "-" if s.greedy.first_divergence is None else str(s.greedy.first_divergence)
            lines.append(
                f"| {i} | {s.image} | {prompt} | {s.greedy.match_rate:.3f} | {d} | {s.reduction.kl:.4g} | "
                f"{'yes' if s.reduction.top1_agree else 'no'} | {s.reduction.tokens.match_rate:.3f} |"
            )
        if self.task:
            lines += [
                "",
                f"| answers (easy-vqa test, exact match) | questions | bundle accuracy | PyTorch accuracy | same answers | pass (drop <= {100 * t.max_accuracy_drop:g} pt) |",
                "|---|---:|---:|---:|---:|:---:|",
            ]
            for tr in self.task:
                ok = tr.bundle_accuracy >= tr.reference_accuracy - t.max_accuracy_drop - 1e-12
                lines.append(f"| {tr.split} | {tr.n} | {100 * tr.bundle_accuracy:.1f} % | {100 * tr.reference_accuracy:.1f} % | "
                             f"{tr.same_answers}/{tr.n} | {'yes' if ok else '**NO**'} |")
        sel = self.selection_summary()
        if sel:
            lines += [
                "",
                "| selection (kept tokens vs fp32 PyTorch, info) | block | kept | flips (all samples) | worst sample | of them ties |",
                "|---|---:|---:|---:|---:|---:|",
                *[f"| {r['stage']} step {i} | {r['block']} | {r['kept']} | {r['flips']} | {r['max_flips']} | {r['tie_flips']} |"
                  for i, r in enumerate(sel)],
            ]
        if self.selection_note:
            lines += ["", f"Selection: {self.selection_note}"]
        if self.failures:
            lines += ["", "Failed:", *[f"- {f}" for f in self.failures]]
        return "\n".join(lines) + "\n"


def write_report(report: CheckReport, report_dir: Path) -> tuple[Path, Path]:
    """check.json and check.md in `report_dir`, each written to a temp file and renamed into place."""
    d = Path(report_dir)
    j, m = d / REPORT_JSON, d / REPORT_MD
    write_atomic(j, json.dumps(_json_safe(report.to_dict()), indent=2) + "\n", make_parents=True)
    write_atomic(m, report.to_markdown(), make_parents=True)
    return j, m


def _json_safe(x: Any) -> Any:
    """NaN/inf (a broken output) as strings, so check.json stays strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


#: The packages a check report records: the export stack and the backends.
CHECK_PACKAGES = ("ficoco-export", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "polygraphy", "tensorrt")


def tool_versions() -> dict[str, str]:
    """The versions of CHECK_PACKAGES that are installed (`exporter.pipeline.tool_versions`)."""
    from exporter.pipeline import tool_versions as versions

    return {k: v for k, v in versions(CHECK_PACKAGES).items() if v != "not installed"}


# ---------------------------------------------------------------------------------------------------------
# the check
# ---------------------------------------------------------------------------------------------------------


def run_check(bundle: str | os.PathLike[str], options: CheckOptions | None = None, progress: ProgressCallback | None = None) -> CheckReport:
    """Check a bundle's backend against PyTorch at the four levels; returns the judged report.

    Raises BundleError (missing / modified / graph-only bundle), CheckInputError / ImageError /
    InputError (bad images, prompts, options, reference model) before any sample runs.
    """
    from engines.runtime import Frontend, Pipeline
    from ficoco.generation import generate_tokens

    options = options or CheckOptions()
    options.validate()
    t_start = time.perf_counter()
    front = Frontend.from_bundle(bundle, verify=options.verify)  # BundleError: missing, modified, graph-only
    samples = make_samples(load_images(options.images), load_prompts(options.prompts), options.num_samples)
    n_new = min(DEFAULT_MAX_NEW_TOKENS, front.max_new_tokens_limit) if options.max_new_tokens is None else int(options.max_new_tokens)
    for s in samples:  # every prompt within the bundle's limits, before anything heavy is loaded
        ids, _ = front.tokenize([s.prompt])
        front.check_request(int(ids.shape[1]), n_new)
    thresholds = resolve_thresholds(front.manifest, options)
    loaded, reduced = reference_for_bundle(front.manifest, options.model)
    pipe = Pipeline.from_bundle(
        front, backend=options.backend, verify=options.verify, device=options.device,
        ort_provider=options.ort_provider, threads=options.threads,
    )
    source = front.manifest.get("source_model") or {}
    report = CheckReport(
        bundle=str(Path(bundle)),
        backend=pipe.backend,
        device=str(pipe.stages.device),
        bundle_kind=bundle_kind(front.manifest),
        thresholds=thresholds,
        max_new_tokens=n_new,
        reference={
            "model": loaded.name,
            "revision": loaded.revision,
            "bundle_source_model": source.get("name"),
            "bundle_revision": source.get("revision"),
            "revision_matches": source.get("revision") in (None, loaded.revision),
            "dtype": "float32",
        },
        samples=[],
        tool_versions=tool_versions(),
    )
    ref_stages = reduced.stages()
    selection, report.selection_note = _selection_checker(front.bundle, options.threads)
    for i, s in enumerate(samples):
        t0 = time.perf_counter()
        px = pipe.preprocess([s.image])
        ids, offsets = pipe.tokenize([s.prompt])
        sc = check_stages(pipe.stages, ref_stages, px, ids, offsets, thresholds, verbose=options.verbose)
        got_tokens = pipe.generate_ids(px, ids, offsets, n_new, stop_token_ids=[])[0].tolist()
        with torch.inference_mode():  # the reference's vision and prefill on these inputs already ran above
            known = _Precomputed(ref_stages, sc.ref_visual, (sc.ref_logits, sc.ref_past))
            ref_tokens = generate_tokens(known, px, ids, offsets, n_new)[0].tolist()
        cost = reduction_cost(loaded, px, ids, int(offsets[0]), sc.ref_logits[0], ref_tokens, n_new)
        flips = None
        if selection is not None:
            with torch.inference_mode():
                flips = selection.check(reduced, px, reduced.embed_text(ids), offsets)
            report.selection_note = report.selection_note or flips.note
        report.samples.append(
            SampleResult(s.image_name, s.prompt, sc.comparisons, token_agreement(got_tokens, ref_tokens), cost,
                         time.perf_counter() - t0, flips)
        )
        if progress is not None:
            progress(i + 1, len(samples), f"{s.image_name} / {s.prompt}")
    task_images = options.task_images
    if task_images is None:
        task_images = TASK_IMAGES if loaded.name in TASK_MODELS else 0
    if task_images:
        report.task = check_task(pipe, ref_stages, loaded, task_images)
    report.seconds = time.perf_counter() - t_start
    report.judge()
    return report


def _selection_checker(bundle: Path, threads: int | None) -> tuple[Any, str]:
    """The kept-set probes over the bundle's ONNX graphs, or (None, why not)."""
    from engines.selection import SelectionChecker
    from exporter.bundle import ONNX_DIR

    try:
        return SelectionChecker(Path(bundle) / ONNX_DIR, threads), ""
    except Exception as err:  # a graph ONNX Runtime cannot load on CPU (e.g. a TensorRT-only plugin): say so
        log.warning("selection flips not measured: %s", err)
        return None, f"not measured ({type(err).__name__}: {err})"


# ---------------------------------------------------------------------------------------------------------
# ficoco-check
# ---------------------------------------------------------------------------------------------------------


@click.command(context_settings=CONTEXT)
@click.version_option(package_name="ficoco-export")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True, help="Backend to check. auto: TensorRT when it, a GPU and engines built for them exist, else ONNX Runtime.")
@click.option("--ort-provider", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), default="auto", show_default=True, help="ONNX Runtime execution provider (auto: CUDA when onnxruntime-gpu has it, else CPU).")
@click.option("--model", help="Reference model (name, alias or llava-hf directory) [default: the manifest's source_model.name]. Use it when a bundle was exported from a local directory that has moved.")
@click.option("--images", type=click.Path(path_type=Path), help=f"Directory whose image files ({', '.join(IMAGE_SUFFIXES)}) are checked [default: the bundled photos {', '.join(DEFAULT_IMAGES)}].")
@click.option("--prompts", type=click.Path(path_type=Path), help="Text file, one prompt per line (blank lines skipped) [default: " + " / ".join(repr(p) for p in DEFAULT_PROMPTS) + "].")
@click.option("--num-samples", type=int, help="Most (image, prompt) pairs to check; every image is paired with every prompt, image-major [default: all pairs, 6 with the defaults].")
@click.option("--max-new-tokens", type=int, help=f"Greedy tokens generated per sample (levels 2 and 3) [default: {DEFAULT_MAX_NEW_TOKENS}, capped by the bundle's shape_ranges.max_new_tokens].")
@click.option("--atol", type=float, help="Absolute tolerance of the stage check (Polygraphy semantics) [default: 1e-4 fp32, 5e-2 fp16 and quantized].")
@click.option("--rtol", type=float, help="Relative tolerance of the stage check (Polygraphy semantics) [default: 1e-3 fp32, 5e-2 fp16 and quantized].")
@click.option("--check-error-stat", type=click.Choice(list(ERROR_STATS)), help="Error statistic the stage check compares with atol/rtol, as Polygraphy: elemwise (every element within atol OR rtol), or mean/median/max error within atol OR rtol [default: elemwise fp32, mean fp16 and quantized]. Given for a quantized bundle, it turns the tolerance gate on.")
@click.option("--min-cosine", type=float, help="Least cosine similarity of every stage output to PyTorch [default: off for fp32, 0.99 for fp16 and quantized bundles, which are judged by it].")
@click.option("--min-token-match", type=float, help="Least exact-match rate of the backend's greedy tokens vs the reduced PyTorch model, over all positions of all samples [default: 1.0 fp32, 0.5 fp16 and quantized].")
@click.option("--max-kl", type=float, help="Fail when the mean first-token KL(p_unreduced || p_reduced), in nats, exceeds this [default: informational, no gate].")
@click.option("--min-reduction-agreement", type=float, help="Fail when the greedy token agreement of the reduced vs the unreduced PyTorch model (rate in [0, 1]) is below this [default: informational, no gate].")
@click.option("--task-images", type=int, help=f"Level 4: answer the questions of this many easy-vqa test images per split (easy-vqa, mosaic) with the bundle and with PyTorch; 0 turns it off [default: {TASK_IMAGES} for a model trained on easy-vqa ({', '.join(TASK_MODELS)}), else 0].")
@click.option("--max-accuracy-drop", type=float, help="Level 4: fail when the bundle's answer accuracy is more than this fraction below PyTorch's (0.01 = one point) [default: 0 fp32, 0.01 fp16, 0.02 quantized].")
@click.option("--report-dir", type=click.Path(path_type=Path), help="Where check.json and check.md go [default: BUNDLE/reports].")
@click.option("--device", type=int, default=0, show_default=True, help="CUDA device index (TensorRT / ONNX Runtime CUDA).")
@click.option("--threads", type=click.IntRange(min=1), help="ONNX Runtime CPU threads [default: all cores].")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundle's files (large models).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging, Polygraphy's comparison log and full tracebacks.")
def main(bundle: Path, **kw: Any) -> None:
    """Check a BUNDLE's backend against the PyTorch reference: stage outputs, greedy tokens, and what the
    reduction costs against the unreduced model.

    Writes BUNDLE/reports/check.json and check.md and prints the table. Exit 0 when every gate passes,
    1 when a threshold fails (named on stderr), 2 for bad input.

    Example: ficoco-check out/llava7b-vl25 --num-samples 4 --max-new-tokens 32
    """
    verbose = bool(kw["verbose"])
    _setup_logging(verbose)
    _guarded(verbose, lambda: _check(bundle, kw))


def _check(bundle: Path, kw: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    options = CheckOptions(
        backend=kw["backend"], ort_provider=kw["ort_provider"], device=int(kw["device"]), threads=kw["threads"],
        model=kw["model"], images=kw["images"], prompts=kw["prompts"], num_samples=kw["num_samples"],
        max_new_tokens=kw["max_new_tokens"], atol=kw["atol"], rtol=kw["rtol"], check_error_stat=kw["check_error_stat"],
        min_cosine=kw["min_cosine"], min_token_match=kw["min_token_match"], max_kl=kw["max_kl"],
        min_reduction_agreement=kw["min_reduction_agreement"], task_images=kw["task_images"],
        max_accuracy_drop=kw["max_accuracy_drop"], verify=not kw["no_verify"], verbose=bool(kw["verbose"]),
    )
    console = Console(file=sys.stderr)
    with Progress(
        TextColumn("checking"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"),
        console=console, transient=True, disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task("", total=None)

        def progress(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, description=label[:60])

        report = run_check(bundle, options, progress)
    report_dir = kw["report_dir"] or Path(bundle) / "reports"
    json_path, _ = write_report(report, report_dir)
    click.echo(report.to_markdown(), nl=False)
    click.echo(f"report: {json_path}", err=True)
    if report.passed:
        click.secho(f"PASS ({len(report.samples)} samples, {report.seconds:.1f} s)", fg="green")
        return
    for line in report.failures:
        click.secho(f"error: {line}", fg="red", err=True)
    click.secho(f"FAIL: {len(report.failures)} gate(s) failed", fg="red")
    sys.exit(1)


if __name__ == "__main__":  # `python -m engines.check BUNDLE ...`
    main(prog_name="ficoco-check")
