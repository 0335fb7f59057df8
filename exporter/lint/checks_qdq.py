"""The checks of explicit quantization (QuantizeLinear / DequantizeLinear) against TensorRT's Q/DQ rules."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from exporter.lint.graph import GraphContext, attr, node_input

_UINT8, _INT4 = TensorProto.UINT8, getattr(TensorProto, "INT4", -1)


def _qdq_array(name: str, ctx: GraphContext) -> np.ndarray | None:
    """A Q/DQ parameter's value: folded constants, or an inline initializer of any size."""
    value = ctx.const(name)
    if value is not None:
        return value
    f = ctx.fact(name)
    if f is not None and f.kind == "initializer" and f.initializer is not None:
        if f.initializer.data_location != TensorProto.EXTERNAL:
            try:
                return numpy_helper.to_array(f.initializer)
            except Exception:
                return None
    return None


def check_qdq_scale(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    scale = node_input(node, 1)
    if scale and not (ctx.is_direct_constant(scale) or ctx.is_computable(scale)):
        return f"the scale {scale!r} is computed at run time; TensorRT needs Q/DQ scales that are build-time constants"
    return None


def check_qdq_zero_point(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    zp = node_input(node, 2)
    if not zp:
        return None
    if not (ctx.is_direct_constant(zp) or ctx.is_computable(zp)):
        return f"the zero point {zp!r} is computed at run time; TensorRT needs a constant zero point of 0"
    value = _qdq_array(zp, ctx)
    if value is not None and np.any(value.astype(np.float64) != 0):
        return f"the zero point {zp!r} is not all zeros (asymmetric quantization); TensorRT supports only symmetric Q/DQ"
    return None


def check_qdq_uint8(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    zp = node_input(node, 2)
    if node.op_type == "DequantizeLinear" and ctx.elem_type(node_input(node, 0)) not in (None, _UINT8):
        return None  # the quantized type is the data's (INT8, INT4, FP8)
    if not zp and not attr(node, "output_dtype", 0):
        return "no zero point: the quantized type defaults to UINT8, which TensorRT reads as INT8; give an INT8 zero point of 0"
    if zp and ctx.elem_type(zp) == _UINT8:
        return f"the zero point {zp!r} is UINT8; TensorRT re-reads it as INT8 (use INT8 zero points, symmetric)"
    return None


def _qdq_quant_type(node: onnx.NodeProto, ctx: GraphContext) -> int | None:
    if node.op_type == "DequantizeLinear":
        return ctx.elem_type(node_input(node, 0))
    zp = node_input(node, 2)
    if zp:
        return ctx.elem_type(zp)
    return attr(node, "output_dtype", None) or None


def check_qdq_block(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    data, scale = node_input(node, 0), node_input(node, 1)
    block = int(attr(node, "block_size", 0) or 0)
    sdims = ctx.dims(scale)
    ddims = ctx.dims(data)
    if block == 0 and (sdims is None or len(sdims) <= 1):
        return None  # per-tensor or per-axis
    if not ctx.is_direct_constant(data):
        return "block quantization of an activation; TensorRT supports blocked Q/DQ only on constant weights (weight-only)"
    if ddims is None or sdims is None or None in ddims or None in sdims or len(ddims) != len(sdims):
        return None
    blocked = [i for i, (d, s) in enumerate(zip(ddims, sdims, strict=True)) if d != s]
    if len(blocked) > 1:
        return f"scale {sdims} blocks weight {ddims} along {len(blocked)} axes; TensorRT allows a single blocking dimension"
    for i in blocked:
        if sdims[i] == 0 or ddims[i] % sdims[i]:
            return f"weight axis {i} ({ddims[i]}) is not a whole number of blocks ({sdims[i]} scales)"
    return None


def check_qdq_int4(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    if _qdq_quant_type(node, ctx) != _INT4:
        return None
    data = node_input(node, 0)
    if node.op_type == "QuantizeLinear" or not ctx.is_direct_constant(data):
        return "INT4 on an activation: TensorRT's INT4 is weight-only (a DequantizeLinear of a constant INT4 weight)"
    dims = ctx.dims(data)
    if dims and dims[-1] is not None and dims[-1] % 2:
        return f"INT4 weight {data!r} has an odd last dimension ({dims[-1]}); TensorRT packs INT4 in pairs along it"
    return None


def check_qdq_per_axis_activation(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    data, scale = node_input(node, 0), node_input(node, 1)
    sdims = ctx.dims(scale)
    if node.op_type == "QuantizeLinear" and not ctx.is_direct_constant(data) and sdims and len(sdims) == 1 and (sdims[0] or 0) > 1:
        return "per-axis quantization of an activation; TensorRT treats per-axis scales as weight scales (use per-tensor)"
    return None
