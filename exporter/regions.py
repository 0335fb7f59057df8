"""Which nodes of an exported graph belong to the token reduction.

`ficoco.reduced_llava` runs every reduction step through the parameter-free modules `VisionReduction`
and `DecoderReduction`; the dynamo exporter records the module path of each node in its `namespace`
metadata, so the reduction's nodes (score statistics, TopK, gathers, the merge GEMMs, the re-splice) can
be found again in the ONNX graph without re-deriving any of the math. Used by the benchmark (profile time
spent in the reduction) and by quantization (keep these nodes in full precision, so the selection of
visual tokens does not flip).

Graph rewrites that drop node metadata (an external optimizer) make these sets empty; callers say so.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx

REDUCTION_MODULES: tuple[str, ...] = ("VisionReduction", "DecoderReduction")
NAMESPACE_KEY = "namespace"


def node_namespace(node: onnx.NodeProto) -> str:
    for prop in node.metadata_props:
        if prop.key == NAMESPACE_KEY:
            return prop.value
    return ""


def is_reduction_node(node: onnx.NodeProto, modules: Iterable[str] = REDUCTION_MODULES) -> bool:
    """True when the node was exported from inside one of the reduction modules."""
    ns = node_namespace(node)
    return any(f".{m}/" in ns or ns.endswith(f".{m}") or f".{m}:" in ns for m in modules)


def reduction_node_names(model: onnx.ModelProto) -> set[str]:
    """Names of the top-level graph's nodes that belong to a reduction step."""
    return {n.name for n in model.graph.node if is_reduction_node(n)}


def has_namespaces(model: onnx.ModelProto) -> bool:
    """Whether the graph still carries the exporter's module metadata (else reduction nodes cannot be told apart)."""
    return any(node_namespace(n) for n in model.graph.node)
