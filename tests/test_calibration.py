"""calibration/: explicit Q/DQ quantization of a bundle (ficoco-quantize), its lint rules and the selection check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from bundle import layout as B
from bundle.manifest import load_manifest
from bundle.names import EMBED, PREFILL, SPLICE, VISION, reduce_index, segment_index
from calibration import graphs as G
from calibration import quantize as Q
from calibration.selection import selection_steps, set_differences
from commands.quantize import main as quantize_main
from exporter.lint import has_errors, lint_files, lint_model
from exporter.regions import reduction_node_names

FAST_ARGS = ["--calib-size", "1", "--step-samples", "1", "--eval-images", "1", "--eval-tokens", "4", "--repeats", "1"]


def _quantize(src: Path, out: Path, *extra: str) -> Path:
    res = CliRunner().invoke(quantize_main, [str(src), "-o", str(out), *extra], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "selection" in res.output
    return out


@pytest.fixture(scope="module")
def w4a8_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quant") / "tiny-w4a8"
    return _quantize(tiny_bundle, out, "--vision", "int8", "--decoder", "int4-weight", *FAST_ARGS)


def _graph(bundle: Path, stage: str) -> onnx.ModelProto:
    return onnx.load(str(bundle / B.ONNX_DIR / f"{stage}.onnx"), load_external_data=False)


def _graph_names(bundle: Path) -> tuple[str, ...]:
    return load_manifest(bundle, verify=False).graph_names()


def _segments(bundle: Path) -> list[str]:
    """The decoder segment graphs (the decoder's weights, each once), in running order."""
    return [g for g in _graph_names(bundle) if segment_index(g) is not None]


def _reductions(bundle: Path) -> list[str]:
    return [g for g in _graph_names(bundle) if reduce_index(g) is not None]


def test_quantized_bundle_manifest_checker_and_lint(w4a8_bundle: Path, tiny_bundle: Path) -> None:
    manifest = load_manifest(w4a8_bundle, verify=True)  # hashes recomputed
    source = load_manifest(tiny_bundle, verify=False)
    assert set(source.to_dict()) <= set(manifest.to_dict())  # every source key kept (ficoco-check rebuilds PyTorch from them)
    assert manifest.schedule == source.schedule and manifest.source_model == source.source_model
    q = manifest.quantization
    segments, reductions = _segments(tiny_bundle), _reductions(tiny_bundle)
    steps = len(source.schedule["decoder"]["steps"])
    assert steps > 0 and len(segments) == steps + 1 and len(reductions) == steps  # a reduction between two segments
    # the decoder mode on every segment (each weight once); the weightless splice and reductions stay as they were
    assert set(q["graphs"]) == {VISION, *segments}
    assert q["unquantized"] == [g for g in manifest.graph_names() if g not in q["graphs"]]
    assert set(q["unquantized"]) == {EMBED, SPLICE, *reductions}
    assert set(manifest.graphs) == set(manifest.graph_names()) == set(source.graphs)
    for rec in q["graphs"].values():
        assert rec["tool"] == "onnxruntime.quantization" and rec["tool_version"] == Q.tool_version()
        assert rec["excluded_nodes"] > 0 and rec["quantized_nodes"] > 0 and rec["ort_cpu_runnable"]
    assert q["graphs"][VISION]["mode"] == "int8" and q["graphs"][VISION]["calib_size"] == 1
    for seg in segments:
        assert q["graphs"][seg]["mode"] == "int4-weight" and q["graphs"][seg]["method"] == "rtn"
        assert manifest.graphs[seg].opset == 21
    assert manifest.opset == 21
    for g in manifest.graph_names():
        onnx.checker.check_model(str(w4a8_bundle / B.ONNX_DIR / f"{g}.onnx"))
        if g in q["unquantized"]:  # copied byte for byte, no opset override
            assert manifest.graphs[g].opset is None
            assert (w4a8_bundle / B.ONNX_DIR / f"{g}.onnx").read_bytes() == (tiny_bundle / B.ONNX_DIR / f"{g}.onnx").read_bytes()
    runtime = {g: [i["name"] for i in manifest.graphs[g].inputs] for g in manifest.graphs}
    findings = lint_files(sorted((w4a8_bundle / B.ONNX_DIR).glob("*.onnx")), runtime_inputs=runtime)
    assert not has_errors(findings)
    assert not any(f.rule_id.startswith("qdq-") for f in findings)


def test_qdq_nodes_are_tensorrt_shaped(w4a8_bundle: Path) -> None:
    vision = _graph(w4a8_bundle, VISION)
    inits = {t.name: t for t in vision.graph.initializer}
    qs = [n for n in vision.graph.node if n.op_type == "QuantizeLinear"]
    assert qs
    for n in qs:  # symmetric INT8: constant scale, INT8 zero point of 0
        assert n.input[1] in inits and n.input[2] in inits
        zp = inits[n.input[2]]
        assert zp.data_type == TensorProto.INT8 and not numpy_helper.to_array(zp).any()
    blocks = set()
    for seg in _segments(w4a8_bundle):
        graph = _graph(w4a8_bundle, seg)
        pinits = {t.name: t for t in graph.graph.initializer}
        dqs = [n for n in graph.graph.node if n.op_type == "DequantizeLinear"]
        assert dqs and all(pinits[n.input[0]].data_type == TensorProto.INT4 for n in dqs), seg
        assert not any(n.op_type == "QuantizeLinear" for n in graph.graph.node), seg  # weight-only
        blocks |= {helper.get_attribute_value(a) for n in dqs for a in n.attribute if a.name == "block_size"}
        assert not any(n.op_type == "MatMulNBits" or n.domain == "com.microsoft" for n in graph.graph.node)
    assert len(blocks) == 1 and next(iter(blocks)) in (16, 32, 64, 128)
    for g in (SPLICE, *_reductions(w4a8_bundle)):  # weightless: nothing to quantize
        assert not any(n.op_type in G.QDQ_OPS for n in _graph(w4a8_bundle, g).graph.node), g


def test_reduction_nodes_never_read_quantized_tensors(w4a8_bundle: Path, tiny_bundle: Path) -> None:
    # the vision graph holds its reduction steps; the decoder's live in the (unquantized) reduction graphs
    for stage in (VISION, *_reductions(tiny_bundle)):
        fp32 = _graph(tiny_bundle, stage)
        quant = _graph(w4a8_bundle, stage)
        red = reduction_node_names(fp32)
        assert red and red <= {n.name for n in quant.graph.node}  # the reduction is all still there
        assert reduction_node_names(quant) == red  # and still attributable (metadata kept)
        assert G.qdq_feeding(quant, red) == {}
    for stage in (VISION, *_segments(tiny_bundle)):
        quant = _graph(w4a8_bundle, stage)
        assert set(G.qdq_consumers(quant)) <= {"MatMul", "Conv", "Gemm"}, stage  # dequantized tensors feed weight GEMMs only
    for seg in _segments(tiny_bundle):
        assert not reduction_node_names(_graph(tiny_bundle, seg)), seg  # no reduction node inside a segment


def _vision_tokens(bundle: Path, pixel_values: np.ndarray) -> np.ndarray:
    """The bundle's vision graph in a plain ONNX Runtime session (not the report's probe), flattened, float64."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(bundle / B.ONNX_DIR / f"{VISION}.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {"pixel_values": pixel_values})[0].astype(np.float64).ravel()


def test_report_and_selection_differences(w4a8_bundle: Path, tiny_bundle: Path) -> None:
    from bundle.frontend import Frontend
    from ficoco.images import TEST_IMAGES, test_image

    report = json.loads((w4a8_bundle / "reports" / "quantize.json").read_text())
    ev = report["evaluation"]
    assert ev["images"] == [TEST_IMAGES[0]]  # --eval-images 1
    assert ev["options"] == {"images": 1, "new_tokens": 4, "repeats": 1, "question": "What is in the picture?", "threads": None}
    # sizes are the files on disk, every graph of the bundle; the embedding, splice and reductions are copied
    # unquantized, the vision graph and every decoder segment shrink
    names = _graph_names(tiny_bundle)
    assert list(ev["sizes"]) == list(names)
    for g in names:
        a, b = Q.graph_bytes(tiny_bundle / B.ONNX_DIR / f"{g}.onnx"), Q.graph_bytes(w4a8_bundle / B.ONNX_DIR / f"{g}.onnx")
        assert ev["sizes"][g] == {"fp32_bytes": a, "quantized_bytes": b, "ratio": round(b / a, 4)}
        assert (b < a) if g == VISION or segment_index(g) is not None else (b == a), g
    assert set(ev["latency_ort_cpu"]) == {VISION, PREFILL}  # stages, not graphs
    # selection: one entry per reduction step of the schedule, |T| = n - r kept, the counts add up
    schedule = load_manifest(tiny_bundle, verify=False).schedule
    kept = {VISION: [s["n"] - s["r"] for s in schedule["vision"]["steps"]],
            PREFILL: [s["n"] - s["r"] for s in schedule["decoder"]["steps"]]}
    assert len(kept[VISION]) == 11 and len(kept[PREFILL]) == len(_reductions(tiny_bundle)) > 0
    for key, stage in ((VISION, VISION), (f"{PREFILL}:isolated", PREFILL), (f"{PREFILL}:end_to_end", PREFILL)):
        steps = ev["selection"][key]["steps"]
        assert [s["step"] for s in steps] == list(range(len(kept[stage])))
        assert [s["kept"] for s in steps] == kept[stage]
        for s in steps:
            assert len(s["differ_per_sample"]) == 1 and s["differ"] == s["differ_per_sample"][0] <= s["kept"]
            assert s["max_fraction"] == s["differ"] / s["kept"]
        if stage == PREFILL:  # decoder step i is read out of reduction graph i + 1
            assert [s["node"].split("/")[0] for s in steps] == _reductions(tiny_bundle)
        assert ev["selection"][key]["summary"] == {
            "steps": len(steps), "steps_with_differences": sum(1 for s in steps if s["differ"]),
            "differ_total": sum(s["differ"] for s in steps),
        }
    assert ev["selection"][VISION]["summary"]["differ_total"] > 0  # INT8 vision changes which tokens are kept
    # greedy agreement over 4 tokens: whole positions, and every position before the first divergence agrees
    g = ev["greedy"]
    assert g["new_tokens"] == 4 and len(g["first_divergence"]) == 1
    (div,) = g["first_divergence"]
    assert g["identical"] == (div is None)
    assert (4 * g["agreement_mean"]).is_integer()
    if div is None:
        assert g["agreement_mean"] == 1.0
    else:
        assert div / 4 <= g["agreement_mean"] <= 3 / 4
    # the vision error is the quantized graph's against the fp32 graph's on the same pixels (recomputed here)
    px = Frontend.from_bundle(tiny_bundle, verify=False).preprocess([test_image(TEST_IMAGES[0])])
    ref, got = _vision_tokens(tiny_bundle, px), _vision_tokens(w4a8_bundle, px)
    err = ev["errors"][VISION]
    assert err["max_abs_err"] == pytest.approx(float(np.abs(got - ref).max()), rel=1e-4)
    assert err["mean_abs_err"] == pytest.approx(float(np.abs(got - ref).mean()), rel=1e-4)
    assert err["cosine_min"] == pytest.approx(float(got @ ref / (np.linalg.norm(got) * np.linalg.norm(ref))), rel=1e-5)
    assert err["cosine_min"] < 1.0 and err["mean_abs_err"] < err["max_abs_err"]


def test_quantized_bundle_runs_in_onnxruntime(w4a8_bundle: Path) -> None:
    from engines.builder import BuildOptions, plan_build
    from engines.runtime import Pipeline
    from ficoco.images import test_image

    pipe = Pipeline.from_bundle(w4a8_bundle, backend="onnxruntime")
    answer = pipe.generate(test_image("astronaut"), "What is in the picture?", max_new_tokens=4, stop_token_ids=[])
    assert len(answer.token_ids) == 4
    plan = plan_build(w4a8_bundle, BuildOptions())  # no TensorRT needed: typing and Q/DQ scan
    assert plan.strongly_typed and plan.flags == ()
    assert plan.qdq[VISION] == {"int8"} and all(plan.qdq[g] == {"int4"} for g in _segments(w4a8_bundle))
    assert all(plan.qdq[g] == set() for g in (EMBED, SPLICE, *_reductions(w4a8_bundle)))


def test_bad_input_exits_2(tmp_path: Path, tiny_bundle: Path, w4a8_bundle: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(quantize_main, [str(tmp_path / "nope"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and "no bundle" in res.output
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(quantize_main, [str(tiny_bundle), "-o", str(tmp_path / "o1"), "--calib-images", str(empty)])
    assert res.exit_code == 2 and "holds no images" in res.output
    res = runner.invoke(quantize_main, [str(w4a8_bundle), "-o", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "already quantized" in res.output
    res = runner.invoke(quantize_main, [str(tiny_bundle), "-o", str(tmp_path / "o3"), "--vision", "none", "--decoder", "none"])
    assert res.exit_code == 2 and "nothing to quantize" in res.output
    assert not any(p.name.startswith(("o1", "o2", "o3", ".o")) for p in tmp_path.iterdir())  # nothing half-written


def test_modified_quantized_bundle_is_refused(w4a8_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(w4a8_bundle, copy)
    with open(copy / B.ONNX_DIR / f"{_segments(copy)[-1]}.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(B.BundleError, match="modified"):
        load_manifest(copy, verify=True)


# ----------------------------------------------------------------------------------------------------
# Q/DQ lint rules and selection helpers on hand-made graphs
# ----------------------------------------------------------------------------------------------------


def _qdq_model(zero: int = 0, dynamic_scale: bool = False, int4_activation: bool = False) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    inits = [w, numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(zero, np.int8), "z")]
    nodes = []
    scale = "s"
    if dynamic_scale:
        nodes.append(helper.make_node("ReduceMax", ["x"], ["sx"], keepdims=0, name="scale_from_data"))
        scale = "sx"
    if int4_activation:
        inits.append(numpy_helper.from_array(np.array(0, np.int8), "z4"))
        inits[-1] = helper.make_tensor("z4", TensorProto.INT4, [], [0])
    zp = "z4" if int4_activation else "z"
    nodes += [
        helper.make_node("QuantizeLinear", ["x", scale, zp], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", scale, zp], ["xd"], name="dq"),
        helper.make_node("MatMul", ["xd", "w"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_qdq_lint_rules() -> None:
    assert not has_errors(lint_model(_qdq_model(), "trt11"))
    ids = {f.rule_id for f in lint_model(_qdq_model(zero=3), "trt11") if f.severity == "error"}
    assert ids == {"qdq-zero-point"}
    ids = {f.rule_id for f in lint_model(_qdq_model(dynamic_scale=True), "trt11") if f.severity == "error"}
    assert "qdq-scale-constant" in ids
    ids = {f.rule_id for f in lint_model(_qdq_model(int4_activation=True), "trt11") if f.severity == "error"}
    assert "qdq-int4" in ids


def test_selection_helpers(tiny_bundle: Path) -> None:
    assert set_differences(np.array([[1, 2, 3], [4, 5, 6]]), np.array([[3, 2, 1], [4, 5, 7]])) == [0, 1]
    steps = selection_steps(_graph(tiny_bundle, VISION))
    assert len(steps) == 11 and all(s.node for s in steps)
    for g in _reductions(tiny_bundle):  # one decoder step per reduction graph
        assert len(selection_steps(_graph(tiny_bundle, g))) == 1, g
    for g in (SPLICE, *_segments(tiny_bundle)):
        assert selection_steps(_graph(tiny_bundle, g)) == [], g


def test_stage_modes_put_the_decoder_mode_on_every_segment() -> None:
    from bundle.names import graph_names

    names = graph_names(3)  # vision, embed, splice, segment 0, reduce 1, segment 1, reduce 2, segment 2
    assert Q.stage_modes("int8", "int4-weight", names) == {
        VISION: "int8", "decoder_segment_0": "int4-weight", "decoder_segment_1": "int4-weight",
        "decoder_segment_2": "int4-weight"}
    assert Q.stage_modes("none", "int8", graph_names(1)) == {"decoder_segment_0": "int8"}
    assert Q.stage_modes("fp8", "none", names) == {VISION: "fp8"}


def test_calibration_feeds_per_segment_in_prefill_and_decode(tiny_bundle: Path, tmp_path: Path) -> None:
    """Every decoder segment is calibrated on what it sees in both phases: the prompt with an empty past,
    then one token with the cache; the feeds are exactly its graph's inputs."""
    import onnxruntime as ort

    from calibration import data as D
    from ficoco.images import test_images

    segments = _segments(tiny_bundle)
    calib = D.collect(tiny_bundle, test_images()[:1], ["What is in the picture?"], 1, step_samples=2)
    assert set(calib.samples) == {VISION, *segments} and calib.size(VISION) == 1
    manifest = load_manifest(tiny_bundle, verify=False)
    text_len = set()
    for seg, plan in zip(segments, manifest.decoder_segments(), strict=True):
        feeds = calib.feeds(seg)
        assert len(feeds) == 3, seg  # 1 prefill + 2 decode steps
        assert all(set(f) == set(manifest.graphs[seg].input_names) for f in feeds)
        pre, *dec = feeds
        t = pre["hidden_states"].shape[1]
        text_len.add(t - plan.span)  # the prompt: the text and the visual tokens this segment's blocks see
        past = [k for k in pre if k.startswith("past_key_values.")]
        assert past and all(pre[k].shape[2] == 0 for k in past)  # prefill: an empty past
        for i, f in enumerate(dec):  # decode: one token, the cache of the prompt and earlier tokens
            assert f["hidden_states"].shape[1] == 1 and f["position_ids"].shape == (1, 1)
            assert all(f[k].shape[2] == t + i for k in past), seg
        sess = ort.InferenceSession(str(tiny_bundle / B.ONNX_DIR / f"{seg}.onnx"), providers=["CPUExecutionProvider"])
        for f in feeds:  # each feed runs the graph as it is
            sess.run(None, f)
    assert len(text_len) == 1
    calib.save(tmp_path / "calib")
    back = D.CalibrationSet.load(tmp_path / "calib")
    assert {g: back.size(g) for g in back.samples} == {g: calib.size(g) for g in calib.samples}
    assert back.feeds(segments[0])[0]["past_key_values.0.key"].shape[2] == 0


# ----------------------------------------------------------------------------------------------------
# Slow: the real SmolLM2-135M decoder weights
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smol_w4a8_bundle(smol, tmp_path: Path) -> None:
    from engines.runtime import Pipeline
    from exporter.export import ExportOptions
    from exporter.pipeline import export_bundle
    from ficoco.images import test_image
    from ficoco.planner import ScheduleRequest

    src = export_bundle(smol, ScheduleRequest(variant="VL", ratio=0.25, layers={"l_start": 2, "l_end": 5}), tmp_path / "smol",
                        ExportOptions(max_batch_size=1, max_text_len=64, max_new_tokens=16))
    out = _quantize(src, tmp_path / "smol-w4a8", "--calib-size", "4", "--eval-images", "3", "--eval-tokens", "16")
    manifest = load_manifest(out, verify=True)
    assert all(manifest.quantization["graphs"][g]["quantized_nodes"] > 0 for g in manifest.graph_names()
               if segment_index(g) is not None)
    runtime = {g: [i["name"] for i in manifest.graphs[g].inputs] for g in manifest.graphs}
    assert not has_errors(lint_files(sorted((out / B.ONNX_DIR).glob("*.onnx")), runtime_inputs=runtime))
    report = json.loads((out / "reports" / "quantize.json").read_text())["evaluation"]
    print(json.dumps({k: report[k] for k in ("sizes", "latency_ort_cpu", "errors", "greedy")}, indent=1))
    print({k: [s["differ"] for s in v["steps"]] for k, v in report["selection"].items()})
    # real decoder weights: INT4 weight-only keeps the logits close (a loose bound, not a hard-coded result)
    assert report["errors"][f"{PREFILL}:logits"]["cosine_min"] > 0.9
    pipe = Pipeline.from_bundle(out, backend="onnxruntime")
    answer = pipe.generate(test_image("chelsea"), "What is in the picture?", max_new_tokens=8, stop_token_ids=[])
    assert len(answer.token_ids) == 8


def test_ficoco_check_judges_a_quantized_bundle_against_fp32_pytorch(w4a8_bundle: Path, tiny_bundle: Path) -> None:
    """ficoco-check on the quantized bundle: the quantized thresholds apply (cosine only), every level is
    measured against the fp32 PyTorch model, and the quantized and fp32 graphs really differ."""
    from engines.check import CheckOptions, run_check
    from engines.runtime import Pipeline
    from ficoco.images import test_image

    report = run_check(w4a8_bundle, CheckOptions(backend="onnxruntime", num_samples=1, max_new_tokens=4))
    t = report.thresholds
    assert report.bundle_kind == "quantized" and t.min_cosine == 0.99 and not t.gate_tolerance
    stages = report.stage_summary()
    assert set(stages) == {
        "vision_encoder:visual_tokens", "embed_tokens:inputs_embeds", "decoder_prefill:logits",
        "decoder_prefill:present", "decoder_step:logits", "decoder_step:present",
    }
    vis = stages["vision_encoder:visual_tokens"]
    assert vis["max_abs_err"] > 0.0 and vis["min_cosine"] < 1.0  # the INT8 vision graph is not the fp32 one
    emb = stages["embed_tokens:inputs_embeds"]
    assert emb["max_abs_err"] == 0.0 and emb["min_cosine"] == 1.0 and emb["passed"]  # never quantized
    for g, s in stages.items():  # judged by cosine alone: a group passes exactly when its least cosine reaches 0.99
        assert s["passed"] == (s["min_cosine"] >= 0.99), g
    # level 2: the reference tokens are fp32 PyTorch's, which the fp32 bundle reproduces (tests/test_check.py);
    # the candidate tokens are the quantized bundle's
    (sample,) = report.samples
    fp32 = Pipeline.from_bundle(tiny_bundle, backend="onnxruntime", verify=False)
    quant = Pipeline.from_bundle(w4a8_bundle, backend="onnxruntime", verify=False)
    px = fp32.preprocess([test_image(sample.image)])
    ids, offsets = fp32.tokenize([sample.prompt])
    assert sample.greedy.reference_tokens == fp32.generate_ids(px, ids, offsets, 4, stop_token_ids=[])[0].tolist()
    assert sample.greedy.tokens == quant.generate_ids(px, ids, offsets, 4, stop_token_ids=[])[0].tolist()
    matches = sum(a == b for a, b in zip(sample.greedy.tokens, sample.greedy.reference_tokens, strict=True))
    assert report.greedy_summary()["match_rate"] == sample.greedy.match_rate == matches / 4
    # the verdict: exactly the stage groups below the cosine gate fail, and the tokens when under half match
    failed_stages = {f.split()[1] for f in report.failures if f.startswith("stage ")}
    assert failed_stages == {g for g, s in stages.items() if not s["min_cosine"] >= 0.99}
    assert any(f.startswith("greedy tokens:") for f in report.failures) == (matches / 4 < 0.5)
    assert report.passed == (not failed_stages and matches / 4 >= 0.5)
    json.dumps(report.to_dict(), allow_nan=False)  # every number finite
