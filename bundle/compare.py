"""The one checking core: a bundle's outputs against a reference, output by output and token by token.

The export validation (`exporter.validate`), `ficoco-check` (`engines.check`) and the quantizer's report
(`calibration.evaluate`) all judge with these functions.

Error statistics (`error_stats`), in float64 over the flattened outputs: the max / mean / median
absolute error |got - ref|, the largest relative error |got - ref| / |ref| (a zero in `ref` counts as
float64's eps there), the cosine similarity (1 when both outputs are zero, 0 when one is, NaN for
non-finite values; clamped to [-1, 1]) and the norm ratio ||got|| / ||ref|| (1 when both are zero, inf
when only the reference is).

Tolerance rules (`OutputGates.check_error_stat`; NaN never passes):

- "elemwise": every element within atol OR within rtol (|d| <= atol or |d| / |ref| <= rtol);
- "mean" / "median" / "max": that statistic of |d| within atol, or the same statistic of |d| / |ref|
  within rtol (with "elemwise", these are Polygraphy's `--check-error-stat` semantics, `ERROR_STATS`);
- "allclose": every element |d| <= atol + rtol * |ref| (numpy.allclose's rule; the export validation's).

An output passes (`compare_output`) when it is finite, within tolerance (unless the gates judge by cosine
only), when `min_cosine` is set at least that similar, and when `max_norm_deviation` is set with
|norm ratio - 1| at most that (TensorRT Edge-LLM's two gates for reduced precision: cosine >= 0.99 and
|ratio - 1| <= 0.25; cosine alone misses an output that is right in direction and wrong in scale). `compare_stages` runs a backend's four
stages on the reference's own inputs of each stage, so every stage's error is its own.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bundle.names import EMBED, PREFILL, STEP, VISION
from ficoco.generation import host_ids, host_logits

log = logging.getLogger(__name__)

#: The error statistics of Polygraphy's `--check-error-stat` (ficoco-check's option).
ERROR_STATS = ("elemwise", "mean", "median", "max")
#: numpy.allclose's rule, |d| <= atol + rtol * |ref| elementwise: the export validation's.
ALLCLOSE = "allclose"
TOLERANCE_RULES = (*ERROR_STATS, ALLCLOSE)

#: The near-tie margin of reduced-precision gates, in logit standard deviations (`forced_agreement`).
TIE_MARGIN = 0.05

_EPS = float(np.finfo(np.float64).eps)  # stands in for |ref| where ref is 0 in the relative error

ArrayLike = Any  # a numpy array or a torch tensor (on any device): the core itself imports no torch


def _f64(x: ArrayLike) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _diffs(g: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(|g - r|, |g - r| / |r|) elementwise, a zero in r counting as eps."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        absdiff = np.abs(g - r)
        ref_abs = np.abs(r)
        return absdiff, absdiff / np.where(ref_abs == 0, _EPS, ref_abs)


def _cosine(g: np.ndarray, r: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(g)), float(np.linalg.norm(r))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    cos = float(np.dot(g, r) / (na * nb))
    return cos if math.isnan(cos) else max(-1.0, min(1.0, cos))


def _norm_ratio(g: np.ndarray, r: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(g)), float(np.linalg.norm(r))
    if nb == 0.0:
        return 1.0 if na == 0.0 else math.inf
    return na / nb


@dataclass(frozen=True)
class ErrorStats:
    """How far one output is from its reference (see the module docstring)."""

    max_abs_err: float
    mean_abs_err: float
    median_abs_err: float
    max_rel_err: float
    cosine: float
    norm_ratio: float = 1.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _stats(g: np.ndarray, r: np.ndarray, absdiff: np.ndarray, reldiff: np.ndarray) -> ErrorStats:
    if not g.size:
        return ErrorStats(0.0, 0.0, 0.0, 0.0, 1.0, 1.0)
    return ErrorStats(
        max_abs_err=float(np.max(absdiff)),
        mean_abs_err=float(np.mean(absdiff)),
        median_abs_err=float(np.median(absdiff)),
        max_rel_err=float(np.max(reldiff)),
        cosine=_cosine(g, r),
        norm_ratio=_norm_ratio(g, r),
    )


def _flat_pair(got: ArrayLike, ref: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    g, r = _f64(got), _f64(ref)
    if g.shape != r.shape:
        raise ValueError(f"cannot compare an output of shape {list(g.shape)} with a reference of shape {list(r.shape)}")
    return g.ravel(), r.ravel()


def error_stats(got: ArrayLike, ref: ArrayLike) -> ErrorStats:
    """The error statistics of `got` against `ref` (same shape; torch tensors or numpy arrays)."""
    g, r = _flat_pair(got, ref)
    return _stats(g, r, *_diffs(g, r))


@dataclass(frozen=True)
class OutputGates:
    """When one output passes: within `atol` / `rtol` by the rule `check_error_stat` (one of
    TOLERANCE_RULES; checked when `gate_tolerance`), finite, cosine >= `min_cosine` (when set) and
    |norm ratio - 1| <= `max_norm_deviation` (when set)."""

    atol: float
    rtol: float
    check_error_stat: str = "elemwise"
    gate_tolerance: bool = True
    min_cosine: float | None = None
    max_norm_deviation: float | None = None

    def __post_init__(self) -> None:
        if self.check_error_stat not in TOLERANCE_RULES:
            raise ValueError(f"unknown tolerance rule {self.check_error_stat!r}; choose one of {', '.join(TOLERANCE_RULES)}")


def _stat_fails(value: float, tol: float) -> bool:
    return math.isnan(value) or value > tol


def _within(absdiff: np.ndarray, reldiff: np.ndarray, r: np.ndarray, gates: OutputGates) -> bool:
    rule, atol, rtol = gates.check_error_stat, gates.atol, gates.rtol
    if not absdiff.size:
        return True
    with np.errstate(invalid="ignore"):
        if rule == ALLCLOSE:
            return bool(np.all(absdiff <= atol + rtol * np.abs(r)))
        if rule == "elemwise":
            mismatch = ((absdiff > atol) | np.isnan(absdiff)) & ((reldiff > rtol) | np.isnan(reldiff))
            return not bool(np.any(mismatch))
    stat = {"mean": np.mean, "median": np.median, "max": np.max}[rule]
    return not (_stat_fails(float(stat(absdiff)), atol) and _stat_fails(float(stat(reldiff)), rtol))


@dataclass
class OutputComparison:
    """One output against its reference: the error statistics and the verdict of the gates."""

    name: str  # "<graph>:<output>"
    shape: list[int]
    max_abs_err: float
    mean_abs_err: float
    median_abs_err: float
    max_rel_err: float
    cosine: float  # NaN when the output is not finite
    norm_ratio: float  # ||got|| / ||ref||; NaN when the output is not finite
    within_tolerance: bool  # finite and within atol / rtol by the gates' rule
    passed: bool  # every gate

    @property
    def graph(self) -> str:
        return self.name.split(":")[0]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_output(name: str, got: ArrayLike, ref: ArrayLike, gates: OutputGates) -> OutputComparison:
    """Judge one output; a shape mismatch fails with NaN statistics."""
    g, r = _f64(got), _f64(ref)
    if g.shape != r.shape:
        nan = float("nan")
        log.debug("%s: shape %s, the reference's is %s", name, list(g.shape), list(r.shape))
        return OutputComparison(name, list(g.shape), nan, nan, nan, nan, nan, nan, False, False)
    shape = list(g.shape)
    g, r = g.ravel(), r.ravel()
    absdiff, reldiff = _diffs(g, r)
    s = _stats(g, r, absdiff, reldiff)
    finite = bool(np.isfinite(g).all())
    within = finite and _within(absdiff, reldiff, r, gates)
    cosine = s.cosine if finite else float("nan")
    ratio = s.norm_ratio if finite else float("nan")
    passed = (within or not gates.gate_tolerance) and finite
    if gates.min_cosine is not None:
        passed = passed and cosine >= gates.min_cosine  # NaN fails
    if gates.max_norm_deviation is not None:
        passed = passed and abs(ratio - 1.0) <= gates.max_norm_deviation  # NaN fails
    log.debug("%s: max |err| %.4g, mean %.4g, median %.4g, max rel %.4g, cosine %.8f, norm ratio %.6f, within %s, passed %s",
              name, s.max_abs_err, s.mean_abs_err, s.median_abs_err, s.max_rel_err, cosine, ratio, within, passed)
    return OutputComparison(name, shape, s.max_abs_err, s.mean_abs_err, s.median_abs_err, s.max_rel_err, cosine,
                            ratio, within, passed)


def compare_outputs(got: Mapping[str, ArrayLike], ref: Mapping[str, ArrayLike], gates: OutputGates) -> list[OutputComparison]:
    """`compare_output` for every output of `got` against the `ref` output of the same name."""
    return [compare_output(name, g, ref[name], gates) for name, g in got.items()]


# ---------------------------------------------------------------------------------------------------------
# stage by stage
# ---------------------------------------------------------------------------------------------------------


def _kv(prefix: str, flat: Sequence[ArrayLike]) -> dict[str, ArrayLike]:
    return {f"{prefix}:present.{i // 2}.{'key' if i % 2 == 0 else 'value'}": t for i, t in enumerate(flat)}


@dataclass
class StageComparison:
    """Every stage output judged, and the reference's intermediate results (for callers that go on decoding)."""

    comparisons: list[OutputComparison]
    ref_visual: ArrayLike
    ref_logits: ArrayLike  # [B, V] prefill logits, float32
    ref_past: list[ArrayLike]


def _no_grad() -> Any:
    """torch's inference mode where torch is installed (the reference is a PyTorch model), else nothing."""
    try:
        import torch
    except ImportError:
        return contextlib.nullcontext()
    return torch.inference_mode()


@dataclass
class StageRun:
    """The reference's side of a stage comparison: every stage output by "<stage>:<output>", and the
    inputs each stage of a backend is fed (the reference's own intermediate results), so a backend can be
    judged against a run that was saved (`engines.check.saved`) as well as against a live model."""

    outputs: dict[str, ArrayLike]
    pixel_values: ArrayLike
    input_ids: np.ndarray
    image_offset: np.ndarray
    visual: ArrayLike  # vision_encoder's visual tokens: decoder_prefill's input
    embeds: ArrayLike  # embed_tokens' output: decoder_prefill's input
    logits: np.ndarray  # [B, V] prefill logits, float32
    past: list[ArrayLike]  # the prefill's K/V: decoder_step's input
    step_embeds: ArrayLike  # the embedding of the reference's greedy token: decoder_step's input
    step_position: np.ndarray  # [B] that token's position


def reference_stages(reference: Any, pixel_values: ArrayLike, input_ids: ArrayLike, image_offset: ArrayLike) -> StageRun:
    """Run every stage of `reference` (a `ficoco.generation.StagedModel`, e.g. `ReducedLlava.stages()`).

    vision_encoder on the pixels; embed_tokens on the ids; decoder_prefill (the splice, every decoder
    segment and reduction) on those embeddings and visual tokens (logits and every present K/V); one
    decoder_step (every segment on one token) on the embedding of the greedy token and the prefill's K/V.
    """
    ids, offset = host_ids(input_ids), host_ids(image_offset)
    out: dict[str, ArrayLike] = {}
    with _no_grad():
        visual = reference.encode_image(pixel_values)
        embeds = reference.embed(ids)
        logits, past = reference.prefill(embeds, visual, offset)
        out[f"{VISION}:visual_tokens"], out[f"{EMBED}:inputs_embeds"], out[f"{PREFILL}:logits"] = visual, embeds, logits
        out.update(_kv(PREFILL, past))
        nxt = np.argmax(host_logits(logits), axis=-1)[:, None].astype(np.int64)
        b = int(ids.shape[0])
        position = np.full((b,), int(ids.shape[1]) + int(visual.shape[1]), dtype=np.int64)
        tok = reference.embed(nxt)
        step_logits, step_past = reference.step(tok, position, past)
        out[f"{STEP}:logits"] = step_logits
        out.update(_kv(STEP, step_past))
    return StageRun(out, pixel_values, ids, offset, visual, embeds, host_logits(logits), list(past), tok, position)


def backend_stages(backend: Any, run: StageRun) -> dict[str, ArrayLike]:
    """Every stage of `backend` on the reference's inputs of that stage (`run`), so each stage's error is
    its own: outputs named as `run.outputs`."""
    got: dict[str, ArrayLike] = {}
    with _no_grad():
        got[f"{VISION}:visual_tokens"] = backend.encode_image(run.pixel_values)
        got[f"{EMBED}:inputs_embeds"] = backend.embed(run.input_ids)
        logits, past = backend.prefill(run.embeds, run.visual, run.image_offset)
        got[f"{PREFILL}:logits"] = logits
        got.update(_kv(PREFILL, past))
        step_logits, step_past = backend.step(run.step_embeds, run.step_position, run.past)
        got[f"{STEP}:logits"] = step_logits
        got.update(_kv(STEP, step_past))
    return got


def compare_stages(
    backend: Any, reference: Any, pixel_values: ArrayLike, input_ids: ArrayLike, image_offset: ArrayLike, gates: OutputGates,
) -> StageComparison:
    """Every stage of `backend` on the reference's inputs of that stage, against `reference` (both
    `ficoco.generation.StagedModel`s, e.g. `bundle.ort.ort_stages(...)` and `ReducedLlava.stages()`):
    `reference_stages`, then `backend_stages`, judged output by output."""
    run = reference_stages(reference, pixel_values, input_ids, image_offset)
    got = backend_stages(backend, run)
    return StageComparison(compare_outputs(got, run.outputs, gates), run.visual, run.logits, run.past)


# ---------------------------------------------------------------------------------------------------------
# tokens
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TokenAgreement:
    """Two greedy token sequences of one sample: exact-match rate over positions and the first divergence."""

    match_rate: float
    first_divergence: int | None  # index of the first differing token; None when identical
    tokens: list[int]  # the candidate's (backend / reduced / quantized)
    reference_tokens: list[int]  # the reference's (reduced PyTorch / unreduced transformers / fp32 bundle)

    @property
    def identical(self) -> bool:
        return self.first_divergence is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def token_agreement(tokens: Sequence[int], reference: Sequence[int]) -> TokenAgreement:
    """The share of positions where both sequences hold the same token, over the longer sequence.

    A position beyond the shorter sequence counts as a mismatch (and a first divergence), so a candidate
    that stops early or runs on never agrees fully. This is the one definition: the quantizer's report
    used to divide by the shorter length instead, which gave the same numbers only because its
    sequences (like every caller's: fixed length, no stop token) are always equally long.
    """
    a, b = list(map(int, tokens)), list(map(int, reference))
    n = max(len(a), len(b))
    same = [i < len(a) and i < len(b) and a[i] == b[i] for i in range(n)]
    first = next((i for i, s in enumerate(same) if not s), None)
    return TokenAgreement(sum(same) / n if n else 1.0, first, a, b)


@dataclass
class ForcedAgreement:
    """A candidate's next-token choices against a reference's greedy path, on equal prefixes (one sample).

    Both backends are driven along the reference's own greedy tokens (`ficoco.generation.forced_logits`),
    so position t compares two argmaxes over the same prefix, however the free-running paths would have
    drifted apart after a first flip. A mismatch is a *near-tie* when the reference itself barely preferred
    its token over the candidate's: its margin z_ref[t, y_t] - z_ref[t, c_t], in units of the standard
    deviation of z_ref[t] over the vocabulary (scale-free, as half precision's rounding is), is at most
    `tie_margin`. `rate` counts matches and near-ties; every other mismatch (and every row of the candidate
    that is not finite) is a real disagreement.
    """

    positions: int
    matches: int
    near_ties: int
    tie_margin: float
    first_disagreement: int | None  # first position that is neither a match nor a near-tie
    worst_margin: float | None  # the largest relative reference margin among the mismatches
    candidate: list[int]  # the candidate's argmax at each position
    reference_tokens: list[int]

    @property
    def rate(self) -> float:
        return (self.matches + self.near_ties) / self.positions if self.positions else 1.0

    @property
    def exact_rate(self) -> float:
        return self.matches / self.positions if self.positions else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rate": self.rate, "exact_rate": self.exact_rate}


def forced_agreement(got_logits: ArrayLike, ref_logits: ArrayLike, reference_tokens: Sequence[int], tie_margin: float) -> ForcedAgreement:
    """Judge `got_logits` [n, V] against `ref_logits` [n, V], the reference's logits along its greedy tokens
    `reference_tokens` (y_t = argmax ref_logits[t]); see `ForcedAgreement`. Float64 throughout."""
    g, r = _f64(got_logits), _f64(ref_logits)
    if g.ndim != 2 or g.shape != r.shape:
        raise ValueError(f"forced agreement needs two [n, vocab] logit arrays of one shape (got {g.shape} and {r.shape})")
    y = np.asarray(list(map(int, reference_tokens)), dtype=np.int64)
    if y.shape != (g.shape[0],):
        raise ValueError(f"{len(y)} reference tokens for {g.shape[0]} logit rows")
    if not (math.isfinite(tie_margin) and tie_margin >= 0):
        raise ValueError(f"the tie margin is a finite number >= 0 of logit standard deviations (got {tie_margin})")
    c = g.argmax(axis=-1) if g.size else np.zeros(0, dtype=np.int64)
    rows = np.arange(len(y))
    margin = (r[rows, y] - r[rows, c]) / np.maximum(r.std(axis=-1), _EPS) if len(y) else np.zeros(0)
    finite = np.isfinite(g).all(axis=-1)  # a row with a NaN / inf is a disagreement, never a match or a tie
    miss = (c != y) | ~finite
    tie = miss & finite & (margin <= tie_margin)
    real = np.flatnonzero(miss & ~tie)
    return ForcedAgreement(
        positions=len(y), matches=int((~miss).sum()), near_ties=int(tie.sum()), tie_margin=float(tie_margin),
        first_disagreement=int(real[0]) if real.size else None,
        worst_margin=float(margin[miss].max()) if miss.any() else None,
        candidate=c.tolist(), reference_tokens=y.tolist(),
    )


def pool_forced(results: Sequence[ForcedAgreement]) -> dict[str, Any]:
    """Teacher-forced agreement over every position of several samples: counts, rates (matches and
    near-ties over positions; matches alone), the earliest real disagreement and the largest margin."""
    n = sum(f.positions for f in results)
    matches, ties = sum(f.matches for f in results), sum(f.near_ties for f in results)
    firsts = [f.first_disagreement for f in results if f.first_disagreement is not None]
    margins = [f.worst_margin for f in results if f.worst_margin is not None]
    return {
        "positions": n, "matches": matches, "near_ties": ties, "rate": (matches + ties) / n if n else 1.0,
        "exact_rate": matches / n if n else 1.0, "first_disagreement": min(firsts) if firsts else None,
        "worst_margin": max(margins) if margins else None,
    }
