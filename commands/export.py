"""`ficoco-export`: a LLaVA checkpoint + a token budget -> a validated bundle of ONNX graphs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from bundle.compare import TIE_MARGIN
from commands.common import CONTEXT, VERBOSE_HELP, fail, run_command
from commands.options import planning_options, schedule_request

STAGE_LABELS = {
    "load": "load model and plan",
    "lint": "TensorRT lint",
    "validate": "validate in ONNX Runtime",
}


def _label(stage: str) -> str:
    """The progress label of an export phase or graph."""
    return STAGE_LABELS.get(stage, f"export {stage}")


@click.command(context_settings=CONTEXT)
@click.version_option(package_name="ficoco-export")
@click.option("--model", "-m", help="Model: alias (llava-1.5-7b, llava-1.5-13b), a local llava-hf directory, a HF repo id in the local cache, or the built-ins shapes (trained on easy-vqa) / tiny / smol / bench. Always offline.")
@planning_options(schedule_file=True, variant_default="VL")
@click.option("-o", "--output-dir", type=click.Path(path_type=Path), help="Bundle directory [default: out/<model>-<variant>-<method>-<budget>].")
@click.option("--force", is_flag=True, help="Replace a non-empty output directory (only after the new bundle is complete).")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True, help="Graph precision; fp16 keeps score statistics and RMSNorm in fp32.")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (TensorRT 10 parses up to 20).")
@click.option("--max-batch-size", type=int, default=4, show_default=True, help="Largest batch in the recorded shape ranges (TensorRT profiles).")
@click.option("--max-text-len", type=int, default=512, show_default=True, help="Largest prompt length in text tokens (without the visual tokens).")
@click.option("--max-new-tokens", type=int, default=256, show_default=True, help="Largest number of generated tokens (sizes the decode KV range).")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Validation of an fp32 bundle: absolute tolerance of ONNX Runtime vs PyTorch, per element of every stage output (numpy.allclose's rule). An fp16 bundle is judged by --min-cosine and --max-norm-deviation against the fp32 computation instead.")
@click.option("--rtol", type=float, default=1e-3, show_default=True, help="Validation: relative tolerance.")
@click.option("--decode-steps", type=int, default=16, show_default=True, help="Validation: greedy decode steps (fp32: tokens must be identical; fp16: teacher-forced along the fp32 reference's tokens, see --min-forced-match).")
@click.option("--min-cosine", type=float, default=0.99, show_default=True, help="Validation of an fp16 bundle: least cosine similarity of every stage output to the fp32 PyTorch reference (which makes the bundle's kept-token choices).")
@click.option("--max-norm-deviation", type=float, default=0.25, show_default=True, help="Validation of an fp16 bundle: largest |norm ratio - 1| of every stage output, ratio = ||ONNX Runtime|| / ||fp32 PyTorch||.")
@click.option("--min-forced-match", type=float, default=1.0, show_default=True, help="Validation of an fp16 bundle: least share of the fp32 reference's greedy positions where ONNX Runtime, given the same prefix, picks the same token or a near-tie (see --tie-margin).")
@click.option("--tie-margin", type=float, default=TIE_MARGIN, show_default=True, help="Validation of an fp16 bundle: a different pick is a near-tie when the reference preferred its own token by at most this many standard deviations of its logits over the vocabulary.")
@click.option("--min-token-match", type=float, help="Validation of an fp16 bundle: also gate the free-running greedy match rate vs the fp32 reference (a rate in [0, 1]) [default: reported, not gated].")
@click.option("--low-memory", is_flag=True, help="Validation: open each graph in ONNX Runtime only while it runs (its CPU provider upcasts fp16 weights, so a 7B fp16 bundle open at once needs ~27 GB); slower.")
@click.option("--no-validate", is_flag=True, help="Skip the ONNX Runtime vs PyTorch validation.")
@click.option("--no-lint", is_flag=True, help="Skip the TensorRT-compatibility lint.")
@click.option("--optimize/--no-optimize", default=False, show_default=True, help="Run the onnxscript optimizer (constant folding, dead-code removal) on each graph. Off by default: it takes minutes on a 32-layer prefill graph and TensorRT folds constants at build time anyway.")
@click.option("--graph-only", is_flag=True, help="Export graphs of the real geometry without weights (meta device): lint and FLOPs without the checkpoint.")
@click.option("--lint-only", "lint_bundle", type=click.Path(path_type=Path), help="Only lint the graphs of an existing BUNDLE and exit.")
@click.option("--trt-target", type=click.Choice(["trt10", "trt11"]), default="trt10", show_default=True, help="TensorRT version the lint checks against (at export and with --lint-only).")
@click.option("-v", "--verbose", is_flag=True, help=VERBOSE_HELP)
def main(**kw: Any) -> None:
    """Export a LLaVA model with visual-token reduction baked into ONNX graphs (vision encoder, token
    embedding, decoder prefill, decoder step), check and lint them, validate them in ONNX Runtime against
    PyTorch, and write a bundle that `ficoco-build` and `ficoco-run` consume.

    Example: ficoco-export --model llava-1.5-7b --variant VL --ratio 0.25 -o out/llava7b-vl25
    """
    if kw["lint_bundle"] is not None:
        run_command(bool(kw["verbose"]), lambda: _lint_only(Path(kw["lint_bundle"]), str(kw["trt_target"])))
        return
    run_command(bool(kw["verbose"]), lambda: _export(kw), interrupted="interrupted; no bundle was written")


def _lint_only(bundle: Path, target: str) -> None:
    from bundle.manifest import load_manifest
    from exporter.lint import format_findings, has_errors, lint_files

    console = Console(stderr=True)
    manifest = load_manifest(bundle, verify=False)
    files = [bundle / g.file for g in manifest.graphs.values()]
    runtime = {stage: [i["name"] for i in g.inputs] for stage, g in manifest.graphs.items()}
    findings = lint_files(files, target=target, runtime_inputs=runtime)
    if findings:
        console.print(format_findings(findings), highlight=False, markup=False)
    if has_errors(findings):
        fail(f"{sum(f.severity == 'error' for f in findings)} TensorRT lint error(s) in {bundle}", 1)
    console.print(f"[green]lint passed[/] ({target}): {len(files)} graphs, {len(findings)} warning(s)")


def default_output(model: str, request: Any) -> Path:
    """out/<model>-<variant>-<method>-<budget>."""
    r = request
    budget = (f"r{r.ratio:g}" if r.ratio is not None else f"k{r.keep_tokens}" if r.keep_tokens is not None
              else f"t{r.target_tflops:g}" if r.target_tflops is not None else "planned")
    return Path("out") / f"{Path(model).name}-{r.variant}-{r.method}-{budget}"


def _export(kw: dict[str, Any]) -> None:
    from bundle.manifest import load_manifest
    from exporter.export import ExportOptions
    from exporter.pipeline import ValidationOptions, export_bundle
    from exporter.validate import ReducedPrecisionGates

    if not kw["model"]:
        raise click.BadParameter("--model is required (an alias such as llava-1.5-7b, a local directory, or shapes / tiny / smol)")
    request = schedule_request(kw)
    opts = ExportOptions(opset=int(kw["opset"]), precision=str(kw["precision"]), max_batch_size=int(kw["max_batch_size"]),
                         max_text_len=int(kw["max_text_len"]), max_new_tokens=int(kw["max_new_tokens"]),
                         optimize=bool(kw["optimize"]), graph_only=bool(kw["graph_only"]))
    gates = ReducedPrecisionGates(min_cosine=float(kw["min_cosine"]), max_norm_deviation=float(kw["max_norm_deviation"]),
                                  min_forced_match=float(kw["min_forced_match"]), tie_margin=float(kw["tie_margin"]),
                                  min_token_match=None if kw["min_token_match"] is None else float(kw["min_token_match"]))
    validation = ValidationOptions(enabled=not kw["no_validate"] and not kw["graph_only"], atol=float(kw["atol"]),
                                   rtol=float(kw["rtol"]), decode_steps=int(kw["decode_steps"]),
                                   low_memory=bool(kw["low_memory"]), reduced_precision=gates)
    model = str(kw["model"])
    out = Path(kw["output_dir"]) if kw["output_dir"] else default_output(model, request)
    console = Console(stderr=True)
    t0 = time.perf_counter()

    def export(progress: Any) -> Path:
        return export_bundle(model, request, out, opts, validation, force=bool(kw["force"]), lint=not kw["no_lint"],
                             lint_target=str(kw["trt_target"]), progress=progress)

    if console.is_terminal:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
            tasks: dict[str, Any] = {}

            def on_stage(stage: str, event: str) -> None:
                if event == "start":
                    tasks[stage] = bar.add_task(_label(stage), total=1)
                else:
                    bar.update(tasks[stage], completed=1)

            path = export(on_stage)
    else:

        def on_stage(stage: str, event: str) -> None:
            console.print(f"[{time.perf_counter() - t0:7.1f}s] {_label(stage)}: {event}",
                          highlight=False, markup=False)

        path = export(on_stage)
    manifest = load_manifest(path, verify=False)
    vt, fl = manifest.visual_tokens, manifest.flops_tflops
    console.print(
        f"[green]bundle written[/] {path}\n"
        f"  visual tokens: {vt['in']} -> {vt['to_decoder']} after the vision tower -> {vt['final']} final; "
        f"TFLOPs vision {fl.get('vision', 0):.3f}, prefill {fl.get('prefill', 0):.3f}\n"
        f"  validation: {validation_line(manifest.validation)}",
        highlight=False,
    )


def validation_line(v: dict[str, Any] | None) -> str:
    """One line on the export validation record of a manifest."""
    if not isinstance(v, dict) or not v.get("ran"):
        return "not run"
    g = v["greedy"]
    if v.get("kind") == "reduced_precision":
        cos = min(s["min_cosine"] for s in v["stages"].values())
        ratio = max((s["worst_norm_ratio"] for s in v["stages"].values()), key=lambda r: abs(r - 1.0))
        sel = v.get("selection") or {}
        f = v.get("forced")
        forced = "" if not f else f"; teacher-forced {f['matches']} matches + {f['near_ties']} near-ties of {f['positions']}"
        return (f"every stage vs fp32 PyTorch: min cosine {cos:.6f}, worst norm ratio {ratio:.4f}; kept-token flips "
                f"{sel.get('total', 0)} ({sel.get('total', 0) - sel.get('non_tie', 0)} ties); greedy tokens match "
                f"{g['match_rate']:.3f} over {g['steps']} steps{forced}")
    worst = max(s["max_abs_err"] for s in v["stages"].values())
    return f"all stages within tolerance (max |err| {worst:.2e}); greedy tokens identical over {g['steps']} steps"


if __name__ == "__main__":
    main()
