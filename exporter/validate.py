"""Validation as part of export: every graph in ONNX Runtime (CPU) against the reduced PyTorch model.

Stage by stage on the same inputs (max/mean absolute error against `--atol`/`--rtol`), then a prefill
plus several decode steps driven by the shared generation loop, whose greedy tokens must be identical.
A mismatch fails the export loudly.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

from exporter.wrappers import EMBED, PREFILL, STEP, VISION, past_names
from ficoco.generation import generate_tokens
from ficoco.reduced_llava import ReducedLlava

log = logging.getLogger(__name__)


class ValidationError(RuntimeError):
    """ONNX Runtime and PyTorch disagree beyond the tolerances (the message says where and by how much)."""


def session_options(threads: int | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return so


class OrtStages:
    """The four stage graphs in ONNX Runtime sessions, behind `ficoco.generation.StagedModel`."""

    def __init__(self, onnx_dir: str | Path, providers: list[str] | None = None, threads: int | None = None) -> None:
        d = Path(onnx_dir)
        providers = providers or ["CPUExecutionProvider"]
        self.sessions = {
            name: ort.InferenceSession(str(d / f"{name}.onnx"), session_options(threads), providers=providers)
            for name in (VISION, EMBED, PREFILL, STEP)
        }
        step_inputs = [i.name for i in self.sessions[STEP].get_inputs()]
        self.num_layers = sum(1 for n in step_inputs if n.endswith(".key"))
        self.past_names = past_names(self.num_layers)
        self.dtype = _np_dtype(self.sessions[VISION].get_inputs()[0].type)

    def run(self, stage: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sessions[stage].run(None, feeds)

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        return torch.from_numpy(self.run(VISION, {"pixel_values": _np(pixel_values, self.dtype)})[0])

    def embed(self, input_ids: Tensor) -> Tensor:
        return torch.from_numpy(self.run(EMBED, {"input_ids": input_ids.numpy().astype(np.int64)})[0])

    def prefill(self, embeds: Tensor, visual: Tensor, image_offset: Tensor) -> tuple[Tensor, list[Tensor]]:
        out = self.run(
            PREFILL,
            {
                "inputs_embeds": _np(embeds, self.dtype),
                "visual_tokens": _np(visual, self.dtype),
                "image_offset": image_offset.numpy().astype(np.int64),
            },
        )
        return torch.from_numpy(out[0]), [torch.from_numpy(x) for x in out[1:]]

    def step(self, embeds: Tensor, position: Tensor, past: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        feeds = {"inputs_embeds": _np(embeds, self.dtype), "position": position.numpy().astype(np.int64)}
        feeds.update({n: _np(p, self.dtype) for n, p in zip(self.past_names, past, strict=True)})
        out = self.run(STEP, feeds)
        return torch.from_numpy(out[0]), [torch.from_numpy(x) for x in out[1:]]


def _np_dtype(ort_type: str) -> np.dtype:
    return np.dtype(np.float16) if "float16" in ort_type else np.dtype(np.float32)


def _np(t: Tensor, dtype: np.dtype) -> np.ndarray:
    return t.detach().cpu().numpy().astype(dtype, copy=False)


@dataclass
class Comparison:
    name: str
    max_abs_err: float
    mean_abs_err: float
    max_ref: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(name: str, got: Tensor, ref: Tensor, atol: float, rtol: float) -> Comparison:
    """Elementwise |got - ref| <= atol + rtol * |ref| (Polygraphy's elemwise check), with shapes equal."""
    if tuple(got.shape) != tuple(ref.shape):
        return Comparison(name, float("inf"), float("inf"), 0.0, False)
    g, r = got.double(), ref.double()
    err = (g - r).abs()
    ok = bool(torch.all(err <= atol + rtol * r.abs())) and bool(torch.isfinite(g).all())
    return Comparison(name, float(err.max()), float(err.mean()), float(r.abs().max()), ok)


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
    ort_model = OrtStages(onnx_dir, threads=threads)
    torch_model = model.stages()
    b = pixel_values.shape[0]
    offset = torch.full((b,), image_offset, dtype=torch.long)
    results: list[Comparison] = []
    with torch.no_grad():
        ref_visual = torch_model.encode_image(pixel_values)
        results.append(compare(VISION, ort_model.encode_image(pixel_values), ref_visual, atol, rtol))
        ref_embeds = torch_model.embed(input_ids)
        results.append(compare(EMBED, ort_model.embed(input_ids), ref_embeds, atol, rtol))
        # feed both graphs the PyTorch inputs, so each stage's error is its own
        ref_logits, ref_past = torch_model.prefill(ref_embeds, ref_visual, offset)
        got_logits, got_past = ort_model.prefill(ref_embeds, ref_visual, offset)
        results.append(compare(f"{PREFILL}:logits", got_logits, ref_logits, atol, rtol))
        results += [compare(f"{PREFILL}:present.{i // 2}", g, r, atol, rtol) for i, (g, r) in enumerate(zip(got_past, ref_past, strict=True))]
        nxt = torch.argmax(ref_logits, dim=-1, keepdim=True)
        position = torch.full((b,), input_ids.shape[1] + ref_visual.shape[1], dtype=torch.long)
        tok = torch_model.embed(nxt)
        ref_step, ref_step_past = torch_model.step(tok, position, ref_past)
        got_step, got_step_past = ort_model.step(tok, position, ref_past)
        results.append(compare(f"{STEP}:logits", got_step, ref_step, atol, rtol))
        results += [compare(f"{STEP}:present.{i // 2}", g, r, atol, rtol) for i, (g, r) in enumerate(zip(got_step_past, ref_step_past, strict=True))]
        ref_tokens = generate_tokens(torch_model, pixel_values, input_ids, image_offset, decode_steps)
        got_tokens = generate_tokens(ort_model, pixel_values, input_ids, image_offset, decode_steps)
    same = ref_tokens.tolist() == got_tokens.tolist()
    diverge = None
    if not same:
        diff = (ref_tokens != got_tokens).any(dim=0).nonzero()
        diverge = int(diff[0]) if diff.numel() else min(ref_tokens.shape[1], got_tokens.shape[1])
    stages = {c.name: c.to_dict() for c in results}
    worst = {}
    for c in results:
        key = c.name.split(":")[0]
        if key not in worst or c.max_abs_err > worst[key]["max_abs_err"]:
            worst[key] = {"max_abs_err": c.max_abs_err, "passed": all(x.passed for x in results if x.name.split(":")[0] == key)}
    report = {
        "atol": atol,
        "rtol": rtol,
        "batch": b,
        "stages": worst,
        "details": stages,
        "greedy": {"steps": decode_steps, "identical": same, "first_divergence": diverge, "tokens": ref_tokens.tolist()},
    }
    failed = [c for c in results if not c.passed]
    if failed or not same:
        lines = [f"{c.name}: max |err| {c.max_abs_err:.3g} (atol {atol}, rtol {rtol})" for c in failed[:8]]
        if not same:
            lines.append(f"greedy tokens differ from PyTorch from decode step {diverge}")
        raise ValidationError("ONNX Runtime does not match PyTorch:\n  " + "\n  ".join(lines))
    return report
