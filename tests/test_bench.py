"""ficoco-bench: the profile parser and aggregation on synthetic data, the bench model's geometry, bad input,
one real worker run on the shared tiny bundle (fast), and the whole command on it (slow: it exports the
unreduced sibling bundle)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TEST_BUNDLE_REQUEST

from bundle.manifest import Manifest
from commands.bench import main
from engines.bench import (
    BenchInputError,
    BenchOptions,
    build_report,
    graph_node_of,
    layer_ranges,
    load_trace,
    node_times,
    parse_ratios,
    parse_variants,
    plan_configs,
    reduction_share,
    render_markdown,
    run_worker,
    sibling_request,
    summarize,
    token_agreement,
    write_reports,
)
from engines.bench.common import PROFILED_STAGES, TIMED_FIELDS
from ficoco.flops import flops_report
from ficoco.geometry import LlavaGeometry
from ficoco.models import BENCH_DECODER_LAYERS, load_config
from ficoco.planner import plan

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------ bench model
def test_bench_model_is_vit_l_336_with_7b_width_decoder() -> None:
    from transformers import LlavaForConditionalGeneration

    cfg = load_config("bench")
    v, t = cfg.vision_config, cfg.text_config
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads) == (1024, 4096, 24, 16)
    assert (v.image_size, v.patch_size, v.hidden_act) == (336, 14, "quick_gelu")
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (-2, "default")
    assert (t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads) == (4096, 11008, 32, 32)
    assert t.num_hidden_layers == BENCH_DECODER_LAYERS
    g = LlavaGeometry.from_config(cfg)
    assert g.visual_tokens == 576 and g.vision.seq_len == 577 and g.vision.select_block == 22
    with torch.device("meta"):  # shapes only: no 4.5 GB of weights
        model = LlavaForConditionalGeneration(cfg)
    proj = model.model.multi_modal_projector
    assert (proj.linear_1.in_features, proj.linear_1.out_features, proj.linear_2.out_features) == (1024, 4096, 4096)

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    assert count(model.model.vision_tower) == 303_507_456  # CLIP ViT-L/14-336's vision tower, all 24 blocks
    assert count(proj) == (1024 * 4096 + 4096) + (4096 * 4096 + 4096)
    block = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # q/k/v/o, gate/up/down (no biases), two RMSNorms
    assert t.vocab_size < 2000  # the tiny tokenizer: the 7B embedding / lm_head are not modelled
    assert count(model.model.language_model) == BENCH_DECODER_LAYERS * block + 4096 + t.vocab_size * 4096  # + norm, embedding
    assert count(model) == count(model.model) + t.vocab_size * 4096  # + an untied lm_head


# ------------------------------------------------------------------------------------------------ parsing
def test_parse_ratios_and_variants() -> None:
    assert parse_ratios("1.0, 0.5,0.25,0.25") == (1.0, 0.5, 0.25)
    assert parse_variants("vl,V") == ("VL", "V")
    assert parse_variants(None) == ()
    for bad in ("0", "1.5", "abc", ",", "nan"):
        with pytest.raises(BenchInputError):
            parse_ratios(bad)
    with pytest.raises(BenchInputError, match="not one of"):
        parse_variants("VL,none")


def test_summarize_quantiles() -> None:
    s = summarize([4.0, 1.0, 3.0, 2.0])
    assert s["n"] == 4 and s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0
    assert s["q1"] == pytest.approx(1.75) and s["q3"] == pytest.approx(3.25)
    assert summarize([]) == {"n": 0}


def _event(name: str, ts: float, dur: float, op: str = "", cat: str = "Node") -> dict[str, object]:
    return {"cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"op_name": op} if op else {}}


def test_profile_parser_keeps_last_run_and_attributes_fused_nodes(tmp_path: Path) -> None:
    events = [
        _event("model_run", 0, 100, cat="Session"),
        _event("red_topk_kernel_time", 10, 50, "TopK"),  # warm-up run: dropped
        _event("model_run", 200, 100, cat="Session"),
        _event("red_topk_kernel_time", 210, 6, "TopK"),
        _event("red_topk_fence_before", 209, 1, "TopK"),  # not a kernel event
        _event("mm_kernel_time", 220, 30, "MatMul"),
        _event("mm2/MatMulScaleFusion/_kernel_time", 250, 10, "FusedMatMul"),  # fused: attributed to mm2
        _event("red_gather/GatherSliceToSplitFusion_kernel_time", 260, 4, "Split"),
        _event("Transpose_token_4_kernel_time", 270, 2, "Transpose"),  # inserted by the runtime
    ]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps(events)[:-1] + ",\n")  # ORT may leave the list unterminated
    nodes = node_times(load_trace(trace), last_runs=1)
    assert sorted(n for n, _, _ in nodes) == [
        "Transpose_token_4", "mm", "mm2/MatMulScaleFusion/", "red_gather/GatherSliceToSplitFusion", "red_topk"
    ]
    graph = {"red_topk", "red_gather", "mm", "mm2"}
    assert graph_node_of("mm2/MatMulScaleFusion/", graph) == "mm2"
    assert graph_node_of("Transpose_token_4", graph) is None
    share = reduction_share(nodes, {"red_topk", "red_gather"}, graph)
    assert share["total_node_ms"] == pytest.approx(0.052)
    assert share["reduction_ms"] == pytest.approx(0.010)
    assert share["share"] == pytest.approx(10 / 52)
    assert share["unattributed_ms"] == pytest.approx(0.002)
    assert share["reduction_nodes_profiled"] == 2
    assert list(share["top_ops_ms"])[0] == "MatMul"


def test_token_agreement() -> None:
    assert token_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == {"agreement": 0.75, "prefix": 2, "compared": 4}
    assert token_agreement([], [1]) == {"agreement": 0.0, "prefix": 0, "compared": 0}


# ------------------------------------------------------------------------------------------------ sweep + report
def _manifest(tmp_path: Path) -> tuple[Manifest, LlavaGeometry]:
    """The manifest of a tiny VL 0.25 bundle as far as the sweep reads it (no graphs: nothing is run)."""
    g = LlavaGeometry.from_config(load_config("tiny"))
    s = plan(g, "VL", "ficoco", ratio=0.25, l_end=11)
    return Manifest(
        source_model={"name": "tiny", "source": "builtin:tiny(seed=0)", "revision": "x"}, graph_only=False,
        geometry=g.to_dict(), variant="VL", method="ficoco", preset="paper", positions="compact",
        schedule_request={"variant": "VL", "ratio": 0.25, "layers": {"l_end": 11}, "text_tokens": 60},
        schedule=s.to_dict(), flops_tflops=s.flops, visual_tokens={"in": 576, "to_decoder": 288, "final": 144},
        export={}, precision="fp32", opset=18, graphs={}, shape_ranges={"batch": [1, 4], "text_len": [2, 64], "max_new_tokens": 16},
        trt_profiles={}, decoder={}, prompt={}, validation={"ran": False}, lint={"ran": False}, tool_versions={},
    ), g


def test_sibling_requests_keep_bundle_layer_ranges(tmp_path: Path) -> None:
    manifest, g = _manifest(tmp_path)
    assert layer_ranges(manifest.schedule) == {"v_start": 12, "v_end": 22, "l_start": 4, "l_end": 11}
    req = sibling_request(manifest, "VL", 0.11)
    assert req.layers == {"v_start": 12, "v_end": 22, "l_start": 4, "l_end": 11}
    assert sibling_request(manifest, "V", 0.5).layers == {"v_start": 12, "v_end": 22}
    assert sibling_request(manifest, "L", 0.5, {"l_start": 2}).layers == {"l_start": 2, "l_end": 11}
    assert sibling_request(manifest, "VL", 1.0).variant == "none"
    opts = BenchOptions(bundle=tmp_path / "b", ratios=(1.0, 0.5, 0.25))
    configs = plan_configs(manifest, opts)
    assert [c.label for c in configs] == ["unreduced (1.0)", "VL 0.5", "VL 0.25"]
    assert configs[2].bundle == str((tmp_path / "b").resolve()) and configs[2].origin == "BUNDLE"  # BUNDLE is its own entry
    assert configs[0].bundle is None and configs[1].bundle is None  # to be exported


def test_report_from_synthetic_results(tmp_path: Path) -> None:
    manifest, g = _manifest(tmp_path)
    opts = BenchOptions(bundle=tmp_path / "b", ratios=(1.0, 0.25), warmup=0, repeats=2, max_new_tokens=4)
    configs = plan_configs(manifest, opts)
    configs[0].bundle = str(tmp_path / "unreduced")

    def runs(ttft: list[float]) -> list[dict[str, float]]:
        return [{"vision_ms": t * 0.3, "embed_ms": 0.1, "prefill_ms": t * 0.6, "ttft_ms": t, "decode_tokens_per_s": 20.0,
                 "step_ms_mean": 50.0} for t in ttft]

    prof = {"vision_encoder": {"reduction_ms": 2.0, "total_node_ms": 10.0, "share": 0.2},
            "decoder_prefill": {"reduction_ms": 1.0, "total_node_ms": 10.0, "share": 0.1}}
    peak = {"shapes": {"vision": [577, 64, 256], "prefill": [589, 64, 256]}, "threads": 2, "kernel": "onnxruntime MatMul",
            "fp32": {"vision": 50.0, "prefill": 80.0}, "fp16": {"vision": None, "prefill": None}, "peak_fp32": 80.0, "peak_fp16": None}
    results = {
        "unreduced (1.0)": {"runs": runs([200.0, 220.0]), "tokens": [5, 6, 7, 8], "text_len": 13, "peak_rss_bytes": 2**30,
                            "roofline": peak},
        "VL 0.25": {"runs": runs([100.0, 120.0]), "tokens": [5, 6, 0, 8], "text_len": 13, "peak_rss_bytes": 2**30, "profile": prof},
    }
    report = build_report(configs, results, {}, manifest, opts, g)
    by = {e["label"]: e for e in report["configs"]}
    ref, red = by["unreduced (1.0)"], by["VL 0.25"]
    f_ref = flops_report(g, plan(g, "none").vision, plan(g, "none").decoder, text_tokens=13)["total"]
    s = plan(g, "VL", "ficoco", ratio=0.25, l_end=11)
    f_red = flops_report(g, s.vision, s.decoder, text_tokens=13)["total"]
    assert red["flops_ratio"] == pytest.approx(f_red / f_ref) and red["flops_speedup"] == pytest.approx(f_ref / f_red)
    assert ref["flops_ratio"] == 1.0 and ref["ttft_speedup"] == 1.0 and ref["meets_target"] is None
    assert red["timings"]["ttft_ms"] == {"n": 2, "median": 110.0, "min": 100.0, "max": 120.0, "q1": 105.0, "q3": 115.0}
    assert red["ttft_speedup"] == pytest.approx(ref["timings"]["ttft_ms"]["median"] / red["timings"]["ttft_ms"]["median"])
    assert red["ttft_speedup"] == pytest.approx(210.0 / 110.0)
    for stage, share in (("vision", 0.3), ("prefill", 0.6)):  # the stages' medians scale with TTFT's
        assert red["timings"][f"{stage}_ms"]["median"] == pytest.approx(share * 110.0)
        assert red["stage_speedups"][stage]["measured"] == pytest.approx(210.0 / 110.0)
    assert red["efficiency"] == pytest.approx((210.0 / 110.0) / (f_ref / f_red))
    assert red["meets_target"] == (red["efficiency"] >= 0.9)
    assert report["target"]["efficiency"] == red["efficiency"] and report["target"]["met"] == red["meets_target"]
    assert red["agreement"]["agreement"] == 0.75 and ref["agreement"]["agreement"] == 1.0
    assert red["reduction_share"] == pytest.approx(3.0 / 20.0)
    assert red["visual_tokens"] == {"to_decoder": 288, "final": 144}
    assert report["target"]["config"] == "VL 0.25"
    # roofline: the planner's FLOPs of each stage over its median time, against the measured GEMM peak
    assert report["gemm_peak"] == peak
    for stage, key, ms in (("vision", "vision", 0.3 * 110.0), ("prefill", "prefill", 0.6 * 110.0), ("ttft", "total", 110.0)):
        want = red["flops_tflops"][key] * 1e12 / (ms * 1e-3) / 1e9
        assert red["roofline"][stage]["gflops"] == pytest.approx(want)
        assert red["roofline"][stage]["fraction_of_peak"] == pytest.approx(want / 80.0)
    md = render_markdown(report)
    assert "| VL 0.25 | 288 → 144 |" in md and "1.91×" in md
    assert "fp32 80 GFLOP/s" in md and f"({red['roofline']['vision']['fraction_of_peak']:.0%})" in md
    paths = write_reports(report, tmp_path / "reports")
    assert json.loads(paths["json"].read_text())["configs"][1]["label"] == "VL 0.25"
    assert paths["png"].read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in (tmp_path / "reports").iterdir() if p.name.startswith(".")]  # no temp files left


# ------------------------------------------------------------------------------------------------ CLI: bad input
def test_cli_bad_input_exits_2(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, [str(tmp_path / "missing")])
    assert res.exit_code == 2 and "error:" in res.output and "does not exist" in res.output
    res = runner.invoke(main, [str(tmp_path), "--ratios", "0.5,2"])
    assert res.exit_code == 2 and "outside (0, 1]" in res.output
    res = runner.invoke(main, [str(tmp_path), "--repeats", "0"])
    assert res.exit_code == 2 and "--repeats must be at least 1" in res.output
    assert "Traceback" not in res.output


def test_cli_refuses_more_tokens_than_the_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(main, [str(tiny_bundle), "--max-new-tokens", "999", "--work-dir", str(tmp_path / "w")])
    assert res.exit_code == 2 and "shape_ranges.max_new_tokens" in res.output
    assert not (tmp_path / "w").exists()  # nothing exported for a refused request


# ------------------------------------------------------------------------------------------------ real runs
def test_worker_times_and_profiles_the_tiny_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    spec = {"label": "VL 0.25", "kind": "bundle", "bundle": str(tiny_bundle), "model": "tiny", "image": "astronaut",
            "prompt": "What is in the picture?", "warmup": 1, "repeats": 2, "max_new_tokens": 3, "threads": 1,
            "profile": True, "trace_dir": str(tmp_path / "traces"), "roofline": True, "profile_passes": 3}
    res = run_worker(spec, tmp_path / "scratch")
    peak = res["roofline"]  # the GEMM peak at the tiny model's shapes, in the worker's own threads
    assert peak["threads"] == 1 and peak["peak_fp32"] == max(peak["fp32"].values()) > 0
    assert res == json.loads((tmp_path / "scratch" / "result.json").read_text())
    assert len(res["runs"]) == 2 and len(res["tokens"]) == 3 and res["threads"] == 1  # the warm-up run is dropped
    eps = 1e-9  # relations between nested perf_counter intervals hold exactly, up to float rounding
    for run in res["runs"]:
        assert set(run) == set(TIMED_FIELDS)
        assert min(run["vision_ms"], run["embed_ms"], run["prefill_ms"], run["step_ms_mean"]) > 0  # each one was timed
        # TTFT runs from the vision tower's start to the first token: vision, embed and prefill lie inside it
        assert run["ttft_ms"] >= (run["vision_ms"] + run["embed_ms"] + run["prefill_ms"]) * (1 - eps)
        # 3 new tokens: 2 decode steps, both between the first token and the last, the window tokens/s is taken over
        assert 2 * run["step_ms_mean"] <= 2 * 1e3 / run["decode_tokens_per_s"] * (1 + eps)
    assert res["peak_rss_bytes"] >= res["base_rss_bytes"] > 0  # VmHWM never falls below an earlier VmRSS
    assert set(res["profile"]) == set(PROFILED_STAGES)
    for stage, p in res["profile"].items():
        assert p["share"] == pytest.approx(p["reduction_ms"] / p["total_node_ms"])
        assert p["reduction_ms"] + p["unattributed_ms"] <= p["total_node_ms"] * (1 + eps)  # disjoint parts of the total
        assert p["reduction_nodes_profiled"] <= p["nodes_profiled"]
        assert sum(p["top_ops_ms"].values()) <= p["total_node_ms"] * (1 + eps)
        if len(p["top_ops_ms"]) < 8:  # every op type listed: they add up to the total
            assert sum(p["top_ops_ms"].values()) == pytest.approx(p["total_node_ms"])
        # each graph's trace holds the warm-up pass and 3 measured ones; the figures are the median pass's
        # (by kernel time), summed over the stage's graphs (prefill: the splice, 5 segments and 4 reductions)
        assert len(p["traces"]) == (10 if stage == "decoder_prefill" else 1)
        assert p["passes"] == 3 and len(p["total_node_ms_all"]) == 3 == len(p["share_all"])
        assert p["total_node_ms"] == sorted(p["total_node_ms_all"])[1]
        k = 2 - p["total_node_ms_all"].index(p["total_node_ms"])  # that pass, counted back from the last
        chosen: list = []
        for trace in p["traces"]:
            events = load_trace(trace)
            assert sum(1 for e in events if e.get("cat") == "Session" and e.get("name") == "model_run") == 4
            mine = node_times(events, last_runs=1, skip_last=k)
            assert len(node_times(events, last_runs=2)) == 2 * len(node_times(events, last_runs=1)), stage
            chosen += mine
        assert len(chosen) == p["nodes_profiled"]
        assert sum(d for _, _, d in chosen) / 1e3 == pytest.approx(p["total_node_ms"])
    for stage in ("vision_encoder", "decoder_prefill"):
        p = res["profile"][stage]
        assert p["reduction_nodes_in_graph"] > 0 and p["reduction_nodes_profiled"] > 0 and p["reduction_ms"] > 0
    embed = res["profile"]["embed_tokens"]
    assert embed["reduction_nodes_in_graph"] == 0 and embed["reduction_ms"] == 0.0 and embed["share"] == 0.0


@pytest.mark.slow
def test_cli_end_to_end_on_tiny_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    args = [str(tiny_bundle), "--ratios", "1.0,0.25", "--repeats", "1", "--warmup", "0", "--max-new-tokens", "4",
            "--threads", "2", "--work-dir", str(tmp_path / "work"), "--report-dir", str(tmp_path / "reports")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "reports" / "bench.json").read_text())
    assert (tmp_path / "reports" / "bench.png").read_bytes()[:8] == PNG_MAGIC
    assert "| VL 0.25 |" in (tmp_path / "reports" / "bench.md").read_text()
    by = {e["label"]: e for e in report["configs"]}
    assert set(by) == {"unreduced (1.0)", "VL 0.25", "PyTorch generate (unreduced)"}
    ref, red, pt = by["unreduced (1.0)"], by["VL 0.25"], by["PyTorch generate (unreduced)"]
    assert red["origin"] == "BUNDLE" and ref["origin"] == "exported"
    g = LlavaGeometry.from_dict(json.loads((tiny_bundle / "manifest.json").read_text())["geometry"])
    s = plan(g, "VL", "ficoco", ratio=0.25, **TEST_BUNDLE_REQUEST["layers"])  # the session bundle's own layers
    n = report["text_tokens"]
    want = flops_report(g, s.vision, s.decoder, n)["total"] / flops_report(g, plan(g, "none").vision, plan(g, "none").decoder, n)["total"]
    assert red["flops_ratio"] == pytest.approx(want)
    ttft = {}
    for e in (ref, red, pt):
        t = e["timings"]["ttft_ms"]
        assert len(e["runs"]) == 1 and len(e["tokens"]) == 4
        assert t["n"] == 1 and t["min"] == t["median"] == t["max"] == e["runs"][0]["ttft_ms"]  # one timed run
        assert e["peak_rss_bytes"] >= e["base_rss_bytes"] > 0
        ttft[e["label"]] = t["median"]
    assert red["ttft_speedup"] == pytest.approx(ttft[ref["label"]] / ttft[red["label"]])  # the ratio of the reported times
    assert red["ttft_speedup_vs_pytorch"] == pytest.approx(ttft[pt["label"]] / ttft[red["label"]])
    assert red["efficiency"] == pytest.approx(red["ttft_speedup"] / red["flops_speedup"])
    assert red["flops_speedup"] == pytest.approx(1 / red["flops_ratio"])
    red_prof = [p for p in red["profile"].values() if "total_node_ms" in p]
    assert red["reduction_share"] == pytest.approx(sum(p["reduction_ms"] for p in red_prof) / sum(p["total_node_ms"] for p in red_prof))
    assert red["reduction_share"] > 0.0 and ref["reduction_share"] == 0.0
    assert pt["tokens"] == ref["tokens"]  # transformers and the unreduced bundle decode the same greedy tokens
    assert red["agreement"] == token_agreement(red["tokens"], ref["tokens"]) and red["agreement"]["compared"] == 4
    again = CliRunner().invoke(main, [*args, "--no-pytorch", "--no-profile"])  # the sibling is reused, not re-exported
    assert again.exit_code == 0 and "cached" in again.output


def test_gemm_peak_shapes_and_measurement() -> None:
    from engines.bench.roofline import gemm_gflops, model_shapes

    g = LlavaGeometry.from_config(load_config("llava-1.5-7b"))
    # CLIP ViT-L/14-336's MLP on 577 tokens; Llama-7B's MLP on 13 text + 576 visual tokens
    assert model_shapes(g, 13) == {"vision": (577, 1024, 4096), "prefill": (589, 4096, 11008)}
    assert gemm_gflops((64, 128, 256), threads=1, warmup=1, repeats=2) > 0


def test_paired_decode_interleaves_two_bundles(tiny_bundle: Path, tmp_path: Path) -> None:
    from engines.bench.decode_pair import paired_decode, render_markdown
    from engines.runtime import Pipeline
    from ficoco.images import test_image

    a = Pipeline.from_bundle(tiny_bundle, backend="onnxruntime", ort_provider="cpu", threads=1, verify=False)
    b = Pipeline.from_bundle(tiny_bundle, backend="onnxruntime", ort_provider="cpu", threads=1, verify=False)
    r = paired_decode(a, b, test_image("astronaut"), "What is in the picture?", steps=6, warmup=1)
    assert r["a"]["n"] == r["b"]["n"] == 6 and r["same_tokens"]  # the same bundle twice: the same greedy path
    assert r["a"]["kv_lengths"] == r["b"]["kv_lengths"] and len(set(r["a"]["kv_lengths"])) > 1  # FiCoCo-L: shorter after a step
    lo, hi = r["step_ratio_95"]
    assert 0 < lo <= hi and r["step_ratio_a_over_b"] > 0 and r["flops_ratio_a_over_b"] == pytest.approx(1.0)
    assert "| A |" in render_markdown(r) and "FLOPs predict 1.000" in render_markdown(r)


def test_paired_decode_in_a_process_per_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    """Lock-step across two worker processes gives the in-process pairing's greedy path and KV lengths; the
    command refuses a directory that is not a bundle before it starts any worker."""
    import subprocess
    import sys

    from engines.bench.decode_pair import paired_decode_processes, render_markdown

    r = paired_decode_processes(tiny_bundle, tiny_bundle, "astronaut", "What is in the picture?", steps=4, warmup=1, threads=1)
    assert r["a"]["n"] == r["b"]["n"] == 4 and r["same_tokens"] and r["layout"].startswith("a process per bundle")
    assert r["a"]["kv_lengths"] == r["b"]["kv_lengths"] and len(set(r["a"]["kv_lengths"])) > 1
    assert r["flops_ratio_a_over_b"] == pytest.approx(1.0) and "lock-step" in render_markdown(r)
    bad = subprocess.run([sys.executable, "-m", "engines.bench.decode_pair", str(tiny_bundle), str(tmp_path),
                          "--json", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert bad.returncode != 0 and "error:" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "r.json").exists()


def test_ort_open_reports_both_session_kinds(tiny_bundle: Path, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    graph = tiny_bundle / "onnx" / "vision_encoder.onnx"  # its weights are external data (the segments' are inline)
    out = subprocess.run([sys.executable, "-m", "engines.bench.ort_open", str(graph), "--json", str(tmp_path / "o.json"),
                          "--md", str(tmp_path / "o.md")], capture_output=True, text=True, check=True)
    rows = json.loads((tmp_path / "o.json").read_text())
    assert [r["mode"] for r in rows] == ["folded", "unfolded"] and "after trim_heap" in out.stdout
    assert all(r["peak_bytes"] >= r["open_bytes"] >= 0 and r["weights_bytes"] > 0 for r in rows)
    bad = subprocess.run([sys.executable, "-m", "engines.bench.ort_open", str(tmp_path / "none.onnx"), "--json", str(tmp_path / "b.json")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "is not a file" in bad.stderr and not (tmp_path / "b.json").exists()
