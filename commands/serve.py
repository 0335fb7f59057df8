"""`ficoco-serve`: an OpenAI-compatible chat-completions HTTP server over one bundle (docs/serving.md)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from commands.common import CONTEXT, VERBOSE_HELP, run_command

MiB = 1 << 20


@click.command(context_settings=CONTEXT)
@click.version_option(package_name="ficoco-export")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on. The default is this machine only; 0.0.0.0 opens it to the network (the server has no authentication, and reads local image files a request names).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port (0: any free port; the one taken is printed).")
@click.option("--model-name", help="Model id served by /v1/models and expected in requests' `model` [default: the manifest's source model name, else the bundle directory's name].")
@click.option("--max-body-bytes", type=click.IntRange(min=1024), default=20 * MiB, show_default=True, help="Largest request body accepted, in bytes (the default is 20 MiB; larger: 413). Images travel inside it as base64 data URLs.")
@click.option("--max-queue", type=click.IntRange(min=1), default=16, show_default=True, help="Requests that may wait behind the one being generated (more: 503). One worker runs them in arrival order.")
@click.option("--chat-cache", type=click.IntRange(min=0), default=4, show_default=True, help="Conversations kept with their KV cache, so a follow-up that sends the history back feeds only its new turn (0: every request prefills its whole history).")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True, help="auto: TensorRT when it, a GPU and engines built for them exist, else ONNX Runtime.")
@click.option("--ort-provider", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), default="auto", show_default=True, help="ONNX Runtime execution provider (auto: CUDA when onnxruntime-gpu has it, else CPU).")
@click.option("--device", type=int, default=0, show_default=True, help="CUDA device index (TensorRT / ONNX Runtime CUDA).")
@click.option("--threads", type=click.IntRange(min=1), help="ONNX Runtime CPU threads [default: all cores].")
@click.option("--low-memory", is_flag=True, help="ONNX Runtime: open each graph only while it runs (only one graph's weights in memory at a time); much slower per request.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundle's files at start-up (large models).")
@click.option("-v", "--verbose", is_flag=True, help=VERBOSE_HELP + " Also logs every request.")
def main(bundle: Path, **kw: Any) -> None:
    """Serve a BUNDLE over HTTP with OpenAI's chat-completions API (POST /v1/chat/completions, GET /v1/models,
    GET /health); one request is generated at a time, the others wait in a bounded queue.

    Example: ficoco-serve out/llava7b-vl25 --port 8000
    """
    run_command(bool(kw["verbose"]), lambda: _serve(bundle, kw))


def _serve(bundle: Path, kw: dict[str, Any]) -> None:
    from engines.runtime import Pipeline, describe
    from serving.server import ChatServer, ServeOptions

    options = ServeOptions(host=kw["host"], port=int(kw["port"]), max_body_bytes=int(kw["max_body_bytes"]),
                           max_queue=int(kw["max_queue"]), model_id=kw["model_name"] or None,
                           chat_cache=int(kw["chat_cache"]))
    pipe = Pipeline.from_bundle(
        bundle, backend=kw["backend"], verify=not kw["no_verify"], device=int(kw["device"]),
        ort_provider=kw["ort_provider"], threads=kw["threads"], low_memory=bool(kw["low_memory"]),
    )
    log = logging.getLogger(__name__)
    log.info("pipeline: %s", describe(pipe))
    server = ChatServer(pipe, options)  # binds now: a port in use fails here, before anything is served
    click.echo(f"ficoco-serve: {server.model_id} ({pipe.backend}) on {server.url}/v1 — Ctrl-C or SIGTERM to stop",
               err=True)
    server.serve_until_signal()
    click.echo("ficoco-serve: stopped", err=True)


if __name__ == "__main__":
    main()
