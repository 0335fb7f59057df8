"""`ficoco-run`: answer a question about an image with a bundle; the answer streams to stdout."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from commands.common import CONTEXT, VERBOSE_HELP, run_command


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
@click.option("--low-memory", is_flag=True, help="ONNX Runtime: open each graph only while it runs, so only one graph's weights are in memory at a time (its CPU provider upcasts fp16 weights to fp32 at load: a 7B fp16 bundle open at once needs ~27 GB); much slower.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundle's files (large models).")
@click.option("-v", "--verbose", is_flag=True, help=VERBOSE_HELP)
def main(bundle: Path, **kw: Any) -> None:
    """Answer a question about an image with a BUNDLE; the answer is streamed to stdout.

    Example: ficoco-run out/llava7b-vl25 --image cat.jpg --prompt "What is in the picture?"
    """
    run_command(bool(kw["verbose"]), lambda: _run(bundle, kw))


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
    from bundle.frontend import Frontend
    from engines.runtime import Pipeline, describe
    from ficoco.preprocess import load_image

    sampling = _sampling(kw)
    images = [load_image(p) for p in kw["images"]]  # a bad file fails before the bundle is loaded
    # the request is tokenized and checked against the bundle once, before any engine or session is loaded
    front = Frontend.from_bundle(bundle, verify=not kw["no_verify"])
    stops: list[int] | None = [] if kw["ignore_eos"] else (list(kw["stop_ids"]) or None)
    text = front.prepare_text([kw["prompt"]] * len(images), kw["max_new_tokens"], stops)
    pipe = Pipeline.from_bundle(
        front, backend=kw["backend"], verify=not kw["no_verify"], device=int(kw["device"]),
        ort_provider=kw["ort_provider"], threads=kw["threads"], low_memory=bool(kw["low_memory"]),
    )
    logging.getLogger(__name__).info("pipeline: %s", describe(pipe))
    timings: dict[str, Any] | None = {} if kw["timings"] else None
    out = sys.stdout
    single = len(images) == 1

    def stream(row: int, piece: str) -> None:
        if single:
            out.write(piece)
            out.flush()

    answers = pipe.generate_batch(images, text, sampling=sampling, on_text=stream, timings=timings)
    if single:
        out.write("\n")
    else:
        for path, ans in zip(kw["images"], answers, strict=True):
            out.write(f"{path}: {ans.text}\n")
    out.flush()
    if timings is not None:
        timings.pop("step_ms", None)
        click.echo(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in timings.items()}), err=True)


if __name__ == "__main__":
    main()
