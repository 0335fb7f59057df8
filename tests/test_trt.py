"""ficoco-build and the TensorRT backend.

The option checks, profiles and Q/DQ scan need no TensorRT and run everywhere. Building engines and
running them needs `tensorrt` and a CUDA GPU: those tests skip elsewhere, saying the TensorRT path was not
verified on that machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper
from test_runtime import QUESTION, linked_copy

from bundle.manifest import load_manifest
from bundle.names import EMBED, PREFILL, STAGES, STEP, VISION
from commands.build import main as build_main
from commands.run import main as run_main
from engines.builder import (
    BuildConfigError,
    BuildOptions,
    parse_shape_args,
    plan_build,
    qdq_types,
    resolve_profiles,
)
from ficoco.images import test_image

NO_TRT = "TensorRT/CUDA absent: the TensorRT path was not verified here"


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Path:
    return tiny_bundle


# -------------------------------------------------------------------------------------------------------------
# no TensorRT needed
# -------------------------------------------------------------------------------------------------------------


def test_parse_shape_args_polygraphy_syntax() -> None:
    got = parse_shape_args(["input_ids:[1,64]", "pixel_values:[2,3,336,336] decoder_step/inputs_embeds:[2, 1, 64]"])
    assert got == {"input_ids": [1, 64], "pixel_values": [2, 3, 336, 336], "decoder_step/inputs_embeds": [2, 1, 64]}
    assert parse_shape_args(["past_key_values.3.key:[1,4,300,16]"]) == {"past_key_values.3.key": [1, 4, 300, 16]}
    for bad in ("input_ids", "input_ids:[1,x]", "input_ids:(1,2)", "input_ids:[-1,2]"):
        with pytest.raises(BuildConfigError, match="--trt-max-shapes"):
            parse_shape_args([bad])


def test_profiles_from_the_manifest_with_overrides(bundle: Path) -> None:
    m = load_manifest(bundle, verify=False)
    base = resolve_profiles(m, BuildOptions())
    assert set(base) == set(STAGES)
    for g in STAGES:
        for name, r in m.trt_profiles[g].items():
            assert base[g][name] == r
    # every dynamic input of every graph has a range (image_offset / position included)
    assert set(base[PREFILL]) == {"inputs_embeds", "visual_tokens", "image_offset"}
    assert len(base[STEP]) == 2 + 2 * m.decoder["num_layers"]
    d = m.geometry["decoder"]["hidden_size"]
    over = resolve_profiles(m, BuildOptions(max_shapes={"decoder_prefill/inputs_embeds": [2, 100, d], "input_ids": [2, 100]},
                                            opt_shapes={"input_ids": [1, 50]}))
    assert over[PREFILL]["inputs_embeds"]["max"] == [2, 100, d]
    assert over[STEP]["inputs_embeds"] == base[STEP]["inputs_embeds"]  # qualified: prefill only
    assert over[EMBED]["input_ids"] == {"min": [1, 1], "opt": [1, 50], "max": [2, 100]}
    with pytest.raises(BuildConfigError, match="no graph has such an input"):
        resolve_profiles(m, BuildOptions(max_shapes={"attention_mask": [1, 2]}))
    with pytest.raises(BuildConfigError, match="rank 2"):
        resolve_profiles(m, BuildOptions(max_shapes={"pixel_values": [2, 3]}))
    with pytest.raises(BuildConfigError, match="axis 1 is fixed at 3"):
        resolve_profiles(m, BuildOptions(max_shapes={"pixel_values": [2, 4, 336, 336]}))
    with pytest.raises(BuildConfigError, match="min <= opt <= max"):
        resolve_profiles(m, BuildOptions(min_shapes={"input_ids": [1, 100]}))


def test_plan_build_typing_and_precision_rules(bundle: Path) -> None:
    plain = plan_build(bundle, BuildOptions(verify=False))
    assert plain.strongly_typed and plain.flags == () and set(plain.onnx) == set(STAGES)
    assert all(v == set() for v in plain.qdq.values())
    fp16 = plan_build(bundle, BuildOptions(precisions=("fp16",), verify=False))
    assert not fp16.strongly_typed and fp16.flags == ("FP16",)
    with pytest.raises(BuildConfigError, match="strongly typed build of an fp32 export"):
        plan_build(bundle, BuildOptions(precisions=("fp16",), strongly_typed=True, verify=False))
    with pytest.raises(BuildConfigError, match="one of --fp16 / --bf16"):
        plan_build(bundle, BuildOptions(precisions=("fp16", "bf16"), verify=False))
    for p in ("int8", "fp8"):
        with pytest.raises(BuildConfigError, match=r"explicit Q/DQ.*never uses TensorRT's implicit INT8 calibration.*TensorRT 11"):
            plan_build(bundle, BuildOptions(precisions=(p,), verify=False))
    with pytest.raises(BuildConfigError, match="--workspace"):
        plan_build(bundle, BuildOptions(workspace_mib=0, verify=False))
    with pytest.raises(BuildConfigError, match="0..5"):
        plan_build(bundle, BuildOptions(builder_optimization_level=7, verify=False))


def _qdq_model(path: Path, zp_type: int) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [0.1])
    zp = helper.make_tensor("zp", zp_type, [], [0])
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"]), helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [x], [y], [scale, zp])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    return path


def test_qdq_scan(tmp_path: Path, bundle: Path) -> None:
    assert qdq_types(_qdq_model(tmp_path / "int8.onnx", TensorProto.INT8)) == {"int8"}
    assert qdq_types(_qdq_model(tmp_path / "fp8.onnx", TensorProto.FLOAT8E4M3FN)) == {"fp8"}
    assert qdq_types(bundle / "onnx" / f"{VISION}.onnx") == set()


def test_build_cli_checks_options_before_needing_tensorrt(bundle: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(build_main, [str(bundle), "--int8"])
    assert res.exit_code == 2 and "explicit Q/DQ" in res.stderr and "Traceback" not in res.output
    res = runner.invoke(build_main, [str(bundle), "--trt-max-shapes", "input_ids:[1,x]"])
    assert res.exit_code == 2 and "cannot read 'input_ids:[1,x]'" in res.stderr
    res = runner.invoke(build_main, [str(bundle) + "-missing"])
    assert res.exit_code == 2 and "no bundle at" in res.stderr
    res = runner.invoke(build_main, ["--help"])
    assert res.exit_code == 0 and "MiB" in res.output and "name:[d0,d1,...]" in res.output


def test_build_cli_without_tensorrt(bundle: Path) -> None:
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here; this test covers machines without it")
    except ImportError:
        pass
    res = CliRunner().invoke(build_main, [str(bundle), "--fp16", "--workspace", "1024"])
    assert res.exit_code == 2
    assert res.stderr.startswith("error: TensorRT is not installed (pip install tensorrt / JetPack)")
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.output


# -------------------------------------------------------------------------------------------------------------
# TensorRT and a GPU
# -------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trt_env() -> object:
    trt = pytest.importorskip("tensorrt", reason=NO_TRT)
    if not torch.cuda.is_available():
        pytest.skip(NO_TRT)
    return trt


@pytest.fixture(scope="module")
def built(trt_env: object, bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A symlinked copy of the bundle with fp32 engines (no TF32) and its timing cache."""
    b = linked_copy(bundle, tmp_path_factory.mktemp("trt") / "bundle")
    cache = b.parent / "timing.cache"
    res = CliRunner().invoke(build_main, [str(b), "--no-tf32", "--timing-cache", str(cache), "--builder-optimization-level", "1", "-v"])
    assert res.exit_code == 0, res.output
    return b, cache


@pytest.mark.gpu
def test_build_writes_engines_and_manifest(built: tuple[Path, Path], trt_env: object) -> None:
    from engines.trt_backend import ENGINE_MANIFEST, local_target

    b, cache = built
    target = local_target()
    d = b / "engines" / target.dirname
    em = json.loads((d / ENGINE_MANIFEST).read_text())
    assert em["tensorrt_version"] == target.tensorrt_version and em["sm"] == target.sm and em["gpu_name"]
    assert set(em["engines"]) == set(STAGES) and all((d / e["file"]).stat().st_size > 0 for e in em["engines"].values())
    assert cache.stat().st_size > 0 and em["build"]["timing_cache"] == str(cache)
    res = CliRunner().invoke(build_main, [str(b), "--timing-cache", str(cache)])
    assert res.exit_code == 2 and "--force" in res.stderr  # never overwrites silently


@pytest.mark.gpu
def test_tensorrt_greedy_tokens_match_onnxruntime(built: tuple[Path, Path], trt_env: object, tmp_path: Path) -> None:
    from engines.runtime import Pipeline
    from engines.trt_backend import TrtStages

    b, _ = built
    trt_pipe = Pipeline.from_bundle(b, backend="tensorrt")
    ort_pipe = Pipeline.from_bundle(b, backend="onnxruntime", verify=False)
    assert trt_pipe.backend == "tensorrt" and isinstance(trt_pipe.stages, TrtStages)
    images = [test_image("chelsea"), test_image("astronaut")]
    got = trt_pipe.generate_batch(images, QUESTION, max_new_tokens=16, stop_token_ids=[])
    ref = ort_pipe.generate_batch(images, QUESTION, max_new_tokens=16, stop_token_ids=[])
    assert [a.token_ids for a in got] == [a.token_ids for a in ref]
    # the KV cache lives in the two preallocated buffer sets and stays on the GPU
    st = trt_pipe.stages
    px = trt_pipe.preprocess(images[:1])
    ids, off = trt_pipe.tokenize([QUESTION])
    with torch.inference_mode():
        logits, past = st.prefill(st.embed(ids), st.encode_image(px), off)
        assert past[0].is_cuda and past[0].data_ptr() == st._sets[0][0].data_ptr()
        _, past2 = st.step(st.embed(logits.argmax(-1)[:, None]), torch.tensor([ids.shape[1] + 288]), past)
        assert past2[0].data_ptr() == st._sets[1][0].data_ptr() and past2[0].shape[2] == past[0].shape[2] + 1
    t: dict = {}
    trt_pipe.generate(images[0], QUESTION, max_new_tokens=8, stop_token_ids=[], timings=t)
    assert t["prefill_ms"] > 0 and t["decode_tokens_per_s"] > 0


@pytest.mark.gpu
def test_run_cli_on_tensorrt_and_refusal_of_foreign_engines(built: tuple[Path, Path], trt_env: object, tmp_path: Path) -> None:
    from engines.trt_backend import ENGINE_MANIFEST, local_target

    b, _ = built
    img = tmp_path / "cat.png"
    test_image("chelsea").save(img)
    res = CliRunner().invoke(run_main, [str(b), "--image", str(img), "--prompt", QUESTION, "--backend", "tensorrt", "--max-new-tokens", "8"])
    assert res.exit_code == 0, res.output
    other = linked_copy(b, tmp_path / "foreign")
    target = local_target()
    mpath = other / "engines" / target.dirname / ENGINE_MANIFEST
    em = json.loads(mpath.read_text())
    em["sm"] = target.sm + 1
    mpath.unlink()
    mpath.write_text(json.dumps(em))
    res = CliRunner().invoke(run_main, [str(other), "--image", str(img), "--prompt", QUESTION, "--backend", "tensorrt"])
    assert res.exit_code == 2 and f"sm{target.sm + 1}" in res.stderr and "ficoco-build" in res.stderr
