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
@click.option("--prompt", help="The question about the image (the bundle's chat template wraps it). Required unless --chat.")
@click.option("--chat", is_flag=True, help="Hold a conversation about one --image: each line read from stdin is a follow-up question (the first is --prompt, if given); follow-ups reuse the cache of earlier turns. An empty line or end of input ends it.")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True, help="auto: TensorRT when it, a GPU and engines built for them exist, else ONNX Runtime.")
@click.option("--ort-provider", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), default="auto", show_default=True, help="ONNX Runtime execution provider (auto: CUDA when onnxruntime-gpu has it, else CPU).")
@click.option("--max-new-tokens", type=int, help="Most tokens to generate [default: the bundle's limit, shape_ranges.max_new_tokens].")
@click.option("--greedy", is_flag=True, help="Greedy decoding, whatever the bundle's generation_config.json says [default: that file's choice; greedy when it sets none].")
@click.option("--temperature", type=float, help="Sample with this temperature (> 0) instead of greedy decoding.")
@click.option("--top-k", type=click.IntRange(min=0), help="Sample from the k most likely tokens only (0: all) [default: the bundle's generation_config.json, else 0; 50 when that file samples without naming it].")
@click.option("--top-p", type=float, help="Sample from the smallest token set with this much probability mass, in (0, 1].")
@click.option("--repetition-penalty", type=float, help="Divide (> 0 logits) or multiply (< 0) the logits of tokens already in the prompt or answer by this; 1.0 is off [default: the bundle's, else 1.0].")
@click.option("--min-new-tokens", type=click.IntRange(min=0), help="Hold the stop tokens back until this many tokens are generated [default: the bundle's, else 0].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampler: the same seed gives the same answer.")
@click.option("--stop-token-id", "stop_ids", type=int, multiple=True, help="Token id that ends the answer (repeatable) [default: the bundle's EOS id].")
@click.option("--stop", "stop_strings", multiple=True, help="Text that ends the answer where it first appears; not printed (repeatable).")
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


def _sampling(kw: dict[str, Any], defaults: Any) -> Any:
    """The request's SamplingConfig: the bundle's defaults (generation_config.json) with the flags given."""
    sample = any(kw[k] is not None for k in ("temperature", "top_p", "top_k"))
    if kw["greedy"] and sample:
        raise click.BadParameter("--greedy cannot be combined with --temperature/--top-p/--top-k")
    do_sample = False if kw["greedy"] else (True if sample else None)
    try:
        return defaults.merged(
            do_sample=do_sample, temperature=kw["temperature"], top_p=kw["top_p"], top_k=kw["top_k"],
            repetition_penalty=kw["repetition_penalty"], min_new_tokens=kw["min_new_tokens"], seed=int(kw["seed"]),
        )
    except ValueError as err:
        raise click.BadParameter(str(err)) from err


def _run(bundle: Path, kw: dict[str, Any]) -> None:
    from bundle.frontend import Frontend
    from engines.runtime import Pipeline, describe
    from ficoco.preprocess import load_image

    if kw["chat"] and len(kw["images"]) != 1:
        raise click.BadParameter("--chat holds a conversation about one image: give exactly one --image")
    if not kw["chat"] and not kw["prompt"]:
        raise click.BadParameter("give the question with --prompt (or --chat to read questions from stdin)")
    images = [load_image(p) for p in kw["images"]]  # a bad file fails before the bundle is loaded
    # the request is tokenized and checked against the bundle once, before any engine or session is loaded
    front = Frontend.from_bundle(bundle, verify=not kw["no_verify"])
    sampling = _sampling(kw, front.default_sampling)
    stops: list[int] | None = [] if kw["ignore_eos"] else (list(kw["stop_ids"]) or None)
    if kw["chat"]:
        _chat(front, images[0], kw, sampling, stops)
        return
    text = front.prepare_text([kw["prompt"]] * len(images), kw["max_new_tokens"], stops, list(kw["stop_strings"]) or None)
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


def _chat(front: Any, image: Any, kw: dict[str, Any], sampling: Any, stops: list[int] | None) -> None:
    """The --chat loop: one question per stdin line, answers streamed to stdout."""
    from engines.runtime import Pipeline

    pipe = Pipeline.from_bundle(
        front, backend=kw["backend"], verify=not kw["no_verify"], device=int(kw["device"]),
        ort_provider=kw["ort_provider"], threads=kw["threads"], low_memory=bool(kw["low_memory"]),
    )
    chat = pipe.chat(image)
    interactive = sys.stdin.isatty()
    pending = kw["prompt"]
    while True:
        question = pending
        pending = None
        if question is None:
            if interactive:
                click.echo("> ", nl=False, err=True)
            line = sys.stdin.readline()
            question = line.strip()
            if not question:
                return
        chat.ask(question, max_new_tokens=kw["max_new_tokens"], sampling=sampling, stop_token_ids=stops,
                 stop_strings=list(kw["stop_strings"]) or None,
                 on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
        sys.stdout.write("\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
