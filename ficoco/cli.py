"""`ficoco-plan`: print (and save) the per-block reduction schedule and its theoretical TFLOPs.

Needs no weights: the model's config comes from `ficoco.models.load_config` (aliases resolve to the
configs shipped in ficoco/configs/). Errors the user can fix exit with status 2 and one red line.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import click

_FORMATS = ("table", "json")


def _fail(message: str) -> NoReturn:
    """One red line on stderr, exit status 2."""
    from rich.console import Console
    from rich.text import Text

    line = " ".join(str(message).split())  # keep it on one line
    Console(stderr=True, soft_wrap=True).print(Text.assemble(("error: ", "bold red"), (line, "red")))
    raise SystemExit(2)


def write_json_atomic(path: Path, text: str) -> None:
    """Write `text` and a newline to `path` atomically (`ficoco.atomic`)."""
    from ficoco.atomic import write_atomic

    write_atomic(path, text + "\n")


@click.command(
    name="ficoco-plan",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@click.version_option(package_name="ficoco-export")
@click.option(
    "--model",
    default="llava-1.5-7b",
    show_default=True,
    help="Model whose config sets the geometry: an alias (llava-1.5-7b, llava-1.5-13b), a local model "
    "directory with config.json, or the built-in `tiny` / `smol` models. No weights are loaded.",
)
@click.option(
    "--variant",
    required=True,
    type=click.Choice(["none", "V", "L", "VL"], case_sensitive=False),
    help="Where to reduce: V = vision encoder, L = language decoder, VL = both (ficoco only), none = no "
    "reduction.",
)
@click.option(
    "--method",
    default="ficoco",
    show_default=True,
    type=click.Choice(["ficoco", "tome", "evit", "random", "pool", "fastv"], case_sensitive=False),
    help="Reduction method. tome, evit and the baselines random (seeded pruning) and pool (spatial average "
    "pooling) reduce the vision stage only (variant V); fastv the decoder only (variant L).",
)
@click.option(
    "--ratio",
    type=float,
    default=None,
    help="Budget: fraction in (0, 1] of the model's visual tokens (576 for LLaVA-1.5) that are KEPT at the "
    "end of reduction; 0.25 keeps 144. Give exactly one of --ratio / --keep-tokens / --target-tflops.",
)
@click.option(
    "--keep-tokens",
    type=int,
    default=None,
    help="Budget: number of visual tokens kept at the end of reduction, 1..576.",
)
@click.option(
    "--target-tflops",
    type=float,
    default=None,
    help="Budget: keep the most visual tokens whose decoder prefill cost (TFLOPs at --text-tokens text "
    "tokens, LLM-Viewer counting as in the paper, vision encoder excluded) is at most this.",
)
@click.option(
    "--preset",
    default="paper",
    show_default=True,
    type=click.Choice(["paper", "official"], case_sensitive=False),
    help="FiCoCo hyperparameter preset: paper equations (L starts at block 4) or the official code's "
    "design choices (L starts at block 5).",
)
@click.option(
    "--positions",
    default="compact",
    show_default=True,
    type=click.Choice(["compact", "original"], case_sensitive=False),
    help="Decoder RoPE positions after a reduction: compact renumbering or the original positions.",
)
@click.option("--v-start", type=int, default=None, help="First 0-based vision block with a step [default: 12].")
@click.option(
    "--v-end",
    type=int,
    default=None,
    help="Last 0-based vision block with a step [default: the block feeding the projector, 22 for LLaVA-1.5].",
)
@click.option(
    "--l-start",
    type=int,
    default=None,
    help="First 0-based decoder block with a step [default: 4 (paper) / 5 (official) for decoders of 32+ "
    "blocks, round(start * blocks / 32) for shallower ones (shapes: 1); fastv: its single step block, 1].",
)
@click.option(
    "--l-end",
    type=int,
    default=None,
    help="Last 0-based decoder block with a step [default: the second-to-last block, 30 for 32 layers].",
)
@click.option(
    "--vl-split",
    type=int,
    default=None,
    help="VL only: visual tokens left after the vision stage [default: round(sqrt(576 x final tokens))].",
)
@click.option(
    "--text-tokens",
    type=click.IntRange(min=0),
    default=60,
    show_default=True,
    help="Text tokens M (prompt + question) assumed by the TFLOPs figures; the paper uses 60.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(_FORMATS, case_sensitive=False),
    default="table",
    show_default=True,
    help="Output on stdout: a per-block table with TFLOPs, or the schedule as JSON (the manifest form).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="Also write the schedule JSON to FILE (atomically: temporary file + rename).",
)
def plan_main(
    model: str,
    variant: str,
    method: str,
    ratio: float | None,
    keep_tokens: int | None,
    target_tflops: float | None,
    preset: str,
    positions: str,
    v_start: int | None,
    v_end: int | None,
    l_start: int | None,
    l_end: int | None,
    vl_split: int | None,
    text_tokens: int,
    fmt: str,
    output: Path | None,
) -> None:
    """Plan a fixed-budget visual-token reduction for a LLaVA model and print its per-block schedule.

    Each step removes tokens after its block's attention; vision spans count [CLS]. TFLOPs are theoretical
    (2 FLOPs per multiply-accumulate): "prefill" is the decoder figure the FiCoCo paper reports
    (8.45 T for unreduced LLaVA-1.5-7B at 60 text tokens), "vision" the CLIP tower + projector.

    Example: ficoco-plan --model llava-1.5-7b --variant VL --ratio 0.25
    """
    from ficoco.geometry import GeometryError, LlavaGeometry
    from ficoco.planner import PlanError, format_table, plan

    try:
        from ficoco.models import ModelNotFoundError, load_config
    except ImportError as e:  # pragma: no cover - only while ficoco.models is missing
        _fail(f"cannot load model configs: {e}")

    try:
        geometry = LlavaGeometry.from_config(load_config(model))
        schedule = plan(
            geometry,
            variant,
            method,
            ratio=ratio,
            keep_tokens=keep_tokens,
            target_tflops=target_tflops,
            preset=preset,
            positions=positions,
            v_start=v_start,
            v_end=v_end,
            l_start=l_start,
            l_end=l_end,
            vl_split=vl_split,
            text_tokens=text_tokens,
        )
    except (PlanError, ModelNotFoundError, GeometryError) as e:
        _fail(str(e))

    text = schedule.to_json(indent=2)
    if output is not None:
        try:
            write_json_atomic(output, text)
        except OSError as e:
            _fail(f"cannot write {output}: {e}")

    if fmt.lower() == "json":
        click.echo(text)
    else:
        from rich.console import Console

        console = Console()
        console.print(format_table(schedule, geometry))
        if output is not None:
            Console(stderr=True).print(f"wrote {output}", markup=False, highlight=False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(plan_main())
