"""The rule set as data: :data:`RULES`, each :class:`Rule` pairing a check with its op types, severity and source."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from exporter.lint.checks import (
    check_attention,
    check_constant_inputs,
    check_data_dependent_op,
    check_double_node,
    check_double_tensor,
    check_if,
    check_late_10x,
    check_layernorm_outputs,
    check_loop,
    check_opset23_op,
    check_opset_all,
    check_opset_max,
    check_opset_min,
    check_random,
    check_resize,
    check_scatter_elements_plugin,
    check_scatter_elements_reduction,
    check_scatternd_reduction,
    check_scatternd_reduction_attr,
    check_shape_inputs,
    check_tensor_scatter,
    check_topk_dynamic_k,
    check_topk_k_limit,
    check_topk_k_unknown,
    check_topk_sorted,
    check_topk_type,
    check_unlisted,
    check_unsupported,
)
from exporter.lint.checks_qdq import (
    check_qdq_block,
    check_qdq_int4,
    check_qdq_per_axis_activation,
    check_qdq_scale,
    check_qdq_uint8,
    check_qdq_zero_point,
)
from exporter.lint.graph import GraphContext
from exporter.lint.tables import (
    CONSTANT_INPUTS,
    DATA_DEPENDENT_OPS,
    DTYPE_ATTR_OPS,
    LATE_10X_OPS,
    OPSET23_OPS,
    RANDOM_OPS,
    SHAPE_INPUTS,
    SRC_CHANGELOG,
    SRC_DDS,
    SRC_DOUBLE,
    SRC_INT4_WOQ,
    SRC_PARSER_101,
    SRC_QDQ_OPS,
    SRC_QDQ_PARSER,
    SRC_RANDOM,
    SRC_SCATTER_PLUGIN,
    SRC_TABLE_101,
    SRC_TABLE_1015,
    SRC_TOPK_K,
    SRC_TOPK_LIMIT,
    SRC_TRT11_OPSET,
    TARGETS,
    UNSUPPORTED_OPS,
)

#: A check takes (node | tensor | model, GraphContext) and returns a reason, or None when it passes.
Check = Callable[[Any, GraphContext], "str | None"]


@dataclass(frozen=True)
class Rule:
    """One fact about what TensorRT accepts, as data.

    scope: "node" (checked on every node whose op type is in ``op_types``; empty = every node),
    "tensor" (graph inputs/outputs/initializers, item = (kind, ValueInfoProto | TensorProto)) or
    "model" (once per model, item = the ModelProto). targets: the targets the rule applies to.
    """

    rule_id: str
    op_types: frozenset[str]
    check: Check
    severity: str
    source: str
    scope: str = "node"
    targets: frozenset[str] = field(default_factory=lambda: frozenset(TARGETS))



def _ops(*names: str) -> frozenset[str]:
    return frozenset(names)


_OPSET_SOURCES = " | ".join(f"{t.name}: {t.opset_source}" for t in TARGETS.values())

#: The rule set. Order is report order within a node.
RULES: tuple[Rule, ...] = (
    # model
    Rule("opset-above-max", frozenset(), check_opset_max, "error", _OPSET_SOURCES, scope="model"),
    Rule(
        "opset-above-all-releases",
        frozenset(),
        check_opset_all,
        "warning",
        SRC_TABLE_101,
        scope="model",
        targets=frozenset({"trt10"}),
    ),
    Rule(
        "opset-below-min",
        frozenset(),
        check_opset_min,
        "error",
        f"{SRC_TABLE_1015}; {SRC_TRT11_OPSET}",
        scope="model",
    ),
    # tensors
    Rule("double-tensor", frozenset(), check_double_tensor, "error", SRC_DOUBLE, scope="tensor"),
    # support status
    Rule("unsupported-op", UNSUPPORTED_OPS, check_unsupported, "error", f"{SRC_TABLE_1015} (rows marked N)"),
    Rule("random-op", RANDOM_OPS, check_random, "error", SRC_RANDOM),
    Rule(
        "data-dependent-op",
        DATA_DEPENDENT_OPS,
        check_data_dependent_op,
        "error",
        f"{SRC_TABLE_1015} (NonZero, NonMaxSuppression: Y); {SRC_DDS}",
    ),
    Rule(
        "opset23-op",
        frozenset(OPSET23_OPS),
        check_opset23_op,
        "error",
        f"{SRC_TABLE_101} (no such rows); {SRC_CHANGELOG}: Attention added in 10.14, RotaryEmbedding/"
        "RMSNormalization/TensorScatter in 10.15",
        targets=frozenset({"trt10"}),
    ),
    Rule(
        "late-10x-op",
        frozenset(LATE_10X_OPS),
        check_late_10x,
        "warning",
        f"{SRC_TABLE_101}; {SRC_CHANGELOG}",
        targets=frozenset({"trt10"}),
    ),
    Rule(
        "unlisted-op",
        frozenset(),
        check_unlisted,
        "warning",
        f"{SRC_TABLE_1015}; custom domains: onnx-tensorrt README/changelog (plugins, local functions)",
    ),
    # shapes that depend on data
    Rule("data-dependent-shape", frozenset(SHAPE_INPUTS), check_shape_inputs, "error", SRC_DDS),
    Rule(
        "constant-input",
        frozenset(CONSTANT_INPUTS),
        check_constant_inputs,
        "error",
        f"{SRC_TABLE_1015} (Restrictions column)",
    ),
    # TopK
    Rule("topk-dynamic-k", _ops("TopK"), check_topk_dynamic_k, "error", SRC_TOPK_K),
    Rule("topk-k-limit", _ops("TopK"), check_topk_k_limit, "error", SRC_TOPK_LIMIT),
    Rule("topk-k-unreadable", _ops("TopK"), check_topk_k_unknown, "warning", SRC_TOPK_LIMIT),
    Rule(
        "topk-sorted",
        _ops("TopK"),
        check_topk_sorted,
        "error",
        f"{SRC_TABLE_1015}: TopK '`sorted` must be 1'",
    ),
    Rule(
        "topk-type",
        _ops("TopK"),
        check_topk_type,
        "error",
        f"{SRC_TABLE_1015}: TopK types FP32, FP16, BF16, INT32, INT64",
    ),
    # Scatter
    Rule(
        "scatternd-reduction",
        _ops("ScatterND"),
        check_scatternd_reduction,
        "error",
        f"{SRC_TABLE_1015}: ScatterND '`reduction` other than `none` is not supported'",
    ),
    Rule(
        "scatternd-reduction-attr",
        _ops("ScatterND"),
        check_scatternd_reduction_attr,
        "warning",
        f'{SRC_PARSER_101}: ScatterND importer asserts !attrs.count("reduction"); {SRC_CHANGELOG} (10.9)',
        targets=frozenset({"trt10"}),
    ),
    Rule(
        "scatter-elements-reduction",
        _ops("ScatterElements", "Scatter"),
        check_scatter_elements_reduction,
        "error",
        f"{SRC_SCATTER_PLUGIN}; {SRC_PARSER_101}: ScatterElements with reduction != 'none' -> scatterPluginHelper",
    ),
    Rule(
        "scatter-elements-plugin",
        _ops("ScatterElements", "Scatter"),
        check_scatter_elements_plugin,
        "warning",
        f"{SRC_PARSER_101} (scatterPluginHelper, plugin 'ScatterElements' v1); {SRC_SCATTER_PLUGIN}; "
        f"{SRC_CHANGELOG} (10.0 EA: reduction support; 10.3: updated plugin)",
    ),
    # documented restrictions of other ops
    Rule(
        "double-op",
        _ops("Cast", "CastLike", "Constant", "ConstantOfShape", *DTYPE_ATTR_OPS),
        check_double_node,
        "error",
        SRC_DOUBLE,
    ),
    Rule(
        "attention-restrictions",
        _ops("Attention"),
        check_attention,
        "error",
        f"{SRC_TABLE_1015}: Attention restrictions",
    ),
    Rule(
        "tensorscatter-restrictions",
        _ops("TensorScatter"),
        check_tensor_scatter,
        "error",
        f"{SRC_TABLE_1015}: TensorScatter restrictions",
    ),
    Rule(
        "loop-scan-output",
        _ops("Loop"),
        check_loop,
        "error",
        f"{SRC_TABLE_1015}: Loop 'Scan output length cannot be dynamic'",
    ),
    Rule(
        "if-branch-rank",
        _ops("If"),
        check_if,
        "error",
        f"{SRC_TABLE_1015}: If branches 'must have the same rank'",
    ),
    Rule("resize-mode", _ops("Resize"), check_resize, "error", f"{SRC_TABLE_1015}: Resize supported modes"),
    # explicit quantization
    Rule("qdq-scale-constant", _ops("QuantizeLinear", "DequantizeLinear"), check_qdq_scale, "error", f"{SRC_QDQ_OPS}; {SRC_QDQ_PARSER}"),
    Rule("qdq-zero-point", _ops("QuantizeLinear", "DequantizeLinear"), check_qdq_zero_point, "error", f"{SRC_QDQ_OPS}; {SRC_QDQ_PARSER}"),
    Rule("qdq-uint8", _ops("QuantizeLinear", "DequantizeLinear"), check_qdq_uint8, "warning", SRC_QDQ_PARSER),
    Rule("qdq-block", _ops("QuantizeLinear", "DequantizeLinear"), check_qdq_block, "error", f"{SRC_QDQ_PARSER}; {SRC_INT4_WOQ}"),
    Rule("qdq-int4", _ops("QuantizeLinear", "DequantizeLinear"), check_qdq_int4, "error", f"{SRC_INT4_WOQ}; {SRC_QDQ_PARSER}"),
    Rule("qdq-per-axis-activation", _ops("QuantizeLinear"), check_qdq_per_axis_activation, "warning", SRC_QDQ_PARSER),
    Rule(
        "layernorm-outputs",
        _ops("LayerNormalization"),
        check_layernorm_outputs,
        "error",
        f"{SRC_TABLE_1015}: LayerNormalization 'Only the first output `Y` is supported'",
    ),
)
