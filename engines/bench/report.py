"""The report of a `ficoco-bench` run: the workers' results aggregated into bench.json's structure
(speedups, FLOPs ratios, token agreement, the target), rendered as bench.md and bench.png, and written."""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bundle.manifest import Manifest
from engines.bench.common import (
    REPORT_SCHEMA,
    TARGET_EFFICIENCY,
    TIMED_FIELDS,
    BenchOptions,
    ConfigSpec,
    available_cores,
    layer_ranges,
)
from engines.bench.profiling import summarize
from engines.bench.roofline import roofline_columns
from ficoco.atomic import atomic_path, write_atomic

# ---------------------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------------------


def token_agreement(tokens: Sequence[int], reference: Sequence[int]) -> dict[str, float | int]:
    """Positional greedy-token agreement with a reference run, and the length of the common prefix."""
    n = min(len(tokens), len(reference))
    if n == 0:
        return {"agreement": 0.0, "prefix": 0, "compared": 0}
    same = sum(1 for a, b in zip(tokens[:n], reference[:n], strict=True) if a == b)
    prefix = next((i for i in range(n) if tokens[i] != reference[i]), n)
    return {"agreement": same / n, "prefix": prefix, "compared": n}


def _flops(schedule: dict[str, Any], text_tokens: int, geometry: Any) -> dict[str, float]:
    from ficoco.flops import flops_report
    from ficoco.schedule import Schedule

    s = Schedule.from_dict(schedule)
    f = flops_report(geometry, s.vision, s.decoder, text_tokens=text_tokens)
    return {k: f[k] for k in ("vision", "prefill", "total", "decode_per_token")}


def _median(summary: dict[str, Any] | None) -> float:
    if not summary or not summary.get("n"):
        return float("nan")
    return float(summary["median"])


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or not finite, or b is 0."""
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or b == 0:
        return None
    return a / b


def build_report(
    configs: Sequence[ConfigSpec], results: dict[str, dict[str, Any]], errors: dict[str, str], manifest: Manifest,
    opts: BenchOptions, geometry: Any, step_reduction_nodes: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Aggregate the workers' results into the bench.json structure (speedups, FLOPs ratios, agreement)."""
    text_len = next((int(r["text_len"]) for r in results.values() if "text_len" in r), 0)
    entries: list[dict[str, Any]] = []
    for cfg in configs:
        res = results.get(cfg.label, {})
        runs = res.get("runs", [])
        timings = {k: summarize([r[k] for r in runs if r.get(k) is not None and math.isfinite(r[k])]) for k in TIMED_FIELDS}
        vt = None
        if cfg.schedule:
            vt = {"to_decoder": int(cfg.schedule["decoder"]["span_in"]),
                  "final": int(cfg.schedule["decoder"]["span_in"]) - sum(int(s["r"]) for s in cfg.schedule["decoder"]["steps"])}
        entry: dict[str, Any] = {
            "label": cfg.label, "kind": cfg.kind, "role": cfg.role, "variant": cfg.variant, "method": cfg.method,
            "ratio": cfg.ratio, "bundle": cfg.bundle, "origin": cfg.origin, "visual_tokens": vt,
            "layers": layer_ranges(cfg.schedule or {}),
            "flops_tflops": _flops(cfg.schedule, text_len, geometry) if cfg.schedule else {},
            "timings": timings, "runs": runs, "tokens": res.get("tokens", []),
            "load_s": res.get("load_s"), "peak_rss_bytes": res.get("peak_rss_bytes"), "base_rss_bytes": res.get("base_rss_bytes"),
            "profile": res.get("profile"), "error": errors.get(cfg.label),
            "loadavg_1min": res.get("loadavg_1min"),
        }
        if "generate_max_new_tokens_1_ms" in res:
            entry["generate_max_new_tokens_1_ms"] = res["generate_max_new_tokens_1_ms"]
        entries.append(entry)
    ref = next((e for e in entries if e["role"] == "unreduced"), None)
    torch_e = next((e for e in entries if e["role"] == "pytorch"), None)
    ref_flops = (ref or {}).get("flops_tflops", {}).get("total")
    for e in entries:
        tot = e["flops_tflops"].get("total")
        e["flops_ratio"] = _ratio(tot, ref_flops)  # reduced / unreduced
        e["flops_speedup"] = _ratio(ref_flops, tot)  # unreduced / reduced
        stage_flops = {s: _ratio(e["flops_tflops"].get(s), (ref or {}).get("flops_tflops", {}).get(s)) for s in ("vision", "prefill")} if ref else {}
        ttft = _median(e["timings"].get("ttft_ms"))
        e["ttft_speedup"] = _ratio(_median(ref["timings"].get("ttft_ms")), ttft) if ref else None
        e["ttft_speedup_vs_pytorch"] = _ratio(_median(torch_e["timings"].get("ttft_ms")), ttft) if torch_e else None
        e["stage_speedups"] = {
            s: {"measured": _ratio(_median(ref["timings"].get(f"{s}_ms")), _median(e["timings"].get(f"{s}_ms"))) if ref else None,
                "flops": _ratio(1.0, stage_flops.get(s))}
            for s in ("vision", "prefill")
        }
        e["efficiency"] = _ratio(e["ttft_speedup"], e["flops_speedup"])
        e["meets_target"] = (e["efficiency"] >= TARGET_EFFICIENCY) if (e["efficiency"] is not None and e["role"] == "sweep") else None
        if ref and ref.get("tokens") and e["tokens"] and e is not ref:
            e["agreement"] = token_agreement(e["tokens"], ref["tokens"])
        else:
            e["agreement"] = {"agreement": 1.0, "prefix": len(e["tokens"]), "compared": len(e["tokens"])} if e is ref else None
        prof = e.get("profile") or {}
        red = sum(p.get("reduction_ms", 0.0) for p in prof.values())
        tot_ms = sum(p.get("total_node_ms", 0.0) for p in prof.values())
        e["reduction_share"] = (red / tot_ms) if tot_ms > 0 else None
        # the profiled kernel time of the whole pass (vision + embed + prefill): median and range over the passes
        per_pass = [sum(ms) for ms in zip(*(p["total_node_ms_all"] for p in prof.values() if p.get("total_node_ms_all")), strict=True)]
        if per_pass:
            e["profiled_node_ms"] = summarize(per_pass)["median"]
            e["profiled_node_ms_range"] = [min(per_pass), max(per_pass)]
        else:
            e["profiled_node_ms"] = tot_ms if tot_ms > 0 else None
    # roofline: each stage's achieved GFLOP/s against the machine's GEMM peak, measured in the same run
    peak = next((r["roofline"] for r in results.values() if r.get("roofline")), None)
    for e in entries:
        e["roofline"] = roofline_columns(e["flops_tflops"], e["timings"], (peak or {}).get("peak_fp32")) if e["flops_tflops"] else None
    # A second speedup estimate from the profiled pass (kernel time only, one pass, taken right after the timed
    # runs): less exposed to other processes' load than wall-clock TTFT, blind to framework overhead.
    ref_prof = (ref or {}).get("profile") or {}
    for e in entries:
        prof = e.get("profile") or {}
        e["profile_speedup"] = _ratio((ref or {}).get("profiled_node_ms"), e.get("profiled_node_ms"))
        e["profile_efficiency"] = _ratio(e["profile_speedup"], e["flops_speedup"])
        for s, graph in (("vision", "vision_encoder"), ("prefill", "decoder_prefill")):
            e["stage_speedups"][s]["profiled"] = _ratio((ref_prof.get(graph) or {}).get("total_node_ms"), (prof.get(graph) or {}).get("total_node_ms"))
    if step_reduction_nodes is not None:
        for e in entries:
            if e.get("bundle") in step_reduction_nodes and e.get("profile"):
                e["profile"]["decoder_step"] = {"profiled": False, "reduction_nodes_in_graph": step_reduction_nodes[e["bundle"]],
                                                "note": "no reduction nodes in the step graph" if not step_reduction_nodes[e["bundle"]] else "not profiled"}
    import onnxruntime
    import torch

    target_entry = next((e for e in entries if e["role"] == "sweep" and e["variant"] == "VL" and abs(e["ratio"] - 0.25) < 1e-9), None)
    return {
        "schema": REPORT_SCHEMA,
        "bundle": str(opts.bundle.resolve()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source_model": manifest.source_model,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cores_available": available_cores(), "threads": opts.resolved_threads(),
                    "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "options": {"ratios": list(opts.ratios), "variants": sorted({c.variant for c in configs if c.role == "sweep"}),
                    "warmup": opts.warmup, "repeats": opts.repeats, "max_new_tokens": opts.max_new_tokens,
                    "image": opts.image, "prompt": opts.prompt, "ignore_eos": True, "backend": "onnxruntime (CPUExecutionProvider)",
                    "profile": opts.profile, "pytorch": opts.pytorch},
        "text_tokens": text_len,
        "gemm_peak": peak,
        "notes": [
            "roofline: achieved GFLOP/s = the planner's FLOPs of a stage / its median time; fraction = that / gemm_peak.peak_fp32, "
            "the fastest of ONNX Runtime's own fp32 MatMul at the model's vision and prefill GEMM shapes, same threads, same run.",
            "flops_tflops: ficoco.flops at the prompt's real text length; vision + decoder prefill, lm_head and embedding excluded.",
            "flops_ratio = reduced / unreduced total FLOPs; flops_speedup = its inverse; efficiency = ttft_speedup / flops_speedup.",
            "peak_rss_bytes: the configuration's own worker process (VmHWM after the timed runs, before profiling); base_rss_bytes: RSS after imports.",
            "reduction share and kernel-time speedups: ONNX Runtime profiles of several passes of vision + embed + prefill after a warm-up pass "
            "(engines.bench.profiling.PROFILE_PASSES); each stage's figures are its median pass's, the kernel-time speedup the median "
            "over passes; node events attributed with exporter.regions.reduction_node_names.",
            "load avg: the machine's 1-minute load average when the configuration's worker started and when its timed "
            "runs ended; a load above the thread count means other processes competed for the cores and the "
            "configurations' times are not comparable.",
        ],
        "target": {"rule": f"ttft_speedup >= {TARGET_EFFICIENCY} x flops_speedup at VL 0.25",
                   "config": target_entry["label"] if target_entry else None,
                   "efficiency": target_entry["efficiency"] if target_entry else None,
                   "met": target_entry["meets_target"] if target_entry else None,
                   "profile_efficiency": target_entry["profile_efficiency"] if target_entry else None},
        "configs": entries,
    }


# ---------------------------------------------------------------------------------------------------------
# rendering and writing
# ---------------------------------------------------------------------------------------------------------


def _fmt(x: Any, spec: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, spec)


def _ms(summary: dict[str, Any] | None) -> str:
    if not summary or not summary.get("n"):
        return "–"
    return f"{summary['median']:.0f} [{summary['min']:.0f}–{summary['max']:.0f}]"


def _roofline_cell(r: dict[str, Any] | None) -> str:
    if not r:
        return "–"
    return " / ".join(f"{_fmt(r[s]['gflops'], '.0f')} ({_fmt(r[s]['fraction_of_peak'], '.0%')})" for s in ("vision", "prefill"))


def target_summary(report: dict[str, Any]) -> str | None:
    """One line on the target (the VL 0.25 configuration's efficiency, met or not); None without that entry."""
    t = report.get("target") or {}
    if not t.get("config"):
        return None
    return f"target {t['rule']}: {t['config']} efficiency {_fmt(t.get('efficiency'), '.2f')} -> {'met' if t.get('met') else 'NOT met'}"


def render_markdown(report: dict[str, Any]) -> str:
    """bench.md: the machine, the options, one table row per configuration, the target and the notes."""
    m, o = report["machine"], report["options"]
    lines = [
        f"# ficoco-bench: {Path(report['bundle']).name}",
        "",
        f"Model `{(report.get('source_model') or {}).get('name')}`, {report['text_tokens']} text tokens, image `{o['image']}`, "
        f"{o['max_new_tokens']} new tokens (EOS ignored), {o['warmup']} warm-up + {o['repeats']} timed runs per configuration, "
        f"{o['backend']}, {m['threads']} threads of {m['cores_available']} cores ({m['processor']}); onnxruntime {m['onnxruntime']}, "
        f"torch {m['torch']}. Times: median [min–max] in ms.",
        "",
        "| config | visual tokens | TFLOPs | FLOPs ratio | vision ms | prefill ms | TTFT ms | TTFT speedup | vs PyTorch "
        "| speedup / FLOPs speedup | GFLOP/s (of peak): vision / prefill | decode tok/s | peak RSS GB "
        "| reduction share (vision / prefill) | agreement | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in report["configs"]:
        vt = e.get("visual_tokens")
        vts = "–" if not vt else (f"{vt['to_decoder']}" if vt["to_decoder"] == vt["final"] else f"{vt['to_decoder']} → {vt['final']}")
        prof = e.get("profile") or {}
        shares = " / ".join(_fmt((prof.get(s) or {}).get("share"), ".1%") for s in ("vision_encoder", "decoder_prefill")) if prof else "–"
        agr = e.get("agreement")
        row = [
            e["label"] + (f" ({e['error'].splitlines()[0][:60]})" if e.get("error") else ""),
            vts,
            _fmt(e["flops_tflops"].get("total"), ".3f"),
            _fmt(e.get("flops_ratio"), ".2f"),
            _ms(e["timings"].get("vision_ms")),
            _ms(e["timings"].get("prefill_ms")),
            _ms(e["timings"].get("ttft_ms")),
            _fmt(e.get("ttft_speedup"), ".2f") + ("×" if e.get("ttft_speedup") else ""),
            _fmt(e.get("ttft_speedup_vs_pytorch"), ".2f") + ("×" if e.get("ttft_speedup_vs_pytorch") else ""),
            _fmt(e.get("efficiency"), ".2f"),
            _roofline_cell(e.get("roofline")),
            _fmt(_median(e["timings"].get("decode_tokens_per_s")), ".2f"),
            _fmt((e.get("peak_rss_bytes") or float("nan")) / 2**30, ".2f"),
            shares,
            _fmt((agr or {}).get("agreement"), ".0%"),
            " → ".join(_fmt(x, ".1f") for x in (e.get("loadavg_1min") or [])) or "–",
        ]
        lines.append("| " + " | ".join(row) + " |")
    peak = report.get("gemm_peak") or {}
    if peak.get("peak_fp32"):
        shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in peak["shapes"].items())
        lines += ["", f"Machine peak ({peak['kernel']}, {peak['threads']} threads, shapes M x K x N: {shapes}): "
                  f"fp32 {peak['peak_fp32']:.0f} GFLOP/s, fp16 {_fmt(peak.get('peak_fp16'), '.0f')} GFLOP/s."]
    ex = report.get("export") or {}
    if ex.get("bundles"):
        total = sum(b["seconds"] for b in ex["bundles"].values())
        per = ", ".join(f"{k} {b['seconds']:.0f} s ({b['graphs_linked']} linked)" for k, b in ex["bundles"].items())
        lines += ["", f"Exports in this run: {len(ex['bundles'])} bundles in {total:.0f} s after one model load of "
                  f"{_fmt(ex.get('load_seconds'), '.0f')} s: {per}. A linked graph is one an earlier bundle of the sweep "
                  "already exported (`exporter.reuse`)."]
    t = report.get("target") or {}
    if t.get("config"):
        verdict = "met" if t.get("met") else "NOT met"
        lines += ["", f"Target ({t['rule']}): {t['config']} efficiency {_fmt(t.get('efficiency'), '.2f')} → **{verdict}** "
                  f"(from the profiled kernel time instead of wall-clock TTFT: {_fmt(t.get('profile_efficiency'), '.2f')})."]
    lines += ["", "Speedups vs unreduced: wall-clock (timed runs) / kernel time (profiled pass) / theoretical (FLOPs):", "",
              "| config | vision | prefill | vision + embed + prefill kernels | top prefill ops (ms) |", "|---|---|---|---|---|"]
    for e in report["configs"]:
        if e["role"] not in ("sweep", "also"):
            continue
        ss = e.get("stage_speedups") or {}
        cell = [" / ".join(_fmt((ss.get(s) or {}).get(k), ".2f") + "×" for k in ("measured", "profiled", "flops")) for s in ("vision", "prefill")]
        spread = e.get("profiled_node_ms_range")
        passes = f"; kernels {spread[0]:.0f}–{spread[1]:.0f} ms over the passes" if spread else ""
        whole = (f"{_fmt(e.get('profile_speedup'), '.2f')}× (÷ FLOPs speedup {_fmt(e.get('flops_speedup'), '.2f')}× = "
                 f"{_fmt(e.get('profile_efficiency'), '.2f')}{passes})")
        top = ((e.get("profile") or {}).get("decoder_prefill") or {}).get("top_ops_ms") or {}
        tops = ", ".join(f"{k} {v:.0f}" for k, v in list(top.items())[:4]) or "–"
        lines.append(f"| {e['label']} | {cell[0]} | {cell[1]} | {whole} | {tops} |")
    lines += ["", "Notes:", ""] + [f"- {n}" for n in report.get("notes", [])]
    return "\n".join(lines) + "\n"


def render_plot(report: dict[str, Any], path: Path) -> None:
    """bench.png: TTFT (median, min–max bars) and greedy agreement vs ratio per variant; PyTorch as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = report["configs"]
    ref = next((e for e in entries if e["role"] == "unreduced"), None)
    torch_e = next((e for e in entries if e["role"] == "pytorch"), None)
    variants = sorted({e["variant"] for e in entries if e["role"] == "sweep"})
    fig, (ax_t, ax_a) = plt.subplots(1, 2, figsize=(11, 4.2))
    for v in variants:
        pts = [e for e in entries if (e["role"] == "sweep" and e["variant"] == v) or e is ref]
        pts = [e for e in pts if e["timings"].get("ttft_ms", {}).get("n")]
        pts.sort(key=lambda e: e["ratio"])
        if not pts:
            continue
        xs = [e["ratio"] for e in pts]
        med = [e["timings"]["ttft_ms"]["median"] for e in pts]
        err = [[m - e["timings"]["ttft_ms"]["min"] for m, e in zip(med, pts, strict=True)],
               [e["timings"]["ttft_ms"]["max"] - m for m, e in zip(med, pts, strict=True)]]
        line = ax_t.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=f"{v} (measured)")
        if ref and ref["timings"].get("ttft_ms", {}).get("n"):
            base = ref["timings"]["ttft_ms"]["median"]
            ideal = [base * e["flops_ratio"] if e.get("flops_ratio") else float("nan") for e in pts]
            ax_t.plot(xs, ideal, linestyle=":", color=line[0].get_color(), label=f"{v} (FLOPs-proportional)")
        agr = [(e["ratio"], (e.get("agreement") or {}).get("agreement")) for e in pts]
        agr = [(x, a) for x, a in agr if a is not None]
        if agr:
            ax_a.plot([x for x, _ in agr], [a for _, a in agr], marker="o", label=v)
    for e in entries:
        if e["role"] == "also" and e["timings"].get("ttft_ms", {}).get("n"):
            ax_t.scatter([e["ratio"]], [e["timings"]["ttft_ms"]["median"]], marker="s", label=e["label"])
    if torch_e and torch_e["timings"].get("ttft_ms", {}).get("n"):
        ax_t.axhline(torch_e["timings"]["ttft_ms"]["median"], color="gray", linestyle="--", label="PyTorch generate (unreduced)")
    ax_t.set_xlabel("ratio of visual tokens kept")
    ax_t.set_ylabel("TTFT ms (median, min–max)")
    ax_t.set_title("time to first token")
    ax_t.set_ylim(bottom=0)
    ax_t.legend(fontsize=7)
    ax_a.set_xlabel("ratio of visual tokens kept")
    ax_a.set_ylabel("greedy token agreement with unreduced")
    ax_a.set_ylim(-0.05, 1.05)
    ax_a.set_title(f"accuracy proxy ({report['options']['max_new_tokens']} greedy tokens)")
    if ax_a.lines:
        ax_a.legend(fontsize=7)
    fig.suptitle(f"ficoco-bench {Path(report['bundle']).name} ({report['machine']['threads']} threads, onnxruntime CPU)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path, make_parents=True) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def finite(x: Any) -> Any:
    """Replace NaN/inf by None recursively (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def write_reports(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """bench.json, bench.md and bench.png in `out_dir`, each written atomically."""
    paths = {"json": out_dir / "bench.json", "md": out_dir / "bench.md", "png": out_dir / "bench.png"}
    write_atomic(paths["json"], json.dumps(finite(report), indent=2, allow_nan=False) + "\n", make_parents=True)
    write_atomic(paths["md"], render_markdown(report), make_parents=True)
    render_plot(report, paths["png"])
    return paths

