"""Validation as part of export: every graph in ONNX Runtime (CPU) against the reduced PyTorch model.

fp32 bundles: stage by stage on the same inputs (`bundle.compare.compare_stages`: every element within
|err| <= atol + rtol * |ref|, numpy.allclose's rule, and finite), then a prefill plus several decode steps
driven by the shared generation loop, whose greedy tokens must be identical.

fp16 (reduced-precision) bundles, against the fp32 computation of the exported weights
(`ficoco.upcast.fp32_compute`, one layer upcast at a time, so a 7B model needs no fp32 copy):

1. the kept sets of every reduction step, read from the bundle's graphs (`exporter.selection`), against the
   reference's: the flips per step, and how many of them are ties between identical patches;
2. every stage against the reference *making the bundle's kept-token choices*
   (`ficoco.reduced_llava.FollowedSelection`), so the error is the arithmetic's: cosine >= `min_cosine` and
   |norm ratio - 1| <= `max_norm_deviation` (TensorRT Edge-LLM's gates), finite; the errors are reported;
3. tokens of the bundle vs the reference making its own choices, teacher-forced: at every position of the
   reference's greedy path, the bundle's argmax on the same prefix is the reference's token or a near-tie
   (`bundle.compare.forced_agreement`), at a rate >= `min_forced_match`; the free-running greedy match
   rate is reported, and gated only when `min_token_match` is set (after a first near-tie flip the two
   paths no longer share a prefix, so on a random model what follows measures its chaos, not the bundle).

A mismatch fails the export loudly. `keep_loaded=False` opens each graph only while it runs (ONNX Runtime's
CPU provider upcasts fp16 weights at load, so a 7B fp16 bundle open at once would need ~27 GB), and before
each opening hands the reference's memory-mapped weight pages back to the kernel (`exporter.pages`), so the
PyTorch model and the graph being opened are not resident together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bundle.compare import (
    ALLCLOSE,
    TIE_MARGIN,
    OutputComparison,
    OutputGates,
    compare_stages,
    forced_agreement,
    pool_forced,
    token_agreement,
)
from bundle.ort import ort_stages
from ficoco.generation import decode_tokens, forced_logits, generate_tokens
from ficoco.reduced_llava import ReducedLlava
from ficoco.upcast import fp32_compute

log = logging.getLogger(__name__)


class ValidationError(RuntimeError):
    """ONNX Runtime and PyTorch disagree beyond the tolerances (the message says where and by how much)."""


@dataclass(frozen=True)
class ReducedPrecisionGates:
    """The gates of an fp16 / bf16 export's validation (see the module docstring)."""

    min_cosine: float = 0.99
    max_norm_deviation: float = 0.25
    min_forced_match: float = 1.0
    tie_margin: float = TIE_MARGIN
    min_token_match: float | None = None  # free-running greedy match; None: reported, not gated

    def __post_init__(self) -> None:
        import math

        if not -1.0 <= self.min_cosine <= 1.0:
            raise ValueError(f"--min-cosine is a cosine similarity in [-1, 1] (got {self.min_cosine})")
        if not (math.isfinite(self.max_norm_deviation) and self.max_norm_deviation >= 0):
            raise ValueError(f"--max-norm-deviation must be a finite number >= 0, e.g. 0.25 (got {self.max_norm_deviation})")
        if not (math.isfinite(self.tie_margin) and self.tie_margin >= 0):
            raise ValueError(f"--tie-margin must be a finite number >= 0 of logit standard deviations (got {self.tie_margin})")
        for name, v in (("--min-forced-match", self.min_forced_match), ("--min-token-match", self.min_token_match)):
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} is a rate in [0, 1] (got {v})")


class _PageRelease:
    """`before_open` for the low-memory sessions: release `model`'s mapped pages, log the first release.

    `module(leaf)` (fp32_compute's `after_module`) releases one reference module's pages once it has run,
    so a reference pass never has the whole checkpoint resident (it faults each layer back in from the page
    cache when it next runs). It uses the clean mappings read at the last session open: the reference
    writes to no weight, and every open reads them again."""

    def __init__(self, model: ReducedLlava) -> None:
        self.model = model
        self.calls = 0
        self.bytes = 0
        self.module_bytes = 0
        self._maps: list[Any] | None = None

    def module(self, leaf: torch.nn.Module) -> None:
        from exporter.pages import clean_mappings, release_mapped_pages

        if self._maps is None:
            self._maps = clean_mappings()
        if self._maps:
            self.module_bytes += release_mapped_pages(leaf, self._maps)

    def __call__(self) -> None:
        from exporter.pages import clean_mappings, release_mapped_pages

        self._maps = clean_mappings()
        n = release_mapped_pages(self.model, self._maps) if self._maps is not None else 0
        if self.calls == 0:
            log.info("validation: the reference's mapped weights (%.2f GiB of address range) are released before "
                     "each graph opens", n / 2**30)
        self.calls += 1
        self.bytes += n


def _worst_per_graph(results: list[OutputComparison]) -> dict[str, dict[str, Any]]:
    worst: dict[str, dict[str, Any]] = {}
    for c in results:
        w = worst.setdefault(c.graph, {"max_abs_err": c.max_abs_err, "min_cosine": c.cosine,
                                       "worst_norm_ratio": c.norm_ratio, "passed": True})
        w["max_abs_err"] = max(w["max_abs_err"], c.max_abs_err)
        w["min_cosine"] = min(w["min_cosine"], c.cosine)
        if abs(c.norm_ratio - 1.0) > abs(w["worst_norm_ratio"] - 1.0):
            w["worst_norm_ratio"] = c.norm_ratio
        w["passed"] = w["passed"] and c.passed
    return worst


def validate_bundle_graphs(
    model: ReducedLlava,
    onnx_dir: Path,
    pixel_values: Tensor,
    input_ids: Tensor,
    image_offset: int,
    *,
    atol: float,
    rtol: float,
    decode_steps: int = 16,
    threads: int | None = None,
    reduced_precision: ReducedPrecisionGates | None = None,
    keep_loaded: bool = True,
) -> dict[str, Any]:
    """Compare each ORT graph with the PyTorch stage, then greedy decoding; raise ValidationError on mismatch.

    `reduced_precision`: judge as an fp16 / bf16 bundle (`model` holds the exported half-precision weights
    and is computed in fp32 as the reference); None: as an fp32 bundle (exact tokens, allclose).
    """
    if reduced_precision is None:
        return _validate_fp32(model, onnx_dir, pixel_values, input_ids, image_offset, atol=atol, rtol=rtol,
                              decode_steps=decode_steps, threads=threads, keep_loaded=keep_loaded)
    from exporter.selection import SelectionChecker

    gates = reduced_precision
    release = None if keep_loaded else _PageRelease(model)
    ort_model = ort_stages(onnx_dir, provider="cpu", threads=threads, segments=model.segments, keep_loaded=keep_loaded,
                           before_open=release)
    b = pixel_values.shape[0]
    offset = torch.full((b,), image_offset, dtype=torch.long)
    with fp32_compute(model, after_module=None if release is None else release.module), torch.inference_mode():
        checker = SelectionChecker(onnx_dir, threads, segments=model.segments, keep_loaded=keep_loaded,
                                   before_open=release)
        selection = checker.check(model, pixel_values, model.embed_text(input_ids), offset)
        del checker
        log.info("validation: %d kept-token flips over %d steps (%d of them ties)", selection.total,
                 len(selection.steps), selection.total - selection.non_tie)
        out_gates = OutputGates(atol, rtol, "mean", gate_tolerance=False, min_cosine=gates.min_cosine,
                                max_norm_deviation=gates.max_norm_deviation)
        results = compare_stages(ort_model, model.stages(selection.follow), pixel_values, input_ids, offset,
                                 out_gates).comparisons
        ref_tokens, ref_rows = _greedy_and_forced(model.stages(), pixel_values, input_ids, offset, decode_steps)
    got_tokens, got_rows = _greedy_and_forced(ort_model, pixel_values, input_ids, offset, decode_steps, ref_tokens)
    rows = [token_agreement(g, r) for g, r in zip(got_tokens.tolist(), ref_tokens.tolist(), strict=True)]
    rate = sum(a.match_rate for a in rows) / len(rows)
    forced = [forced_agreement(got_rows[i], ref_rows[i], ref_tokens[i].tolist(), gates.tie_margin) for i in range(b)]
    pooled = pool_forced(forced)
    forced_rate = pooled["rate"]
    token_fail = gates.min_token_match is not None and rate < gates.min_token_match
    forced_fail = forced_rate < gates.min_forced_match - 1e-12
    report = {
        "kind": "reduced_precision",
        "reference": "fp32 computation of the exported weights, making the bundle's kept-token choices for the stages",
        "gates": {"min_cosine": gates.min_cosine, "max_norm_deviation": gates.max_norm_deviation,
                  "min_forced_match": gates.min_forced_match, "tie_margin": gates.tie_margin,
                  "min_token_match": gates.min_token_match},
        "batch": b,
        "released_pages": None if release is None else {"opens": release.calls, "bytes": release.bytes,
                                                        "after_modules_bytes": release.module_bytes},
        "followed": selection.follow is not None,
        "stages": _worst_per_graph(results),
        "details": {c.name: c.to_dict() for c in results},
        "selection": selection.to_dict(),
        "greedy": {"steps": decode_steps, "match_rate": rate, "identical": all(a.identical for a in rows),
                   "first_divergence": min((a.first_divergence for a in rows if a.first_divergence is not None), default=None),
                   "tokens": ref_tokens.tolist(), "bundle_tokens": got_tokens.tolist()},
        "forced": {**pooled, "samples": [f.to_dict() for f in forced]},
    }
    failed = [c for c in results if not c.passed]
    if failed or token_fail or forced_fail:
        lines = [f"{c.name}: cosine {c.cosine:.6f} (>= {gates.min_cosine}), norm ratio {c.norm_ratio:.4f} "
                 f"(|ratio - 1| <= {gates.max_norm_deviation})" for c in failed[:8]]
        if forced_fail:
            lines.append(f"teacher-forced tokens match the fp32 reference (or are near-ties within {gates.tie_margin:g} "
                         f"logit std) at {forced_rate:.3f} < {gates.min_forced_match}")
        if token_fail:
            lines.append(f"greedy tokens match the fp32 reference at {rate:.3f} < {gates.min_token_match}")
        if selection.follow is None:
            lines.append(f"(the kept sets could not be read from the graphs: {selection.note}; stage errors include flips)")
        raise ValidationError("ONNX Runtime (fp16) does not match the fp32 PyTorch reference:\n  " + "\n  ".join(lines))
    return report


def _greedy_and_forced(
    model: Any, pixel_values: Tensor, input_ids: Tensor, offset: Tensor, steps: int, path: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`model`'s own greedy tokens [B, steps] and its logits [B, steps, V] along `path` (default: those
    tokens, i.e. the logits it chose them from), from one vision and prefill call."""
    visual = model.encode_image(pixel_values)
    prefilled = model.prefill(model.embed(input_ids), visual, offset)
    own: list[np.ndarray] = []
    tokens = decode_tokens(model, visual, input_ids, offset, steps, prefilled=prefilled, on_logits=own.append)
    if path is None:
        return tokens, np.stack(own, axis=1)
    return tokens, forced_logits(model, visual, input_ids, offset, path, prefilled=prefilled)


def _validate_fp32(
    model: ReducedLlava, onnx_dir: Path, pixel_values: Tensor, input_ids: Tensor, image_offset: int, *,
    atol: float, rtol: float, decode_steps: int, threads: int | None, keep_loaded: bool,
) -> dict[str, Any]:
    release = None if keep_loaded else _PageRelease(model)
    ort_model = ort_stages(onnx_dir, provider="cpu", threads=threads, segments=model.segments, keep_loaded=keep_loaded,
                           before_open=release)
    torch_model = model.stages()
    b = pixel_values.shape[0]
    offset = torch.full((b,), image_offset, dtype=torch.long)
    # each graph gets the PyTorch inputs of that graph, so each stage's error is its own
    results = compare_stages(ort_model, torch_model, pixel_values, input_ids, offset, OutputGates(atol, rtol, ALLCLOSE)).comparisons
    with torch.no_grad():
        ref_tokens = generate_tokens(torch_model, pixel_values, input_ids, image_offset, decode_steps)
        got_tokens = generate_tokens(ort_model, pixel_values, input_ids, image_offset, decode_steps)
    rows = [token_agreement(g, r) for g, r in zip(got_tokens.tolist(), ref_tokens.tolist(), strict=True)]
    same = all(a.identical for a in rows)
    diverge = min((a.first_divergence for a in rows if a.first_divergence is not None), default=None)
    report = {
        "kind": "fp32",
        "atol": atol,
        "rtol": rtol,
        "batch": b,
        "released_pages": None if release is None else {"opens": release.calls, "bytes": release.bytes},
        "stages": _worst_per_graph(results),
        "details": {c.name: c.to_dict() for c in results},
        "greedy": {"steps": decode_steps, "identical": same, "first_divergence": diverge, "tokens": ref_tokens.tolist()},
    }
    failed = [c for c in results if not c.passed]
    if failed or not same:
        lines = [f"{c.name}: max |err| {c.max_abs_err:.3g} (atol {atol}, rtol {rtol})" for c in failed[:8]]
        if not same:
            lines.append(f"greedy tokens differ from PyTorch from decode step {diverge}")
        raise ValidationError("ONNX Runtime does not match PyTorch:\n  " + "\n  ".join(lines))
    return report
