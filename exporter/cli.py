"""`ficoco-export`: a LLaVA checkpoint + a token budget -> a validated bundle of ONNX graphs."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from exporter.bundle import BundleError, load_manifest
from exporter.export import ExportError, ExportOptions
from exporter.validate import ValidationError

log = logging.getLogger("ficoco-export")

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _fail(console: Console, message: str, code: int) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _default_output(model: str, variant: str, method: str, ratio: float | None, keep: int | None, tflops: float | None) -> Path:
    budget = f"r{ratio:g}" if ratio is not None else f"k{keep}" if keep is not None else f"t{tflops:g}" if tflops is not None else "planned"
    return Path("out") / f"{Path(model).name}-{variant}-{method}-{budget}"


def _lint_only(bundle: Path, target: str, console: Console) -> None:
    from exporter.lint import format_findings, has_errors, lint_files

    try:
        manifest = load_manifest(bundle, verify=False)
    except BundleError as e:
        _fail(console, str(e), 2)
    try:
        files = [bundle / g["file"] for g in manifest["graphs"].values()]
        runtime = {stage: [i["name"] for i in g["inputs"]] for stage, g in manifest["graphs"].items()}
    except (KeyError, TypeError, AttributeError) as e:
        _fail(console, f"{bundle}/manifest.json has no readable graph list ({e}); re-export the bundle", 2)
    try:
        findings = lint_files(files, target=target, runtime_inputs=runtime)
    except ValueError as e:
        _fail(console, str(e), 2)
    if findings:
        console.print(format_findings(findings), highlight=False)
    if has_errors(findings):
        _fail(console, f"{sum(f.severity == 'error' for f in findings)} TensorRT lint error(s) in {bundle}", 1)
    console.print(f"[green]lint passed[/] ({target}): {len(files)} graphs, {len(findings)} warning(s)")


@click.command(context_settings=CONTEXT)
@click.version_option(package_name="ficoco-export")
@click.option("--model", "-m", help="Model: alias (llava-1.5-7b, llava-1.5-13b), a local llava-hf directory, a HF repo id in the local cache, or the built-ins shapes (trained on easy-vqa) / tiny / smol / bench. Always offline.")
@click.option("--variant", type=click.Choice(["none", "V", "L", "VL"], case_sensitive=False), default="VL", show_default=True, help="Where to reduce: V = vision encoder, L = decoder, VL = both, none = no reduction.")
@click.option("--method", type=click.Choice(["ficoco", "tome", "evit", "random", "pool", "fastv"]), default="ficoco", show_default=True, help="Reduction method (tome/evit and the baselines random/pool: vision only, variant V; fastv: decoder only).")
@click.option("--ratio", type=float, help="Fraction of the 576 visual tokens KEPT at the end of reduction, in (0, 1]; 0.25 -> 144 tokens.")
@click.option("--keep-tokens", type=int, help="Visual tokens kept at the end of reduction (instead of --ratio).")
@click.option("--target-tflops", type=float, help="Pick the largest budget whose decoder prefill costs at most this many TFLOPs (at --text-tokens).")
@click.option("--schedule", "schedule_file", type=click.Path(path_type=Path), help="Use a schedule written by `ficoco-plan -o FILE` instead of planning here (then no budget or layer option may be given).")
@click.option("--text-tokens", type=click.IntRange(min=0), default=60, show_default=True, help="Prompt length in text tokens at which the recorded TFLOPs (and a --target-tflops budget) are computed.")
@click.option("--preset", type=click.Choice(["paper", "official"]), default="paper", show_default=True, help="FiCoCo equations of the paper (v4) or the official code's design choices.")
@click.option("--positions", type=click.Choice(["compact", "original"]), default="compact", show_default=True, help="Decoder RoPE positions after FiCoCo-L: renumbered per layer, or original positions kept.")
@click.option("--v-start", type=int, help="First CLIP block (0-based) with a reduction step [default: 12].")
@click.option("--v-end", type=int, help="Last CLIP block with a reduction step [default: the feature block, 22].")
@click.option("--l-start", type=int, help="First decoder block with a reduction step [default: 4 paper / 5 official for 32+ decoder blocks, at the same relative depth for shallower decoders (shapes: 1); fastv: its step block 1].")
@click.option("--l-end", type=int, help="Last decoder block with a reduction step [default: last block - 1].")
@click.option("--vl-split", type=int, help="VL only: visual tokens after the vision stage [default: sqrt(576 * final)].")
@click.option("-o", "--output-dir", type=click.Path(path_type=Path), help="Bundle directory [default: out/<model>-<variant>-<method>-<budget>].")
@click.option("--force", is_flag=True, help="Replace a non-empty output directory (only after the new bundle is complete).")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True, help="Graph precision; fp16 keeps score statistics and RMSNorm in fp32.")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (TensorRT 10 parses up to 20).")
@click.option("--max-batch-size", type=int, default=4, show_default=True, help="Largest batch in the recorded shape ranges (TensorRT profiles).")
@click.option("--max-text-len", type=int, default=512, show_default=True, help="Largest prompt length in text tokens (without the visual tokens).")
@click.option("--max-new-tokens", type=int, default=256, show_default=True, help="Largest number of generated tokens (sizes the decode KV range).")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Validation: absolute tolerance of ONNX Runtime vs PyTorch, per stage.")
@click.option("--rtol", type=float, default=1e-3, show_default=True, help="Validation: relative tolerance.")
@click.option("--decode-steps", type=int, default=16, show_default=True, help="Validation: greedy decode steps that must give identical tokens.")
@click.option("--no-validate", is_flag=True, help="Skip the ONNX Runtime vs PyTorch validation.")
@click.option("--no-lint", is_flag=True, help="Skip the TensorRT-compatibility lint.")
@click.option("--optimize/--no-optimize", default=False, show_default=True, help="Run the onnxscript optimizer (constant folding, dead-code removal) on each graph. Off by default: it takes minutes on a 32-layer prefill graph and TensorRT folds constants at build time anyway.")
@click.option("--graph-only", is_flag=True, help="Export graphs of the real geometry without weights (meta device): lint and FLOPs without the checkpoint.")
@click.option("--lint-only", "lint_bundle", type=click.Path(path_type=Path), help="Only lint the graphs of an existing BUNDLE and exit.")
@click.option("--trt-target", type=click.Choice(["trt10", "trt11"]), default="trt10", show_default=True, help="TensorRT version the lint checks against (at export and with --lint-only).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and full tracebacks.")
def main(**kw: object) -> None:
    """Export a LLaVA model with visual-token reduction baked into ONNX graphs (vision encoder, token
    embedding, decoder prefill, decoder step), check and lint them, validate them in ONNX Runtime against
    PyTorch, and write a bundle that `ficoco-build` and `ficoco-run` consume.

    Example: ficoco-export --model llava-1.5-7b --variant VL --ratio 0.25 -o out/llava7b-vl25
    """
    console = Console(stderr=True)
    verbose = bool(kw["verbose"])
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if kw["lint_bundle"] is not None:
        _lint_only(Path(str(kw["lint_bundle"])), str(kw["trt_target"]), console)
        return
    if not kw["model"]:
        _fail(console, "--model is required (an alias such as llava-1.5-7b, a local directory, or shapes / tiny / smol)", 2)
    try:
        _export(kw, console)
    except KeyboardInterrupt:
        _fail(console, "interrupted; no bundle was written", 130)
    except Exception as e:  # every failure becomes one clear line; --verbose shows the traceback
        if verbose:
            console.print_exception()
        _fail(console, str(e), _exit_code(e))


def _exit_code(e: Exception) -> int:
    from ficoco.geometry import GeometryError
    from ficoco.models import ModelNotFoundError
    from ficoco.planner import PlanError

    if isinstance(e, ModelNotFoundError | PlanError | GeometryError | BundleError | ValueError):
        return 2
    if isinstance(e, ExportError | ValidationError):
        return 1
    return 1


def _read_schedule(path: Path) -> dict[str, Any]:
    """The JSON object of a `ficoco-plan -o` file; ValueError (exit 2) naming the file otherwise."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--schedule {path}: cannot read it as JSON ({err}); write it with `ficoco-plan -o {path}`") from err
    if not isinstance(data, dict):
        raise ValueError(f"--schedule {path}: holds a JSON {type(data).__name__}, not a schedule; write it with ficoco-plan -o")
    return data


def _export(kw: dict[str, object], console: Console) -> None:
    from exporter.pipeline import PlanRequest, ValidationOptions, export_bundle

    variant = {"none": "none", "v": "V", "l": "L", "vl": "VL"}[str(kw["variant"]).lower()]
    schedule = None
    if kw["schedule_file"] is not None:
        planning = [f"--{k.replace('_', '-')}" for k in ("ratio", "keep_tokens", "target_tflops", "v_start", "v_end",
                                                         "l_start", "l_end", "vl_split") if kw[k] is not None]
        if planning:
            raise ValueError(f"--schedule is a complete plan; drop {', '.join(planning)}")
        schedule = _read_schedule(Path(str(kw["schedule_file"])))
        variant = str(schedule.get("variant", variant))
    request = PlanRequest(
        variant=variant,
        method=str(kw["method"]),
        ratio=kw["ratio"],  # type: ignore[arg-type]
        keep_tokens=kw["keep_tokens"],  # type: ignore[arg-type]
        target_tflops=kw["target_tflops"],  # type: ignore[arg-type]
        preset=str(kw["preset"]),
        positions=str(kw["positions"]),
        layers={k: kw[k] for k in ("v_start", "v_end", "l_start", "l_end", "vl_split")},  # type: ignore[misc]
        text_tokens=int(kw["text_tokens"]),  # type: ignore[arg-type]
        schedule=schedule,
    )
    if schedule is not None:
        request = PlanRequest(variant=variant, method=str(schedule.get("method", request.method)),
                              preset=str(schedule.get("preset", request.preset)),
                              positions=str(schedule.get("positions", request.positions)),
                              text_tokens=request.text_tokens, schedule=schedule)
    opts = ExportOptions(
        opset=int(kw["opset"]),  # type: ignore[arg-type]
        precision=str(kw["precision"]),  # type: ignore[arg-type]
        max_batch_size=int(kw["max_batch_size"]),  # type: ignore[arg-type]
        max_text_len=int(kw["max_text_len"]),  # type: ignore[arg-type]
        max_new_tokens=int(kw["max_new_tokens"]),  # type: ignore[arg-type]
        optimize=bool(kw["optimize"]),
        graph_only=bool(kw["graph_only"]),
    )
    validation = ValidationOptions(
        enabled=not kw["no_validate"] and not kw["graph_only"],
        atol=float(kw["atol"]),  # type: ignore[arg-type]
        rtol=float(kw["rtol"]),  # type: ignore[arg-type]
        decode_steps=int(kw["decode_steps"]),  # type: ignore[arg-type]
    )
    model = str(kw["model"])
    out = kw["output_dir"] or _default_output(model, variant, request.method, request.ratio, request.keep_tokens, request.target_tflops)
    out = Path(str(out))
    labels = {
        "load": "load model and plan",
        "vision_encoder": "export vision_encoder",
        "embed_tokens": "export embed_tokens",
        "decoder_prefill": "export decoder_prefill",
        "decoder_step": "export decoder_step",
        "lint": "TensorRT lint",
        "validate": "validate in ONNX Runtime",
    }
    t0 = time.perf_counter()
    if console.is_terminal:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
            tasks: dict[str, int] = {}

            def progress(stage: str, event: str) -> None:
                if event == "start":
                    tasks[stage] = bar.add_task(labels.get(stage, stage), total=1)
                else:
                    bar.update(tasks[stage], completed=1)

            path = export_bundle(model, request, out, opts, validation, force=bool(kw["force"]), lint=not kw["no_lint"],
                                 lint_target=str(kw["trt_target"]), progress=progress)
    else:

        def progress(stage: str, event: str) -> None:
            console.print(f"[{time.perf_counter() - t0:7.1f}s] {labels.get(stage, stage)}: {event}", highlight=False)

        path = export_bundle(model, request, out, opts, validation, force=bool(kw["force"]), lint=not kw["no_lint"],
                                 lint_target=str(kw["trt_target"]), progress=progress)
    manifest = load_manifest(path, verify=False)
    vt = manifest["visual_tokens"]
    fl = manifest["flops_tflops"]
    console.print(
        f"[green]bundle written[/] {path}\n"
        f"  visual tokens: 576 -> {vt['to_decoder']} after the vision stage -> {vt['final']} final; "
        f"TFLOPs vision {fl.get('vision', 0):.3f}, prefill {fl.get('prefill', 0):.3f}\n"
        f"  validation: {_validation_line(manifest)}",
        highlight=False,
    )


def _validation_line(manifest: dict[str, object]) -> str:
    v = manifest.get("validation") or {}
    if not isinstance(v, dict) or not v.get("ran"):
        return "not run"
    worst = max(s["max_abs_err"] for s in v["stages"].values())
    g = v["greedy"]
    return f"all stages within tolerance (max |err| {worst:.2e}); greedy tokens identical over {g['steps']} steps"
