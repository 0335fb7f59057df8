"""`ficoco-eval`: answer accuracy vs visual-token budget on the easy-vqa test splits.

    ficoco-eval                                   # the grid on the shapes model, both splits -> reports/
    ficoco-eval --limit 50 --budgets 128          # a quick subset
    ficoco-eval --bundle out/shapes-vl25          # a bundle through the runtime, vs the reduced PyTorch model
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from commands.common import CONTEXT, run_command

log = logging.getLogger(__name__)


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from err
    if not vals or any(not 1 <= v <= 576 for v in vals):
        raise click.BadParameter(f"budgets are visual tokens kept, each in [1, 576]; got {text!r}")
    return vals


@click.command(context_settings=CONTEXT)
@click.version_option(package_name="ficoco-export")
@click.option("--model", default="shapes", show_default=True, help="Model for the PyTorch grid (a built-in, alias or llava-hf directory).")
@click.option("--bundle", "bundles", multiple=True, type=click.Path(path_type=Path),
              help="Evaluate this bundle through the runtime as well (repeatable); compared with the reduced PyTorch model.")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(["auto", "onnxruntime", "tensorrt"]),
              help="Runtime backend for --bundle.")
@click.option("--grid/--no-grid", default=None, help="Run the PyTorch method grid (default: on unless --bundle is given).")
@click.option("--splits", default="easy-vqa,mosaic", show_default=True, help="Comma-separated test splits.")
@click.option("--budgets", default="192,128,64", show_default=True, help="Visual tokens kept (of 576), comma-separated.")
@click.option("--ratio", type=float, default=None, help="Evaluate every method at this kept fraction instead of --budgets.")
@click.option("--methods", default="all", show_default=True,
              help="Comma-separated labels to keep, e.g. 'FiCoCo-VL,ToMe' (matched by prefix), or 'all'.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N images of each split (default: all).")
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), default=Path("reports"), show_default=True,
              help="Report directory (eval.json, eval.md, eval.png).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: all cores).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and tracebacks.")
def main(**kw: Any) -> None:
    """Answer accuracy of reduction methods (PyTorch) and bundles (runtime) on the easy-vqa test splits."""
    run_command(bool(kw["verbose"]), lambda: _eval(kw))


def _eval(kw: dict[str, Any]) -> None:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from evaluation import grid as G
    from evaluation import report
    from evaluation.bundles import evaluate_bundle, machine_line
    from ficoco import vqa
    from ficoco.models import load_model

    if kw["threads"]:
        torch.set_num_threads(kw["threads"])
    names = [s.strip() for s in kw["splits"].split(",") if s.strip()]
    bad = [s for s in names if s not in vqa.SPLITS]
    if bad or not names:
        raise click.BadParameter(f"unknown split(s) {', '.join(bad) or '(none)'}; choose from {', '.join(vqa.SPLITS)}", param_hint="--splits")
    budgets = _ints(kw["budgets"])
    if kw["ratio"] is not None and not 0 < kw["ratio"] <= 1:
        raise click.BadParameter("the kept fraction must be in (0, 1]", param_hint="--ratio")
    for b in kw["bundles"]:
        if not (b / "manifest.json").is_file():
            raise click.BadParameter(f"{b} is not a bundle (no manifest.json); export one with ficoco-export", param_hint="--bundle")
    splits = [vqa.test_split(s).limit(kw["limit"]) for s in names]
    run_grid = kw["grid"] if kw["grid"] is not None else not kw["bundles"]
    configs = G.grid(budgets, kw["ratio"]) if run_grid else []
    if kw["methods"] != "all":
        keep = [m.strip() for m in kw["methods"].split(",") if m.strip()]
        configs = [c for c in configs if c.variant == "none" or any(c.label.startswith(k) for k in keep)]
    console = Console(stderr=True)
    results: list[G.EvalResult] = []
    agreement: list[dict[str, Any]] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=False) as bar:
        task = bar.add_task("eval", total=None)

        def progress(label: str, done: int, total: int) -> None:
            bar.update(task, description=label, completed=done, total=total)

        if configs:
            loaded = load_model(kw["model"])
            results += G.blind_results(splits)
            results += G.evaluate_model(loaded, configs, splits, on_progress=progress)
        references: dict[str, list] = {}  # one PyTorch run per (source model, schedule), shared by bundles
        for b in kw["bundles"]:
            results_b, agree = evaluate_bundle(b, kw["backend"], splits, progress, references)
            results += results_b
            agreement += agree
    import shlex as _sh

    meta = {
        "model": kw["model"] if configs else ", ".join(str(b) for b in kw["bundles"]),
        "command": "ficoco-eval " + " ".join(_sh.quote(a) for a in sys.argv[1:]),
        "questions": {s.name: len(s.questions) for s in splits},
        "images": {s.name: len(s.image_keys()) for s in splits},
        "machine": machine_line(),
        "torch_threads": torch.get_num_threads(),
        "agreement": agreement,
    }
    paths = report.write(results, meta, kw["out_dir"])
    click.echo(report.to_markdown(results, meta))
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
