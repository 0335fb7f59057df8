"""Walking a model: every rule of the target applied to the model, its tensors and nodes, bodies included.

Entry points :func:`lint_model` (one model or path, loaded without its weights) and :func:`lint_files`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import onnx
from onnx import AttributeProto

from exporter.lint.graph import GraphContext
from exporter.lint.report import LintFinding
from exporter.lint.rules import RULES, Rule
from exporter.lint.tables import TARGETS, TargetSpec


def _default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 1


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"<{node.op_type}#{index}>"


class _Linter:
    """One lint run over one model: walks its scopes and collects each finding once."""

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
    """Lint several files; ``runtime_inputs`` maps a file's stem (e.g. "decoder_segment_0") to its runtime inputs."""
    findings: list[LintFinding] = []
    for p in paths:
        runtime = None if runtime_inputs is None else runtime_inputs.get(Path(p).stem)
        findings.extend(lint_model(p, target, runtime_inputs=runtime))
    return findings
