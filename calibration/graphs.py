"""Graph surgery around quantization: weight folding, exclusion lists, Q/DQ hygiene, saving.

The dynamo exporter writes every `nn.Linear` as `MatMul(x, Transpose(W))` with `W` an initializer. Both
quantizers only treat an input as a *weight* when it is an initializer, so `fold_weight_transposes`
first replaces each `Transpose(initializer)` by the transposed initializer (TensorRT folds the same
Transpose at build time, so the graph means the same thing).

What is quantized: only MatMul / Gemm / Conv nodes whose second input is a constant weight (weights and
that node's activation input). What never is (`exclusions`): every node of a reduction step
(`exporter.regions.reduction_node_names`: score statistics, TopK, gathers, merge GEMMs), Softmax, and
normalisation (LayerNormalization, the RMSNorm pattern Pow / ReduceMean / Sqrt / Div / Reciprocal, and
anything exported from a `*Norm` module), so the token selection sees the same fp32 statistics.
`unshare_dequantize` then makes sure no node outside the quantized set reads a dequantized tensor.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from exporter.regions import has_namespaces, node_namespace, reduction_node_names

log = logging.getLogger(__name__)

QUANTIZABLE_OPS: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
NORM_OPS: frozenset[str] = frozenset(
    {"LayerNormalization", "RMSNormalization", "GroupNormalization", "InstanceNormalization", "BatchNormalization",
     "Pow", "ReduceMean", "Sqrt", "Reciprocal", "Div"}
)
SOFTMAX_OPS: frozenset[str] = frozenset({"Softmax", "LogSoftmax"})
QDQ_OPS: frozenset[str] = frozenset({"QuantizeLinear", "DequantizeLinear"})
#: tensors at least this large go to the graph's external-data file (the exporter's threshold)
EXTERNAL_THRESHOLD = 64 * 1024


class GraphError(ValueError):
    """A graph cannot be quantized as asked (the message names the graph and why)."""


@dataclass
class Exclusions:
    """Node names kept out of quantization, by reason."""

    reduction: set[str] = field(default_factory=set)
    softmax: set[str] = field(default_factory=set)
    norm: set[str] = field(default_factory=set)

    @property
    def all(self) -> set[str]:
        return self.reduction | self.softmax | self.norm

    def counts(self) -> dict[str, int]:
        return {"reduction": len(self.reduction), "softmax": len(self.softmax), "norm": len(self.norm),
                "total": len(self.all)}


def load_graph(path: str | os.PathLike[str], weights: bool = True) -> onnx.ModelProto:
    """Load an ONNX graph (with its external weights when `weights`)."""
    try:
        return onnx.load(str(path), load_external_data=weights)
    except Exception as err:  # onnx raises DecodeError, FileNotFoundError, ...
        raise GraphError(f"cannot read {path}: {err}") from err


def fold_weight_transposes(model: onnx.ModelProto) -> int:
    """Replace every `Transpose(initializer)` by a transposed initializer (in place); returns how many."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    kept: list[onnx.NodeProto] = []
    folded = 0
    for node in g.node:
        if node.op_type == "Transpose" and node.input and node.input[0] in inits:
            arr = numpy_helper.to_array(inits[node.input[0]])
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(np.transpose(arr, perm)), node.output[0]))
            folded += 1
        else:
            kept.append(node)
    if folded:
        del g.node[:]
        g.node.extend(kept)
        remove_unused_initializers(model)
    return folded


def remove_unused_initializers(model: onnx.ModelProto) -> None:
    g = model.graph
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    alive = [t for t in g.initializer if t.name in used]
    if len(alive) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(alive)


def exclusions(model: onnx.ModelProto) -> Exclusions:
    """The nodes quantization must leave alone (see the module docstring)."""
    if not has_namespaces(model):
        raise GraphError(
            "the graph has no exporter namespace metadata, so its reduction nodes cannot be found and kept in fp32; "
            "quantize a bundle written by ficoco-export (not one rewritten by an external optimizer)"
        )
    ex = Exclusions(reduction=reduction_node_names(model))
    for n in model.graph.node:
        ns = node_namespace(n)
        if n.op_type in SOFTMAX_OPS:
            ex.softmax.add(n.name)
        elif n.op_type in NORM_OPS or _inside_norm_module(ns):
            ex.norm.add(n.name)
    return ex


def _inside_norm_module(namespace: str) -> bool:
    """Whether a node's module path passes through a normalisation module (LayerNorm, LlamaRMSNorm, ...)."""
    return any(seg.split(":")[-1].strip().endswith("Norm") for seg in namespace.split("/"))


def weight_nodes(model: onnx.ModelProto, excluded: Iterable[str] = ()) -> list[str]:
    """Names of MatMul / Gemm / Conv nodes with a constant (initializer) weight input, minus `excluded`."""
    inits = {t.name for t in model.graph.initializer}
    skip = set(excluded)
    out = []
    for n in model.graph.node:
        if n.op_type in QUANTIZABLE_OPS and n.name not in skip and len(n.input) > 1 and n.input[1] in inits:
            out.append(n.name)
    return out


def ensure_node_names(model: onnx.ModelProto) -> None:
    """Give unnamed nodes a unique name (the quantizers address nodes by name)."""
    seen: set[str] = set()
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_{i}_unnamed"
        seen.add(n.name)


def unshare_dequantize(model: onnx.ModelProto, quantized: Iterable[str]) -> int:
    """Rewire every node outside `quantized` that reads a dequantized activation back to the fp32 tensor.

    ONNX Runtime's QDQ quantizer may route all consumers of a tensor through the Q/DQ pair it inserts for
    one quantized consumer (seen for pixel_values -> Shape). Weight DQs (input an initializer) are left
    alone. Returns the number of rewired inputs.
    """
    g = model.graph
    q_of = {n.output[0]: n for n in g.node if n.op_type == "QuantizeLinear"}
    source: dict[str, str] = {}
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in q_of:
            source[n.output[0]] = q_of[n.input[0]].input[0]
    allowed = set(quantized)
    rewired = 0
    for n in g.node:
        if n.op_type in QDQ_OPS or n.name in allowed:
            continue
        for i, name in enumerate(n.input):
            if name in source:
                n.input[i] = source[name]
                rewired += 1
    if rewired:
        prune_dead_nodes(model)
    return rewired


def prune_dead_nodes(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nobody reads (and then their unused initializers)."""
    g = model.graph
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        alive = [n for n in g.node if any(o in used for o in n.output)]
        if len(alive) == len(g.node):
            break
        del g.node[:]
        g.node.extend(alive)
    remove_unused_initializers(model)


def qdq_feeding(model: onnx.ModelProto, names: Iterable[str]) -> dict[str, list[str]]:
    """For each named node, the inputs it reads directly from a QuantizeLinear/DequantizeLinear node."""
    producer = {o: n for n in model.graph.node for o in n.output}
    wanted = set(names)
    out: dict[str, list[str]] = {}
    for n in model.graph.node:
        if n.name in wanted:
            bad = [i for i in n.input if i in producer and producer[i].op_type in QDQ_OPS]
            if bad:
                out[n.name] = bad
    return out


def qdq_consumers(model: onnx.ModelProto) -> dict[str, int]:
    """op type -> number of nodes (other than Q/DQ) that read a DequantizeLinear output."""
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    counts: dict[str, int] = defaultdict(int)
    for n in model.graph.node:
        if n.op_type not in QDQ_OPS and any(i in dq for i in n.input):
            counts[n.op_type] += 1
    return dict(counts)


def opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def save_graph(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Write `path` (+ `path.data` for tensors >= EXTERNAL_THRESHOLD); returns the files written.

    Writes to temporary names first and renames, so a reader never sees half a graph.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp_data_name = f".{data.name}.tmp"
    for stale in (tmp, path.with_name(tmp_data_name)):
        stale.unlink(missing_ok=True)
    big = any(t.ByteSize() >= EXTERNAL_THRESHOLD for t in model.graph.initializer)
    onnx.save_model(
        model, str(tmp), save_as_external_data=big, all_tensors_to_one_file=True,
        location=tmp_data_name if big else None, size_threshold=EXTERNAL_THRESHOLD,
    )
    written = [path]
    if big:
        # point the graph at the final data name, then move both into place
        m = onnx.load(str(tmp), load_external_data=False)
        for t in m.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = data.name
        onnx.save_model(m, str(tmp))
        os.replace(path.with_name(tmp_data_name), data)
        written.append(data)
    elif data.exists():
        data.unlink()
    os.replace(tmp, path)
    return written
