"""Console entry points of the engines package: `ficoco-build`, `ficoco-run`; `ficoco-check` lives in
`engines/check.py` and `ficoco-bench` in `engines/bench.py`, sharing the error handling below.

Errors are one red `error: ...` line on stderr: exit 2 for bad input (a missing or modified bundle, a bad
image, an over-long prompt, engines built for another TensorRT or GPU, a missing TensorRT), exit 1 for a
failure while running. Tracebacks only with --verbose.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


# ---------------------------------------------------------------------------------------------------------
# shared error handling
# ---------------------------------------------------------------------------------------------------------


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def _fail(message: str, code: int) -> NoReturn:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


def _exit_code(err: BaseException) -> int:
    """2: the input is wrong (bundle, image, prompt, options, missing TensorRT); 1: running failed."""
    from engines.builder import BuildConfigError
    from engines.runtime import InputError
    from engines.session import BackendUnavailable
    from exporter.bundle import BundleError
    from ficoco.inputs import PromptError
    from ficoco.preprocess import ImageError

    bad_input = (BundleError, ImageError, PromptError, InputError, BuildConfigError, BackendUnavailable, click.BadParameter)
    if isinstance(err, bad_input):
        return 2
    if isinstance(err, ValueError) and not isinstance(err, UnicodeError):
        return 2
    return 1


def _guarded(verbose: bool, body: Callable[[], None]) -> None:
    try:
        body()
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except click.exceptions.Exit:
        raise
    except click.ClickException:
        raise
    except Exception as err:  # every failure becomes one clear line; --verbose shows the traceback
        if verbose:
            import traceback

            traceback.print_exc()
        message = str(err) or type(err).__name__
        _fail(message, _exit_code(err))


# ---------------------------------------------------------------------------------------------------------
# ficoco-build
# ---------------------------------------------------------------------------------------------------------

SHAPES_HELP = (
    "Polygraphy syntax name:[d0,d1,...], repeatable (or several space-separated in one quoted value); "
    "`name` applies to every graph with that input, `graph/name` to one graph (e.g. "
    "decoder_step/inputs_embeds:[4,1,4096]). Overrides the manifest's trt_profiles."
)


@click.command(context_settings=CONTEXT)
@click.version_option(package_name="ficoco-export")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--fp16", is_flag=True, help="Allow FP16 kernels (TensorRT 10 weak typing) for an fp32 export. An fp16 export is built strongly typed in its own types without this flag.")
@click.option("--bf16", is_flag=True, help="Allow BF16 kernels (TensorRT 10 weak typing) for an fp32 export.")
@click.option("--int8", is_flag=True, help="INT8 from the graphs' explicit Q/DQ nodes (quantize the bundle first). Implicit calibration is never used: TensorRT 11 removed it.")
@click.option("--fp8", is_flag=True, help="FP8 from the graphs' explicit Q/DQ nodes (Hopper/Ada and later).")
@click.option("--strongly-typed/--weakly-typed", "strongly_typed", default=None, help="Network typing [default: strongly typed unless --fp16/--bf16 is asked for on an fp32 export].")
@click.option("--workspace", "workspace_mib", type=int, help="Cap on the builder's workspace memory pool, in MiB [default: TensorRT's, the whole GPU memory]. Use e.g. 2048 on Jetson.")
@click.option("--timing-cache", type=click.Path(path_type=Path), help="Timing cache file, read before and updated after every build [default: $FICOCO_CACHE/tensorrt/timing-trt<version>-sm<cc>.cache].")
@click.option("--builder-optimization-level", type=click.IntRange(0, 5), help="TensorRT builder optimization level 0..5 [default: TensorRT's, 3]; lower builds faster, higher may run faster.")
@click.option("--trt-min-shapes", multiple=True, help="Minimum shapes of the optimization profile. " + SHAPES_HELP)
@click.option("--trt-opt-shapes", multiple=True, help="Shapes TensorRT tunes for. " + SHAPES_HELP)
@click.option("--trt-max-shapes", multiple=True, help="Maximum shapes of the optimization profile. " + SHAPES_HELP)
@click.option("--tf32/--no-tf32", default=True, show_default=True, help="Let fp32 layers use TF32 tensor cores (Ampere and later); --no-tf32 keeps fp32 results closest to ONNX Runtime.")
@click.option("--device", type=int, default=0, show_default=True, help="CUDA device index to build for.")
@click.option("--force", is_flag=True, help="Replace engines already built for this TensorRT version and GPU.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundle's files (large models).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and full tracebacks.")
def build_main(bundle: Path, **kw: Any) -> None:
    """Build TensorRT engines from a BUNDLE's ONNX graphs with the TensorRT 10 Python builder.

    One engine per graph (vision_encoder, embed_tokens, decoder_prefill, decoder_step), each with one
    optimization profile from the manifest's trt_profiles. Engines are written to
    BUNDLE/engines/trt-<version>-sm<cc>/ with engines.json recording the TensorRT version, GPU and SM;
    ficoco-run refuses engines built for another TensorRT version or GPU. Needs TensorRT and an NVIDIA
    GPU (x86_64/SBSA: pip install tensorrt; Jetson: JetPack's TensorRT).

    Example: ficoco-build out/llava7b-vl25 --fp16 --workspace 4096
    """
    verbose = bool(kw["verbose"])
    _setup_logging(verbose)
    _guarded(verbose, lambda: _build(bundle, kw))


def _build(bundle: Path, kw: dict[str, Any]) -> None:
    import time

    from engines.builder import BuildOptions, build_engines, parse_shape_args, plan_build
    from engines.trt_backend import import_tensorrt, local_target
    from exporter.bundle import load_manifest

    precisions = tuple(p for p in ("fp16", "bf16", "int8", "fp8") if kw[p])
    options = BuildOptions(
        precisions=precisions,
        strongly_typed=kw["strongly_typed"],
        workspace_mib=kw["workspace_mib"],
        timing_cache=kw["timing_cache"],
        builder_optimization_level=kw["builder_optimization_level"],
        min_shapes=parse_shape_args(kw["trt_min_shapes"], "--trt-min-shapes"),
        opt_shapes=parse_shape_args(kw["trt_opt_shapes"], "--trt-opt-shapes"),
        max_shapes=parse_shape_args(kw["trt_max_shapes"], "--trt-max-shapes"),
        tf32=bool(kw["tf32"]),
        force=bool(kw["force"]),
        device=int(kw["device"]),
        verify=False,  # hashes are checked below, once TensorRT is known to be there
    )
    plan = plan_build(bundle, options)  # every check that needs no TensorRT
    import_tensorrt()  # BackendUnavailable -> exit 2 with the install hint
    target = local_target(options.device)
    if not kw["no_verify"]:
        load_manifest(bundle, verify=True)
    click.echo(f"building {len(plan.onnx)} engines for {target.describe()} "
               f"({'strongly typed' if plan.strongly_typed else 'weakly typed ' + '+'.join(plan.flags or ('fp32',))})", err=True)
    t0 = time.perf_counter()

    def progress(graph: str, event: str) -> None:
        click.echo(f"[{time.perf_counter() - t0:7.1f}s] {graph}: {event}", err=True)

    out = build_engines(plan, progress=progress, target=target)
    click.secho(f"engines written to {out}", fg="green", err=True)


# ---------------------------------------------------------------------------------------------------------
# ficoco-run
# ---------------------------------------------------------------------------------------------------------


@click.command(context_settings=CONTEXT)
@click.version_option(package_name="ficoco-export")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--image", "images", multiple=True, required=True, help="Image file (PNG, JPEG, ... anything PIL reads). Repeat for a batch: the prompt is asked of every image.")
@click.option("--prompt", required=True, help="The question about the image (the bundle's chat template wraps it).")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True, help="auto: TensorRT when it, a GPU and engines built for them exist, else ONNX Runtime.")
@click.option("--ort-provider", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), default="auto", show_default=True, help="ONNX Runtime execution provider (auto: CUDA when onnxruntime-gpu has it, else CPU).")
@click.option("--max-new-tokens", type=int, help="Most tokens to generate [default: the bundle's limit, shape_ranges.max_new_tokens].")
@click.option("--greedy", is_flag=True, help="Greedy decoding (the default when no --temperature/--top-p is given).")
@click.option("--temperature", type=float, help="Sample with this temperature (> 0) instead of greedy decoding.")
@click.option("--top-p", type=float, help="Sample from the smallest token set with this much probability mass, in (0, 1].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampler: the same seed gives the same answer.")
@click.option("--stop-token-id", "stop_ids", type=int, multiple=True, help="Token id that ends the answer (repeatable) [default: the bundle's EOS id].")
@click.option("--ignore-eos", is_flag=True, help="Generate exactly --max-new-tokens tokens (no stop token; for benchmarks).")
@click.option("--device", type=int, default=0, show_default=True, help="CUDA device index (TensorRT / ONNX Runtime CUDA).")
@click.option("--threads", type=click.IntRange(min=1), help="ONNX Runtime CPU threads [default: all cores].")
@click.option("--timings", is_flag=True, help="Print per-stage times (ms), TTFT and decode tokens/s to stderr as JSON.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundle's files (large models).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and full tracebacks.")
def run_main(bundle: Path, **kw: Any) -> None:
    """Answer a question about an image with a BUNDLE; the answer is streamed to stdout.

    Example: ficoco-run out/llava7b-vl25 --image cat.jpg --prompt "What is in the picture?"
    """
    verbose = bool(kw["verbose"])
    _setup_logging(verbose)
    _guarded(verbose, lambda: _run(bundle, kw))


def _sampling(kw: dict[str, Any]) -> Any:
    from ficoco.sampling import SamplingConfig

    sample = kw["temperature"] is not None or kw["top_p"] is not None
    if kw["greedy"] and sample:
        raise click.BadParameter("--greedy cannot be combined with --temperature/--top-p")
    if not sample:
        return SamplingConfig()
    return SamplingConfig(
        do_sample=True,
        temperature=1.0 if kw["temperature"] is None else float(kw["temperature"]),
        top_p=1.0 if kw["top_p"] is None else float(kw["top_p"]),
        seed=int(kw["seed"]),
    )


def _run(bundle: Path, kw: dict[str, Any]) -> None:
    from engines.runtime import Frontend, Pipeline, describe
    from ficoco.preprocess import load_image

    try:
        sampling = _sampling(kw)
    except click.BadParameter as err:
        _fail(err.message, 2)
    images = [load_image(p) for p in kw["images"]]  # a bad file fails before the bundle is loaded
    # the request is checked against the bundle's limits before any engine or session is loaded
    front = Frontend.from_bundle(bundle, verify=not kw["no_verify"])
    ids, _ = front.tokenize([kw["prompt"]])
    limit = front.max_new_tokens_limit if kw["max_new_tokens"] is None else int(kw["max_new_tokens"])
    front.check_request(int(ids.shape[1]), limit)
    if kw["stop_ids"]:
        front.check_stop_ids(kw["stop_ids"])
    pipe = Pipeline.from_bundle(
        front, backend=kw["backend"], verify=not kw["no_verify"], device=int(kw["device"]),
        ort_provider=kw["ort_provider"], threads=kw["threads"],
    )
    logging.getLogger(__name__).info("pipeline: %s", describe(pipe))
    stops: list[int] | None = [] if kw["ignore_eos"] else (list(kw["stop_ids"]) or None)
    timings: dict[str, Any] | None = {} if kw["timings"] else None
    out = sys.stdout
    single = len(images) == 1

    def stream(row: int, text: str) -> None:
        if single:
            out.write(text)
            out.flush()

    answers = pipe.generate_batch(
        images, kw["prompt"], max_new_tokens=kw["max_new_tokens"], sampling=sampling,
        stop_token_ids=stops, on_text=stream, timings=timings,
    )
    if single:
        out.write("\n")
    else:
        for path, ans in zip(kw["images"], answers, strict=True):
            out.write(f"{path}: {ans.text}\n")
    out.flush()
    if timings is not None:
        timings.pop("step_ms", None)
        click.echo(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in timings.items()}), err=True)


if __name__ == "__main__":  # `python -m engines.cli build|run ...` (tests on machines without the console scripts)
    commands = {"build": build_main, "run": run_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        _fail("usage: python -m engines.cli build|run BUNDLE [OPTIONS]", 2)
    name = sys.argv.pop(1)
    commands[name](prog_name=f"ficoco-{name}")
