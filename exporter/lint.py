"""Static lint of exported ONNX graphs for what TensorRT's ONNX parser would reject (or we must not ship).

TensorRT cannot be installed on the development machines (EXPORT_NOTES.md §1), so this lint is how graphs
that TensorRT 10 / 11 would refuse are caught before a GPU machine sees them. Everything is static: the
graph is read without its weights (``load_external_data=False``), ONNX shape inference fills in types where
it can, and a small constant folder resolves index/shape inputs such as TopK's ``K``.

The rules are data: :data:`RULES` is a tuple of :class:`Rule`, each naming the op types it applies to, a
check ``(item, GraphContext) -> reason | None``, a severity and the ``source`` of the fact it enforces.
The facts come from the ONNX-TensorRT operator support matrix (``onnx/onnx-tensorrt`` ``docs/operators.md``;
the TensorRT 10.15 table and the ``release/10.1-GA`` table), the ONNX-TensorRT changelog, the parser source
at ``release/10.1-GA``, the TensorRT scatterElements plugin README and NVIDIA's ONNX opset guide. Where a
rule goes beyond what TensorRT documents (our static-shape, deterministic requirement) the reason says so.

Targets: ``"trt10"`` (default; TensorRT 10.x, including JetPack's older 10.x parsers) and ``"trt11"``.
No operator table for TensorRT 11 was available; trt11 reuses the 10.15 table (the newest one read) and only
its opset ceiling differs (documented in :data:`TARGETS`).

What the lint cannot see: numeric problems. The dynamo exporter silently lowers
``scatter_reduce(reduce="mean")`` to ``ScatterElements(reduction="none")`` (ANCHORS.md Appendix A): that
graph is valid and lints clean, and only a numeric comparison against PyTorch finds it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

# ----------------------------------------------------------------------------------------------------
# Sources (where each fact comes from)
# ----------------------------------------------------------------------------------------------------

SRC_TABLE_1015 = (
    "onnx/onnx-tensorrt docs/operators.md, TensorRT 10.15 operator support matrix "
    "('supports operators in the inclusive range of opset 9 to opset 24')"
)
SRC_TABLE_101 = (
    "onnx/onnx-tensorrt docs/operators.md at release/10.1-GA (96e7811) and 10.0-GA: "
    "'TensorRT 10.0 supports operators in the inclusive range of opset 9 to opset 20'"
)
SRC_PARSER_101 = "onnx/onnx-tensorrt onnxOpImporters.cpp at release/10.1-GA (96e7811)"
SRC_CHANGELOG = "onnx/onnx-tensorrt docs/Changelog.md (TensorRT 8.6 EA ... 10.15 GA entries)"
SRC_SCATTER_PLUGIN = "NVIDIA/TensorRT plugin/scatterElementsPlugin/README.md (Parameters, Known issues)"
SRC_TRT11_OPSET = (
    "NVIDIA TensorRT docs, ONNX Opset Guide "
    "(docs.nvidia.com/deeplearning/tensorrt/latest/reference/onnx-opset-guide.html): "
    "TensorRT 11.x maximum opset 25, minimum 9"
)
SRC_DDS = (
    "NVIDIA/TensorRT#3372 and #3903 ('ForeignNode does not support data-dependent shape', TensorRT 10.0); "
    "project rule: fixed-budget static shapes (ANCHORS.md §3 pain point 9)"
)
SRC_TOPK_K = (
    "TensorRT <= 8.5 tables: 'K input must be an initializer' (onnx-tensorrt#455, NVIDIA/TensorRT#2721, #1764); "
    "changelog 8.6 EA adds tensor K; project rule: K must be a build-time constant (ANCHORS.md §3 #9)"
)
SRC_TOPK_LIMIT = (
    "onnx/onnx-tensorrt docs/operators.md, TensorRT 10.1 and 10.15 tables: TopK '`K` input must be less than "
    "3840' (the ITopKLayer::setK API doc says 'up to 3840'; the stricter bound is used)"
)
SRC_RANDOM = (
    "onnx/onnx-tensorrt docs/operators.md, TensorRT 10.15 table: RandomNormal/RandomUniform(+Like) Y with "
    "'`seed` value is ignored by TensorRT', Bernoulli and Multinomial N; project rule: deterministic graphs "
    "(ANCHORS.md Appendix A: torch.rand tie-breaks export as RandomUniformLike)"
)
SRC_DOUBLE = (
    "onnx/onnx-tensorrt docs/operators.md, TensorRT 10.15 table: 'limited support for DOUBLE type. TensorRT "
    "will attempt to cast DOUBLE down to FLOAT, clamping values'; Cast/CastLike supported types omit DOUBLE"
)

SRC_QDQ_OPS = (
    "NVIDIA TensorRT docs, operators Quantize/Dequantize (docs.nvidia.com/deeplearning/tensorrt/latest/_static/"
    "operators/Quantize.html): 'The scale tensor must be a build-time constant', 'The zero_point must only contain "
    "zero-valued coefficients'; onnx/onnx-tensorrt docs/operators.md (10.1-GA): DequantizeLinear INT8, FP8, INT4 "
    "'`x_zero_point` must be zero', QuantizeLinear '`y_zero_point` must be 0'"
)
SRC_QDQ_PARSER = (
    "onnx/onnx-tensorrt onnxOpImporters.cpp QuantDequantLinearHelper at release/10.1-GA (96e7811): 'Dynamic shape "
    "for scale tensor is not supported', 'TensorRT only supports symmetric quantization', UINT8 zero point -> "
    "'TensorRT will use INT8 instead', block quantization: 'Only a single blocking dimension is allowed', "
    "'Inferred block size is not an integer', 'Quantization to INT4 is not supported for tensors with an odd "
    "last dimension'; per-axis scales are assumed to be weights ('Activations-quantization does not support "
    "per-axis quantization')"
)
SRC_INT4_WOQ = (
    "NVIDIA TensorRT docs, Working with Quantized Types: 'INT4 (signed 4-bit integer, weight-only quantization)'; "
    "Explicit Quantization: 'When using pre-quantized weights, an IDequantizeLayer is required between the weights "
    "and the linear operator that uses them'"
)


# ----------------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetSpec:
    """What a TensorRT major version's ONNX parser accepts, as far as the lint checks it.

    min_opset / max_opset: outside this range no release of the major parses the model (error).
    max_opset_all: the highest opset that *every* release of the major accepts; above it, older
    releases (e.g. JetPack's 10.x) refuse the model (warning).
    """

    name: str
    min_opset: int
    max_opset: int
    max_opset_all: int
    opset_source: str
    opset23_ops_ok: bool


TARGETS: dict[str, TargetSpec] = {
    "trt10": TargetSpec(
        name="trt10",
        min_opset=9,
        max_opset=24,
        max_opset_all=20,
        opset_source=(
            f"{SRC_TABLE_1015}; {SRC_TABLE_101}. The ranges of 10.2-10.14 (JetPack 6 ships 10.3) were not "
            "found; every 10.x is assumed to accept opset <= 20"
        ),
        opset23_ops_ok=False,
    ),
    "trt11": TargetSpec(
        name="trt11",
        min_opset=9,
        max_opset=25,
        max_opset_all=25,
        opset_source=(
            f"{SRC_TRT11_OPSET}. No TensorRT 11 operator table was available: op rules reuse the 10.15 table "
            "(assumed)"
        ),
        opset23_ops_ok=True,
    ),
}


# ----------------------------------------------------------------------------------------------------
# Operator tables (data, transcribed from the ONNX-TensorRT support matrices)
# ----------------------------------------------------------------------------------------------------

#: Every operator named in the ONNX-TensorRT table (10.1-GA table, plus the rows the 10.15 table adds).
LISTED_OPS = frozenset(
    """
    Abs Acos Acosh Add AffineGrid And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
    Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor BlackmanWindow Cast CastLike Ceil Celu
    CenterCropPad Clip Col2Im Compress Concat ConcatFromSequence Constant ConstantOfShape Conv ConvInteger
    ConvTranspose Cos Cosh CumSum DFT DeformConv DepthToSpace DequantizeLinear Det Div Dropout
    DynamicQuantizeLinear Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor GRU Gather GatherElements
    GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
    GroupNormalization HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If ImageDecoder
    ImageScaler InstanceNormalization IsInf IsNaN LRN LSTM LayerNormalization LeakyRelu Less LessOrEqual Log
    LogSoftmax Loop LpNormalization LpPool MatMul MatMulInteger Max MaxPool MaxRoiPool MaxUnpool Mean
    MeanVarianceNormalization MelWeightMatrix Min Mish Mod Mul Multinomial Neg NegativeLogLikelihoodLoss
    NonMaxSuppression NonZero Not OneHot Optional OptionalGetElement OptionalHasElement Or PRelu Pad
    ParametricSoftplus Pow QLinearConv QLinearMatMul QuantizeLinear RNN RandomNormal RandomNormalLike
    RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
    ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare RegexFullMatch Relu Reshape Resize
    ReverseSequence RoiAlign Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu SequenceAt
    SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength SequenceMap Shape Shrink
    Sigmoid Sign Sin Sinh Size Slice Softmax SoftmaxCrossEntropyLoss Softplus Softsign SpaceToDepth Split
    SplitToSequence Sqrt Squeeze StringConcat StringNormalizer StringSplit Sub Sum Tan Tanh TfIdfVectorizer
    ThresholdedRelu Tile TopK Transpose Trilu Unique Unsqueeze Upsample Where Xor
    Attention RMSNormalization RotaryEmbedding TensorScatter
    """.split()
)

#: Rows marked N in the TensorRT 10.15 table (all of them are N in the 10.1 table too).
UNSUPPORTED_OPS = frozenset(
    """
    AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad Compress
    ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger MaxRoiPool
    MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement
    OptionalHasElement QLinearConv QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty
    SequenceErase SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence
    StringConcat StringNormalizer StringSplit TfIdfVectorizer Unique
    """.split()
)

#: N in the 10.0/10.1 tables, Y in 10.15 (changelog: windows added in 10.4, real STFT in 10.5).
LATE_10X_OPS = {"BlackmanWindow": "10.4", "HammingWindow": "10.4", "HannWindow": "10.4", "STFT": "10.5"}

#: Ops that only exist from opset 23/24 on, with the TensorRT release whose changelog adds them.
OPSET23_OPS = {
    "Attention": "10.14",
    "RotaryEmbedding": "10.15",
    "RMSNormalization": "10.15",
    "TensorScatter": "10.15",
}

RANDOM_OPS = frozenset(
    {"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Multinomial", "Bernoulli"}
)

#: Ops whose output shape depends on input *values* (data-dependent shapes), and not in UNSUPPORTED_OPS.
DATA_DEPENDENT_OPS = frozenset({"NonZero", "NonMaxSuppression"})

#: Inputs whose values set an output shape: (op) -> input indices. A value computed from runtime data
#: there makes the output shape data-dependent. (TopK's K has its own rules; Reduce* axes are in
#: CONSTANT_INPUTS.)
SHAPE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "Slice": (1, 2, 3, 4),
    "Range": (0, 1, 2),
    "ConstantOfShape": (0,),
    "OneHot": (1,),
    "Resize": (2, 3),
    "Upsample": (1,),
    "Pad": (1, 3),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "Split": (1,),
}

_REDUCE_OPS = (
    "ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum "
    "ReduceSumSquare"
).split()

#: Inputs the 10.15 table requires to be constant: op -> (input index, input name, strict, table wording).
#: strict: an initializer or a Constant node's output; otherwise any build-time-foldable value.
CONSTANT_INPUTS: dict[str, tuple[int, str, bool, str]] = {
    **{op: (1, "axes", True, "`axes` must be an initializer") for op in _REDUCE_OPS},
    "CumSum": (1, "axis", False, "`axis` must be a build-time constant"),
    "OneHot": (1, "depth", False, "`depth` must be a build-time constant"),
}

_TOPK_TYPES = {
    TensorProto.FLOAT,
    TensorProto.FLOAT16,
    TensorProto.BFLOAT16,
    TensorProto.INT32,
    TensorProto.INT64,
}
_SCATTER_PLUGIN_REDUCTIONS = ("add", "mul", "max", "min")
_DTYPE_ATTR_OPS = RANDOM_OPS | {"EyeLike"}
_CONTROL_FLOW = ("If", "Loop", "Scan")

_CONST_FOLD_LIMIT = 4096  # elements; bigger values are never materialised by the lint


# ----------------------------------------------------------------------------------------------------
# Findings
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LintFinding:
    rule_id: str
    severity: str  # "error" | "warning"
    node_name: str
    op_type: str
    reason: str
    source: str
    graph_file: str


# ----------------------------------------------------------------------------------------------------
# Graph context: scopes (main graph, If/Loop/Scan bodies, local-function bodies) with value facts
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Facts:
    """What the lint knows about one value name in one scope."""

    kind: str  # "input" | "initializer" | "node" | "formal"
    producer: onnx.NodeProto | None = None
    initializer: TensorProto | None = None
    computable: bool = False  # derivable at build time from constants and tensor shapes only
    const: np.ndarray | None = None  # folded value, when small and derivable from constants alone


class GraphContext:
    """One scope of a model: the main graph, a control-flow body or a local function's body at one call site.

    Rules query value facts through it (``const``, ``is_computable``, ``elem_type``, ``dims``); names not
    defined in this scope resolve through the enclosing scope (subgraphs) or the call site (functions).
    """

    def __init__(
        self,
        *,
        target: TargetSpec,
        opset: int,
        functions: dict[tuple[str, str], onnx.FunctionProto],
        graph_file: str,
        base_dir: str | None,
        scope: str,
        nodes: Sequence[onnx.NodeProto],
        graph: onnx.GraphProto | None = None,
        parent: GraphContext | None = None,
        formals: dict[str, tuple[GraphContext, str]] | None = None,
        depth: int = 0,
        weight_inputs: frozenset[str] = frozenset(),
    ) -> None:
        self.weight_inputs = weight_inputs
        self.target = target
        self.opset = opset
        self.functions = functions
        self.graph_file = graph_file
        self.base_dir = base_dir
        self.scope = scope
        self.nodes = list(nodes)
        self.graph = graph
        self.parent = parent
        self.formals = formals or {}
        self.depth = depth
        self.facts: dict[str, _Facts] = {}
        self.types: dict[str, onnx.TypeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.graph_outputs: set[str] = set()
        self._index()

    # -- construction ------------------------------------------------------------------------------

    def _index(self) -> None:
        g = self.graph
        if g is not None:
            for vi in list(g.input) + list(g.output) + list(g.value_info):
                if vi.type.HasField("tensor_type"):
                    self.types[vi.name] = vi.type
            for t in g.initializer:
                self.facts[t.name] = _Facts("initializer", initializer=t, computable=True)
                self.types[t.name] = helper.make_tensor_type_proto(t.data_type, list(t.dims))
            for vi in g.input:
                # An input that is also an initializer (IR < 4 style) is imported as weights by the parser.
                if vi.name not in self.facts:
                    # weights carried as inputs (a --graph-only export) are build-time constants
                    self.facts[vi.name] = _Facts("input", computable=vi.name in self.weight_inputs)
            self.graph_outputs = {o.name for o in g.output}
        for name in self.formals:
            self.facts[name] = _Facts("formal")
        for node in self.nodes:
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)
        for node in self.nodes:  # topological order (an ONNX requirement), so one forward pass suffices
            self._propagate(node)

    def _propagate(self, node: onnx.NodeProto) -> None:
        ins = [n for n in node.input if n]
        op = node.op_type
        std = node.domain in ("", "ai.onnx")
        if std and op in ("Constant", "Shape", "Size"):
            computable = True
        elif std and (
            op in RANDOM_OPS or op in DATA_DEPENDENT_OPS or op in UNSUPPORTED_OPS or op in _CONTROL_FLOW
        ):
            computable = False
        else:
            computable = all(self.is_computable(n) for n in ins) and (bool(ins) or not std)
        const = None
        if computable and std:
            try:
                const = _fold(node, self)
            except Exception:  # a malformed constant chain is not the lint's business
                const = None
        for i, out in enumerate(node.output):
            if out:
                value = const[i] if const is not None and i < len(const) else None
                self.facts[out] = _Facts("node", producer=node, computable=computable, const=value)

    # -- lookups -----------------------------------------------------------------------------------

    def _resolve(self, name: str) -> tuple[GraphContext, str] | None:
        if name in self.formals:
            caller, actual = self.formals[name]
            return caller._resolve(actual) if actual else None
        if name in self.facts:
            return self, name
        if self.parent is not None:
            return self.parent._resolve(name)
        return None

    def fact(self, name: str) -> _Facts | None:
        hit = self._resolve(name)
        return None if hit is None else hit[0].facts.get(hit[1])

    def is_computable(self, name: str) -> bool:
        """True if the value can be derived at build time from constants and tensor shapes (no runtime data)."""
        f = self.fact(name)
        return f is not None and f.computable

    def is_direct_constant(self, name: str) -> bool:
        """An initializer or a Constant node's output (what the parser imports as weights)."""
        f = self.fact(name)
        if f is None:
            return False
        if f.kind == "initializer":
            return True
        return f.kind == "node" and f.producer is not None and f.producer.op_type == "Constant"

    def const(self, name: str) -> np.ndarray | None:
        """The folded value of a small constant (initializer, Constant, or a simple chain of them)."""
        hit = self._resolve(name)
        if hit is None:
            return None
        scope, real = hit
        f = scope.facts.get(real)
        if f is None:
            return None
        if f.kind == "initializer" and f.const is None and f.initializer is not None:
            f.const = scope._load_initializer(f.initializer)
        return f.const

    def _load_initializer(self, t: TensorProto) -> np.ndarray | None:
        if int(np.prod(t.dims, dtype=np.int64)) > _CONST_FOLD_LIMIT:
            return None
        external = t.data_location == TensorProto.EXTERNAL
        if external and self.base_dir is None:
            return None
        try:
            return numpy_helper.to_array(t, base_dir=self.base_dir or "")
        except Exception:  # missing .data file and the like: the value stays unknown
            return None

    def elem_type(self, name: str) -> int | None:
        hit = self._resolve(name)
        if hit is None:
            return None
        scope, real = hit
        t = scope.types.get(real)
        if t is not None and t.HasField("tensor_type") and t.tensor_type.elem_type:
            return t.tensor_type.elem_type
        f = scope.facts.get(real)
        if f is not None and f.const is not None:
            try:
                return helper.np_dtype_to_tensor_dtype(f.const.dtype)
            except Exception:
                return None
        return None

    def dims(self, name: str) -> list[int | None] | None:
        """Static dims where known (None for a symbolic/unknown dim); None if the rank is unknown."""
        hit = self._resolve(name)
        if hit is None:
            return None
        scope, real = hit
        t = scope.types.get(real)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim]

    def is_function_call(self, node: onnx.NodeProto) -> bool:
        return (node.domain, node.op_type) in self.functions

    def is_used(self, name: str) -> bool:
        return bool(name) and (name in self.graph_outputs or bool(self.consumers.get(name)))


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _attr_str(node: onnx.NodeProto, name: str, default: str) -> str:
    v = _attr(node, name, default)
    return v.decode() if isinstance(v, bytes) else str(v)


def _in(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


# ----------------------------------------------------------------------------------------------------
# Constant folding (small, exact, only the ops that build index/shape values)
# ----------------------------------------------------------------------------------------------------


def _fold(node: onnx.NodeProto, ctx: GraphContext) -> list[np.ndarray] | None:
    op = node.op_type
    if op == "Constant":
        for a in node.attribute:
            if a.name == "value":
                return [numpy_helper.to_array(a.t)]
            if a.name == "value_int":
                return [np.array(a.i, dtype=np.int64)]
            if a.name == "value_ints":
                return [np.array(list(a.ints), dtype=np.int64)]
            if a.name == "value_float":
                return [np.array(a.f, dtype=np.float32)]
            if a.name == "value_floats":
                return [np.array(list(a.floats), dtype=np.float32)]
        return None
    if op in ("Shape", "Size"):
        dims = ctx.dims(_in(node, 0))
        if dims is None or any(d is None for d in dims):
            return None
        if op == "Size":
            return [np.array(int(np.prod(dims, dtype=np.int64)), dtype=np.int64)]
        start, end = _attr(node, "start", 0), _attr(node, "end", None)
        return [np.array(dims[start:end], dtype=np.int64)]
    vals = [ctx.const(n) if n else None for n in node.input]
    if any(v is None for n, v in zip(node.input, vals, strict=True) if n):
        return None
    if any(v is not None and v.size > _CONST_FOLD_LIMIT for v in vals):
        return None
    x = vals[0] if vals else None
    if op == "Identity":
        return [x]
    if op == "Cast":
        return [x.astype(helper.tensor_dtype_to_np_dtype(_attr(node, "to")))]
    if op == "Neg":
        return [-x]
    if op in ("Add", "Sub", "Mul", "Div"):
        a, b = vals[0], vals[1]
        if op == "Div" and np.issubdtype(np.result_type(a, b), np.integer):
            return [np.trunc(np.true_divide(a, b)).astype(np.result_type(a, b))]
        return [{"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op](a, b)]
    if op == "Reshape":
        shape = [int(s) for s in vals[1].reshape(-1)]
        if not _attr(node, "allowzero", 0):
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return [x.reshape(shape)]
    if op in ("Unsqueeze", "Squeeze"):
        axes = vals[1] if len(vals) > 1 and vals[1] is not None else _attr(node, "axes", None)
        if op == "Squeeze":
            return [
                np.squeeze(x)
                if axes is None
                else np.squeeze(x, axis=tuple(int(a) for a in np.reshape(axes, -1)))
            ]
        rank = x.ndim + len(np.reshape(axes, -1))
        out = x
        for a in sorted(int(a) % rank for a in np.reshape(axes, -1)):
            out = np.expand_dims(out, a)
        return [out]
    if op == "Concat":
        return [np.concatenate([v for v in vals if v is not None], axis=_attr(node, "axis", 0))]
    if op == "Gather":
        return [np.take(x, vals[1], axis=_attr(node, "axis", 0))]
    if op == "Slice":
        starts, ends = vals[1].reshape(-1), vals[2].reshape(-1)
        axes = vals[3].reshape(-1) if len(vals) > 3 and vals[3] is not None else np.arange(len(starts))
        steps = (
            vals[4].reshape(-1) if len(vals) > 4 and vals[4] is not None else np.ones(len(starts), np.int64)
        )
        index = [slice(None)] * x.ndim
        for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
            index[int(a)] = slice(int(s), int(e), int(st))
        return [x[tuple(index)]]
    return None


# ----------------------------------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------------------------------

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


# -- model-level ---------------------------------------------------------------------------------------


def _check_opset_max(model: onnx.ModelProto, ctx: GraphContext) -> str | None:
    t = ctx.target
    if ctx.opset > t.max_opset:
        return (
            f"model opset {ctx.opset} is above {t.max_opset}, the highest any {t.name} parser accepts; "
            f"export with opset <= {t.max_opset_all} (default 18)"
        )
    return None


def _check_opset_all(model: onnx.ModelProto, ctx: GraphContext) -> str | None:
    t = ctx.target
    if t.max_opset_all < ctx.opset <= t.max_opset:
        return (
            f"model opset {ctx.opset} is above {t.max_opset_all}: only late {t.name} releases parse it "
            f"(TensorRT 10.0/10.1 stop at opset 20; JetPack's 10.x may too); export with opset <= {t.max_opset_all}"
        )
    return None


def _check_opset_min(model: onnx.ModelProto, ctx: GraphContext) -> str | None:
    if ctx.opset < ctx.target.min_opset:
        return f"model opset {ctx.opset} is below {ctx.target.min_opset}, the lowest the parser supports"
    return None


# -- tensors -----------------------------------------------------------------------------------------


def _check_double_tensor(item: tuple[str, Any], ctx: GraphContext) -> str | None:
    kind, proto = item
    dtype = proto.data_type if isinstance(proto, TensorProto) else proto.type.tensor_type.elem_type
    if dtype == TensorProto.DOUBLE:
        return (
            f"{kind} '{proto.name}' is float64 (DOUBLE): TensorRT only casts it down to FLOAT with clamping; "
            "export float32/float16"
        )
    return None


# -- nodes: support status ---------------------------------------------------------------------------


def _check_unsupported(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    if (
        node.domain not in ("", "ai.onnx")
        or node.op_type not in UNSUPPORTED_OPS
        or node.op_type in RANDOM_OPS
    ):
        return None
    extra = " and its output shape is data-dependent" if node.op_type in ("Unique", "Compress") else ""
    return f"{node.op_type} is marked not supported (N) in the TensorRT operator table{extra}"


def _check_late_10x(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    if node.domain in ("", "ai.onnx") and node.op_type in LATE_10X_OPS:
        return f"{node.op_type} is N in the TensorRT 10.0/10.1 tables; the changelog adds it in {LATE_10X_OPS[node.op_type]}"
    return None


def _check_opset23_op(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    if ctx.target.opset23_ops_ok or node.domain not in ("", "ai.onnx") or node.op_type not in OPSET23_OPS:
        return None
    return (
        f"{node.op_type} needs opset >= 23; TensorRT 10.0/10.1 parse opset <= 20 and the changelog adds "
        f"{node.op_type} only in TensorRT {OPSET23_OPS[node.op_type]}: export with opset 18 for trt10 (it decomposes the op)"
    )


def _check_unlisted(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    if ctx.is_function_call(node):
        return None
    if node.domain not in ("", "ai.onnx"):
        return f"custom-domain op '{node.domain}::{node.op_type}' with no local function: TensorRT needs a plugin for it"
    if node.op_type not in LISTED_OPS:
        return f"{node.op_type} does not appear in the TensorRT operator table (not verified on TensorRT)"
    return None


def _check_random(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    status = "N in the TensorRT table" if node.op_type in UNSUPPORTED_OPS else "TensorRT ignores its seed"
    return (
        f"{node.op_type} is random ({status}): results are not reproducible against PyTorch/ONNX Runtime; "
        "use a deterministic tie-break"
    )


def _check_data_dependent_op(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    return (
        f"{node.op_type}'s output shape depends on the input values (data-dependent shape); the engines here "
        "need static shapes: use a fixed-budget TopK + Gather instead"
    )


def _check_shape_inputs(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    bad = [
        (i, node.input[i])
        for i in SHAPE_INPUTS[node.op_type]
        if _in(node, i) and not ctx.is_computable(node.input[i])
    ]
    if not bad:
        return None
    what = ", ".join(f"input {i} '{name}'" for i, name in bad)
    return (
        f"output shape depends on runtime values: {what} is computed from tensor data (or a graph input), "
        "not from constants and tensor shapes"
    )


def _check_constant_inputs(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    index, name, strict, wording = CONSTANT_INPUTS[node.op_type]
    value = _in(node, index)
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
    k_name = _in(node, 1)
    if not k_name:
        k = _attr(node, "k", None)
        return ("attr", None if k is None else int(k))
    value = ctx.const(k_name)
    if value is not None:
        return ("const", int(np.reshape(value, -1)[0]))
    if ctx.is_direct_constant(k_name):
        return ("const?", None)  # an initializer whose bytes are not available (external data)
    if ctx.is_computable(k_name):
        return ("shape", None)
    return ("data", None)


def _check_topk_dynamic_k(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    kind, _ = _topk_k(node, ctx)
    k_name = _in(node, 1)
    if kind == "shape":
        return f"dynamic K: '{k_name}' is computed from tensor shapes with unknown (dynamic) dims, not a build-time constant"
    if kind == "data":
        return f"dynamic K: '{k_name}' comes from runtime data (a graph input or computed values); K must be an initializer"
    return None


def _check_topk_k_limit(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    _, k = _topk_k(node, ctx)
    if k is not None and k >= 3840:
        return f"K = {k}, but TensorRT's TopK requires K < 3840"
    return None


def _check_topk_k_unknown(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    kind, _ = _topk_k(node, ctx)
    if kind == "const?":
        return (
            f"K is an initializer ('{_in(node, 1)}') whose value could not be read (external data); "
            "the K < 3840 bound was not checked"
        )
    return None


def _check_topk_sorted(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    if _attr(node, "sorted", 1) == 0:
        return "sorted=0, but TensorRT's TopK requires sorted=1"
    return None


def _check_topk_type(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    t = ctx.elem_type(_in(node, 0))
    if t is not None and t not in _TOPK_TYPES:
        return f"TopK input is {helper.tensor_dtype_to_string(t)}; TensorRT's TopK takes FP32, FP16, BF16, INT32, INT64"
    return None


# -- Scatter ------------------------------------------------------------------------------------------


def _check_scatternd_reduction(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    r = _attr_str(node, "reduction", "none")
    if r != "none":
        return f"ScatterND reduction='{r}': TensorRT supports ScatterND only without reduction"
    return None


def _check_scatternd_reduction_attr(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    if _attr(node, "reduction", None) is not None and _attr_str(node, "reduction", "none") == "none":
        return (
            "ScatterND carries an explicit reduction='none' attribute: the 10.1 parser rejects any `reduction` "
            "attribute (changelog: 'Fixed support for opset 18+ ScatterND' only in 10.9)"
        )
    return None


def _check_scatter_elements_reduction(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    r = _attr_str(node, "reduction", "none")
    if r == "none":
        return None
    if r not in _SCATTER_PLUGIN_REDUCTIONS:
        return f"{node.op_type} reduction='{r}' is not one of none/add/mul/max/min"
    data_t, index_t = ctx.elem_type(_in(node, 0)), ctx.elem_type(_in(node, 1))
    if data_t in (TensorProto.BFLOAT16, TensorProto.INT8):
        dtype = helper.tensor_dtype_to_string(data_t)
        return (
            f"reduction='{r}' runs in TensorRT's scatterElements plugin, which does not support {dtype} data"
        )
    if index_t == TensorProto.INT32:
        return f"reduction='{r}' runs in TensorRT's scatterElements plugin, which only takes INT64 indices"
    return None


def _check_scatter_elements_plugin(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    r = _attr_str(node, "reduction", "none")
    if r in _SCATTER_PLUGIN_REDUCTIONS:
        return (
            f"reduction='{r}' is not done by TensorRT core but by the scatterElements plugin (libnvinfer_plugin must "
            "be loaded when building; parser support since 10.0): not verified on TensorRT in this project"
        )
    return None


# -- opset-23 ops' documented restrictions ------------------------------------------------------------


def _check_attention(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    problems = []
    for i, name in ((4, "past_key"), (5, "past_value"), (6, "nonpad_kv_seqlen")):
        if _in(node, i):
            problems.append(f"input {name}")
    for i, name in ((1, "present_key"), (2, "present_value"), (3, "qk_matmul_output")):
        if len(node.output) > i and node.output[i]:
            problems.append(f"output {name}")
    # The exporter writes both attributes with their defaults (0); only other values are flagged.
    for a in ("qk_matmul_output_mode", "softcap"):
        if _attr(node, a, 0):
            problems.append(f"attribute {a}={_attr(node, a)}")
    for i, name in ((0, "Q"), (1, "K"), (2, "V"), (3, "attn_mask")):
        d = ctx.dims(_in(node, i)) if _in(node, i) else None
        if d is not None and len(d) != 4:
            problems.append(f"{name} of rank {len(d)} (must be 4D)")
    if problems:
        return "TensorRT's Attention does not support: " + ", ".join(problems)
    return None


def _check_tensor_scatter(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    problems = []
    if _attr(node, "axis", -2) != -2:
        problems.append(f"axis={_attr(node, 'axis')} (must be -2)")
    for i, name in ((0, "past_cache"), (1, "update")):
        d = ctx.dims(_in(node, i))
        if d is not None and len(d) != 4:
            problems.append(f"{name} of rank {len(d)} (must be 4D)")
    return "TensorRT's TensorScatter does not support: " + ", ".join(problems) if problems else None


# -- other documented restrictions --------------------------------------------------------------------


def _check_double_node(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    op = node.op_type
    if op == "Cast" and _attr(node, "to") == TensorProto.DOUBLE:
        return "Cast to DOUBLE (float64): TensorRT's Cast does not produce DOUBLE"
    if op == "CastLike" and ctx.elem_type(_in(node, 1)) == TensorProto.DOUBLE:
        return "CastLike to DOUBLE (float64): TensorRT's CastLike does not produce DOUBLE"
    if op in ("Constant", "ConstantOfShape"):
        v = _attr(node, "value", None)
        if isinstance(v, TensorProto) and v.data_type == TensorProto.DOUBLE:
            return f"{op} holds a DOUBLE (float64) value"
    if op in _DTYPE_ATTR_OPS and _attr(node, "dtype", None) == TensorProto.DOUBLE:
        return f"{op} produces DOUBLE (float64) (dtype attribute)"
    return None


def _check_loop(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    body = _attr(node, "body", None)
    if body is None:
        return None
    n_carried = max(len(body.input) - 2, 0)
    n_scan = len(node.output) - n_carried
    trip = _in(node, 0)
    if n_scan > 0 and (not trip or ctx.const(trip) is None):
        return (
            "Loop has scan outputs but no constant trip count: TensorRT requires a static scan-output length"
        )
    return None


def _check_if(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    then_b, else_b = _attr(node, "then_branch", None), _attr(node, "else_branch", None)
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


def _check_resize(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    problems = []
    mode = _attr_str(node, "mode", "nearest")
    if mode not in ("nearest", "linear"):
        problems.append(f"mode='{mode}'")
    ctm = _attr_str(node, "coordinate_transformation_mode", "half_pixel")
    if ctm not in ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"):
        problems.append(f"coordinate_transformation_mode='{ctm}'")
    nm = _attr_str(node, "nearest_mode", "round_prefer_floor")
    if mode == "nearest" and nm not in ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil"):
        problems.append(f"nearest_mode='{nm}'")
    if _attr(node, "antialias", 0):
        problems.append("antialias=1")
    policy = _attr_str(node, "keep_aspect_ratio_policy", "stretch")
    if policy != "stretch":
        problems.append(f"keep_aspect_ratio_policy='{policy}'")
    return "TensorRT's Resize does not support " + ", ".join(problems) if problems else None


def _check_layernorm_outputs(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    used = [o for o in node.output[1:] if ctx.is_used(o)]
    if used:
        return f"LayerNormalization's Mean/InvStdDev outputs are used ({', '.join(used)}); TensorRT supports only output Y"
    return None


# -- nodes: explicit quantization (QuantizeLinear / DequantizeLinear) ------------------------------------

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


def _check_qdq_scale(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    scale = _in(node, 1)
    if scale and not (ctx.is_direct_constant(scale) or ctx.is_computable(scale)):
        return f"the scale {scale!r} is computed at run time; TensorRT needs Q/DQ scales that are build-time constants"
    return None


def _check_qdq_zero_point(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    zp = _in(node, 2)
    if not zp:
        return None
    if not (ctx.is_direct_constant(zp) or ctx.is_computable(zp)):
        return f"the zero point {zp!r} is computed at run time; TensorRT needs a constant zero point of 0"
    value = _qdq_array(zp, ctx)
    if value is not None and np.any(value.astype(np.float64) != 0):
        return f"the zero point {zp!r} is not all zeros (asymmetric quantization); TensorRT supports only symmetric Q/DQ"
    return None


def _check_qdq_uint8(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    zp = _in(node, 2)
    if node.op_type == "DequantizeLinear" and ctx.elem_type(_in(node, 0)) not in (None, _UINT8):
        return None  # the quantized type is the data's (INT8, INT4, FP8)
    if not zp and not _attr(node, "output_dtype", 0):
        return "no zero point: the quantized type defaults to UINT8, which TensorRT reads as INT8; give an INT8 zero point of 0"
    if zp and ctx.elem_type(zp) == _UINT8:
        return f"the zero point {zp!r} is UINT8; TensorRT re-reads it as INT8 (use INT8 zero points, symmetric)"
    return None


def _qdq_quant_type(node: onnx.NodeProto, ctx: GraphContext) -> int | None:
    if node.op_type == "DequantizeLinear":
        return ctx.elem_type(_in(node, 0))
    zp = _in(node, 2)
    if zp:
        return ctx.elem_type(zp)
    return _attr(node, "output_dtype", None) or None


def _check_qdq_block(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    data, scale = _in(node, 0), _in(node, 1)
    block = int(_attr(node, "block_size", 0) or 0)
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


def _check_qdq_int4(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    if _qdq_quant_type(node, ctx) != _INT4:
        return None
    data = _in(node, 0)
    if node.op_type == "QuantizeLinear" or not ctx.is_direct_constant(data):
        return "INT4 on an activation: TensorRT's INT4 is weight-only (a DequantizeLinear of a constant INT4 weight)"
    dims = ctx.dims(data)
    if dims and dims[-1] is not None and dims[-1] % 2:
        return f"INT4 weight {data!r} has an odd last dimension ({dims[-1]}); TensorRT packs INT4 in pairs along it"
    return None


def _check_qdq_per_axis_activation(node: onnx.NodeProto, ctx: GraphContext) -> str | None:
    data, scale = _in(node, 0), _in(node, 1)
    sdims = ctx.dims(scale)
    if node.op_type == "QuantizeLinear" and not ctx.is_direct_constant(data) and sdims and len(sdims) == 1 and (sdims[0] or 0) > 1:
        return "per-axis quantization of an activation; TensorRT treats per-axis scales as weight scales (use per-tensor)"
    return None


def _ops(*names: str) -> frozenset[str]:
    return frozenset(names)


_OPSET_SOURCES = " | ".join(f"{t.name}: {t.opset_source}" for t in TARGETS.values())

#: The rule set. Order is report order within a node.
RULES: tuple[Rule, ...] = (
    # model
    Rule("opset-above-max", frozenset(), _check_opset_max, "error", _OPSET_SOURCES, scope="model"),
    Rule(
        "opset-above-all-releases",
        frozenset(),
        _check_opset_all,
        "warning",
        SRC_TABLE_101,
        scope="model",
        targets=frozenset({"trt10"}),
    ),
    Rule(
        "opset-below-min",
        frozenset(),
        _check_opset_min,
        "error",
        f"{SRC_TABLE_1015}; {SRC_TRT11_OPSET}",
        scope="model",
    ),
    # tensors
    Rule("double-tensor", frozenset(), _check_double_tensor, "error", SRC_DOUBLE, scope="tensor"),
    # support status
    Rule("unsupported-op", UNSUPPORTED_OPS, _check_unsupported, "error", f"{SRC_TABLE_1015} (rows marked N)"),
    Rule("random-op", RANDOM_OPS, _check_random, "error", SRC_RANDOM),
    Rule(
        "data-dependent-op",
        DATA_DEPENDENT_OPS,
        _check_data_dependent_op,
        "error",
        f"{SRC_TABLE_1015} (NonZero, NonMaxSuppression: Y); {SRC_DDS}",
    ),
    Rule(
        "opset23-op",
        frozenset(OPSET23_OPS),
        _check_opset23_op,
        "error",
        f"{SRC_TABLE_101} (no such rows); {SRC_CHANGELOG}: Attention added in 10.14, RotaryEmbedding/"
        "RMSNormalization/TensorScatter in 10.15",
        targets=frozenset({"trt10"}),
    ),
    Rule(
        "late-10x-op",
        frozenset(LATE_10X_OPS),
        _check_late_10x,
        "warning",
        f"{SRC_TABLE_101}; {SRC_CHANGELOG}",
        targets=frozenset({"trt10"}),
    ),
    Rule(
        "unlisted-op",
        frozenset(),
        _check_unlisted,
        "warning",
        f"{SRC_TABLE_1015}; custom domains: onnx-tensorrt README/changelog (plugins, local functions)",
    ),
    # shapes that depend on data
    Rule("data-dependent-shape", frozenset(SHAPE_INPUTS), _check_shape_inputs, "error", SRC_DDS),
    Rule(
        "constant-input",
        frozenset(CONSTANT_INPUTS),
        _check_constant_inputs,
        "error",
        f"{SRC_TABLE_1015} (Restrictions column)",
    ),
    # TopK
    Rule("topk-dynamic-k", _ops("TopK"), _check_topk_dynamic_k, "error", SRC_TOPK_K),
    Rule("topk-k-limit", _ops("TopK"), _check_topk_k_limit, "error", SRC_TOPK_LIMIT),
    Rule("topk-k-unreadable", _ops("TopK"), _check_topk_k_unknown, "warning", SRC_TOPK_LIMIT),
    Rule(
        "topk-sorted",
        _ops("TopK"),
        _check_topk_sorted,
        "error",
        f"{SRC_TABLE_1015}: TopK '`sorted` must be 1'",
    ),
    Rule(
        "topk-type",
        _ops("TopK"),
        _check_topk_type,
        "error",
        f"{SRC_TABLE_1015}: TopK types FP32, FP16, BF16, INT32, INT64",
    ),
    # Scatter
    Rule(
        "scatternd-reduction",
        _ops("ScatterND"),
        _check_scatternd_reduction,
        "error",
        f"{SRC_TABLE_1015}: ScatterND '`reduction` other than `none` is not supported'",
    ),
    Rule(
        "scatternd-reduction-attr",
        _ops("ScatterND"),
        _check_scatternd_reduction_attr,
        "warning",
        f'{SRC_PARSER_101}: ScatterND importer asserts !attrs.count("reduction"); {SRC_CHANGELOG} (10.9)',
        targets=frozenset({"trt10"}),
    ),
    Rule(
        "scatter-elements-reduction",
        _ops("ScatterElements", "Scatter"),
        _check_scatter_elements_reduction,
        "error",
        f"{SRC_SCATTER_PLUGIN}; {SRC_PARSER_101}: ScatterElements with reduction != 'none' -> scatterPluginHelper",
    ),
    Rule(
        "scatter-elements-plugin",
        _ops("ScatterElements", "Scatter"),
        _check_scatter_elements_plugin,
        "warning",
        f"{SRC_PARSER_101} (scatterPluginHelper, plugin 'ScatterElements' v1); {SRC_SCATTER_PLUGIN}; "
        f"{SRC_CHANGELOG} (10.0 EA: reduction support; 10.3: updated plugin)",
    ),
    # documented restrictions of other ops
    Rule(
        "double-op",
        _ops("Cast", "CastLike", "Constant", "ConstantOfShape", *_DTYPE_ATTR_OPS),
        _check_double_node,
        "error",
        SRC_DOUBLE,
    ),
    Rule(
        "attention-restrictions",
        _ops("Attention"),
        _check_attention,
        "error",
        f"{SRC_TABLE_1015}: Attention restrictions",
    ),
    Rule(
        "tensorscatter-restrictions",
        _ops("TensorScatter"),
        _check_tensor_scatter,
        "error",
        f"{SRC_TABLE_1015}: TensorScatter restrictions",
    ),
    Rule(
        "loop-scan-output",
        _ops("Loop"),
        _check_loop,
        "error",
        f"{SRC_TABLE_1015}: Loop 'Scan output length cannot be dynamic'",
    ),
    Rule(
        "if-branch-rank",
        _ops("If"),
        _check_if,
        "error",
        f"{SRC_TABLE_1015}: If branches 'must have the same rank'",
    ),
    Rule("resize-mode", _ops("Resize"), _check_resize, "error", f"{SRC_TABLE_1015}: Resize supported modes"),
    # explicit quantization
    Rule("qdq-scale-constant", _ops("QuantizeLinear", "DequantizeLinear"), _check_qdq_scale, "error", f"{SRC_QDQ_OPS}; {SRC_QDQ_PARSER}"),
    Rule("qdq-zero-point", _ops("QuantizeLinear", "DequantizeLinear"), _check_qdq_zero_point, "error", f"{SRC_QDQ_OPS}; {SRC_QDQ_PARSER}"),
    Rule("qdq-uint8", _ops("QuantizeLinear", "DequantizeLinear"), _check_qdq_uint8, "warning", SRC_QDQ_PARSER),
    Rule("qdq-block", _ops("QuantizeLinear", "DequantizeLinear"), _check_qdq_block, "error", f"{SRC_QDQ_PARSER}; {SRC_INT4_WOQ}"),
    Rule("qdq-int4", _ops("QuantizeLinear", "DequantizeLinear"), _check_qdq_int4, "error", f"{SRC_INT4_WOQ}; {SRC_QDQ_PARSER}"),
    Rule("qdq-per-axis-activation", _ops("QuantizeLinear"), _check_qdq_per_axis_activation, "warning", SRC_QDQ_PARSER),
    Rule(
        "layernorm-outputs",
        _ops("LayerNormalization"),
        _check_layernorm_outputs,
        "error",
        f"{SRC_TABLE_1015}: LayerNormalization 'Only the first output `Y` is supported'",
    ),
)


# ----------------------------------------------------------------------------------------------------
# Walking the model
# ----------------------------------------------------------------------------------------------------


def _default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 1


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"<{node.op_type}#{index}>"


class _Linter:
    def __init__(
        self,
        model: onnx.ModelProto,
        target: TargetSpec,
        graph_file: str,
        base_dir: str | None,
        weight_inputs: frozenset[str] = frozenset(),
    ) -> None:
        self.weight_inputs = weight_inputs
        self.model = model
        self.target = target
        self.graph_file = graph_file
        self.base_dir = base_dir
        self.opset = _default_opset(model)
        self.functions = {(f.domain, f.name): f for f in model.functions}
        self.rules = [r for r in RULES if target.name in r.targets]
        self.findings: list[LintFinding] = []
        self._seen: set[tuple[str, str, str]] = set()

    def add(self, rule: Rule, node_name: str, op_type: str, reason: str, source: str | None = None) -> None:
        key = (rule.rule_id, node_name, reason)
        if key in self._seen:  # the same function body seen from several call sites
            return
        self._seen.add(key)
        self.findings.append(
            LintFinding(
                rule.rule_id,
                rule.severity,
                node_name,
                op_type,
                reason,
                source or rule.source,
                self.graph_file,
            )
        )

    def context(self, **kw: Any) -> GraphContext:
        return GraphContext(
            target=self.target,
            opset=self.opset,
            functions=self.functions,
            graph_file=self.graph_file,
            base_dir=self.base_dir,
            weight_inputs=self.weight_inputs,
            **kw,
        )

    def run(self) -> list[LintFinding]:
        main = self.context(scope="", nodes=self.model.graph.node, graph=self.model.graph)
        for rule in self.rules:
            if rule.scope == "model":
                reason = rule.check(self.model, main)
                if reason:
                    src = self.target.opset_source if rule.rule_id == "opset-above-max" else None
                    self.add(rule, "<model>", "<opset>", reason, src)
        self.walk_graph(main, self.model.graph)
        return self.findings

    def walk_graph(self, ctx: GraphContext, graph: onnx.GraphProto) -> None:
        prefix = f"{ctx.scope}/" if ctx.scope else ""
        items: list[tuple[str, Any]] = [("graph input", vi) for vi in graph.input]
        items += [("graph output", vi) for vi in graph.output]
        items += [("initializer", t) for t in graph.initializer]
        for rule in self.rules:
            if rule.scope != "tensor":
                continue
            for kind, proto in items:
                reason = rule.check((kind, proto), ctx)
                if reason:
                    self.add(rule, prefix + proto.name, f"<{kind}>", reason)
        self.walk_nodes(ctx)

    def walk_nodes(self, ctx: GraphContext) -> None:
        prefix = f"{ctx.scope}/" if ctx.scope else ""
        for i, node in enumerate(ctx.nodes):
            label = prefix + _node_label(node, i)
            for rule in self.rules:
                if rule.scope != "node" or (rule.op_types and node.op_type not in rule.op_types):
                    continue
                reason = rule.check(node, ctx)
                if reason:
                    self.add(rule, label, node.op_type, reason)
            for a in node.attribute:  # If/Loop/Scan bodies
                graphs = (
                    [a.g]
                    if a.type == AttributeProto.GRAPH
                    else list(a.graphs)
                    if a.type == AttributeProto.GRAPHS
                    else []
                )
                for sub in graphs:
                    child = self.context(
                        scope=f"{label}/{a.name}", nodes=sub.node, graph=sub, parent=ctx, depth=ctx.depth + 1
                    )
                    self.walk_graph(child, sub)
            fn = self.functions.get((node.domain, node.op_type))
            if fn is not None and ctx.depth < 32:
                formals = {
                    f: (ctx, node.input[j] if j < len(node.input) else "") for j, f in enumerate(fn.input)
                }
                body = self.context(
                    scope=f"{fn.domain}::{fn.name}", nodes=fn.node, formals=formals, depth=ctx.depth + 1
                )
                self.walk_nodes(body)


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except Exception:  # shape inference is a help, not a requirement
        return model


def lint_model(
    model: onnx.ModelProto | str | Path,
    target: str = "trt10",
    *,
    graph_file: str | None = None,
    runtime_inputs: Iterable[str] | None = None,
) -> list[LintFinding]:
    """Lint one ONNX model for ``target`` ("trt10" or "trt11"). Paths are loaded without their weights.

    ``runtime_inputs``: the graph inputs fed at run time; any other graph input is a weight (a
    --graph-only export carries its weights as inputs) and counts as a build-time constant.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {sorted(TARGETS)}")
    base_dir = None
    if isinstance(model, str | Path):
        path = Path(model)
        graph_file = graph_file or str(path)
        base_dir = str(path.parent)
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as err:  # protobuf's DecodeError, OSError: a truncated or foreign file
            raise ValueError(f"{path} is not a readable ONNX model ({type(err).__name__}: {err}); it is truncated or "
                             "damaged: re-export the bundle") from err
    graph_file = graph_file or model.graph.name or "<model>"
    weights: frozenset[str] = frozenset()
    if runtime_inputs is not None:
        keep = set(runtime_inputs)
        weights = frozenset(vi.name for vi in model.graph.input if vi.name not in keep)
    return _Linter(_infer(model), TARGETS[target], graph_file, base_dir, weights).run()


def lint_files(
    paths: Iterable[str | Path], target: str = "trt10", runtime_inputs: dict[str, Iterable[str]] | None = None
) -> list[LintFinding]:
    """Lint several files; ``runtime_inputs`` maps a file's stem (e.g. "decoder_step") to its runtime inputs."""
    findings: list[LintFinding] = []
    for p in paths:
        runtime = None if runtime_inputs is None else runtime_inputs.get(Path(p).stem)
        findings.extend(lint_model(p, target, runtime_inputs=runtime))
    return findings


def has_errors(findings: Iterable[LintFinding]) -> bool:
    return any(f.severity == "error" for f in findings)


def format_findings(findings: Sequence[LintFinding], *, with_source: bool = False) -> str:
    """One line per finding: ``file: severity [rule] node 'name' (Op): reason``."""
    lines = []
    for f in findings:
        line = f"{f.graph_file}: {f.severity} [{f.rule_id}] node '{f.node_name}' ({f.op_type}): {f.reason}"
        if with_source:
            line += f"  [source: {f.source}]"
        lines.append(line)
    return "\n".join(lines)
