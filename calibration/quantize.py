"""Explicit Q/DQ quantization of a bundle's graphs with ONNX Runtime's quantization tools.

Why ONNX Runtime and not NVIDIA ModelOpt: `nvidia-modelopt[onnx]` 0.47 installs and calibrates on CPU,
but on Linux x86_64 it pins `onnxruntime-gpu~=1.24.2`, `onnx~=1.21.0` and pulls `cupy-cuda12x`, i.e. it
replaces this project's onnxruntime (1.31, CPU) and onnx (1.23). Its defaults also quantize the inputs
of the reduction's TopK / GatherElements / ReduceSum, and its INT4 mode finds no weights in our graphs
(they are `Transpose(initializer)`). So the project uses `onnxruntime.quantization`, already a dependency,
with TensorRT's rules (explicit quantization section of the TensorRT developer guide; the onnx-tensorrt
QuantizeLinear/DequantizeLinear importer):

* INT8 / FP8 (`quantize_static`, QDQ format): symmetric activations and weights (TensorRT supports only
  zero points of 0), signed INT8 zero points (a UINT8 zero point is re-read as INT8 by the parser),
  per-channel weights (axis = output channel) and per-tensor activations (the parser: "activations-
  quantization does not support per-axis quantization"), scales as constant initializers, Q/DQ on the
  inputs of MatMul / Gemm / Conv only (no output quantization), bias left in float, one Q/DQ pair per
  consumer. FP8 needs ORT's Distribution calibration (its only float8 calibrator).
* INT4 weight-only (`MatMulNBitsQuantizer` with `QuantFormat.QDQ`, RTN, symmetric): each MatMul weight
  becomes an INT4 initializer + `DequantizeLinear(axis=0, block_size=B)` (opset 21 blocked
  quantization, blocks along K); no ORT contrib `MatMulNBits` op is emitted. Weights whose K is not a
  multiple of B, or whose N is odd (TensorRT packs INT4 in pairs along the last dim), stay fp32.

`exclusions` (graphs.py) keeps the reduction, Softmax and norms out; see `quantize_bundle` for the bundle.
The decoder's mode applies to each decoder segment graph (`decoder_segment_{s}`, which hold every decoder
weight once, docs/export-notes.md §14); the weightless splice and reduction graphs are never quantized.
"""

from __future__ import annotations

import importlib.metadata
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from bundle.names import VISION, weighted_decoder_graph
from calibration import graphs as G
from calibration.data import CalibrationSet, FeedReader

log = logging.getLogger(__name__)

VISION_MODES: tuple[str, ...] = ("int8", "fp8", "none")
DECODER_MODES: tuple[str, ...] = ("int4-weight", "int8", "fp8", "none")
METHODS: tuple[str, ...] = ("max", "entropy", "percentile")
BLOCK_SIZES: tuple[int, ...] = (128, 64, 32, 16)  # INT4 block sizes tried, largest first (<= --block-size)

#: ORT CPU's graph optimizer fuses FP8 Q/DQ + MatMul into MatMulIntegerToFloat and then rejects float8
#: ("Type 'tensor(float8e4m3fn)' ... of operator (MatMulIntegerToFloat) is invalid"); with all graph
#: optimizations disabled the FP8 graphs run (slowly, as reference kernels).
FP8_ORT_NOTE = (
    "ONNX Runtime CPU (default graph optimizations) cannot run FP8 Q/DQ: it fuses them into "
    "MatMulIntegerToFloat, which has no float8 kernel; it runs only with graph optimizations disabled. "
    "Build TensorRT engines (Hopper/Ada) to run it."
)


class QuantizeError(RuntimeError):
    """Quantizing a graph failed (the message names the graph)."""


@dataclass(frozen=True)
class GraphQuantOptions:
    """How one graph is quantized."""

    mode: str  # int8 | fp8 | int4-weight
    method: str = "max"  # max | entropy | percentile (int8/fp8); int4-weight is RTN
    block_size: int = 128  # INT4 block size upper bound
    percentile: float = 99.999
    threads: int | None = None


def tool_version() -> str:
    try:
        return importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:  # e.g. onnxruntime-gpu
        import onnxruntime

        return str(onnxruntime.__version__)


def quantize_graph(
    src: Path, opts: GraphQuantOptions, calib: CalibrationSet | None, graph: str
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Quantize the graph at `src` (with its weights); returns the new model and its manifest record."""
    model = G.load_graph(src)
    G.ensure_node_names(model)
    ex = G.exclusions(model)
    G.fold_weight_transposes(model)
    candidates = G.weight_nodes(model, ex.all)
    record: dict[str, Any] = {
        "mode": opts.mode,
        "excluded_nodes": len(ex.all),
        "excluded_by_reason": ex.counts(),
        "tool": "onnxruntime.quantization",
        "tool_version": tool_version(),
    }
    if opts.mode == "int4-weight":
        model, info = _int4_weight_only(model, candidates, opts)
        record.update(method="rtn", calib_size=0, **info)
    elif opts.mode in ("int8", "fp8"):
        if calib is None:
            raise QuantizeError(f"{graph}: {opts.mode} needs calibration data")
        feeds = calib.feeds(graph)
        model, info = _static(model, candidates, sorted(ex.all), feeds, opts)
        record.update(calib_size=len(feeds), **info)
    else:
        raise QuantizeError(f"{graph}: unknown mode {opts.mode!r}")
    rewired = G.unshare_dequantize(model, record["quantized_node_names"])
    record["rewired_dq_consumers"] = rewired
    record["quantized_nodes"] = len(record.pop("quantized_node_names"))
    record["opset"] = G.opset(model)
    record["ort_cpu_runnable"] = opts.mode != "fp8"
    if opts.mode == "fp8":
        record["ort_cpu_note"] = FP8_ORT_NOTE
    leaks = G.qdq_feeding(model, ex.all)
    if leaks:
        raise QuantizeError(f"{graph}: Q/DQ nodes feed excluded nodes {sorted(leaks)[:5]} (a bug in the exclusion)")
    return model, record


def _pick_block_size(model: onnx.ModelProto, nodes: list[str], upper: int) -> tuple[int, list[str], list[str]]:
    """The INT4 block size (<= upper) that quantizes the most weights; (size, quantizable, skipped)."""
    inits = {t.name: t for t in model.graph.initializer}
    shapes = {n.name: list(inits[n.input[1]].dims) for n in model.graph.node if n.name in set(nodes)}
    best: tuple[int, list[str], list[str]] | None = None
    for bs in [b for b in BLOCK_SIZES if b <= upper] or [upper]:
        ok = [n for n in nodes if len(shapes[n]) == 2 and shapes[n][0] % bs == 0 and shapes[n][1] % 2 == 0]
        if best is None or len(ok) > len(best[1]):
            best = (bs, ok, [n for n in nodes if n not in set(ok)])
    assert best is not None
    return best


def _int4_weight_only(model: onnx.ModelProto, nodes: list[str], opts: GraphQuantOptions) -> tuple[onnx.ModelProto, dict[str, Any]]:
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    matmuls = [n.name for n in model.graph.node if n.name in set(nodes) and n.op_type == "MatMul"]
    bs, ok, skipped = _pick_block_size(model, matmuls, opts.block_size)
    if not ok:
        raise QuantizeError(f"no MatMul weight has a K divisible by an INT4 block size <= {opts.block_size}")
    # the quantizer takes every MatMul not excluded: exclude all but the chosen ones (reduction MatMuls too)
    never = sorted({n.name for n in model.graph.node if n.op_type == "MatMul"} - set(ok))
    cfg = DefaultWeightOnlyQuantConfig(block_size=bs, is_symmetric=True, quant_format=QuantFormat.QDQ,
                                       op_types_to_quantize=("MatMul",))
    q = MatMulNBitsQuantizer(model, block_size=bs, is_symmetric=True, quant_format=QuantFormat.QDQ,
                             nodes_to_include=ok, nodes_to_exclude=never, algo_config=cfg)
    _quiet(lambda: q.process())
    out = q.model.model
    contrib = [n.name for n in out.graph.node if n.op_type == "MatMulNBits" or n.domain == "com.microsoft"]
    if contrib:
        raise QuantizeError(f"the INT4 quantizer emitted ONNX Runtime contrib ops TensorRT cannot parse: {contrib[:3]}")
    return out, {"block_size": bs, "quantized_node_names": ok, "skipped_weights": len(skipped) + len(nodes) - len(matmuls),
                 "weight_dtype": "int4", "activations": "fp32 (weight-only)"}


def _static(
    model: onnx.ModelProto, nodes: list[str], excluded: list[str], feeds: list[dict[str, Any]], opts: GraphQuantOptions
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    fp8 = opts.mode == "fp8"
    qtype = QuantType.QFLOAT8E4M3FN if fp8 else QuantType.QInt8
    method = {"max": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[opts.method]
    used_method = opts.method
    if fp8:
        method, used_method = CalibrationMethod.Distribution, "distribution"
        if opts.method != "max":
            log.warning("FP8: ONNX Runtime calibrates float8 only with its Distribution method; --method %s ignored", opts.method)
    extra = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "DedicatedQDQPair": True,
        "QuantizeBias": False,
        "CalibTensorRangeSymmetric": True,
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1, "Gemm": 0},
        "OpTypesToExcludeOutputQuantization": list(G.QUANTIZABLE_OPS),
        "CalibPercentile": opts.percentile,
        "CalibMovingAverage": False,
    }
    names = [i.name for i in model.graph.input]
    reader = _reader(feeds, names)
    with tempfile.TemporaryDirectory(prefix="ficoco-quant-") as tmp:
        out_path = Path(tmp) / "q.onnx"
        _quiet(lambda: quantize_static(
            model, out_path, reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(G.QUANTIZABLE_OPS),
            per_channel=True, reduce_range=False, activation_type=qtype, weight_type=qtype,
            nodes_to_quantize=nodes, nodes_to_exclude=excluded, use_external_data_format=True,
            calibrate_method=method, extra_options=extra,
        ))
        out = onnx.load(str(out_path))
    return out, {"method": used_method, "quantized_node_names": nodes, "weight_dtype": "fp8e4m3" if fp8 else "int8",
                 "activations": "fp8e4m3 per-tensor" if fp8 else "int8 per-tensor", "weights": "per-channel"}


def _reader(feeds: list[dict[str, Any]], names: list[str]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(FeedReader, CalibrationDataReader):
        pass

    return _Reader(feeds, names)


def _quiet(fn: Callable[[], Any]) -> Any:
    """Run an ORT quantization call with its INFO chatter (one line per node) turned down."""
    loggers = [logging.getLogger(n) for n in ("onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.WARNING) if lg.name != "root" else lg.level)
    try:
        return fn()
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def graph_files(onnx_path: Path) -> list[Path]:
    return [p for p in (onnx_path, onnx_path.with_name(onnx_path.name + ".data")) if p.exists()]


def graph_bytes(onnx_path: Path) -> int:
    return sum(p.stat().st_size for p in graph_files(onnx_path))


def copy_bundle(src: Path, dst: Path) -> None:
    """Copy a bundle's files except manifest, reports/ and engines/ (those describe the source bundle)."""
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if rel.parts[0] in ("reports", "engines") or rel.as_posix() == "manifest.json":
            continue
        target = dst / rel
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif p.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, target)


def stage_modes(vision: str, decoder: str, graphs: Iterable[str]) -> dict[str, str]:
    """graph -> mode for those of the bundle's `graphs` (`Manifest.graph_names()`) that get quantized.

    `decoder` applies to every decoder segment (the graphs with the decoder's weights, each weight once);
    embed_tokens never (a Gather, not a GEMM), nor the weightless splice and reduction graphs.
    """
    out: dict[str, str] = {}
    for g in graphs:
        if g == VISION and vision != "none":
            out[g] = vision
        elif weighted_decoder_graph(g) and decoder != "none":
            out[g] = decoder
    return out
