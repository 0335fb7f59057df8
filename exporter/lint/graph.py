"""Value facts of one graph scope for the lint: what is constant, computable at build time, typed and shaped.

:class:`GraphContext` indexes one scope (the main graph, an If/Loop/Scan body or a local function's body at
one call site) in one forward pass, resolving names through enclosing scopes and call sites; a small exact
constant folder (:func:`_fold`) resolves the index/shape values (TopK's ``K``, Reshape's shape, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporter.lint.tables import CONTROL_FLOW_OPS, DATA_DEPENDENT_OPS, RANDOM_OPS, UNSUPPORTED_OPS, TargetSpec

_CONST_FOLD_LIMIT = 4096  # elements; bigger values are never materialised by the lint

# ----------------------------------------------------------------------------------------------------
# Graph context: scopes (main graph, If/Loop/Scan bodies, local-function bodies) with value facts
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Facts:
    """What the lint knows about one value name in one scope."""

    kind: str  # "input" | "initializer" | "node"
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
            op in RANDOM_OPS or op in DATA_DEPENDENT_OPS or op in UNSUPPORTED_OPS or op in CONTROL_FLOW_OPS
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


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of a node attribute, or ``default`` when the node does not carry it."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def attr_str(node: onnx.NodeProto, name: str, default: str) -> str:
    """A string attribute, decoded."""
    v = attr(node, name, default)
    return v.decode() if isinstance(v, bytes) else str(v)


def node_input(node: onnx.NodeProto, i: int) -> str:
    """The name of input ``i``; "" when the input is absent (omitted optional inputs are "" too)."""
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
        dims = ctx.dims(node_input(node, 0))
        if dims is None or any(d is None for d in dims):
            return None
        if op == "Size":
            return [np.array(int(np.prod(dims, dtype=np.int64)), dtype=np.int64)]
        start, end = attr(node, "start", 0), attr(node, "end", None)
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
        return [x.astype(helper.tensor_dtype_to_np_dtype(attr(node, "to")))]
    if op == "Neg":
        return [-x]
    if op in ("Add", "Sub", "Mul", "Div"):
        a, b = vals[0], vals[1]
        if op == "Div" and np.issubdtype(np.result_type(a, b), np.integer):
            return [np.trunc(np.true_divide(a, b)).astype(np.result_type(a, b))]
        return [{"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op](a, b)]
    if op == "Reshape":
        shape = [int(s) for s in vals[1].reshape(-1)]
        if not attr(node, "allowzero", 0):
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return [x.reshape(shape)]
    if op in ("Unsqueeze", "Squeeze"):
        axes = vals[1] if len(vals) > 1 and vals[1] is not None else attr(node, "axes", None)
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
        return [np.concatenate([v for v in vals if v is not None], axis=attr(node, "axis", 0))]
    if op == "Gather":
        return [np.take(x, vals[1], axis=attr(node, "axis", 0))]
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
