"""Console entry points of the engines package. Each command lands with its issue; until then it says so.

Nothing here pretends to work: a command that is not built yet exits 2 with a message naming what is
missing, after a real `--help` that documents what it will do.
"""

from __future__ import annotations

import sys

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _not_yet(command: str, what: str) -> None:
    click.echo(
        f"error: {command} is not available in this version of ficoco-export: {what}. "
        "Bundles from ficoco-export are already validated in ONNX Runtime at export time.",
        err=True,
    )
    sys.exit(2)


@click.command(context_settings=CONTEXT)
@click.argument("bundle", required=False)
def build_main(bundle: str | None) -> None:
    """Build TensorRT engines from a BUNDLE's ONNX graphs (one profile per phase, --fp16/--int8,
    timing cache, workspace caps). Not built yet."""
    _not_yet("ficoco-build", "the TensorRT engine builder is not implemented yet")


@click.command(context_settings=CONTEXT)
@click.argument("bundle", required=False)
def run_main(bundle: str | None) -> None:
    """Answer a prompt about an image with a BUNDLE (ONNX Runtime or TensorRT backend). Not built yet."""
    _not_yet("ficoco-run", "the bundled runtime is not implemented yet")


@click.command(context_settings=CONTEXT)
@click.argument("bundle", required=False)
def check_main(bundle: str | None) -> None:
    """Compare a BUNDLE's backend with PyTorch at three levels (stages, greedy tokens, reduction cost). Not built yet."""
    _not_yet("ficoco-check", "the accuracy check is not implemented yet")


@click.command(context_settings=CONTEXT)
@click.argument("bundle", required=False)
def bench_main(bundle: str | None) -> None:
    """Measure per-stage latency, TTFT, tokens/s and memory of a BUNDLE for a ratio sweep. Not built yet."""
    _not_yet("ficoco-bench", "the benchmark is not implemented yet")
