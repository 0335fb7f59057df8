"""What the machine can do: the backend's own GEMM peak at the model's shapes, for the bench's roofline column.

A bench's absolute times do not carry from machine to machine; a fraction of what the machine reaches
does. In the same run as the timed configurations, this measures ONNX Runtime's MatMul (the kernel the
bundle's linear layers run on) with the session options and thread count the bundle runs with, at the
model's largest GEMM shapes:

- vision: the CLIP MLP's up-projection, [n_patches + 1, hidden] x [hidden, intermediate];
- prefill: the decoder MLP's up-projection at the prefill length, [text + visual tokens, hidden] x
  [hidden, intermediate].

Each shape is run `warmup` times, then timed `repeats` times; its GFLOP/s is 2·M·K·N over the fastest run
(the machine's capability, not its average under load). The peak is the best shape's. fp16 is measured
too when this ONNX Runtime build has an fp16 MatMul on CPU (None otherwise: then fp16 graphs run upcast).

The bench reports per stage achieved GFLOP/s = the planner's FLOPs / the measured median time, and its
fraction of the fp32 peak (`roofline_columns`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

Shape = tuple[int, int, int]  # (M, K, N): [M, K] x [K, N]


def _matmul_session(k: int, n: int, dtype: str, threads: int | None) -> Any:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from bundle.ort import session_options

    elem = TensorProto.FLOAT if dtype == "float32" else TensorProto.FLOAT16
    w = (np.random.default_rng(0).standard_normal((k, n)) * 0.02).astype(dtype)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["y"])], "gemm_peak",
        [helper.make_tensor_value_info("a", elem, ["m", k])], [helper.make_tensor_value_info("y", elem, ["m", n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"])


def gemm_gflops(shape: Shape, dtype: str = "float32", threads: int | None = None, warmup: int = 2, repeats: int = 5) -> float | None:
    """GFLOP/s of one MatMul shape in ONNX Runtime (CPU), fastest of `repeats`; None when the build lacks it."""
    m, k, n = shape
    try:
        sess = _matmul_session(k, n, dtype, threads)
    except Exception as err:  # no kernel for this type in this build: ONNX Runtime raises its own types
        log.info("gemm peak: no %s MatMul here (%s)", dtype, err)
        return None
    a = (np.random.default_rng(1).standard_normal((m, k)) * 0.02).astype(dtype)
    for _ in range(warmup):
        sess.run(None, {"a": a})
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        sess.run(None, {"a": a})
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best / 1e9


def model_shapes(geometry: Any, text_tokens: int) -> dict[str, Shape]:
    """The vision and prefill GEMM shapes of `geometry` (a `ficoco.geometry.LlavaGeometry`), the prefill at the
    unreduced length (every visual token reaches the decoder)."""
    v, d = geometry.vision, geometry.decoder
    return {
        "vision": (int(v.seq_len), int(v.hidden_size), int(v.intermediate_size)),
        "prefill": (int(text_tokens) + int(geometry.visual_tokens), int(d.hidden_size), int(d.intermediate_size)),
    }


def gemm_peak(shapes: dict[str, Shape], threads: int | None = None, warmup: int = 2, repeats: int = 5) -> dict[str, Any]:
    """{"shapes": {name: [M, K, N]}, "fp32": {name: GFLOP/s}, "fp16": {...}, "peak_fp32", "peak_fp16"}."""
    out: dict[str, Any] = {"shapes": {k: list(s) for k, s in shapes.items()}, "threads": threads,
                           "kernel": "onnxruntime MatMul (CPUExecutionProvider)", "fp32": {}, "fp16": {}}
    for dtype, key in (("float32", "fp32"), ("float16", "fp16")):
        for name, shape in shapes.items():
            out[key][name] = gemm_gflops(shape, dtype, threads, warmup, repeats)
    for key in ("fp32", "fp16"):
        got = [g for g in out[key].values() if g is not None]
        out[f"peak_{key}"] = max(got) if got else None
    return out


def roofline_columns(flops_tflops: dict[str, float], timings: dict[str, Any], peak_gflops: float | None) -> dict[str, Any]:
    """Per stage (vision, prefill, and TTFT over their sum): achieved GFLOP/s and its fraction of the peak."""
    def median(key: str) -> float | None:
        s = timings.get(key) or {}
        return float(s["median"]) if s.get("n") else None

    out: dict[str, Any] = {}
    for stage, flops_key, time_key in (("vision", "vision", "vision_ms"), ("prefill", "prefill", "prefill_ms"),
                                       ("ttft", "total", "ttft_ms")):
        tf, ms = flops_tflops.get(flops_key), median(time_key)
        gflops = tf * 1e12 / (ms * 1e-3) / 1e9 if tf and ms else None
        frac = gflops / peak_gflops if gflops is not None and peak_gflops else None
        out[stage] = {"gflops": gflops, "fraction_of_peak": frac}
    return out


__all__: Sequence[str] = ("gemm_gflops", "gemm_peak", "model_shapes", "roofline_columns")
