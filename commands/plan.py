"""`ficoco-plan`: print (and save) the per-block reduction schedule and its theoretical TFLOPs.

Needs no weights: the model's config comes from `ficoco.models.load_config` (aliases resolve to the
configs shipped in ficoco/configs/). `--memory` adds the bundle's memory plan (`ficoco.memory`): weights,
KV cache, activations and workspace per graph, and whether it fits the named devices.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from commands.common import CONTEXT, run_command
from commands.options import planning_options, schedule_request
from ficoco.memory import DEFAULT_WORKSPACE_MIB

if TYPE_CHECKING:
    from rich.table import Table

    from ficoco.geometry import LlavaGeometry
    from ficoco.memory import MemoryPlan
    from ficoco.schedule import Schedule


def export_defaults() -> dict[str, Any]:
    """`exporter.export.ExportOptions`' field defaults, read from its source (importing it would import torch
    and onnx, seconds before `--help` could print; tests/test_memory.py checks them against the class)."""
    spec = importlib.util.find_spec("exporter.export")
    if spec is None or spec.origin is None:
        raise RuntimeError("exporter.export is not importable; reinstall ficoco-export")
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "ExportOptions":
            return {st.target.id: ast.literal_eval(st.value) for st in node.body
                    if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name) and st.value is not None}
    raise RuntimeError("exporter.export has no ExportOptions class")


_EXPORT = export_defaults()


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
@click.option("--memory", is_flag=True, help="Also plan the bundle's memory: weights, KV cache at the maximum lengths "
              "(per-block lengths under FiCoCo-L), prefill activations (an estimate) and TensorRT workspace per graph, "
              "and whether the total fits Jetson Orin Nano 8 GB / Orin NX 16 GB / AGX Orin 32 and 64 GB and a 24 GB GPU. "
              "With --format json (and in the -o file) the plan is the schedule's \"memory\" key.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"], case_sensitive=False),
              default=_EXPORT["precision"], show_default=True,
              help="--memory: weight, KV and activation precision (4 / 2 / 2 bytes per element); the default is ficoco-export's.")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=_EXPORT["max_batch_size"], show_default=True,
              help="--memory: largest batch (sequences) the bundle accepts; the default is ficoco-export's.")
@click.option("--max-text-len", type=click.IntRange(min=2), default=_EXPORT["max_text_len"], show_default=True,
              help="--memory: largest prompt in text tokens, visual tokens not counted; the default is ficoco-export's.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=_EXPORT["max_new_tokens"], show_default=True,
              help="--memory: most generated tokens, in tokens (sizes the KV cache); the default is ficoco-export's.")
@click.option("--quant-vision", type=click.Choice(["none", "int8"], case_sensitive=False), default="none", show_default=True,
              help="--memory: the vision weights as `ficoco-quantize --vision` leaves them (int8: per-channel INT8).")
@click.option("--quant-decoder", type=click.Choice(["none", "int4-weight"], case_sensitive=False), default="none",
              show_default=True, help="--memory: the decoder weights as `ficoco-quantize --decoder` leaves them "
              "(int4-weight: blocked INT4 + scales).")
@click.option("--workspace", "workspace_mib", type=click.IntRange(min=0), default=DEFAULT_WORKSPACE_MIB, show_default=True,
              help="--memory: TensorRT workspace / runtime allowance in MiB (tactic scratch, cuBLAS/cuDNN); build the "
              "engines with `ficoco-build --workspace` no larger.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and full tracebacks.")
def main(**kw: Any) -> None:
    """Plan a fixed-budget visual-token reduction for a LLaVA model and print its per-block schedule.

    Each step removes tokens after its block's attention; vision spans count [CLS]. TFLOPs are theoretical
    (2 FLOPs per multiply-accumulate): "prefill" is the decoder figure the FiCoCo paper reports
    (8.45 T for unreduced LLaVA-1.5-7B at 60 text tokens), "vision" the CLIP tower + projector.

    With --memory: the bundle's memory per graph at --precision and the maximum shapes, and the named targets
    it fits (docs/export-notes.md §15).

    Example: ficoco-plan --model llava-1.5-7b --variant VL --ratio 0.25 --memory --precision fp16
    """
    run_command(bool(kw["verbose"]), lambda: _plan(kw))


def _plan(kw: dict[str, Any]) -> None:
    from rich.console import Console

    from ficoco.atomic import write_atomic
    from ficoco.geometry import LlavaGeometry
    from ficoco.models import load_config

    geometry = LlavaGeometry.from_config(load_config(kw["model"]))
    schedule = schedule_request(kw).make(geometry)
    memory = memory_plan(kw, geometry, schedule) if kw["memory"] else None
    data = schedule.to_dict()
    if memory is not None:
        data["memory"] = memory.to_dict()  # Schedule.from_dict ignores it: the file still feeds --schedule
    text = json.dumps(data, indent=2)
    output: Path | None = kw["output"]
    if output is not None:
        try:
            write_atomic(output, text + "\n")
        except OSError as e:
            raise ValueError(f"cannot write {output}: {e}") from e
    if kw["fmt"].lower() == "json":
        click.echo(text)
        return
    console = Console()
    console.print(format_table(schedule, geometry))
    if memory is not None:
        console.print(format_memory_table(memory))
        console.print(format_targets_table(memory))
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


def memory_plan(kw: dict[str, Any], geometry: LlavaGeometry, schedule: Schedule) -> MemoryPlan:
    """The `ficoco.memory` plan the --memory options ask for."""
    from ficoco.memory import MiB, ShapeLimits, plan_memory

    limits = ShapeLimits(int(kw["max_batch_size"]), int(kw["max_text_len"]), int(kw["max_new_tokens"]))
    mib = int(kw["workspace_mib"])
    return plan_memory(geometry, schedule, limits, str(kw["precision"]).lower(),
                       vision_quant=str(kw["quant_vision"]).lower(), decoder_quant=str(kw["quant_decoder"]).lower(),
                       workspace_bytes=mib * MiB)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f}"


def format_memory_table(plan: MemoryPlan) -> Table:
    """A rich Table of each graph's weights, KV cache and prefill activations (MiB), then the totals."""
    from rich.table import Table

    lim = plan.limits
    quant = [q for q in (f"vision {plan.vision_quant}" if plan.vision_quant != "none" else "",
                         f"decoder {plan.decoder_quant}" if plan.decoder_quant != "none" else "") if q]
    title = (f"memory, {plan.precision}{' (' + ', '.join(quant) + ')' if quant else ''}: batch {lim.max_batch_size}, "
             f"text {lim.max_text_len}, new tokens {lim.max_new_tokens} (MiB)")
    table = Table(title=title, title_justify="left")
    table.add_column("graph", no_wrap=True)
    for col, justify in (("blocks", "left"), ("parameters", "right"), ("weights", "right"), ("KV cache", "right"),
                         ("activations", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for g in plan.graphs:
        blocks = f"{g.kv_layers[0]}..{g.kv_layers[-1]}" if g.kv_layers else ""
        table.add_row(g.graph, blocks, f"{g.parameters:,}", _mib(g.weight_bytes), _mib(g.kv_bytes) if g.kv_bytes else "",
                      _mib(g.activation_bytes))
    by_p = plan.to_dict()["weight_bytes_by_precision"]
    lengths = sorted(set(plan.kv_lengths))
    table.add_row("total", "", "", _mib(plan.weight_bytes), _mib(plan.kv_bytes), _mib(plan.activation_bytes) + " (max)",
                  end_section=True)
    table.caption = "\n".join((
        f"total {_mib(plan.total_bytes)} MiB = weights + KV + largest graph's activations + workspace {_mib(plan.workspace_bytes)}",
        "float weights: " + ", ".join(f"{p} {_mib(v)}" for p, v in by_p.items()) + " MiB",
        f"KV per block: T + span_at(l) + N positions, {lengths[0]}..{lengths[-1]}; Σ 2·B·Hkv·L·hd·bytes",
        "activations: an estimate of prefill's largest live tensors per graph (ficoco.memory), not measured",
    ))
    table.caption_justify = "left"
    return table


def format_targets_table(plan: MemoryPlan) -> Table:
    """A rich Table of the fit verdicts (GiB)."""
    from rich.table import Table

    from ficoco.memory import DISCRETE_RESERVE_GIB, JETSON_RESERVE_GIB

    table = Table(title=f"fits? total {plan.total_bytes / (1 << 30):.2f} GiB", title_justify="left")
    for col, justify in (("target", "left"), ("usable GiB", "right"), ("headroom GiB", "right"), ("fits", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for v in plan.verdicts:
        table.add_row(v.target, f"{v.usable_bytes / (1 << 30):.2f}", f"{v.headroom_bytes / (1 << 30):+.2f}",
                      "yes" if v.fits else "no")
    table.caption = (f"usable = memory - reserve: Jetson {JETSON_RESERVE_GIB} GiB (memory shared with the OS, CUDA "
                     f"and TensorRT), discrete GPU {DISCRETE_RESERVE_GIB} GiB (CUDA context)")
    table.caption_justify = "left"
    return table


if __name__ == "__main__":
    main()
