"""`ficoco-build`: TensorRT engines from a bundle's ONNX graphs (TensorRT 10 Python builder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from commands.common import CONTEXT, VERBOSE_HELP, run_command

SHAPES_HELP = (
    "Polygraphy syntax KEY:[d0,d1,...], repeatable (or several space-separated in one quoted value). KEY, the "
    "most specific match wins: graph:profile/name (one profile of one graph, e.g. "
    "decoder_segment_0:decode/past_key_values.0.key:[2,4,600,16]), graph/name (every profile of that graph), "
    "*:profile/name (that profile of every graph, e.g. *:decode/hidden_states:[4,1,4096]) or name (every "
    "profile of every graph with that input). Profiles: 'all' for vision_encoder, embed_tokens, decoder_splice "
    "and decoder_reduce_*; 'prefill' (empty past) and 'decode' (one token) for decoder_segment_*. Overrides the "
    "manifest's trt_profiles; an unknown graph, profile or input is an error."
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
@click.option("--trt-min-shapes", multiple=True, help="Minimum shapes of the optimization profiles. " + SHAPES_HELP)
@click.option("--trt-opt-shapes", multiple=True, help="Shapes TensorRT tunes for. " + SHAPES_HELP)
@click.option("--trt-max-shapes", multiple=True, help="Maximum shapes of the optimization profiles. " + SHAPES_HELP)
@click.option("--tf32/--no-tf32", default=True, show_default=True, help="Let fp32 layers use TF32 tensor cores (Ampere and later); --no-tf32 keeps fp32 results closest to ONNX Runtime.")
@click.option("--device", type=int, default=0, show_default=True, help="CUDA device index to build for.")
@click.option("--force", is_flag=True, help="Replace engines already built for this TensorRT version and GPU.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundle's files (large models).")
@click.option("-v", "--verbose", is_flag=True, help=VERBOSE_HELP)
def main(bundle: Path, **kw: Any) -> None:
    """Build TensorRT engines from a BUNDLE's ONNX graphs with the TensorRT 10 Python builder.

    One engine per graph: vision_encoder, embed_tokens, decoder_splice, each decoder_segment_<s> and each
    decoder_reduce_<s>. A decoder_segment engine holds its decoder weights once and two optimization
    profiles, 'prefill' (the prompt, an empty past) and 'decode' (one token on the KV cache); every other
    engine one profile, 'all'; all from the manifest's trt_profiles. Engines are written to
    BUNDLE/engines/trt-<version>-sm<cc>/ with engines.json recording the TensorRT version, GPU, SM and each
    engine's profiles; ficoco-run refuses engines built for another TensorRT version or GPU. Needs TensorRT
    and an NVIDIA GPU (x86_64/SBSA: pip install tensorrt; Jetson: JetPack's TensorRT).

    Example: ficoco-build out/llava7b-vl25 --fp16 --workspace 4096
    """
    run_command(bool(kw["verbose"]), lambda: _build(bundle, kw))


def _build(bundle: Path, kw: dict[str, Any]) -> None:
    import time

    from bundle.manifest import load_manifest
    from engines.builder import BuildOptions, build_engines, parse_shape_args, plan_build
    from engines.trt_backend import import_tensorrt, local_target

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
    n_profiles = sum(len(v) for v in plan.profiles.values())
    click.echo(f"building {len(plan.onnx)} engines ({n_profiles} optimization profiles) for {target.describe()} "
               f"({'strongly typed' if plan.strongly_typed else 'weakly typed ' + '+'.join(plan.flags or ('fp32',))})", err=True)
    t0 = time.perf_counter()

    def progress(graph: str, event: str) -> None:
        click.echo(f"[{time.perf_counter() - t0:7.1f}s] {graph}: {event}", err=True)

    out = build_engines(plan, progress=progress, target=target)
    click.secho(f"engines written to {out}", fg="green", err=True)


if __name__ == "__main__":
    main()
