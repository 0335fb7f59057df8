"""`ficoco-quantize`: an fp32 bundle -> a new bundle with explicit Q/DQ graphs (TensorRT explicit quantization)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from commands.common import CONTEXT, run_command

HELP_EPILOG = "Example: ficoco-quantize out/llava7b-vl25 -o out/llava7b-vl25-w4a8 --vision int8 --decoder int4-weight"


@click.command(context_settings=CONTEXT, epilog=HELP_EPILOG)
@click.version_option(package_name="ficoco-export")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Directory of the new quantized bundle (must not exist or be empty, unless --force).")
@click.option("--vision", type=click.Choice(["int8", "fp8", "none"]), default="int8", show_default=True, help="Vision encoder: INT8 or FP8 (E4M3) Q/DQ on weights (per channel) and activations (per tensor) of its MatMul/Conv, or none.")
@click.option("--decoder", type=click.Choice(["int4-weight", "int8", "fp8", "none"]), default="int4-weight", show_default=True, help="Decoder: every decoder segment graph (each weight once, shared by prefill and decode): INT4 weight-only (blocked DequantizeLinear, opset 21), INT8/FP8 Q/DQ, or none. The splice and reduction graphs are weightless and stay unquantized.")
@click.option("--calib-images", type=click.Path(path_type=Path), help="Folder of calibration images (jpg/png/...) [default: the bundled scikit-image photos].")
@click.option("--calib-prompts", type=click.Path(path_type=Path), help="Text file of calibration prompts, one per line [default: 8 built-in questions].")
@click.option("--calib-size", type=int, default=8, show_default=True, help="Number of (image, prompt) calibration pairs; each decoder segment gets one prefill sample and --step-samples decode samples per pair.")
@click.option("--step-samples", type=int, default=2, show_default=True, help="Decode-phase calibration samples (greedy decode steps) per pair, for each decoder segment (INT8/FP8 decoder).")
@click.option("--method", type=click.Choice(["max", "entropy", "percentile"]), default="max", show_default=True, help="INT8 activation calibration: max (min/max), entropy (KL) or percentile. FP8 always uses ONNX Runtime's distribution calibration.")
@click.option("--percentile", type=float, default=99.999, show_default=True, help="Percentile (in %) for --method percentile.")
@click.option("--block-size", type=int, default=128, show_default=True, help="Largest INT4 block size (elements along K); the largest power of two <= this that fits the most weights is used.")
@click.option("--save-calib", type=click.Path(path_type=Path), help="Also write the calibration inputs here as <graph>/<i>.npz (arrays keyed by ONNX input names).")
@click.option("--eval-images", type=int, default=3, show_default=True, help="Bundled photos used for the report's errors, selection check and greedy agreement (0: no evaluation).")
@click.option("--eval-tokens", type=int, default=16, show_default=True, help="Greedy tokens compared with the fp32 bundle.")
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed runs per stage for the latency medians (ONNX Runtime CPU).")
@click.option("--threads", type=click.IntRange(min=1), help="ONNX Runtime intra-op threads [default: ONNX Runtime's choice].")
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and full tracebacks.")
def main(bundle: Path, **kw: Any) -> None:
    """Quantize an fp32 BUNDLE with explicit QuantizeLinear/DequantizeLinear nodes into a new bundle.

    Calibration runs the bundle's own preprocessing and its fp32 graphs (ONNX Runtime CPU) on
    images x prompts, so each graph is calibrated on its real inputs. Only MatMul/Gemm/Conv weights
    and their inputs are quantized; the token reduction (its scores, TopK, gathers), Softmax and norms
    stay fp32. The new bundle keeps the source manifest, adds a `quantization` record, passes
    onnx.checker and the TensorRT lint, and gets reports/quantize.json (sizes, ORT CPU latency, errors,
    greedy agreement, and how many selected visual tokens differ per reduction step).
    Build engines from it with `ficoco-build` (strongly typed; TensorRT 10).
    """
    run_command(bool(kw["verbose"]), lambda: _run(bundle, kw))


def _run(bundle: Path, kw: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from calibration.evaluate import EvalOptions
    from calibration.pipeline import QuantizeRequest, quantize_bundle

    for opt in ("calib_size", "step_samples", "repeats", "eval_tokens"):
        if kw[opt] < 1:
            raise click.BadParameter(f"must be at least 1 (got {kw[opt]})", param_hint=f"--{opt.replace('_', '-')}")
    if kw["eval_images"] < 0:
        raise click.BadParameter("must be 0 or more", param_hint="--eval-images")
    if not 0 < kw["percentile"] <= 100:
        raise click.BadParameter(f"must be in (0, 100] (got {kw['percentile']})", param_hint="--percentile")
    evaluation = None if kw["eval_images"] == 0 else EvalOptions(
        images=kw["eval_images"], new_tokens=kw["eval_tokens"], repeats=kw["repeats"], threads=kw["threads"])
    request = QuantizeRequest(
        vision=kw["vision"], decoder=kw["decoder"], method=kw["method"], calib_images=kw["calib_images"],
        calib_prompts=kw["calib_prompts"], calib_size=kw["calib_size"], step_samples=kw["step_samples"],
        block_size=kw["block_size"], percentile=kw["percentile"], save_calib=kw["save_calib"],
        evaluation=evaluation, threads=kw["threads"],
    )
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description:<28}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=not sys.stderr.isatty()) as bar:
        tasks: dict[str, Any] = {}

        def progress(phase: str, done: int, total: int) -> None:
            key = phase.split()[0]
            if key not in tasks:
                tasks[key] = bar.add_task(phase, total=total)
            bar.update(tasks[key], description=phase, completed=done, total=total)

        out, report = quantize_bundle(bundle, kw["out"], request, force=kw["force"], progress=progress)
    click.echo(f"wrote {out}")
    for graph, rec in report["quantization"].items():
        click.echo(f"  {graph}: {rec['mode']} ({rec['method']}), {rec['quantized_nodes']} nodes quantized, "
                   f"{rec['excluded_nodes']} excluded, {rec['fp32_bytes'] / 2**20:.1f} -> {rec['bytes'] / 2**20:.1f} MiB"
                   + ("" if rec["ort_cpu_runnable"] else "  [not runnable on ONNX Runtime CPU]"))
    ev = report.get("evaluation")
    if ev:
        for stage, lat in ev["latency_ort_cpu"].items():
            click.echo(f"  {stage} ORT CPU: {lat['fp32_ms']:.1f} ms fp32 -> {lat['quantized_ms']:.1f} ms quantized")
        for name, err in ev["errors"].items():
            click.echo(f"  {name}: max |err| {err['max_abs_err']:.4g}, min cosine {err['cosine_min']:.4f}")
        click.echo(f"  greedy agreement over {ev['greedy']['new_tokens']} tokens: {ev['greedy']['agreement_mean']:.2%}")
        for name, sel in ev["selection"].items():
            diffs = ", ".join(str(s["differ"]) for s in sel["steps"])
            click.echo(f"  selection {name}: differing kept tokens per step [{diffs}]")
    click.echo(f"  report: {out / 'reports' / 'quantize.json'}")
    if kw["verbose"]:
        click.echo(json.dumps(report.get("quantization"), indent=2))


if __name__ == "__main__":
    main()
