"""ficoco-run and the Pipeline on the ONNX Runtime backend (CPU), against the reduced PyTorch model.

One tiny FiCoCo-VL 0.25 bundle is exported per test session (`tiny_bundle` in conftest.py, shared with the export and engine tests)
and reused read-only; tests that need a damaged bundle build a symlink copy with one file replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bundle.layout import sha256_file
from bundle.manifest import Manifest, load_manifest
from bundle.ort import ort_stages
from commands.run import main as run_main
from engines.engine_store import (
    ENGINE_MANIFEST,
    EngineError,
    EngineManifest,
    EngineMismatch,
    GpuTarget,
    find_engines,
)
from engines.runtime import InputError, Pipeline
from ficoco.generation import generate_tokens
from ficoco.images import test_image
from ficoco.models import LoadedModel
from ficoco.reduced_llava import ReducedLlava
from ficoco.sampling import SamplingConfig
from ficoco.schedule import Schedule

QUESTION = "What is in the picture?"


@pytest.fixture(scope="session")
def bundle(tiny_bundle: Path) -> Path:
    return tiny_bundle


@pytest.fixture(scope="session")
def pipe(bundle: Path) -> Pipeline:
    return Pipeline.from_bundle(bundle, backend="onnxruntime", verify=False)


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("images")
    paths = []
    for name in ("chelsea", "astronaut"):
        p = d / f"{name}.png"
        test_image(name).save(p)
        paths.append(p)
    return paths


def reference(tiny: LoadedModel, manifest: Manifest, px: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, n: int, eos: int | None, sampling: SamplingConfig | None = None) -> torch.Tensor:
    model = ReducedLlava(tiny.model, Schedule.from_dict(manifest.schedule)).eval()
    with torch.no_grad():
        return model.generate(px, ids, offsets, n, sampling=sampling, eos_token_id=eos)


def linked_copy(src: Path, dst: Path) -> Path:
    """A bundle copy made of symlinks (cheap); replace single files to damage it."""
    for p in src.rglob("*"):
        target = dst / p.relative_to(src)
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(p, target)
    return dst


def replace_file(path: Path, text: str) -> None:
    path.unlink()
    path.write_text(text)


# -------------------------------------------------------------------------------------------------------------
# the same tokens as PyTorch
# -------------------------------------------------------------------------------------------------------------


def test_pipeline_greedy_batch_matches_reduced_pytorch(pipe: Pipeline, tiny: LoadedModel, images: list[Path]) -> None:
    px = pipe.preprocess(images)
    ids, offsets = pipe.tokenize([QUESTION] * 2)
    eos = pipe.eos_token_ids[0]
    got = pipe.generate_ids(px, ids, offsets, 32)
    ref = reference(tiny, pipe.manifest, px, ids, offsets, 32, eos)
    assert got.tolist() == ref.tolist()
    assert got.shape[0] == 2 and got.shape[1] >= 1
    answers = pipe.generate_batch(images, QUESTION, max_new_tokens=32)
    for ans, row in zip(answers, ref.tolist(), strict=True):
        cut = row.index(eos) if eos in row else len(row)
        assert ans.token_ids == row[:cut] and ans.stopped == (eos in row)
        assert ans.text == tiny.tokenizer.decode(row[:cut], skip_special_tokens=True)


def test_cli_run_streams_the_reduced_pytorch_answer(bundle: Path, pipe: Pipeline, tiny: LoadedModel, images: list[Path]) -> None:
    res = CliRunner().invoke(run_main, [str(bundle), "--image", str(images[0]), "--prompt", QUESTION,
                                        "--backend", "onnxruntime", "--max-new-tokens", "24", "--ignore-eos", "--timings"])
    assert res.exit_code == 0, res.output
    stats = json.loads(res.stderr.strip().splitlines()[-1])  # --timings: one JSON line on stderr
    assert stats["prefill_ms"] > 0 and stats["ttft_ms"] > 0 and stats["new_tokens"] == 24 and stats["decode_steps"] == 23
    ids, offsets = pipe.tokenize([QUESTION])
    ref = reference(tiny, pipe.manifest, pipe.preprocess(images[:1]), ids, offsets, 24, None)
    assert ref.shape[1] == 24
    assert res.stdout == tiny.tokenizer.decode(ref[0].tolist(), skip_special_tokens=True) + "\n"


def test_sampling_with_a_seed_is_reproducible(bundle: Path, pipe: Pipeline, tiny: LoadedModel, images: list[Path]) -> None:
    cfg = SamplingConfig(do_sample=True, temperature=1.5, top_p=0.95, seed=7)
    a = pipe.generate(images[0], QUESTION, max_new_tokens=16, sampling=cfg, stop_token_ids=[])
    b = pipe.generate(images[0], QUESTION, max_new_tokens=16, sampling=cfg, stop_token_ids=[])
    assert a.token_ids == b.token_ids and len(a.token_ids) == 16
    greedy = pipe.generate(images[0], QUESTION, max_new_tokens=16, stop_token_ids=[])
    others = [pipe.generate(images[0], QUESTION, max_new_tokens=16, sampling=SamplingConfig(True, 1.5, 0.95, s), stop_token_ids=[]).token_ids for s in (1, 2)]
    assert any(o != greedy.token_ids for o in [a.token_ids, *others]), "sampling at temperature 1.5 never left the greedy path"
    args = [str(bundle), "--image", str(images[0]), "--prompt", QUESTION, "--backend", "onnxruntime",
            "--max-new-tokens", "16", "--ignore-eos", "--temperature", "1.5", "--top-p", "0.95", "--seed", "7", "--no-verify"]
    runs = [CliRunner().invoke(run_main, args) for _ in range(2)]
    assert all(r.exit_code == 0 for r in runs), runs[0].output
    assert runs[0].stdout == runs[1].stdout == tiny.tokenizer.decode(a.token_ids, skip_special_tokens=True) + "\n"


def test_io_binding_path_gives_the_same_tokens(bundle: Path, pipe: Pipeline, images: list[Path]) -> None:
    """The IOBinding + DLPack path (what the CUDA provider uses) run on CPU."""
    bound = ort_stages(bundle / "onnx", provider="cpu", io_binding=True)
    px = pipe.preprocess(images[:1])
    ids, offsets = pipe.tokenize([QUESTION])
    with torch.no_grad():
        got = generate_tokens(bound, px, ids, offsets, 8)
        ref = generate_tokens(pipe.stages, px, ids, offsets, 8)
    assert got.tolist() == ref.tolist()


def test_sessions_do_not_spin_wait() -> None:
    """A bundle's sessions run one after another; a finished one's spinning threads would take the cores."""
    from bundle.ort import session_options

    for so in (session_options(), session_options(2, optimize=False)):
        assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_a_session_opened_for_one_run_skips_constant_folding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Low-memory sessions open without ConstantFolding (it holds a folded fp32 copy of every fp16 weight
    beside the fp16 one while the graph opens), kept-loaded ones with it; an fp16 graph's outputs are
    bit-identical either way."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from bundle import ort as bo

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 48)).astype(np.float16), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Mul", ["h", "h"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [3, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [3, 48])], [w])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = rng.standard_normal((3, 64)).astype(np.float16)
    seen: list[list[str]] = []
    real = ort.InferenceSession

    def spy(*args, **kwargs):
        seen.append(list(kwargs.get("disabled_optimizers", [])))
        return real(*args, **kwargs)

    monkeypatch.setattr(bo.ort, "InferenceSession", spy)
    kept = bo.OrtSession(path, threads=1).run({"x": x})["y"]
    opened = bo.OrtSession(path, threads=1, keep_loaded=False).run({"x": x})["y"]
    assert seen == [[], ["ConstantFolding"], ["ConstantFolding"]]  # kept: one open; per run: specs, then the run
    assert np.array_equal(kept, opened)

def test_timings_hook(pipe: Pipeline, images: list[Path]) -> None:
    t: dict = {}
    ans = pipe.generate(images[0], QUESTION, max_new_tokens=8, stop_token_ids=[], timings=t)
    assert len(ans.token_ids) == 8
    for key in ("vision_ms", "embed_ms", "prefill_ms", "ttft_ms", "decode_ms", "total_ms", "preprocess_ms"):
        assert t[key] > 0, key
    assert t["ttft_ms"] >= t["vision_ms"] + t["prefill_ms"]
    assert t["decode_steps"] == 7 and len(t["step_ms"]) == 7 and t["decode_tokens_per_s"] > 0
    assert t["backend"] == "onnxruntime" and t["batch"] == 1 and t["new_tokens"] == 8


def test_chunked_batch_equals_single_runs(bundle: Path, pipe: Pipeline, images: list[Path]) -> None:
    """Three images with a decoder limit of 2: chunks of 2 + 1 give each image's own answer."""
    both = pipe.generate_batch([*images, images[0]], QUESTION, max_new_tokens=6, stop_token_ids=[])
    single = [pipe.generate(im, QUESTION, max_new_tokens=6, stop_token_ids=[]) for im in images]
    assert [a.token_ids for a in both] == [single[0].token_ids, single[1].token_ids, single[0].token_ids]


# -------------------------------------------------------------------------------------------------------------
# limits and bad inputs: one clear line, the right exit code, no traceback
# -------------------------------------------------------------------------------------------------------------


def run_cli(args: list[str], **env: str) -> tuple[int, str]:
    res = CliRunner().invoke(run_main, args, env=env or None)
    assert "Traceback" not in res.output and not isinstance(res.exception, AssertionError)
    return res.exit_code, res.stderr


def test_pipeline_refuses_what_the_bundle_was_not_exported_for(pipe: Pipeline, images: list[Path]) -> None:
    with pytest.raises(InputError, match=r"at most 128 text tokens \(shape_ranges.text_len\)"):
        pipe.generate(images[0], "why " * 200)
    with pytest.raises(InputError, match=r"at most 32 \(shape_ranges.max_new_tokens\)"):
        pipe.generate(images[0], QUESTION, max_new_tokens=33)
    with pytest.raises(InputError, match="different lengths"):
        pipe.generate_batch(images, [QUESTION, QUESTION + " Describe it in great detail, please."])
    with pytest.raises(InputError, match="2 images but 3 questions"):
        pipe.generate_batch(images, [QUESTION] * 3)


def test_cli_bad_inputs(bundle: Path, images: list[Path], tmp_path: Path) -> None:
    ok = ["--image", str(images[0]), "--prompt", QUESTION, "--backend", "onnxruntime", "--no-verify"]
    code, err = run_cli([str(tmp_path / "nope"), *ok])
    assert code == 2 and "no bundle at" in err and err.count("\n") == 1
    code, err = run_cli([str(images[0].parent), *ok])
    assert code == 2 and "manifest.json is missing" in err
    notimg = tmp_path / "cat.jpg"
    notimg.write_text("this is not a picture")
    code, err = run_cli([str(bundle), "--image", str(notimg), "--prompt", QUESTION])
    assert code == 2 and "not an image file" in err and "cat.jpg" in err
    code, err = run_cli([str(bundle), "--image", str(tmp_path / "missing.png"), "--prompt", QUESTION])
    assert code == 2 and "no such file" in err
    code, err = run_cli([str(bundle), *ok[:2], "--prompt", "why " * 200, *ok[4:]])
    assert code == 2 and "at most 128 text tokens" in err and err.startswith("error: ")
    code, err = run_cli([str(bundle), *ok, "--max-new-tokens", "33"])
    assert code == 2 and "at most 32" in err
    code, err = run_cli([str(bundle), *ok, "--greedy", "--temperature", "0.7"])
    assert code == 2 and "--greedy cannot be combined" in err
    code, err = run_cli([str(bundle), *ok, "--temperature", "0"])
    assert code == 2 and "temperature must be a finite number > 0" in err


def test_cli_tampered_bundle(bundle: Path, images: list[Path], tmp_path: Path) -> None:
    bad = linked_copy(bundle, tmp_path / "tampered")
    cfg = json.loads((bundle / "preprocessor_config.json").read_text())
    cfg["image_mean"] = [0.0, 0.0, 0.0]
    replace_file(bad / "preprocessor_config.json", json.dumps(cfg))
    code, err = run_cli([str(bad), "--image", str(images[0]), "--prompt", QUESTION, "--backend", "onnxruntime"])
    assert code == 2 and "preprocessor_config.json was modified after export (sha256 mismatch)" in err
    assert err.count("\n") == 1


def test_cli_tensorrt_backend_without_tensorrt(bundle: Path, images: list[Path]) -> None:
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here; this test covers machines without it")
    except ImportError:
        pass
    code, err = run_cli([str(bundle), "--image", str(images[0]), "--prompt", QUESTION, "--backend", "tensorrt", "--no-verify"])
    assert code == 2 and "TensorRT is not installed (pip install tensorrt / JetPack)" in err and err.count("\n") == 1


# -------------------------------------------------------------------------------------------------------------
# engines built for another TensorRT / GPU are refused (the check needs no TensorRT: fake engine manifests)
# -------------------------------------------------------------------------------------------------------------


def fake_engines(bundle: Path, version: str, sm: int, gpu: str = "NVIDIA Fake", source_sha: str | None = None) -> Path:
    manifest = load_manifest(bundle, verify=False)
    d = bundle / "engines" / f"trt-{version}-sm{sm}"
    d.mkdir(parents=True, exist_ok=True)
    engines = {}
    for g, info in manifest.graphs.items():
        plan = d / f"{g}.plan"
        plan.write_bytes(b"not a real engine " + g.encode())
        engines[g] = {"file": plan.name, "sha256": sha256_file(plan), "bytes": plan.stat().st_size,
                      "source": info.file, "source_sha256": source_sha or manifest.files[info.file]}
    em = EngineManifest(version, sm, gpu, "x86_64", engines, manifest.trt_profiles, {"strongly_typed": True})
    (d / ENGINE_MANIFEST).write_text(json.dumps(em.to_dict()))
    return d


def test_engine_version_and_sm_check(bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, images: list[Path]) -> None:
    b = linked_copy(bundle, tmp_path / "with-engines")
    manifest = load_manifest(b, verify=False)
    here = GpuTarget("10.3.0", 87, "Orin")
    with pytest.raises(EngineError, match="has no TensorRT engines; build them with `ficoco-build"):
        find_engines(b, manifest, here)
    fake_engines(b, "10.0.1", 89, "NVIDIA L4")
    with pytest.raises(EngineMismatch) as e:
        find_engines(b, manifest, here)
    msg = str(e.value)
    assert "TensorRT 10.0.1 on sm89 (NVIDIA L4)" in msg and "TensorRT 10.3.0 on sm87 (Orin)" in msg and "ficoco-build" in msg
    with pytest.raises(EngineMismatch, match="sm89"):  # same version, other GPU
        find_engines(b, manifest, GpuTarget("10.0.1", 87))
    with pytest.raises(EngineMismatch, match="TensorRT 10.0.1 on sm89"):  # same GPU, other version
        find_engines(b, manifest, GpuTarget("10.0.2", 89))
    d, em = find_engines(b, manifest, GpuTarget("10.0.1", 89))
    assert d.name == "trt-10.0.1-sm89" and em.gpu_name == "NVIDIA L4"
    # a plan changed after the build, and engines built from an earlier export, are refused too
    (d / "decoder_segment_0.plan").write_bytes(b"changed")
    with pytest.raises(EngineError, match="decoder_segment_0.plan was modified after the build"):
        find_engines(b, manifest, GpuTarget("10.0.1", 89))
    shutil.rmtree(d)
    fake_engines(b, "10.0.1", 89, source_sha="0" * 64)
    with pytest.raises(EngineMismatch, match="re-exported after the build"):
        find_engines(b, manifest, GpuTarget("10.0.1", 89))
    # through ficoco-run: the mismatch is one line, exit 2, before TensorRT would load anything
    monkeypatch.setattr("engines.trt_backend.local_target", lambda device=0: GpuTarget("10.3.0", 87, "Orin"))
    code, err = run_cli([str(b), "--image", str(images[0]), "--prompt", QUESTION, "--backend", "tensorrt", "--no-verify"])
    assert code == 2 and "were built for TensorRT 10.0.1 on sm89" in err and "rebuild them on this machine" in err
    # auto: falls back to ONNX Runtime instead
    code, _ = run_cli([str(b), "--image", str(images[0]), "--prompt", QUESTION, "--max-new-tokens", "2", "--no-verify"])
    assert code == 0


TOKENIZER_TEXTS = ["USER: <image>\nWhat is in the picture? ASSISTANT:", "  two  spaces, émigré café — 東京 🙂", "a\nb\tc </s> <s>"]


@pytest.mark.parametrize("which", ["tiny", "smol"])
def test_bundle_tokenizer_equals_transformers(which: str, tiny: LoadedModel, smol: LoadedModel, tmp_path) -> None:
    """The runtime's tokenizer (tokenizers alone, from the bundle's file) encodes and decodes as transformers does."""
    from bundle.tokenizer import BundleTokenizer

    hf = {"tiny": tiny, "smol": smol}[which].tokenizer
    hf.save_pretrained(str(tmp_path))
    ours = BundleTokenizer.from_dir(tmp_path)
    assert len(ours) == len(hf)
    for text in TOKENIZER_TEXTS:
        ids = hf(text, add_special_tokens=True)["input_ids"]
        assert ours(text)["input_ids"] == ids
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_stop_strings_end_the_answer_before_the_string(tiny_bundle) -> None:
    pipe = Pipeline.from_bundle(tiny_bundle, backend="onnxruntime")
    image = test_image("rocket")
    full = pipe.generate(image, QUESTION, max_new_tokens=16, stop_token_ids=[])
    assert len(full.text) >= 4
    stop = full.text[2:4]  # a string the answer is known to contain
    pieces: list[str] = []
    cut = pipe.generate(image, QUESTION, max_new_tokens=16, stop_token_ids=[], stop_strings=[stop], on_text=pieces.append)
    assert cut.stopped and cut.text == full.text[: full.text.index(stop)]
    assert "".join(pieces) == cut.text  # the stop string is never streamed, not even in part
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < len(full.token_ids)
    with pytest.raises(InputError, match="stop string"):
        pipe.generate(image, QUESTION, stop_strings=[""])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status; malloc_trim is glibc's")
def test_a_low_memory_run_gives_its_graph_memory_back(tmp_path: Path) -> None:
    """After a graph opened for one run closes, its weights' memory leaves RSS (`bundle.ort.trim_heap`):
    64 fp16 weights of 512 KiB (fp32 copies of 1 MiB, below glibc's mmap threshold, so they live in the
    C heap). In a fresh process, so no other test's allocations are counted."""
    code = f"""
import numpy as np, onnx
from onnx import TensorProto, helper, numpy_helper
from bundle.ort import OrtSession
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
rng = np.random.default_rng(0)
n = 64
ws = [numpy_helper.from_array(rng.standard_normal((512, 512)).astype(np.float16), f"w{{i}}") for i in range(n)]
nodes = [helper.make_node("MatMul", [f"h{{i}}", f"w{{i}}"], [f"h{{i + 1}}"]) for i in range(n)]
g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("h0", TensorProto.FLOAT16, [2, 512])],
                      [helper.make_tensor_value_info(f"h{{n}}", TensorProto.FLOAT16, [2, 512])], ws)
path = {str(tmp_path / "g.onnx")!r}
onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path, save_as_external_data=True, location="g.data")
before = rss()
OrtSession(path, threads=1, keep_loaded=False).run({{"h0": np.ones((2, 512), np.float16)}})
print(rss() - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    weights = 64 * 512 * 512 * (2 + 4)  # fp16 and fp32 bytes
    assert int(out.stdout.split()[-1]) < 0.4 * weights  # without the trim about all of them stay resident
