"""The checks behind the rules (all but Q/DQ): each takes (item, GraphContext) and returns a reason or None.

The item is the ModelProto (model rules), a (kind, ValueInfoProto | TensorProto) pair (tensor rules) or a
NodeProto (node rules); :mod:`exporter.lint.rules` pairs each check with its op types, severity and source.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from exporter.lint.graph import GraphContext, attr, attr_str, node_input
from exporter.lint.tables import (
    CONSTANT_INPUTS,
    DTYPE_ATTR_OPS,
    LATE_10X_OPS,
    LISTED_OPS,
    OPSET23_OPS,
    RANDOM_OPS,
    SCATTER_PLUGIN_REDUCTIONS,
    SHAPE_INPUTS,
    TOPK_TYPES,
    UNSUPPORTED_OPS,
)

# -- model-level ---------------------------------------------------------------------------------------


def check_opset_max(model: onnx.ModelProto, ctx: GraphContext) -> str | None:
    t = ctx.target
    if ctx.opset > t.max_opset:
        return (
            f"model opset {ctx.opset} is above {t.max_opset}, the highest any {t.name} parser accepts; "
            f"export with opset <= {t.max_opset_all} (default 18)"
        )
    return None


def check_opset_all(model: onnx.ModelProto, ctx: GraphContext) -> str | None:
    t = ctx.target
    if t.max_opset_all < ctx.opset <= t.max_opset:
        return (
            f"model opset {ctx.opset} is above {t.max_opset_all}: only late {t.name} releases parse it "
            f"(TensorRT 10.0/10.1 stop at opset 20; JetPack's 10.x may too); export with opset <= {t.max_opset_all}"
        )
    return None


def check_opset_min(model: onnx.ModelProto, ctx: GraphContext) -> str | None:
    if ctx.opset < ctx.target.min_opset:
        return f"model opset {ctx.opset} is below {ctx.target.min_opset}, the lowest the parser supports"
    return None


# -- tensors -----------------------------------------------------------------------------------------


def check_double_tensor(item: tuple[str, Any], ctx: GraphContext) -> str | None:
    kind, proto = item
    dtype = proto.data_type if isinstance(proto, TensorProto) else proto.type.tensor_type.elem_type
    if dtype == TensorProto.DOUBLE:
        return (
            f"{kind} '{proto.name}' is float64 (DOUBLE): TensorRT only casts it down to FLOAT with clamping; "
            "export float32/float16"
        )
    return None


# -- nodes: support status ---------------------------------------------------------------------------


def check_unsupported(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    if (
        node.domain not in ("", "ai.onnx")
        or node.op_type not in UNSUPPORTED_OPS
        or node.op_type in RANDOM_OPS
    ):
        return None
    extra = " and its output shape is data-dependent" if node.op_type in ("Unique", "Compress") else ""
    return f"{node.op_type} is marked not supported (N) in the TensorRT operator table{extra}"


def check_late_10x(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    if node.domain in ("", "ai.onnx") and node.op_type in LATE_10X_OPS:
        return f"{node.op_type} is N in the TensorRT 10.0/10.1 tables; the changelog adds it in {LATE_10X_OPS[node.op_type]}"
    return None


def check_opset23_op(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    if ctx.target.opset23_ops_ok or node.domain not in ("", "ai.onnx") or node.op_type not in OPSET23_OPS:
        return None
    return (
        f"{node.op_type} needs opset >= 23; TensorRT 10.0/10.1 parse opset <= 20 and the changelog adds "
        f"{node.op_type} only in TensorRT {OPSET23_OPS[node.op_type]}: export with opset 18 for trt10 (it decomposes the op)"
    )


def check_unlisted(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    if ctx.is_function_call(node):
        return None
    if node.domain not in ("", "ai.onnx"):
        return f"custom-domain op '{node.domain}::{node.op_type}' with no local function: TensorRT needs a plugin for it"
    if node.op_type not in LISTED_OPS:
        return f"{node.op_type} does not appear in the TensorRT operator table (not verified on TensorRT)"
    return None


def check_random(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    status = "N in the TensorRT table" if node.op_type in UNSUPPORTED_OPS else "TensorRT ignores its seed"
    return (
        f"{node.op_type} is random ({status}): results are not reproducible against PyTorch/ONNX Runtime; "
        "use a deterministic tie-break"
    )


def check_data_dependent_op(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    return (
        f"{node.op_type}'s output shape depends on the input values (data-dependent shape); the engines here "
        "need static shapes: use a fixed-budget TopK + Gather instead"
    )


def check_shape_inputs(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    bad = [
        (i, node.input[i])
        for i in SHAPE_INPUTS[node.op_type]
        if node_input(node, i) and not ctx.is_computable(node.input[i])
    ]
    if not bad:
        return None
    what = ", ".join(f"input {i} '{name}'" for i, name in bad)
    return (
        f"output shape depends on runtime values: {what} is computed from tensor data (or a graph input), "
        "not from constants and tensor shapes"
    )


def check_constant_inputs(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    index, name, strict, wording = CONSTANT_INPUTS[node.op_type]
    value = node_input(node, index)
    if not value:
        return None
    ok = (
        ctx.is_direct_constant(value)
        if strict
        else ctx.const(value) is not None or ctx.is_direct_constant(value)
    )
    if ok:
        return None
    return f"input '{name}' ('{value}') is not a constant; the TensorRT table says {wording}"


# -- TopK ---------------------------------------------------------------------------------------------


def _topk_k(node: onnx.NodeProto, ctx: GraphContext) -> tuple[str, int | None]:
    """('attr'|'const'|'const?'|'shape'|'data', K value or None)."""
    k_name = node_input(node, 1)
    if not k_name:
        k = attr(node, "k", None)
        return ("attr", None if k is None else int(k))
    value = ctx.const(k_name)
    if value is not None:
        return ("const", int(np.reshape(value, -1)[0]))
    if ctx.is_direct_constant(k_name):
        return ("const?", None)  # an initializer whose bytes are not available (external data)
    if ctx.is_computable(k_name):
        return ("shape", None)
    return ("data", None)


def check_topk_dynamic_k(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    kind, _ = _topk_k(node, ctx)
    k_name = node_input(node, 1)
    if kind == "shape":
        return f"dynamic K: '{k_name}' is computed from tensor shapes with unknown (dynamic) dims, not a build-time constant"
    if kind == "data":
        return f"dynamic K: '{k_name}' comes from runtime data (a graph input or computed values); K must be an initializer"
    return None


def check_topk_k_limit(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    _, k = _topk_k(node, ctx)
    if k is not None and k >= 3840:
        return f"K = {k}, but TensorRT's TopK requires K < 3840"
    return None


def check_topk_k_unknown(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    kind, _ = _topk_k(node, ctx)
    if kind == "const?":
        return (
            f"K is an initializer ('{node_input(node, 1)}') whose value could not be read (external data); "
            "the K < 3840 bound was not checked"
        )
    return None


def check_topk_sorted(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    if attr(node, "sorted", 1) == 0:
        return "sorted=0, but TensorRT's TopK requires sorted=1"
    return None


def check_topk_type(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    t = ctx.elem_type(node_input(node, 0))
    if t is not None and t not in TOPK_TYPES:
        return f"TopK input is {helper.tensor_dtype_to_string(t)}; TensorRT's TopK takes FP32, FP16, BF16, INT32, INT64"
    return None


# -- Scatter ------------------------------------------------------------------------------------------


def check_scatternd_reduction(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    r = attr_str(node, "reduction", "none")
    if r != "none":
        return f"ScatterND reduction='{r}': TensorRT supports ScatterND only without reduction"
    return None


def check_scatternd_reduction_attr(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    if attr(node, "reduction", None) is not None and attr_str(node, "reduction", "none") == "none":
        return (
            "ScatterND carries an explicit reduction='none' attribute: the 10.1 parser rejects any `reduction` "
            "attribute (changelog: 'Fixed support for opset 18+ ScatterND' only in 10.9)"
        )
    return None


def check_scatter_elements_reduction(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    r = attr_str(node, "reduction", "none")
    if r == "none":
        return None
    if r not in SCATTER_PLUGIN_REDUCTIONS:
        return f"{node.op_type} reduction='{r}' is not one of none/add/mul/max/min"
    data_t, index_t = ctx.elem_type(node_input(node, 0)), ctx.elem_type(node_input(node, 1))
    if data_t in (TensorProto.BFLOAT16, TensorProto.INT8):
        dtype = helper.tensor_dtype_to_string(data_t)
        return (
            f"reduction='{r}' runs in TensorRT's scatterElements plugin, which does not support {dtype} data"
        )
    if index_t == TensorProto.INT32:
        return f"reduction='{r}' runs in TensorRT's scatterElements plugin, which only takes INT64 indices"
    return None


def check_scatter_elements_plugin(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    r = attr_str(node, "reduction", "none")
    if r in SCATTER_PLUGIN_REDUCTIONS:
        return (
            f"reduction='{r}' is not done by TensorRT core but by the scatterElements plugin (libnvinfer_plugin must "
            "be loaded when building; parser support since 10.0): not verified on TensorRT in this project"
        )
    return None


# -- opset-23 ops' documented restrictions ------------------------------------------------------------


def check_attention(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    problems = []
    for i, name in ((4, "past_key"), (5, "past_value"), (6, "nonpad_kv_seqlen")):
        if node_input(node, i):
            problems.append(f"input {name}")
    for i, name in ((1, "present_key"), (2, "present_value"), (3, "qk_matmul_output")):
        if len(node.output) > i and node.output[i]:
            problems.append(f"output {name}")
    # The exporter writes both attributes with their defaults (0); only other values are flagged.
    for a in ("qk_matmul_output_mode", "softcap"):
        if attr(node, a, 0):
            problems.append(f"attribute {a}={attr(node, a)}")
    for i, name in ((0, "Q"), (1, "K"), (2, "V"), (3, "attn_mask")):
        d = ctx.dims(node_input(node, i)) if node_input(node, i) else None
        if d is not None and len(d) != 4:
            problems.append(f"{name} of rank {len(d)} (must be 4D)")
    if problems:
        return "TensorRT's Attention does not support: " + ", ".join(problems)
    return None


def check_tensor_scatter(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    problems = []
    if attr(node, "axis", -2) != -2:
        problems.append(f"axis={attr(node, 'axis')} (must be -2)")
    for i, name in ((0, "past_cache"), (1, "update")):
        d = ctx.dims(node_input(node, i))
        if d is not None and len(d) != 4:
            problems.append(f"{name} of rank {len(d)} (must be 4D)")
    return "TensorRT's TensorScatter does not support: " + ", ".join(problems) if problems else None


# -- other documented restrictions --------------------------------------------------------------------


def check_double_node(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    op = node.op_type
    if op == "Cast" and attr(node, "to") == TensorProto.DOUBLE:
        return "Cast to DOUBLE (float64): TensorRT's Cast does not produce DOUBLE"
    if op == "CastLike" and ctx.elem_type(node_input(node, 1)) == TensorProto.DOUBLE:
        return "CastLike to DOUBLE (float64): TensorRT's CastLike does not produce DOUBLE"
    if op in ("Constant", "ConstantOfShape"):
        v = attr(node, "value", None)
        if isinstance(v, TensorProto) and v.data_type == TensorProto.DOUBLE:
            return f"{op} holds a DOUBLE (float64) value"
    if op in DTYPE_ATTR_OPS and attr(node, "dtype", None) == TensorProto.DOUBLE:
        return f"{op} produces DOUBLE (float64) (dtype attribute)"
    return None


def check_loop(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    body = attr(node, "body", None)
    if body is None:
        return None
    n_carried = max(len(body.input) - 2, 0)
    n_scan = len(node.output) - n_carried
    trip = node_input(node, 0)
    if n_scan > 0 and (not trip or ctx.const(trip) is None):
        return (
            "Loop has scan outputs but no constant trip count: TensorRT requires a static scan-output length"
        )
    return None


def check_if(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    then_b, else_b = attr(node, "then_branch", None), attr(node, "else_branch", None)
    if then_b is None or else_b is None:
        return None
    for i, (a, b) in enumerate(zip(then_b.output, else_b.output, strict=False)):
        ra = len(a.type.tensor_type.shape.dim) if a.type.tensor_type.HasField("shape") else None
        rb = len(b.type.tensor_type.shape.dim) if b.type.tensor_type.HasField("shape") else None
        if ra is not None and rb is not None and ra != rb:
            return (
                f"If output {i}: then-branch rank {ra} != else-branch rank {rb}; TensorRT needs equal ranks"
            )
    return None


def check_resize(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    problems = []
    mode = attr_str(node, "mode", "nearest")
    if mode not in ("nearest", "linear"):
        problems.append(f"mode='{mode}'")
    ctm = attr_str(node, "coordinate_transformation_mode", "half_pixel")
    if ctm not in ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"):
        problems.append(f"coordinate_transformation_mode='{ctm}'")
    nm = attr_str(node, "nearest_mode", "round_prefer_floor")
    if mode == "nearest" and nm not in ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil"):
        problems.append(f"nearest_mode='{nm}'")
    if attr(node, "antialias", 0):
        problems.append("antialias=1")
    policy = attr_str(node, "keep_aspect_ratio_policy", "stretch")
    if policy != "stretch":
        problems.append(f"keep_aspect_ratio_policy='{policy}'")
    return "TensorRT's Resize does not support " + ", ".join(problems) if problems else None


def check_layernorm_outputs(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    used = [o for o in node.output[1:] if ctx.is_used(o)]
    if used:
        return f"LayerNormalization's Mean/InvStdDev outputs are used ({', '.join(used)}); TensorRT supports only output Y"
    return None
