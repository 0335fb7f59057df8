"""ficoco-check: the accuracy gate of a bundle against PyTorch (stages, greedy tokens, reduction cost)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner, Result

from bundle.layout import MANIFEST, hash_files
from bundle.manifest import Manifest, write_manifest
from commands.check import main
from engines.check import (
    DEFAULT_THRESHOLDS,
    CheckOptions,
    CheckReport,
    first_token_kl,
    resolve_thresholds,
    token_agreement,
)

QUICK = ["--num-samples", "1", "--max-new-tokens", "4"]


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _rehash(bundle: Path) -> None:
    """Make a hand-edited bundle "valid" again: the manifest's sha256 list matches its files."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    write_manifest(bundle, Manifest.from_dict(manifest), files=hash_files(bundle))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("reports"))
    return dst


@pytest.fixture(scope="module")
def perturbed_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_bundle with noise in one weight of the first decoder segment (block 0's MLP), its hashes rewritten:
    only numerics can tell."""
    out = _copy(tiny_bundle, tmp_path_factory.mktemp("perturbed") / "b")
    path = out / "onnx" / "decoder_segment_0.onnx"
    model = onnx.load(str(path), load_external_data=False)  # external weights stay where they are
    init = next(i for i in model.graph.initializer if i.name.endswith("layers.0.mlp.down_proj.weight"))
    w = onnx.numpy_helper.to_array(init)
    noise = np.random.default_rng(0).normal(0.0, 0.05 * float(w.std()) + 1e-3, w.shape).astype(w.dtype)
    init.CopyFrom(onnx.numpy_helper.from_array(w + noise, init.name))
    onnx.save(model, str(path))
    _rehash(out)
    return out


# ------------------------------------------------------------------------------------------------------
# the CLI on the session's tiny bundle
# ------------------------------------------------------------------------------------------------------


def test_check_passes_on_tiny_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    res = _invoke(tiny_bundle, "--num-samples", "2", "--max-new-tokens", "6", "--report-dir", tmp_path)
    assert res.exit_code == 0, res.output
    assert "| decoder_prefill:logits |" in res.stdout and res.stdout.rstrip().splitlines()[-1].startswith("PASS")
    report = json.loads((tmp_path / "check.json").read_text())
    assert (tmp_path / "check.md").read_text().startswith("# ficoco-check: PASS")
    assert report["passed"] and report["failures"] == []
    assert report["backend"] == "onnxruntime" and report["bundle_kind"] == "fp32"
    assert report["thresholds"] == DEFAULT_THRESHOLDS["fp32"].to_dict()
    assert report["reference"]["revision_matches"] and report["num_samples"] == 2 == len(report["samples"])
    assert set(report["tool_versions"]) >= {"torch", "transformers", "onnx", "onnxruntime"}
    # level 1: every stage output, finite errors within the fp32 tolerances, cosine ~ 1
    stages = report["aggregate"]["stages"]
    assert set(stages) == {
        "vision_encoder:visual_tokens", "embed_tokens:inputs_embeds", "decoder_prefill:logits",
        "decoder_prefill:present", "decoder_step:logits", "decoder_step:present",
    }
    assert stages["decoder_prefill:present"]["outputs"] == 64  # 32 layers x (key, value)
    for s in stages.values():
        assert s["passed"] and math.isfinite(s["max_abs_err"]) and 0 <= s["max_abs_err"] < 1e-3
        assert s["min_cosine"] > 0.9999
    assert stages["embed_tokens:inputs_embeds"]["max_abs_err"] == 0.0  # a gather: bit-exact
    # level 2: the backend's greedy tokens are PyTorch's
    greedy = report["aggregate"]["greedy"]
    assert greedy["match_rate"] == 1.0 and greedy["first_divergence"] is None and greedy["identical_samples"] == 2
    for s in report["samples"]:
        assert len(s["greedy"]["tokens"]) == 6 and s["greedy"]["tokens"] == s["greedy"]["reference_tokens"]
        assert s["forced"]["candidate"] == s["greedy"]["reference_tokens"]  # teacher-forced: the same choices
    forced = report["aggregate"]["forced"]
    assert (forced["positions"], forced["matches"], forced["near_ties"]) == (12, 12, 0) and not forced["gated"]
    # level 3: informational, sane
    red = report["aggregate"]["reduction"]
    assert not red["gated"] and red["passed"]
    assert 0 <= red["kl_mean"] <= red["kl_max"] and math.isfinite(red["kl_max"])
    assert 0 <= red["top1_agreement"] <= 1 and 0 <= red["token_agreement"] <= 1
    for s in report["samples"]:
        assert s["reduction"]["token_tokens"] == s["greedy"]["reference_tokens"]  # the reduced model's tokens
        assert len(s["reduction"]["token_reference_tokens"]) == 6
    # selection: the fp32 graphs keep exactly the reference's tokens at every reduction step
    sel = report["aggregate"]["selection"]
    assert [r["tower"] for r in sel] == ["vision"] * 11 + ["decoder"] * 4  # the bundle's schedule
    assert all(r["flips"] == 0 and r["samples"] == 2 for r in sel) and report["selection_note"] == ""
    assert "| selection (kept tokens vs fp32 PyTorch, info)" in res.stdout


def test_perturbed_weights_fail_at_the_prefill_stage(perturbed_bundle: Path, tmp_path: Path) -> None:
    res = _invoke(perturbed_bundle, *QUICK, "--report-dir", tmp_path)
    assert res.exit_code == 1, res.output
    assert "error: stage decoder_prefill:logits failed" in res.stderr and "max |err|" in res.stderr
    assert res.stdout.rstrip().splitlines()[-1].startswith("FAIL")
    report = json.loads((tmp_path / "check.json").read_text())
    assert not report["passed"]
    stages = report["aggregate"]["stages"]
    # each stage is fed PyTorch's inputs, so only the stages that run the perturbed graph fail: prefill and
    # decode share the segment (one copy of the weights), vision and embed pass
    assert not stages["decoder_prefill:logits"]["passed"] and not stages["decoder_prefill:present"]["passed"]
    assert not stages["decoder_step:logits"]["passed"]
    assert stages["vision_encoder:visual_tokens"]["passed"] and stages["embed_tokens:inputs_embeds"]["passed"]
    assert "decoder_prefill:present.0.key" not in stages["decoder_prefill:present"]["failed_outputs"]  # before the MLP
    # threshold flags change the verdict: loose enough tolerances and token match, and it passes
    loose = _invoke(perturbed_bundle, *QUICK, "--report-dir", tmp_path, "--atol", "100", "--rtol", "100",
                    "--min-token-match", "0")
    assert loose.exit_code == 0, loose.output
    assert json.loads((tmp_path / "check.json").read_text())["thresholds"]["atol"] == 100.0


def test_reduction_gate_fails_when_asked(tiny_bundle: Path, tmp_path: Path) -> None:
    res = _invoke(tiny_bundle, *QUICK, "--report-dir", tmp_path, "--max-kl", "1e-9", "--check-error-stat", "max")
    assert res.exit_code == 1, res.output
    assert "reduction: mean first-token KL" in res.stderr and "error: stage" not in res.stderr
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["thresholds"]["check_error_stat"] == "max" and report["aggregate"]["reduction"]["gated"]
    assert report["aggregate"]["greedy"]["passed"] and all(s["passed"] for s in report["aggregate"]["stages"].values())


# ------------------------------------------------------------------------------------------------------
# bad input: exit 2, one clear line, before anything heavy runs
# ------------------------------------------------------------------------------------------------------


def test_missing_and_modified_bundles_exit_2(tiny_bundle: Path, tmp_path: Path) -> None:
    res = _invoke(tmp_path / "nope")
    assert res.exit_code == 2 and "no bundle at" in res.stderr and "Traceback" not in res.output
    b = _copy(tiny_bundle, tmp_path / "mod")
    with open(b / "onnx" / "embed_tokens.onnx.data", "r+b") as f:
        f.write(b"\x01\x02\x03\x04")
    res = _invoke(b, *QUICK)
    assert res.exit_code == 2 and "modified after export" in res.stderr


def test_graph_only_bundle_exits_2(tiny_bundle: Path, tmp_path: Path) -> None:
    b = _copy(tiny_bundle, tmp_path / "g")
    shutil.rmtree(b / "tokenizer")
    for f in (b / "onnx").glob("*.onnx.data"):
        f.unlink()
    manifest = json.loads((b / MANIFEST).read_text())
    manifest["graph_only"] = True
    manifest["prompt"]["chat_template"] = None
    write_manifest(b, Manifest.from_dict(manifest), files=hash_files(b))
    res = _invoke(b)
    assert res.exit_code == 2 and "--graph-only bundle" in res.stderr


def test_bad_prompts_images_and_model_exit_2(tiny_bundle: Path, tmp_path: Path) -> None:
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n   \n")
    res = _invoke(tiny_bundle, "--prompts", empty)
    assert res.exit_code == 2 and "has no prompts" in res.stderr
    res = _invoke(tiny_bundle, "--images", tmp_path / "no-such-dir")
    assert res.exit_code == 2 and "not a directory" in res.stderr
    res = _invoke(tiny_bundle, "--images", tmp_path)  # a directory without images
    assert res.exit_code == 2 and "no image files" in res.stderr
    res = _invoke(tiny_bundle, "--model", tmp_path / "moved-model-dir", *QUICK)
    assert res.exit_code == 2 and "reference model" in res.stderr and "not found" in res.stderr
    res = _invoke(tiny_bundle, "--min-token-match", "1.5")
    assert res.exit_code == 2 and "--min-token-match" in res.stderr
    res = _invoke(tiny_bundle, "--max-new-tokens", "999")
    assert res.exit_code == 2 and "max_new_tokens" in res.stderr


# ------------------------------------------------------------------------------------------------------
# the pieces
# ------------------------------------------------------------------------------------------------------


def test_token_agreement_and_kl() -> None:
    a = token_agreement([1, 2, 3, 4], [1, 2, 9, 4])
    assert a.match_rate == 0.75 and a.first_divergence == 2
    same = token_agreement([5, 6], [5, 6])
    assert same.match_rate == 1.0 and same.first_divergence is None
    short = token_agreement([5], [5, 6])  # a missing position counts as a mismatch
    assert short.match_rate == 0.5 and short.first_divergence == 1
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(50, generator=g), torch.randn(50, generator=g)
    assert first_token_kl(p, p) == pytest.approx(0.0, abs=1e-12)
    kl = first_token_kl(p, q)
    lp, lq = torch.log_softmax(p.double(), -1), torch.log_softmax(q.double(), -1)
    assert kl > 0 and kl == pytest.approx(float(torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="sum")))


def test_thresholds_follow_the_bundle_kind(tiny_bundle: Path) -> None:
    from dataclasses import replace

    from bundle.manifest import load_manifest

    base = load_manifest(tiny_bundle, verify=False)

    def kind(precision: str, quantization: dict | None = None) -> Manifest:
        return replace(base, precision=precision, quantization=quantization)

    fp32 = resolve_thresholds(kind("fp32"), CheckOptions())
    assert fp32 == DEFAULT_THRESHOLDS["fp32"] and fp32.gate_tolerance and fp32.min_cosine is None
    fp16 = resolve_thresholds(kind("fp16"), CheckOptions())
    assert fp16.atol > fp32.atol and fp16.min_token_match is None  # free-running tokens: reported
    assert fp16.min_forced_match == 1.0 and fp16.tie_margin > 0 and fp32.min_forced_match is None
    assert resolve_thresholds(kind("fp16"), CheckOptions(min_token_match=0.5, tie_margin=0.0)).min_token_match == 0.5
    q = resolve_thresholds(kind("fp16", {"mode": "int8"}), CheckOptions())
    assert not q.gate_tolerance and q.min_cosine == 0.99 and q.min_token_match == 0.5
    q2 = resolve_thresholds(kind("fp32", {"mode": "int8"}), CheckOptions(atol=1e-2, min_cosine=0.9))
    assert q2.gate_tolerance and q2.atol == 1e-2 and q2.min_cosine == 0.9
    assert resolve_thresholds(kind("fp32", {}), CheckOptions()) == DEFAULT_THRESHOLDS["fp32"]


@pytest.mark.parametrize(("cosine", "ratio", "words"), [
    (0.95, 1.0, "cosine 0.950000 < 0.99"),
    (0.999, 1.4, "norm ratio 1.4000 (|ratio - 1| > 0.25)"),  # right direction, wrong scale
])
def test_report_judges_cosine_and_norm_ratio_gates(cosine: float, ratio: float, words: str) -> None:
    from engines.check import OutputComparison, ReductionCost, SampleResult

    t = DEFAULT_THRESHOLDS["quantized"]
    comp = OutputComparison("vision_encoder:visual_tokens", [1, 2], 1.0, 0.5, 0.5, 2.0, cosine, ratio, False, False)
    tokens = token_agreement([1, 2], [1, 2])
    report = CheckReport("b", "onnxruntime", "cpu", "quantized", t, 2, {}, [
        SampleResult("img", "q", [comp], tokens, ReductionCost(0.1, True, tokens), 0.0)
    ], {})
    report.judge()
    assert not report.passed and words in report.failures[0]
    assert "vision_encoder:visual_tokens" in report.to_markdown()


def test_report_gates_teacher_forced_tokens_and_not_free_running_for_fp16() -> None:
    """fp16: a free-running path that drifted after a near-tie flip passes; a real teacher-forced
    disagreement fails, naming the counts and the margin."""
    from bundle.compare import forced_agreement
    from engines.check import ReductionCost, SampleResult

    t = DEFAULT_THRESHOLDS["fp16"]
    ref = np.array([[3.0, 0.0, 0.0, 0.0], [0.0, 3.0, 2.99, 0.0], [0.0, 0.0, 3.0, 0.0]])
    drifted = token_agreement([0, 2, 3], [0, 1, 2])  # free-running: diverged after the near-tie at step 1

    def judged(got: np.ndarray) -> CheckReport:
        forced = forced_agreement(got, ref, [0, 1, 2], t.tie_margin)
        r = CheckReport("b", "onnxruntime", "cpu", "fp16", t, 3, {}, [
            SampleResult("img", "q", [], drifted, ReductionCost(0.1, True, drifted), 0.0, None, forced)], {})
        r.judge()
        return r

    tie = judged(np.array([[3.0, 0, 0, 0], [0, 2.99, 3.0, 0], [0, 0, 3.0, 0]]))
    assert tie.passed, tie.failures
    fs = tie.forced_summary()
    assert fs is not None and (fs["matches"], fs["near_ties"], fs["rate"]) == (2, 1, 1.0) and fs["gated"]
    assert not tie.greedy_summary()["gated"] and "| teacher-forced tokens" in tie.to_markdown()
    real = judged(np.array([[3.0, 0, 0, 0], [0, 2.99, 3.0, 0], [0, 4.0, 3.0, 0]]))  # step 2 picks a far token
    assert not real.passed and len(real.failures) == 1
    assert "teacher-forced tokens: 1 matches + 1 near-ties of 3 = 0.667 < --min-forced-match 1" in real.failures[0]
    assert "first real disagreement at step 2" in real.failures[0]


# ------------------------------------------------------------------------------------------------------
# slow: every variant / method, and the real SmolLM2 decoder
# ------------------------------------------------------------------------------------------------------

SLOW_EXPORT = {"max_batch_size": 1, "max_text_len": 64, "max_new_tokens": 16}


def _export(loaded, tmp_path: Path, variant: str, method: str, layers: dict[str, int]) -> Path:
    from exporter.export import ExportOptions
    from exporter.pipeline import ValidationOptions, export_bundle
    from ficoco.planner import ScheduleRequest

    # the exporter's own validation is off: ficoco-check is what is under test here
    return export_bundle(
        loaded, ScheduleRequest(variant=variant, method=method, ratio=0.25, layers=layers), tmp_path / f"{variant}-{method}",
        ExportOptions(**SLOW_EXPORT), ValidationOptions(enabled=False),
    )


def _assert_clean_pass(res: Result, bundle: Path, samples: int) -> dict:
    assert res.exit_code == 0, res.output
    report = json.loads((bundle / "reports" / "check.json").read_text())
    assert report["passed"] and report["num_samples"] == samples and report["max_new_tokens"] == 16
    assert report["aggregate"]["greedy"]["match_rate"] == 1.0
    assert all(s["passed"] and s["min_cosine"] > 0.9999 for s in report["aggregate"]["stages"].values())
    red = report["aggregate"]["reduction"]
    assert red["kl_mean"] >= 0 and math.isfinite(red["kl_max"]) and 0 <= red["token_agreement"] <= 1
    return report


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant,method,layers",
    [
        ("VL", "ficoco", {"l_end": 11}),
        ("V", "ficoco", {}),
        ("L", "ficoco", {"l_end": 11}),
        ("V", "tome", {}),
        ("V", "evit", {}),
        ("L", "fastv", {}),
    ],
)
def test_check_passes_every_variant(tiny, tmp_path: Path, variant: str, method: str, layers: dict[str, int]) -> None:
    bundle = _export(tiny, tmp_path, variant, method, layers)
    res = _invoke(bundle, "--num-samples", "2")  # 16 new tokens: the default, = the bundle's limit
    report = _assert_clean_pass(res, bundle, 2)
    assert report["aggregate"]["stages"]["decoder_prefill:present"]["outputs"] == 2 * tiny.geometry.decoder.num_layers


@pytest.mark.slow
def test_check_passes_smol_vl(smol, tmp_path: Path) -> None:
    bundle = _export(smol, tmp_path, "VL", "ficoco", {"l_end": 11})
    res = _invoke(bundle)  # the defaults: 3 photos x 2 prompts, 16 tokens
    report = _assert_clean_pass(res, bundle, 6)
    assert report["reference"]["model"] == "smol" and report["reference"]["revision_matches"]
    assert (bundle / "reports" / "check.md").read_text().startswith("# ficoco-check: PASS")


# ------------------------------------------------------------------------------------------------------
# saved references: --save-reference on the PyTorch machine, --reference on the device (no torch)
# ------------------------------------------------------------------------------------------------------

_NO_TORCH = """
import sys, importlib.abc
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "transformers", "onnx", "onnxscript"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Block())
from commands.check import main
main(sys.argv[1:], prog_name="ficoco-check")
"""


def _device_check(*args: object) -> subprocess.CompletedProcess[str]:
    """`ficoco-check` in a fresh interpreter where torch, transformers and onnx cannot be imported."""
    import os
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-c", _NO_TORCH, *map(str, args)], capture_output=True, text=True, env=env,
                          check=False, timeout=600)


@pytest.fixture(scope="module")
def saved_reference(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ref = tmp_path_factory.mktemp("reference") / "tiny.npz"
    res = _invoke(tiny_bundle, *QUICK, "--save-reference", ref, "--report-dir", ref.parent / "report")
    assert res.exit_code == 0, res.output
    return ref


def test_reference_judges_a_clean_bundle_without_torch(tiny_bundle: Path, saved_reference: Path, tmp_path: Path) -> None:
    res = _device_check(tiny_bundle, "--reference", saved_reference, "--report-dir", tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.rstrip().splitlines()[-1].startswith("PASS")
    report = json.loads((tmp_path / "check.json").read_text())
    live = json.loads((saved_reference.parent / "report" / "check.json").read_text())
    assert report["reference"]["saved_reference"] == str(saved_reference)
    # the same gates, the same inputs: the device's verdicts equal the live check's, sample by sample
    assert [s["greedy"] for s in report["samples"]] == [s["greedy"] for s in live["samples"]]
    assert set(report["samples"][0]["stages"]) == set(live["samples"][0]["stages"])
    assert report["samples"][0]["reduction"] == live["samples"][0]["reduction"]


def test_reference_fails_a_bundle_that_computes_differently(tiny_bundle: Path, saved_reference: Path, tmp_path: Path) -> None:
    """Weights changed after export, hashes not rewritten (what --no-verify lets through on a device)."""
    bad = _copy(tiny_bundle, tmp_path / "bad")
    path = bad / "onnx" / "decoder_segment_0.onnx"
    model = onnx.load(str(path), load_external_data=False)
    init = next(i for i in model.graph.initializer if i.name.endswith("layers.0.mlp.down_proj.weight"))
    w = onnx.numpy_helper.to_array(init)
    init.CopyFrom(onnx.numpy_helper.from_array(w + np.float32(0.05) * np.abs(w).max(), init.name))
    onnx.save(model, str(path))
    res = _device_check(bad, "--reference", saved_reference, "--no-verify", "--report-dir", tmp_path / "r")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "decoder_prefill" in res.stderr and "FAIL" in res.stdout


def test_reference_for_another_bundle_or_other_inputs_is_refused(perturbed_bundle: Path, tiny_bundle: Path,
                                                                 saved_reference: Path, tmp_path: Path) -> None:
    res = _device_check(perturbed_bundle, "--reference", saved_reference, "--report-dir", tmp_path)
    assert res.returncode == 2 and "was saved for the bundle" in res.stderr and "--save-reference" in res.stderr
    res = _device_check(tiny_bundle, "--reference", saved_reference, "--max-new-tokens", "9", "--report-dir", tmp_path)
    assert res.returncode == 2 and "holds 4 greedy tokens" in res.stderr
    res = _device_check(tiny_bundle, "--reference", saved_reference, "--num-samples", "3", "--report-dir", tmp_path)
    assert res.returncode == 2 and "inputs are the ones saved" in res.stderr
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    res = _device_check(tiny_bundle, "--reference", junk, "--report-dir", tmp_path)
    assert res.returncode == 2 and "is not a ficoco-check reference" in res.stderr
    # without --reference, the device has no PyTorch to check against: one line naming the fix
    res = _device_check(tiny_bundle, *QUICK, "--report-dir", tmp_path)
    assert res.returncode == 2 and "ficoco-export[export]" in res.stderr and "Traceback" not in res.stderr
