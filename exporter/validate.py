"""Validation as part of export: every graph in ONNX Runtime (CPU) against the reduced PyTorch model.

Stage by stage on the same inputs (`bundle.compare.compare_stages`: every element within
|err| <= atol + rtol * |ref|, numpy.allclose's rule, and finite), then a prefill plus several decode
steps driven by the shared generation loop, whose greedy tokens must be identical. A mismatch fails the
export loudly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bundle.compare import ALLCLOSE, OutputGates, compare_stages, token_agreement
from bundle.ort import ort_stages
from ficoco.generation import generate_tokens
from ficoco.reduced_llava import ReducedLlava

log = logging.getLogger(__name__)


class ValidationError(RuntimeError):
    """ONNX Runtime and PyTorch disagree beyond the tolerances (the message says where and by how much)."""


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
) -> dict[str, Any]:
    """Compare each ORT graph with the PyTorch stage, then greedy decoding; raise ValidationError on mismatch."""
    ort_model = ort_stages(onnx_dir, provider="cpu", threads=threads, segments=model.segments)
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
    worst: dict[str, dict[str, Any]] = {}
    for c in results:
        if c.graph not in worst or c.max_abs_err > worst[c.graph]["max_abs_err"]:
            worst[c.graph] = {"max_abs_err": c.max_abs_err, "passed": all(x.passed for x in results if x.graph == c.graph)}
    report = {
        "atol": atol,
        "rtol": rtol,
        "batch": b,
        "stages": worst,
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
