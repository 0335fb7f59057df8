"""Option groups that several commands share, declared once (Polygraphy-style reusable groups).

`planning_options` is what `ficoco-plan` and `ficoco-export` take to plan a schedule (variant, method,
budget, preset, RoPE positions, layer range, text tokens; `ficoco-export` also a `--schedule FILE` that
`ficoco-plan -o FILE` wrote); `layer_options` alone is what `ficoco-bench` takes to re-plan its sweep;
`schedule_request` turns the parsed options into the one `ficoco.planner.ScheduleRequest`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ficoco.params import METHODS, POSITIONS, VARIANTS

F = TypeVar("F", bound=Callable[..., Any])

LAYER_KEYS = ("v_start", "v_end", "l_start", "l_end", "vl_split")
BUDGET_KEYS = ("ratio", "keep_tokens", "target_tflops")


def _stack(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    def apply(f: F) -> F:
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


def layer_options(default: str | None = None) -> Callable[[F], F]:
    """--v-start/--v-end/--l-start/--l-end; `default` replaces the planner's defaults in the help."""

    def says(planner: str) -> str:
        return f"[default: {default or planner}]"

    return _stack(
        click.option("--v-start", type=int, help="First 0-based CLIP block with a reduction step " + says("12") + "."),
        click.option("--v-end", type=int, help="Last 0-based CLIP block with a reduction step "
                     + says("the block feeding the projector, 22 for LLaVA-1.5") + "."),
        click.option("--l-start", type=int, help="First 0-based decoder block with a reduction step "
                     + says("4 (paper) / 5 (official) for decoders of 32+ blocks, the same relative depth for "
                            "shallower ones (shapes: 1); fastv: its single step block, 1") + "."),
        click.option("--l-end", type=int, help="Last 0-based decoder block with a reduction step "
                     + says("the second-to-last block, 30 for 32 layers") + "."),
    )


def planning_options(schedule_file: bool = False, variant_default: str | None = None) -> Callable[[F], F]:
    """The planning options; `schedule_file` adds `--schedule FILE`; `variant_default` None: required."""
    variant = click.option(
        "--variant", type=click.Choice(VARIANTS, case_sensitive=False), required=variant_default is None,
        default=variant_default, show_default=variant_default is not None,
        help="Where to reduce: V = vision encoder, L = language decoder, VL = both (ficoco only), none = no reduction.")
    group = [
        variant,
        click.option("--method", type=click.Choice(METHODS, case_sensitive=False), default="ficoco", show_default=True,
                     help="Reduction method. tome, evit and the baselines random (seeded pruning) and pool (spatial "
                     "average pooling) reduce the vision tower only (variant V); fastv the decoder only (variant L)."),
        click.option("--ratio", type=float, help="Budget: fraction in (0, 1] of the model's visual tokens (576 for "
                     "LLaVA-1.5) KEPT at the end of reduction; 0.25 keeps 144. Give one of --ratio / --keep-tokens / "
                     "--target-tflops."),
        click.option("--keep-tokens", type=int, help="Budget: visual tokens kept at the end of reduction, 1..576."),
        click.option("--target-tflops", type=float, help="Budget: the most visual tokens whose decoder prefill costs "
                     "at most this many TFLOPs (at --text-tokens text tokens; LLM-Viewer counting as in the paper, "
                     "vision encoder excluded)."),
        click.option("--preset", type=click.Choice(["paper", "official"], case_sensitive=False), default="paper",
                     show_default=True, help="FiCoCo hyperparameters: the paper's equations (L starts at block 4) or "
                     "the official code's design choices (L starts at block 5)."),
        click.option("--positions", type=click.Choice(POSITIONS, case_sensitive=False), default="compact",
                     show_default=True, help="Decoder RoPE positions after a decoder reduction: renumbered per layer "
                     "(compact) or the original positions kept."),
        layer_options(),
        click.option("--vl-split", type=int, help="VL only: visual tokens left after the vision tower "
                     "[default: round(sqrt(576 x final tokens))]."),
        click.option("--text-tokens", type=click.IntRange(min=0), default=60, show_default=True,
                     help="Text tokens M (prompt + question) at which the TFLOPs figures (and a --target-tflops "
                     "budget) are computed; the paper uses 60."),
    ]
    if schedule_file:
        group.append(click.option(
            "--schedule", "schedule_file", type=click.Path(path_type=Path),
            help="Use a schedule written by `ficoco-plan -o FILE` instead of planning (then no budget or layer "
            "option may be given)."))
    return _stack(*group)


def read_schedule_file(path: Path) -> dict[str, Any]:
    """The JSON object of a `ficoco-plan -o` file; ValueError (exit 2) naming the file otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--schedule {path}: cannot read it as JSON ({err}); write it with `ficoco-plan -o {path}`") from err
    if not isinstance(data, dict):
        raise ValueError(f"--schedule {path}: holds a JSON {type(data).__name__}, not a schedule; write it with ficoco-plan -o")
    return data


def canonical_variant(text: str) -> str:
    return {"none": "none", "v": "V", "l": "L", "vl": "VL"}[str(text).lower()]


def schedule_request(kw: dict[str, Any]) -> Any:
    """The `ScheduleRequest` the planning options describe (a `--schedule FILE` replaces all planning)."""
    from ficoco.planner import ScheduleRequest

    path = kw.get("schedule_file")
    if path is not None:
        given = [f"--{k.replace('_', '-')}" for k in (*BUDGET_KEYS, *LAYER_KEYS) if kw.get(k) is not None]
        if given:
            raise ValueError(f"--schedule is a complete plan; drop {', '.join(given)}")
        data = read_schedule_file(Path(path))
        return ScheduleRequest(
            variant=str(data.get("variant", canonical_variant(kw["variant"]))), method=str(data.get("method", kw["method"])),
            preset=str(data.get("preset", kw["preset"])), positions=str(data.get("positions", kw["positions"])),
            text_tokens=int(kw["text_tokens"]), schedule=data)
    return ScheduleRequest(
        variant=canonical_variant(kw["variant"]), method=str(kw["method"]).lower(),
        ratio=kw["ratio"], keep_tokens=kw["keep_tokens"], target_tflops=kw["target_tflops"],
        preset=str(kw["preset"]).lower(), positions=str(kw["positions"]).lower(),
        layers={k: kw[k] for k in LAYER_KEYS}, text_tokens=int(kw["text_tokens"]))
