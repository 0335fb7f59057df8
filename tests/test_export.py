"""ficoco-export: bundles on `tiny`, their graphs, validation, lint, and the failure paths of the CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from bundle.compare import ALLCLOSE, OutputGates, compare_output
from bundle.layout import BundleError
from bundle.manifest import SCHEMA_VERSION, load_manifest
from bundle.names import EMBED, SPLICE, VISION, graph_names, segment_graph, segment_index
from bundle.ort import OrtSession
from bundle.session import SessionStages
from commands.export import main as export_main
from exporter.export import ExportOptions, example_inputs, export_graph
from exporter.lint import has_errors, lint_files
from exporter.pipeline import export_bundle
from ficoco.models import LoadedModel
from ficoco.planner import ScheduleRequest, plan
from ficoco.reduced_llava import ReducedLlava
from ficoco.schedule import Schedule

FAST = ExportOptions(max_batch_size=2, max_text_len=128, max_new_tokens=32, optimize=False)
CLI = [sys.executable, "-m", "commands.export"]


@pytest.fixture(scope="session")
def vl_bundle(tiny_bundle: Path) -> Path:
    return tiny_bundle


def test_bundle_layout_and_manifest(vl_bundle: Path, tiny: LoadedModel) -> None:
    m = load_manifest(vl_bundle)  # verifies every sha256
    names = m.graph_names()
    assert names[:4] == (VISION, EMBED, SPLICE, segment_graph(0)) and len(names) == 3 + 2 * 4 + 1  # 4 decoder steps
    assert set(m.graphs) == set(names)
    for name in names:
        assert (vl_bundle / "onnx" / f"{name}.onnx").is_file() and f"onnx/{name}.onnx" in m.files
    assert (vl_bundle / "tokenizer").is_dir() and (vl_bundle / "preprocessor_config.json").is_file()
    assert m.variant == "VL" and m.method == "ficoco" and m.opset == 18
    assert m.visual_tokens == {"in": 576, "to_decoder": 288, "final": 144}
    assert m.source_model["revision"] == tiny.revision
    first = [i["name"] for i in m.graphs[segment_graph(0)].inputs]
    assert first[:4] == ["hidden_states", "position_ids", "past_key_values.0.key", "past_key_values.0.value"]
    assert [o["name"] for o in m.graphs[segment_graph(0)].outputs][:3] == ["hidden_out", "query_states", "present.0.key"]
    assert [o["name"] for o in m.graphs[segment_graph(4)].outputs][0] == "logits"
    # per-layer KV lengths: the manifest's decode offsets are the schedule's removed counts
    s = plan(tiny.geometry, "VL", ratio=0.25, l_end=7)
    assert Schedule.from_dict(m.schedule) == s
    assert m.decoder["position_offsets"] == [s.decoder.span_in - s.decoder.span_at(i) for i in range(32)]
    assert m.decoder["position_offsets"][-1] == 288 - 144
    assert [seg["then_reduce_at_block"] for seg in m.decoder["segments"]] == [4, 5, 6, 7, None]
    last = m.trt_profiles[segment_graph(4)]
    assert set(last) == {"prefill", "decode"}
    assert last["decode"]["past_key_values.31.key"]["min"][2] == 2 + 144
    assert last["decode"]["past_key_values.31.key"]["max"][2] == 128 + 144 + 31
    assert last["prefill"]["past_key_values.31.key"]["max"][2] == 0
    v = m.validation
    assert v["ran"] and v["greedy"]["identical"] and v["greedy"]["steps"] == 16 and v["batch"] == 2
    assert all(st["passed"] for st in v["stages"].values())


def test_decoder_weights_are_stored_once(vl_bundle: Path, tiny: LoadedModel) -> None:
    """Every decoder weight (each block's projections and norms, the final norm, the LM head) is an
    initializer of exactly one segment graph, and no other graph holds one."""
    m = load_manifest(vl_bundle, verify=False)
    reduced = ReducedLlava(tiny.model, Schedule.from_dict(m.schedule))
    decoder = {f"model.{n}" for n, _ in reduced.named_parameters()
               if (n.startswith("lm.") and not n.startswith("lm.embed_tokens")) or n.startswith("lm_head.")}
    owner: dict[str, list[str]] = {}
    for name in m.graph_names():
        model = onnx.load(str(vl_bundle / "onnx" / f"{name}.onnx"), load_external_data=False)
        for t in model.graph.initializer:
            if t.name in decoder:
                owner.setdefault(t.name, []).append(name)
    assert set(owner) == decoder
    twice = {w: g for w, g in owner.items() if len(g) > 1}
    assert not twice
    assert all(segment_index(g[0]) is not None for g in owner.values())


def test_graphs_pass_checker_and_lint(vl_bundle: Path) -> None:
    files = sorted((vl_bundle / "onnx").glob("*.onnx"))
    for f in files:
        onnx.checker.check_model(str(f), full_check=True)
    assert not has_errors(lint_files(files))


def _static_except_batch(model: onnx.ModelProto, ops: tuple[str, ...]) -> list[str]:
    shapes = {v.name: v.type.tensor_type.shape for v in list(model.graph.value_info) + list(model.graph.output)}
    bad = []
    seen = 0
    for node in model.graph.node:
        if node.op_type not in ops:
            continue
        for out in node.output:
            if out not in shapes:
                bad.append(f"{node.name}: no inferred shape")
                continue
            seen += 1
            dims = shapes[out].dim
            if any(not d.HasField("dim_value") for d in list(dims)[1:]):
                bad.append(f"{node.name} ({node.op_type}): {[d.dim_value or d.dim_param for d in dims]}")
    assert seen, f"no {ops} nodes found"
    return bad


def test_reduction_nodes_have_static_shapes(vl_bundle: Path) -> None:
    """TopK / ArgMax / ScatterElements (the selection machinery) have static shapes apart from the batch."""
    names = load_manifest(vl_bundle, verify=False).graph_names()
    for name in [VISION, *(n for n in names if n.startswith("decoder_reduce_"))]:
        model = onnx.load(str(vl_bundle / "onnx" / f"{name}.onnx"), load_external_data=False)
        assert _static_except_batch(model, ("TopK", "ArgMax", "ScatterElements")) == []
        # and every TopK's K is a constant (no data-dependent K)
        assert not any(n.op_type == "NonZero" for n in model.graph.node)


def test_tampered_bundle_is_refused(vl_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(vl_bundle, copy)
    load_manifest(copy)
    data = max((copy / "onnx").glob("decoder_segment_*.onnx.data"), key=lambda f: f.stat().st_size)  # the LM head's
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=f"{data.name} was modified"):
        load_manifest(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_manifest(copy)


def test_lint_only_cli(vl_bundle: Path) -> None:
    r = subprocess.run([*CLI, "--lint-only", str(vl_bundle)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "lint passed" in r.stderr


def _compare_vision(model: ReducedLlava, tmp_path: Path) -> bool:
    """Export the vision graph, lint it, run it in ONNX Runtime at another batch than the trace's, and compare
    with PyTorch elementwise (|err| <= 1e-3 + 1e-3 |ref|: random unit-variance inputs drift more than real
    prompts, which the export validation checks at atol 1e-4)."""
    ex = example_inputs(model, FAST)
    path = tmp_path / f"{VISION}.onnx"
    export_graph(model, VISION, path, FAST, ex)
    assert not has_errors(lint_files([path]))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    px = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        ref = model.encode_image(px).visual
    got = sess.run(None, {"pixel_values": px.numpy()})
    gates = OutputGates(atol=1e-3, rtol=1e-3, check_error_stat=ALLCLOSE)
    return compare_output(f"{VISION}:visual_tokens", got[0], ref, gates).passed


def _compare_prefill(model: ReducedLlava, tmp_path: Path, front: Path) -> bool:
    """Export the decoder graphs, lint them, run a prefill through them (`SessionStages`, ONNX Runtime) at
    another batch and text length than the trace's, and compare the logits and every present K/V with
    PyTorch. The vision and embed sessions (never run here) come from the session bundle `front`."""
    ex = example_inputs(model, FAST)
    sessions = {}
    for name in graph_names(len(model.segments)):
        if name in (VISION, EMBED):
            sessions[name] = OrtSession(front / "onnx" / f"{name}.onnx")
            continue
        path = tmp_path / f"{name}.onnx"
        export_graph(model, name, path, FAST, ex)
        assert not has_errors(lint_files([path]))
        sessions[name] = OrtSession(path)
    stages = SessionStages(sessions, model.segments)
    b, t = 1, 23
    d, n = model.geometry.decoder.hidden_size, model.schedule.decoder.span_in
    embeds, visual, offset = torch.randn(b, t, d), torch.randn(b, n, d), torch.tensor([5])
    with torch.no_grad():
        out = model.prefill(embeds, visual, offset)
    logits, presents = stages.prefill(embeds, visual, offset)
    ref = [out.logits, *[x for kv in out.cache for x in kv]]
    gates = OutputGates(atol=1e-3, rtol=1e-3, check_error_stat=ALLCLOSE)
    results = [compare_output(f"prefill:{i}", g, r, gates) for i, (g, r) in enumerate(zip([logits, *presents], ref, strict=True))]
    return all(c.passed for c in results)


# random / pool: ~50 s each on a loaded 2-core machine; their reduction step alone is exported and compared
# quickly in tests/test_baselines.py (test_baseline_step_exports_and_matches)
@pytest.mark.parametrize(
    "method", ["tome", "evit", pytest.param("random", marks=pytest.mark.slow), pytest.param("pool", marks=pytest.mark.slow)]
)
def test_other_vision_methods_export_and_match(tiny: LoadedModel, method: str, tmp_path: Path) -> None:
    model = ReducedLlava(tiny.model, plan(tiny.geometry, "V", method=method, ratio=0.25)).eval()
    assert _compare_vision(model, tmp_path)


def test_fastv_prefill_exports_and_matches(tiny: LoadedModel, tiny_bundle: Path, tmp_path: Path) -> None:
    model = ReducedLlava(tiny.model, plan(tiny.geometry, "L", method="fastv", ratio=0.25)).eval()
    assert len(model.segments) == 2  # one step: splice, segment 0, reduce 1, segment 1
    assert _compare_prefill(model, tmp_path, tiny_bundle)


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant,method,preset,positions",
    [
        ("none", "ficoco", "paper", "compact"),
        ("V", "ficoco", "paper", "compact"),
        ("V", "tome", "paper", "compact"),
        ("V", "evit", "paper", "compact"),
        ("L", "ficoco", "paper", "compact"),
        ("L", "ficoco", "official", "original"),
        ("L", "fastv", "paper", "original"),
        ("VL", "ficoco", "official", "compact"),
    ],
)
def test_every_variant_exports_and_validates(tiny: LoadedModel, tmp_path: Path, variant: str, method: str, preset: str, positions: str) -> None:
    ratio = None if variant == "none" else 0.25
    out = export_bundle(tiny, ScheduleRequest(variant=variant, method=method, ratio=ratio, preset=preset, positions=positions), tmp_path / "b", FAST)
    m = load_manifest(out)
    assert m.validation["greedy"]["identical"] and all(s["passed"] for s in m.validation["stages"].values())
    assert not has_errors(lint_files(sorted((out / "onnx").glob("*.onnx"))))
    # the runtime (ficoco-run's Pipeline, ONNX Runtime backend) answers exactly like the reduced PyTorch model
    from engines.runtime import Pipeline
    from ficoco.images import test_image

    pipe = Pipeline.from_bundle(out, backend="onnxruntime")
    px = pipe.preprocess([test_image("astronaut"), test_image("coffee")])
    ids, offsets = pipe.tokenize(["What is in the picture?"] * 2)
    got = pipe.generate_ids(px, ids, offsets, 16, stop_token_ids=[])
    reduced = ReducedLlava(tiny.model, Schedule.from_dict(m.schedule)).eval()
    with torch.no_grad():
        ref = reduced.generate(px, ids, offsets, 16)
    assert got.tolist() == ref.tolist()


@pytest.mark.slow
def test_smol_bundle_validates(smol: LoadedModel, tmp_path: Path) -> None:
    out = export_bundle(smol, ScheduleRequest(variant="VL", ratio=0.25), tmp_path / "smol", FAST)
    assert load_manifest(out)["validation"]["greedy"]["identical"]


@pytest.mark.slow
def test_graph_only_llava_7b(tmp_path: Path) -> None:
    r = subprocess.run(
        [*CLI, "--model", "llava-1.5-7b", "--variant", "VL", "--ratio", "0.25", "--graph-only", "-o", str(tmp_path / "g7b")],
        capture_output=True, text=True, timeout=1800, env={**os.environ, "HF_HOME": str(tmp_path / "empty-hf")},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    m = load_manifest(tmp_path / "g7b")
    assert m.graph_only and m.lint["ran"] and m.geometry["decoder"]["hidden_size"] == 4096
    assert not list((tmp_path / "g7b" / "onnx").glob("decoder_segment_*.onnx.data"))
    assert not has_errors(lint_files(sorted((tmp_path / "g7b" / "onnx").glob("*.onnx"))))


# ------------------------------------------------------------------------------------------------------
# failure paths: clear errors, exit codes, no half bundles
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "tiny", "--ratio", "0"], "ratio must be"),
        (["--model", "tiny", "--ratio", "nan"], "ratio must be"),
        (["--model", "tiny", "--ratio", "1.5"], "ratio must be"),
        (["--model", "tiny", "--variant", "XL", "--ratio", "0.5"], "Invalid value for '--variant'"),
        (["--model", "tiny", "--variant", "V", "--method", "fastv", "--ratio", "0.5"], "fastv"),
        (["--model", "tiny", "--variant", "VL", "--method", "pool", "--ratio", "0.5"], "VL needs method ficoco"),
        (["--model", "tiny", "--variant", "L", "--ratio", "0.5", "--l-start", "40"], "l_start"),
        (["--variant", "VL", "--ratio", "0.25"], "--model is required"),
    ],
)
def test_cli_rejects_bad_requests(args: list[str], message: str, tmp_path: Path) -> None:
    """In process (the same click command and error contract as the console script, without a Python start-up
    per case); `test_cli_rejects_bad_request_as_a_process` runs one case through a real process."""
    r = CliRunner().invoke(export_main, [*args, "-o", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    assert message in r.stderr
    assert "Traceback" not in r.stderr and isinstance(r.exception, SystemExit)
    assert not (tmp_path / "out").exists()


def test_cli_rejects_bad_request_as_a_process(tmp_path: Path) -> None:
    r = subprocess.run([*CLI, "--model", "tiny", "--ratio", "0", "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "ratio must be" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_cli_missing_weights_says_where_and_how(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    r = subprocess.run(
        [*CLI, "--model", "llava-1.5-7b", "--variant", "VL", "--ratio", "0.25", "-o", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert r.returncode == 2
    assert str(tmp_path / "hf" / "hub") in r.stderr and "download" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_cli_unreadable_model_dir(tmp_path: Path) -> None:
    bad = tmp_path / "broken-model"
    bad.mkdir()
    (bad / "config.json").write_text("{ not json")
    r = CliRunner().invoke(export_main, ["--model", str(bad), "--ratio", "0.25", "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "Traceback" not in r.stderr
    assert "broken-model" in r.stderr
    assert not (tmp_path / "out").exists()


def test_cli_refuses_non_empty_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = CliRunner().invoke(export_main, ["--model", "tiny", "--ratio", "0.25", "-o", str(out)])
    assert r.exit_code == 2 and "--force" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"


# SIGKILL is slow-only: it costs a second export, and what a killed run leaves (a hidden partial) is
# removed by the next run to that path, which tests/test_bad_inputs.py checks without an export.
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGKILL, marks=pytest.mark.slow)])
def test_interrupted_export_leaves_no_bundle(tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen([*CLI, "--model", "tiny", "--ratio", "0.25", "--no-optimize", "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    # wait until the export has made its staging directory, then interrupt it while it exports the first
    # graph (the SIGTERM handler is installed right after the directory is made; the second gives margin)
    while time.time() < deadline and not list(tmp_path.glob(".out.partial-*")):
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        time.sleep(0.2)
    assert list(tmp_path.glob(".out.partial-*")), "export never started"
    time.sleep(1.0)
    assert proc.poll() is None, "the export ended before it could be interrupted"
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert not out.exists()
    if sig == signal.SIGTERM:  # a catchable signal also removes the staging directory
        assert not list(tmp_path.glob(".out.partial-*"))
    assert math.isfinite(proc.returncode)


def test_manifest_is_json_with_tool_versions(vl_bundle: Path) -> None:
    m = json.loads((vl_bundle / "manifest.json").read_text())
    assert m["schema_version"] == SCHEMA_VERSION and "onnxruntime" in m["tool_versions"] and m["precision"] == "fp32"
    assert len(m["integrity"]["sha256"]) == 64 and m["schedule_request"]["variant"] == m["variant"]


def _plan_file(tmp_path: Path, model: str, name: str, *extra: str) -> Path:
    from click.testing import CliRunner

    from commands.plan import main as plan_main

    path = tmp_path / name
    res = CliRunner().invoke(plan_main, ["--model", model, "--variant", "VL", "--ratio", "0.25", *extra, "-o", str(path)])
    assert res.exit_code == 0, res.output
    return path


def test_a_schedule_from_ficoco_plan_is_used_as_it_is(tmp_path: Path) -> None:
    """`ficoco-plan -o FILE` then `ficoco-export --schedule FILE`: that schedule, refused when it cannot apply."""
    from click.testing import CliRunner

    from commands.export import main as export_main
    from ficoco.geometry import LlavaGeometry
    from ficoco.models import load_config
    from ficoco.planner import ScheduleRequest

    sched = _plan_file(tmp_path, "shapes", "plan.json", "--l-end", "3")
    data = json.loads(sched.read_text())
    made = ScheduleRequest(schedule=data).make(LlavaGeometry.from_config(load_config("shapes")))
    assert json.loads(json.dumps(made.to_dict())) == data
    # a complete plan takes no budget; a plan for another model does not fit
    res = CliRunner().invoke(export_main, ["--model", "shapes", "--schedule", str(sched), "--ratio", "0.5", "-o", str(tmp_path / "c")])
    assert res.exit_code == 2 and "drop --ratio" in res.output
    other = _plan_file(tmp_path, "tiny", "tiny.json")
    res = CliRunner().invoke(export_main, ["--model", "shapes", "--schedule", str(other), "--graph-only", "-o", str(tmp_path / "d")])
    assert res.exit_code == 2 and "decoder tower has" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "tiny.json"]


@pytest.mark.slow
def test_export_uses_a_schedule_written_by_ficoco_plan(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from commands.export import main as export_main

    sched = _plan_file(tmp_path, "shapes", "plan.json", "--l-end", "3")
    out = tmp_path / "b"
    res = CliRunner().invoke(export_main, ["--model", "shapes", "--schedule", str(sched), "--graph-only", "--no-lint", "-o", str(out)])
    assert res.exit_code == 0, res.output
    m = load_manifest(out, verify=False)
    assert m["schedule"] == json.loads(sched.read_text()) and m["schedule_request"]["schedule"] == m["schedule"]


def test_a_segment_graph_does_not_depend_on_the_ratio(tiny: LoadedModel, tmp_path: Path) -> None:
    """The premise of `exporter.reuse`, graph by graph: a decoder segment exported from two ratios with the
    steps in the same blocks is the same file, and `graph_key` names it alike; the vision encoder,
    splice and reductions, which depend on the budgets, are keyed apart or not at all."""
    from bundle.layout import sha256_file
    from bundle.names import reduce_graph
    from exporter.export import check_graph
    from exporter.reuse import graph_key
    from tests.conftest import TEST_BUNDLE_REQUEST

    opts = ExportOptions(max_batch_size=1, max_text_len=32, max_new_tokens=8)
    source = {"name": tiny.name, "source": tiny.source, "revision": tiny.revision}
    models = [ReducedLlava(tiny.model, ScheduleRequest(**{**TEST_BUNDLE_REQUEST, "ratio": r}).make(tiny.geometry)).eval()
              for r in (0.5, 0.25)]
    digests = []
    for i, m in enumerate(models):
        path = tmp_path / str(i) / "decoder_segment_1.onnx"
        export_graph(m, "decoder_segment_1", path, opts, example_inputs(m, opts))
        check_graph(path)
        digests.append(sha256_file(path))
    assert digests[0] == digests[1]
    key = [{g: graph_key(g, m, opts.to_dict(), source) for g in (EMBED, VISION, SPLICE, segment_graph(1), reduce_graph(1))}
           for m in models]
    assert key[0][segment_graph(1)] == key[1][segment_graph(1)] and key[0][EMBED] == key[1][EMBED]
    assert key[0][VISION] != key[1][VISION] and key[0][SPLICE] is None and key[0][reduce_graph(1)] is None
    assert graph_key(segment_graph(1), models[0], opts.to_dict(), {**source, "revision": "other"}) != key[0][segment_graph(1)]


@pytest.mark.slow
def test_a_sweep_links_the_graphs_that_do_not_depend_on_the_ratio(tiny: LoadedModel, tiny_bundle: Path, tmp_path: Path) -> None:
    """`exporter.reuse`: the embedding and the decoder segments of two ratios with the steps in the same
    blocks are byte-identical when both are exported afresh (the premise of linking them), and a bundle
    that links them from an earlier one of the sweep is file for file the bundle a fresh export makes."""
    from bundle.layout import sha256_file
    from exporter.pipeline import ValidationOptions
    from exporter.reuse import GraphReuse
    from tests.conftest import TEST_BUNDLE_REQUEST

    opts = ExportOptions(max_batch_size=2, max_text_len=128, max_new_tokens=32)  # the session bundle's options
    reuse = GraphReuse()
    half = ScheduleRequest(**{**TEST_BUNDLE_REQUEST, "ratio": 0.5})
    a = export_bundle(tiny, half, tmp_path / "a", opts, ValidationOptions(enabled=False), lint=False, reuse=reuse)
    assert reuse.reused == []  # nothing to link yet
    fresh = load_manifest(tiny_bundle)
    blocks = [(s["attention_blocks"], s["mlp_blocks"]) for s in fresh.decoder["segments"]]
    assert [(s["attention_blocks"], s["mlp_blocks"]) for s in load_manifest(a).decoder["segments"]] == blocks
    assert load_manifest(a).schedule["decoder"] != fresh.schedule["decoder"]  # other budgets in the same blocks
    shared = [EMBED] + [segment_graph(i) for i in range(len(fresh.decoder_segments()))]
    for g in shared:
        for suffix in (".onnx", ".onnx.data"):  # the tiny model's small segments keep their weights inline
            fa, ff = a / "onnx" / f"{g}{suffix}", tiny_bundle / "onnx" / f"{g}{suffix}"
            assert fa.is_file() == ff.is_file() and (not ff.is_file() or sha256_file(fa) == sha256_file(ff)), g
    c = export_bundle(tiny, ScheduleRequest(**TEST_BUNDLE_REQUEST), tmp_path / "c", opts, ValidationOptions(enabled=False),
                      lint=False, reuse=reuse)
    assert sorted(reuse.reused) == sorted(f"c/{g}" for g in shared)  # the vision encoder, splice and reductions are not
    for g in shared:
        assert os.stat(c / "onnx" / f"{g}.onnx").st_ino == os.stat(a / "onnx" / f"{g}.onnx").st_ino
    digests = {p.name: sha256_file(p) for p in sorted((c / "onnx").iterdir())}
    assert digests == {p.name: sha256_file(p) for p in sorted((tiny_bundle / "onnx").iterdir())}
    load_manifest(c, verify=True)
