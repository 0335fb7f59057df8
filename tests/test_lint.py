"""The TensorRT lint: planted problems in tiny hand-built graphs are caught; clean graphs, and a real exported
reduction graph, lint clean."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from exporter.lint import (
    RULES,
    TARGETS,
    LintFinding,
    format_findings,
    has_errors,
    lint_files,
    lint_model,
)
from ficoco import paradigm as P

F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, inits=(), opset=18, functions=(), check=True) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(inits))
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(f.domain, 1) for f in functions]
    model = helper.make_model(graph, opset_imports=imports, functions=list(functions))
    model.ir_version = 10
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def _vi(name, elem=F, shape=(2, 8)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def _k(value=3, name="k"):
    return numpy_helper.from_array(np.array([value], dtype=np.int64), name)


def _topk(k_input="k", name="topk", **attrs):
    return helper.make_node("TopK", ["x", k_input], ["vals", "idx"], name=name, axis=-1, **attrs)


def _topk_outputs(k=3, rows=2):
    return [_vi("vals", F, (rows, k)), _vi("idx", TensorProto.INT64, (rows, k))]


def _ids(findings: list[LintFinding], severity: str | None = None) -> set[str]:
    return {f.rule_id for f in findings if severity is None or f.severity == severity}


def _only(findings: list[LintFinding], rule_id: str) -> LintFinding:
    hits = [f for f in findings if f.rule_id == rule_id]
    assert len(hits) == 1, format_findings(findings)
    return hits[0]


# ----------------------------------------------------------------------------------------------------
# Rules as data
# ----------------------------------------------------------------------------------------------------


def test_rules_are_data_with_sources() -> None:
    ids = [r.rule_id for r in RULES]
    assert len(ids) == len(set(ids))
    for r in RULES:
        assert r.severity in ("error", "warning")
        assert r.scope in ("node", "tensor", "model")
        assert r.source.strip() and callable(r.check)
        assert r.targets <= set(TARGETS)
    assert {"trt10", "trt11"} <= set(TARGETS)
    assert TARGETS["trt10"].max_opset < TARGETS["trt11"].max_opset


def test_unknown_target_is_refused() -> None:
    m = _model([_topk()], [_vi("x")], _topk_outputs(), [_k()])
    with pytest.raises(ValueError, match="target"):
        lint_model(m, target="trt9")


# ----------------------------------------------------------------------------------------------------
# TopK
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["trt10", "trt11"])
def test_clean_topk_with_initializer_k_passes(target: str) -> None:
    m = _model([_topk()], [_vi("x")], _topk_outputs(), [_k()])
    assert lint_model(m, target) == []


def test_topk_k_from_constant_chain_passes() -> None:
    """Constant -> Cast -> Reshape is still a build-time constant, and so is a Shape of a static tensor."""
    nodes = [
        helper.make_node("Constant", [], ["k0"], value=numpy_helper.from_array(np.array(3, dtype=np.int32))),
        helper.make_node("Cast", ["k0"], ["k1"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["k1", "one"], ["k"]),
        _topk("k", name="topk_chain"),
        helper.make_node("Shape", ["x"], ["sx"]),
        helper.make_node("Gather", ["sx", "last"], ["n"], axis=0),  # n = 8, static
        helper.make_node("Unsqueeze", ["n", "zero"], ["n1"]),
        helper.make_node("TopK", ["x", "n1"], ["v8", "i8"], name="topk_full", axis=-1),
    ]
    inits = [
        numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
        numpy_helper.from_array(np.array(1, dtype=np.int64), "last"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
    ]
    outs = _topk_outputs() + [_vi("v8", F, (2, 8)), _vi("i8", TensorProto.INT64, (2, 8))]
    assert lint_model(_model(nodes, [_vi("x")], outs, inits)) == []


def test_dynamic_k_from_graph_input_is_caught() -> None:
    m = _model(
        [_topk("k_in", name="topk_dyn")],
        [_vi("x"), _vi("k_in", TensorProto.INT64, (1,))],
        [_vi("vals", F, (2, None)), _vi("idx", TensorProto.INT64, (2, None))],
    )
    f = _only(lint_model(m), "topk-dynamic-k")
    assert f.severity == "error" and f.node_name == "topk_dyn" and f.op_type == "TopK"
    assert "dynamic K" in f.reason and "runtime data" in f.reason
    assert has_errors(lint_model(m))


def test_dynamic_k_from_shape_of_dynamic_dim_is_caught() -> None:
    nodes = [
        helper.make_node("Shape", ["x"], ["sx"], start=1, end=2),  # the dynamic "seq" dim
        helper.make_node("Div", ["sx", "two"], ["k"]),
        _topk("k", name="topk_from_shape"),
    ]
    m = _model(
        nodes,
        [_vi("x", F, (2, "seq"))],
        [_vi("vals", F, (2, None)), _vi("idx", TensorProto.INT64, (2, None))],
        [numpy_helper.from_array(np.array([2], dtype=np.int64), "two")],
    )
    f = _only(lint_model(m), "topk-dynamic-k")
    assert f.node_name == "topk_from_shape" and "tensor shapes" in f.reason


@pytest.mark.parametrize("k,caught", [(3839, False), (3840, True), (4000, True)])
def test_topk_k_limit(k: int, caught: bool) -> None:
    m = _model([_topk()], [_vi("x", F, (1, 5000))], _topk_outputs(k, rows=1), [_k(k)])
    findings = lint_model(m)
    assert ("topk-k-limit" in _ids(findings, "error")) is caught
    if caught:
        assert str(k) in _only(findings, "topk-k-limit").reason


def test_topk_unsorted_and_double_input_are_caught() -> None:
    m = _model([_topk(sorted=0)], [_vi("x")], _topk_outputs(), [_k()])
    assert "topk-sorted" in _ids(lint_model(m), "error")
    nodes = [
        helper.make_node("Cast", ["x"], ["xd"], to=TensorProto.DOUBLE, name="to_f64"),
        helper.make_node("TopK", ["xd", "k"], ["vals", "idx"], name="topk_f64"),
    ]
    m = _model(
        nodes,
        [_vi("x")],
        [_vi("vals", TensorProto.DOUBLE, (2, 3)), _vi("idx", TensorProto.INT64, (2, 3))],
        [_k()],
    )
    findings = lint_model(m)
    assert _only(findings, "topk-type").node_name == "topk_f64"


# ----------------------------------------------------------------------------------------------------
# Unsupported / data-dependent / random ops
# ----------------------------------------------------------------------------------------------------


def test_planted_nonzero_is_caught() -> None:
    nodes = [helper.make_node("NonZero", ["x"], ["nz"], name="planted_nonzero")]
    m = _model(nodes, [_vi("x")], [_vi("nz", TensorProto.INT64, (2, None))])
    findings = lint_model(m)
    f = _only(findings, "data-dependent-op")
    assert f.severity == "error" and f.node_name == "planted_nonzero" and f.op_type == "NonZero"
    assert "data-dependent" in f.reason
    assert "planted_nonzero" in format_findings(findings)


@pytest.mark.parametrize("op", ["Unique", "Compress"])
def test_unsupported_ops_are_caught(op: str) -> None:
    if op == "Unique":
        nodes = [helper.make_node("Unique", ["x"], ["u"], name="uniq")]
        inputs, out = [_vi("x")], _vi("u", F, (None,))
    else:
        nodes = [helper.make_node("Compress", ["x", "c"], ["u"], name="uniq", axis=1)]
        inputs, out = [_vi("x"), _vi("c", TensorProto.BOOL, (8,))], _vi("u", F, (2, None))
    m = _model(nodes, inputs, [out])
    f = _only(lint_model(m), "unsupported-op")
    assert f.node_name == "uniq" and "data-dependent" in f.reason


def test_random_uniform_like_is_caught() -> None:
    nodes = [
        helper.make_node("RandomUniformLike", ["x"], ["r"], name="tie_break_noise"),
        helper.make_node("Add", ["x", "r"], ["y"], name="add"),
    ]
    findings = lint_model(_model(nodes, [_vi("x")], [_vi("y")]))
    f = _only(findings, "random-op")
    assert f.node_name == "tie_break_noise" and f.severity == "error" and "reproducible" in f.reason
    assert _ids(findings) == {"random-op"}


def test_reshape_to_a_data_dependent_shape_is_caught_and_shape_derived_passes() -> None:
    bad = [helper.make_node("Reshape", ["x", "s"], ["y"], name="reshape_from_input")]
    m = _model(bad, [_vi("x"), _vi("s", TensorProto.INT64, (2,))], [_vi("y", F, (None, None))])
    f = _only(lint_model(m), "data-dependent-shape")
    assert f.node_name == "reshape_from_input" and "'s'" in f.reason
    # ArgMax values used as a Slice end: data-dependent too
    bad = [
        helper.make_node("ArgMax", ["x"], ["am"], axis=1, keepdims=0),
        helper.make_node("Slice", ["x", "zero", "am", "one"], ["y"], name="slice_to_argmax"),
    ]
    inits = [
        numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
    ]
    m = _model(bad, [_vi("x")], [_vi("y", F, (None, None))], inits, check=False)
    assert _only(lint_model(m), "data-dependent-shape").node_name == "slice_to_argmax"
    good = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Reshape", ["x", "s"], ["y"], name="reshape_from_shape"),
    ]
    assert lint_model(_model(good, [_vi("x", F, ("b", 8))], [_vi("y", F, ("b", 8))])) == []


# ----------------------------------------------------------------------------------------------------
# Scatter reductions
# ----------------------------------------------------------------------------------------------------


def _scatter(op: str, reduction: str | None, index_type=TensorProto.INT64):
    attrs = {"reduction": reduction} if reduction is not None else {}
    if op == "ScatterElements":
        node = helper.make_node(op, ["x", "i", "u"], ["y"], name="scatter", axis=1, **attrs)
        inputs = [_vi("x"), _vi("i", index_type, (2, 3)), _vi("u", F, (2, 3))]
    else:
        node = helper.make_node(op, ["x", "i", "u"], ["y"], name="scatter", **attrs)
        inputs = [_vi("x"), _vi("i", TensorProto.INT64, (3, 2)), _vi("u", F, (3,))]
    return _model([node], inputs, [_vi("y")])


def test_scatter_elements_reductions() -> None:
    assert lint_model(_scatter("ScatterElements", None)) == []
    assert lint_model(_scatter("ScatterElements", "none")) == []
    # add/mul/max/min: TensorRT's scatterElements plugin, not verified here -> warning, not error
    add = lint_model(_scatter("ScatterElements", "add"))
    assert _ids(add) == {"scatter-elements-plugin"} and not has_errors(add)
    assert "plugin" in add[0].reason and "not verified" in add[0].reason
    # the plugin takes INT64 indices only
    add32 = lint_model(_scatter("ScatterElements", "add", TensorProto.INT32))
    assert "scatter-elements-reduction" in _ids(add32, "error")


def test_scatter_nd_reductions() -> None:
    f = _only(lint_model(_scatter("ScatterND", "add")), "scatternd-reduction")
    assert f.severity == "error" and "'add'" in f.reason
    assert lint_model(_scatter("ScatterND", None)) == []
    # an explicit reduction="none" attribute: rejected by the 10.1 parser, fixed in 10.9 -> trt10 warning only
    explicit = lint_model(_scatter("ScatterND", "none"))
    assert _ids(explicit) == {"scatternd-reduction-attr"} and not has_errors(explicit)
    assert lint_model(_scatter("ScatterND", "none"), "trt11") == []


# ----------------------------------------------------------------------------------------------------
# float64, opset
# ----------------------------------------------------------------------------------------------------


def test_float64_cast_is_caught() -> None:
    nodes = [
        helper.make_node("Cast", ["x"], ["xd"], to=TensorProto.DOUBLE, name="cast_to_f64"),
        helper.make_node("Cast", ["xd"], ["y"], to=F, name="cast_back"),
    ]
    findings = lint_model(_model(nodes, [_vi("x")], [_vi("y")]))
    f = _only(findings, "double-op")
    assert f.node_name == "cast_to_f64" and f.severity == "error" and "DOUBLE" in f.reason


def test_float64_graph_input_and_initializer_are_caught() -> None:
    w = numpy_helper.from_array(np.ones((2, 8)), "w64")
    nodes = [helper.make_node("Add", ["x", "w64"], ["y"], name="add")]
    findings = lint_model(_model(nodes, [_vi("x", TensorProto.DOUBLE)], [_vi("y", TensorProto.DOUBLE)], [w]))
    names = {f.node_name for f in findings if f.rule_id == "double-tensor"}
    assert names == {"x", "y", "w64"}


def test_opset_too_high_for_trt10() -> None:
    m = _model([_topk()], [_vi("x")], _topk_outputs(), [_k()], opset=25)
    f = _only(lint_model(m, "trt10"), "opset-above-max")
    assert f.severity == "error" and "25" in f.reason and f.node_name == "<model>"
    assert not has_errors(lint_model(m, "trt11"))
    # 21..24: parsed only by late 10.x releases -> warning for trt10
    m22 = _model([_topk()], [_vi("x")], _topk_outputs(), [_k()], opset=22)
    assert _ids(lint_model(m22, "trt10")) == {"opset-above-all-releases"}
    assert lint_model(m22, "trt11") == []


def test_attention_needs_trt11_or_opset18() -> None:
    q = [_vi(n, F, (1, 2, 4, 8)) for n in ("q", "k", "v")]
    nodes = [helper.make_node("Attention", ["q", "k", "v"], ["y"], name="sdpa")]
    m = _model(nodes, q, [_vi("y", F, (1, 2, 4, 8))], opset=23)
    assert "opset23-op" in _ids(lint_model(m, "trt10"), "error")
    assert lint_model(m, "trt11") == []
    cached = [
        helper.make_node(
            "Attention", ["q", "k", "v", "", "pk", "pv"], ["y", "pres_k", "pres_v"], name="sdpa_kv"
        )
    ]
    m = _model(
        cached,
        q + [_vi("pk", F, (1, 2, 3, 8)), _vi("pv", F, (1, 2, 3, 8))],
        [_vi("y", F, (1, 2, 4, 8)), _vi("pres_k", F, (1, 2, 7, 8)), _vi("pres_v", F, (1, 2, 7, 8))],
        opset=23,
    )
    f = _only(lint_model(m, "trt11"), "attention-restrictions")
    assert "past_key" in f.reason and "present_key" in f.reason


# ----------------------------------------------------------------------------------------------------
# Subgraphs and local functions
# ----------------------------------------------------------------------------------------------------


def test_node_inside_if_subgraph_is_found() -> None:
    then_g = helper.make_graph(
        [helper.make_node("NonZero", ["x"], ["t"], name="nz_in_then")],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.INT64, [2, None])],
    )
    else_g = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["e0"], to=TensorProto.INT64, name="cast_else"),
            helper.make_node("Shape", ["e0"], ["e1"]),
            helper.make_node("Reshape", ["e0", "e1"], ["e"], name="reshape_else"),
        ],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.INT64, [2, None])],
    )
    nodes = [helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    m = _model(nodes, [_vi("x"), _vi("c", TensorProto.BOOL, ())], [_vi("y", TensorProto.INT64, (2, None))])
    f = _only(lint_model(m), "data-dependent-op")
    assert f.node_name == "branch/then_branch/nz_in_then"
    assert "nz_in_then" in format_findings([f])


def _local_function(inner_op_nodes, inputs, outputs):
    return helper.make_function(
        "pkg.test", "Block", inputs, outputs, inner_op_nodes, opset_imports=[helper.make_opsetid("", 18)]
    )


def test_node_inside_local_function_is_found() -> None:
    fn = _local_function(
        [
            helper.make_node("RandomUniformLike", ["a"], ["r"], name="noise_in_fn"),
            helper.make_node("Add", ["a", "r"], ["b"]),
        ],
        ["a"],
        ["b"],
    )
    nodes = [helper.make_node("Block", ["x"], ["y"], domain="pkg.test", name="call_block")]
    findings = lint_model(_model(nodes, [_vi("x")], [_vi("y")], functions=[fn]))
    f = _only(findings, "random-op")
    assert f.node_name == "pkg.test::Block/noise_in_fn"
    assert "unlisted-op" not in _ids(findings)  # a call of a local function is not a custom op


def test_local_function_topk_k_resolves_through_the_call_site() -> None:
    fn = _local_function(
        [helper.make_node("TopK", ["a", "kk"], ["v", "i"], name="topk_in_fn", axis=-1)],
        ["a", "kk"],
        ["v", "i"],
    )
    const_k = [helper.make_node("Block", ["x", "k"], ["vals", "idx"], domain="pkg.test", name="call")]
    assert lint_model(_model(const_k, [_vi("x")], _topk_outputs(), [_k()], functions=[fn])) == []
    dyn_k = [helper.make_node("Block", ["x", "k_in"], ["vals", "idx"], domain="pkg.test", name="call")]
    m = _model(
        dyn_k,
        [_vi("x"), _vi("k_in", TensorProto.INT64, (1,))],
        [_vi("vals", F, (2, None)), _vi("idx", TensorProto.INT64, (2, None))],
        functions=[fn],
    )
    assert _only(lint_model(m), "topk-dynamic-k").node_name == "pkg.test::Block/topk_in_fn"


def test_custom_domain_op_without_function_is_caught() -> None:
    nodes = [helper.make_node("FusedThing", ["x"], ["y"], domain="com.example", name="fused")]
    m = _model(nodes, [_vi("x")], [_vi("y")], check=False)
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    f = _only(lint_model(m), "unlisted-op")
    assert f.node_name == "fused" and "plugin" in f.reason


# ----------------------------------------------------------------------------------------------------
# Files, formatting
# ----------------------------------------------------------------------------------------------------


def test_lint_files_reads_k_from_external_data(tmp_path: Path) -> None:
    ok = _model([_topk()], [_vi("x", F, (1, 5000))], _topk_outputs(8, rows=1), [_k(8)])
    big = _model([_topk(name="topk_big")], [_vi("x", F, (1, 5000))], _topk_outputs(4000, rows=1), [_k(4000)])
    paths = []
    for name, m in (("ok.onnx", ok), ("big.onnx", big)):
        onnx.save_model(
            m,
            tmp_path / name,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=name + ".data",
            size_threshold=0,
        )
        assert (
            onnx.load(str(tmp_path / name), load_external_data=False).graph.initializer[0].data_location == 1
        )
        paths.append(tmp_path / name)
    findings = lint_files(paths, "trt10")
    assert [(Path(f.graph_file).name, f.rule_id) for f in findings] == [("big.onnx", "topk-k-limit")]
    text = format_findings(findings)
    assert len(text.splitlines()) == 1 and "big.onnx" in text and "topk_big" in text and "TopK" in text


# ----------------------------------------------------------------------------------------------------
# Integration: the project's own reduction primitives export to a graph that lints clean
# ----------------------------------------------------------------------------------------------------


class _ReductionStep(torch.nn.Module):
    """One FiCoCo-style merge on a [B, 40, 8] span: filter (stable TopK), correlate, self-preserving compress."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, r, eps = x.shape[1], 10, 0.9
        sources = P.stable_topk(x.norm(dim=-1), r)
        kept = P.complement_sorted(sources, n)
        xn = torch.nn.functional.normalize(x, dim=-1)
        corr = P.gather_tokens(xn, sources) @ xn.transpose(1, 2)
        targets, weights = P.select_targets(corr, sources, kept, P.adaptive_targets(n, eps), eps)
        return P.compress_self_preserving(x, P.MergePlan(kept, sources, targets, weights))


def test_exported_reduction_graph_lints_clean(tmp_path: Path) -> None:
    x = torch.randn(2, 40, 8)
    path = tmp_path / "reduction.onnx"
    torch.onnx.export(_ReductionStep().eval(), (x,), str(path), dynamo=True, opset_version=18)
    model = onnx.load(str(path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert {"TopK", "ScatterElements", "GatherElements", "ArgMax"} <= ops  # the ops the lint is about
    findings = lint_model(path)
    assert not has_errors(findings), format_findings(findings)
    assert not has_errors(lint_model(path, "trt11")), format_findings(findings)
    # ... and the same graph with a planted NonZero is not clean
    model.graph.node.append(
        helper.make_node("NonZero", [model.graph.output[0].name], ["planted"], name="planted_nz")
    )
    assert "data-dependent-op" in _ids(lint_model(model, graph_file=str(path)), "error")
