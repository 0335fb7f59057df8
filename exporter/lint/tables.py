"""The facts the lint enforces, as data: where each comes from, the TensorRT targets and the operator tables.

The facts come from the ONNX-TensorRT operator support matrix (``onnx/onnx-tensorrt`` ``docs/operators.md``;
the TensorRT 10.15 table and the ``release/10.1-GA`` table), the ONNX-TensorRT changelog, the parser source
at ``release/10.1-GA``, the TensorRT scatterElements plugin README and NVIDIA's ONNX opset guide. Where a
rule goes beyond what TensorRT documents (our static-shape, deterministic requirement) the source says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnx import TensorProto

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
    "project rule: fixed-budget static shapes (docs/export-notes.md: static shapes, no data-dependent outputs)"
)
SRC_TOPK_K = (
    "TensorRT <= 8.5 tables: 'K input must be an initializer' (onnx-tensorrt#455, NVIDIA/TensorRT#2721, #1764); "
    "changelog 8.6 EA adds tensor K; project rule: K must be a build-time constant "
    "(docs/export-notes.md: static TopK K)"
)
SRC_TOPK_LIMIT = (
    "onnx/onnx-tensorrt docs/operators.md, TensorRT 10.1 and 10.15 tables: TopK '`K` input must be less than "
    "3840' (the ITopKLayer::setK API doc says 'up to 3840'; the stricter bound is used)"
)
SRC_RANDOM = (
    "onnx/onnx-tensorrt docs/operators.md, TensorRT 10.15 table: RandomNormal/RandomUniform(+Like) Y with "
    "'`seed` value is ignored by TensorRT', Bernoulli and Multinomial N; project rule: deterministic graphs "
    "(docs/export-notes.md: torch.rand tie-breaks export as RandomUniformLike)"
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

#: Element types TensorRT's TopK takes.
TOPK_TYPES = frozenset(
    {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT32, TensorProto.INT64}
)
#: ScatterElements reductions that TensorRT runs in its scatterElements plugin.
SCATTER_PLUGIN_REDUCTIONS = ("add", "mul", "max", "min")
#: Ops whose output type is set by a ``dtype`` attribute.
DTYPE_ATTR_OPS = RANDOM_OPS | {"EyeLike"}
#: Ops with subgraph bodies: their outputs always count as runtime values.
CONTROL_FLOW_OPS = ("If", "Loop", "Scan")
