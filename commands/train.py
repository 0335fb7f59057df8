"""`ficoco-train`: rebuild the `shapes` built-in model from its seed (what `make train` runs).

    ficoco-train -o ficoco/builtin/shapes        # the shipped weights (CPU: ~70 min on 2 cores; CUDA if present)
"""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

import click

from commands.common import CONTEXT, run_command
from training.train import TrainConfig

DEFAULTS = TrainConfig()


@click.command(context_settings=CONTEXT)
@click.version_option(package_name="ficoco-export")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=Path("out/shapes"), show_default=True,
              help="The llava-hf directory to write (replaced atomically when training ends and at each evaluation).")
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True, help="Seed of weights, data order and drawn images.")
@click.option("--vision-steps", type=click.IntRange(min=0), default=DEFAULTS.vision_steps, show_default=True,
              help="Phase 1 steps: the vision tower alone on the [CLS] and patch tasks.")
@click.option("--steps", type=click.IntRange(min=1), default=DEFAULTS.steps, show_default=True,
              help="Phase 2 steps: answers plus both auxiliary tasks.")
@click.option("--images-per-step", type=click.IntRange(min=2), default=DEFAULTS.images_per_step, show_default=True,
              help="Images per step (half single tiles, half mosaics).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS.lr, show_default=True, help="Peak learning rate (AdamW).")
@click.option("--threads", type=click.IntRange(min=1), default=DEFAULTS.threads, show_default=True, help="CPU threads.")
@click.option("-v", "--verbose", is_flag=True, help="Log every 10 steps and tracebacks.")
def main(**kw: Any) -> None:
    """Train the `shapes` model (LLaVA-1.5 vision geometry, tiny widths) on easy-vqa's train images."""
    run_command(bool(kw["verbose"]), lambda: _train(kw))


def _train(kw: dict[str, Any]) -> None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from training.train import train

    if kw["verbose"]:
        logging.getLogger("training").setLevel(logging.INFO)
    names = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in kw.items() if k in names})
    with Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()) as bar:
        task = bar.add_task("train", total=cfg.vision_steps + cfg.steps)
        log = train(cfg, kw["out"], progress=lambda done, total: bar.update(task, completed=done))
    last = log["evals"][-1] if log["evals"] else {}
    click.echo(f"wrote {kw['out']} in {log['train_seconds'] / 60:.1f} min; weights sha256 {log['weights_sha256'] if 'weights_sha256' in log else '(see training_log.json)'}")
    click.echo("quick eval (first answer token, 60 test images per split): "
               + ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k in ("easy-vqa", "mosaic")))
