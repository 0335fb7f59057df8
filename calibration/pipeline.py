"""`quantize_bundle`: an fp32 bundle -> a new bundle whose graphs carry explicit Q/DQ nodes.

The new bundle is built in `bundle.layout.staging_dir` (nothing appears at the output path unless
everything succeeded): the source's files are copied, each quantized graph replaces its original under
the same name, every graph passes `onnx.checker` and the TensorRT lint (`exporter.lint`, Q/DQ rules
included), and the manifest keeps every key of the source (so `ficoco-check` can rebuild the PyTorch
reference from `source_model` and `schedule`) plus `quantization` (per graph: mode, method, calibration
size, excluded node count, tool and version, ...), the new `opset`, `lint`, and fresh `files` hashes.
The decoder's mode applies to each decoder segment graph (`decoder_segment_{s}`: every decoder weight once,
serving prefill and decode); the splice and reduction graphs are weightless and copied unchanged.
`reports/quantize.json` holds the evaluation (`calibration.evaluate`) including the selection check.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx

from bundle import layout as B
from bundle.manifest import Manifest, load_manifest, write_manifest
from calibration import data as D
from calibration import graphs as G
from calibration import quantize as Q
from calibration.evaluate import EvalOptions, evaluate

log = logging.getLogger(__name__)

REPORT = "reports/quantize.json"

Progress = Callable[[str, int, int], None]  # (phase, done, total)


class QuantizeInputError(ValueError):
    """The bundle or the options cannot be quantized as asked (exit 2; the message says what to do)."""


@dataclass(frozen=True)
class QuantizeRequest:
    vision: str = "int8"
    decoder: str = "int4-weight"
    method: str = "max"
    calib_images: Path | None = None  # None: the bundled scikit-image photos
    calib_prompts: Path | None = None  # None: calibration.data.DEFAULT_PROMPTS
    calib_size: int = 8
    step_samples: int = 2  # decode-phase samples (greedy steps) per (image, prompt) pair for each decoder segment
    block_size: int = 128
    percentile: float = 99.999
    save_calib: Path | None = None
    evaluation: EvalOptions | None = field(default_factory=EvalOptions)  # None: no report numbers
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.vision not in Q.VISION_MODES:
            raise QuantizeInputError(f"--vision {self.vision!r}: choose one of {', '.join(Q.VISION_MODES)}")
        if self.decoder not in Q.DECODER_MODES:
            raise QuantizeInputError(f"--decoder {self.decoder!r}: choose one of {', '.join(Q.DECODER_MODES)}")
        if self.method not in Q.METHODS:
            raise QuantizeInputError(f"--method {self.method!r}: choose one of {', '.join(Q.METHODS)}")
        if self.vision == "none" and self.decoder == "none":
            raise QuantizeInputError("--vision none --decoder none leaves nothing to quantize; choose a mode for one of them")
        if self.calib_size < 1:
            raise QuantizeInputError(f"--calib-size must be at least 1 (got {self.calib_size})")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise QuantizeInputError(f"--block-size must be a power of two >= 16 (got {self.block_size})")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def check_source(bundle: Path) -> Manifest:
    """The source manifest (files verified); QuantizeInputError for bundles this cannot quantize."""
    manifest = load_manifest(bundle, verify=True)
    if manifest.quantization:
        src = (manifest.quantization.get("source_bundle") or {}).get("path", "the fp32 bundle it was made from")
        raise QuantizeInputError(
            f"{bundle} is already quantized ({_modes(manifest.quantization)}); quantize the fp32 bundle instead ({src})"
        )
    if manifest.graph_only:
        raise QuantizeInputError(f"{bundle} is a --graph-only bundle (no weights); export it with weights to quantize it")
    if manifest.precision != "fp32":
        raise QuantizeInputError(
            f"{bundle} is a {manifest.precision} export; quantize an fp32 export (ficoco-export --precision fp32)"
        )
    missing = [g for g in manifest.graph_names() if g not in manifest.graphs]
    if missing:
        raise QuantizeInputError(f"{bundle}'s manifest lists no graph {', '.join(missing)}; re-export the bundle")
    return manifest


def _modes(q: dict[str, Any]) -> str:
    graphs = q.get("graphs", {})
    return ", ".join(f"{g}: {r.get('mode')}" for g, r in graphs.items()) or "unknown modes"


def quantize_bundle(bundle: str | os.PathLike[str], out: str | os.PathLike[str], request: QuantizeRequest, *,
                    force: bool = False, progress: Progress | None = None) -> tuple[Path, dict[str, Any]]:
    """Write the quantized bundle to `out`; returns (its path, the report written to reports/quantize.json)."""
    src = Path(bundle).resolve()
    notify = progress or (lambda phase, done, total: None)
    manifest = check_source(src)
    if Path(out).resolve() == src:
        raise QuantizeInputError("-o must name a new directory, not the bundle being quantized")
    graph_names = manifest.graph_names()
    modes = Q.stage_modes(request.vision, request.decoder, graph_names)
    needs = [g for g, m in modes.items() if m in ("int8", "fp8")]
    images = D.load_images(request.calib_images)
    prompts = D.load_prompts(request.calib_prompts)
    calib: D.CalibrationSet | None = None
    if needs:
        calib = D.collect(src, images, prompts, request.calib_size, graphs=needs, step_samples=request.step_samples,
                          threads=request.threads, progress=lambda d, t: notify("calibrate", d, t))
        if request.save_calib is not None:
            calib.save(request.save_calib)
    records: dict[str, dict[str, Any]] = {}
    with B.staging_dir(out, force=force) as stage:
        Q.copy_bundle(src, stage)
        onnx_dir = stage / B.ONNX_DIR
        for i, (graph, mode) in enumerate(modes.items()):
            notify(f"quantize {graph}", i, len(modes))
            gopts = Q.GraphQuantOptions(mode=mode, method=request.method, block_size=request.block_size,
                                        percentile=request.percentile, threads=request.threads)
            model, rec = Q.quantize_graph(src / B.ONNX_DIR / f"{graph}.onnx", gopts, calib, graph)
            path = onnx_dir / f"{graph}.onnx"
            G.save_graph(model, path)
            del model
            try:
                onnx.checker.check_model(str(path), full_check=False)
            except onnx.checker.ValidationError as err:
                raise Q.QuantizeError(f"{graph}: the quantized graph fails onnx.checker: {err}") from err
            rec["fp32_bytes"] = Q.graph_bytes(src / B.ONNX_DIR / f"{graph}.onnx")
            rec["bytes"] = Q.graph_bytes(path)
            records[graph] = rec
        notify(f"quantize {list(modes)[-1]}", len(modes), len(modes))
        lint_report = _lint(onnx_dir, manifest)
        quantization = {
            "format": "explicit Q/DQ (QuantizeLinear/DequantizeLinear)",
            "graphs": records,
            "unquantized": [g for g in graph_names if g not in records],
            "calibration": {"size": request.calib_size if calib else 0, "images": "bundled scikit-image photos"
                            if request.calib_images is None else str(request.calib_images),
                            "prompts": len(prompts), "samples": {g: calib.size(g) for g in needs} if calib else {}},
            "ort_cpu_runnable": all(r["ort_cpu_runnable"] for r in records.values()),
            "request": request.to_dict(),
            "source_bundle": {"path": str(src), "manifest_sha256": B.sha256_file(src / B.MANIFEST)},
        }
        new = manifest.updated(
            graphs={g: replace(r, opset=records[g]["opset"]) if g in records else r for g, r in manifest.graphs.items()},
            opset=max([int(manifest.opset or 0)] + [r["opset"] for r in records.values()]),
            lint=lint_report,
            quantization=quantization,
            tool_versions={**manifest.tool_versions, "quantizer": f"onnxruntime.quantization {Q.tool_version()}"},
        )
        new = write_manifest(stage, new, files=B.hash_files(stage))
        report: dict[str, Any] = {"quantization": records, "lint": {"errors": 0, "findings": len(lint_report["findings"])}}
        if request.evaluation is not None:
            notify("evaluate", 0, 1)
            report["evaluation"] = evaluate(src, stage, request.evaluation,
                                            optimize_quant=quantization["ort_cpu_runnable"])
            notify("evaluate", 1, 1)
        (stage / B.REPORTS_DIR).mkdir(exist_ok=True)
        B.write_json(stage / REPORT, report)
    return Path(out).resolve(), report


def _lint(onnx_dir: Path, manifest: Manifest) -> dict[str, Any]:
    from exporter.lint import format_findings, has_errors, lint_files

    runtime = {g: manifest.graphs[g].input_names for g in manifest.graph_names() if g in manifest.graphs}
    findings = lint_files(sorted(onnx_dir.glob("*.onnx")), runtime_inputs=runtime)
    for f in findings:  # report paths relative to the bundle, not the staging directory
        object.__setattr__(f, "graph_file", f"{B.ONNX_DIR}/{Path(f.graph_file).name}")
    if has_errors(findings):
        raise Q.QuantizeError("the quantized graphs fail the TensorRT lint:\n" + format_findings([f for f in findings if f.severity == "error"]))
    return {"ran": True, "target": "trt10", "findings": [f.__dict__ for f in findings]}
