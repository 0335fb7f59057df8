"""`ficoco-plan`: print (and save) the per-block reduction schedule and its theoretical TFLOPs.

Needs no weights: the model's config comes from `ficoco.models.load_config` (aliases resolve to the
configs shipped in ficoco/configs/).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from commands.common import CONTEXT, run_command
from commands.options import planning_options, schedule_request

if TYPE_CHECKING:
    from rich.table import Table

    from ficoco.geometry import LlavaGeometry
    from ficoco.schedule import Schedule


@click.command(name="ficoco-plan", context_settings=CONTEXT)
@click.version_option(package_name="ficoco-export")
@click.option("--model", default="llava-1.5-7b", show_default=True,
              help="Model whose config sets the geometry: an alias (llava-1.5-7b, llava-1.5-13b), a local model "
              "directory with config.json, or a built-in (shapes, tiny, smol, bench). No weights are loaded.")
@planning_options()
@click.option("--format", "fmt", type=click.Choice(("table", "json"), case_sensitive=False), default="table",
              show_default=True, help="Output on stdout: a per-block table with TFLOPs, or the schedule as JSON "
              "(the manifest form, what `ficoco-export --schedule` reads).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the schedule JSON to FILE (atomically: temporary file + rename).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and full tracebacks.")
def main(**kw: Any) -> None:
    """Plan a fixed-budget visual-token reduction for a LLaVA model and print its per-block schedule.

    Each step removes tokens after its block's attention; vision spans count [CLS]. TFLOPs are theoretical
    (2 FLOPs per multiply-accumulate): "prefill" is the decoder figure the FiCoCo paper reports
    (8.45 T for unreduced LLaVA-1.5-7B at 60 text tokens), "vision" the CLIP tower + projector.

    Example: ficoco-plan --model llava-1.5-7b --variant VL --ratio 0.25
    """
    run_command(bool(kw["verbose"]), lambda: _plan(kw))


def _plan(kw: dict[str, Any]) -> None:
    from rich.console import Console

    from ficoco.atomic import write_atomic
    from ficoco.geometry import LlavaGeometry
    from ficoco.models import load_config

    geometry = LlavaGeometry.from_config(load_config(kw["model"]))
    schedule = schedule_request(kw).make(geometry)
    text = schedule.to_json(indent=2)
    output: Path | None = kw["output"]
    if output is not None:
        try:
            write_atomic(output, text + "\n")
        except OSError as e:
            raise ValueError(f"cannot write {output}: {e}") from e
    if kw["fmt"].lower() == "json":
        click.echo(text)
        return
    Console().print(format_table(schedule, geometry))
    if output is not None:
        Console(stderr=True).print(f"wrote {output}", markup=False, highlight=False)


def format_table(schedule: Schedule, geometry: LlavaGeometry) -> Table:
    """A rich Table of the per-block steps (tokens in, removed, targets K, tokens out) with the TFLOPs."""
    from rich.table import Table

    s = schedule
    title = (
        f"{s.variant} / {s.method}, preset {s.preset}, positions {s.positions}\n"
        f"visual tokens {s.visual_tokens_in} -> {s.visual_tokens_to_decoder} -> {s.visual_tokens_final}"
    )
    table = Table(title=title, title_justify="left")
    for col, justify in (("tower", "left"), ("block", "right"), ("method", "left"), ("tokens in", "right"),
                         ("removed", "right"), ("K", "right"), ("tokens out", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for tower in (s.vision, s.decoder):
        if not tower.steps:
            table.add_row(tower.tower, "-", "none", str(tower.span_in), "0", "-", str(tower.span_out), end_section=True)
            continue
        for i, step in enumerate(tower.steps):
            table.add_row(tower.tower if i == 0 else "", str(step.layer), tower.method if i == 0 else "", str(step.n),
                          str(step.r), str(step.targets_per_source), str(step.n_out), end_section=i == len(tower.steps) - 1)
    f = s.flops
    if f:
        table.caption = "\n".join((
            f"prefill {f['prefill']:.4g} TFLOPs (decoder, M = {s.text_tokens} text tokens)",
            f"vision  {f['vision']:.4g} TFLOPs (CLIP blocks 0..{geometry.vision.select_block} + projector)",
            f"total   {f['total']:.4g} TFLOPs; decode {f['decode_per_token'] * 1e3:.4g} GFLOPs/token",
            "vision spans count [CLS]; a step runs after its block's attention",
        ))
        table.caption_justify = "left"
    return table


if __name__ == "__main__":
    main()
