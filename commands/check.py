"""`ficoco-check BUNDLE`: the command line of `engines.check.run_check` (options, progress bar, exit codes)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from bundle.compare import ERROR_STATS, TIE_MARGIN
from commands.common import CONTEXT, run_command
from engines.check.levels import TASK_IMAGES, TASK_MODELS
from engines.check.options import (
    DEFAULT_IMAGES,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_PROMPTS,
    IMAGE_SUFFIXES,
    CheckOptions,
)
from engines.check.report import write_report


@click.command(context_settings=CONTEXT)
@click.version_option(package_name="ficoco-export")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True, help="Backend to check. auto: TensorRT when it, a GPU and engines built for them exist, else ONNX Runtime.")
@click.option("--ort-provider", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), default="auto", show_default=True, help="ONNX Runtime execution provider (auto: CUDA when onnxruntime-gpu has it, else CPU).")
@click.option("--model", help="Reference model (name, alias or llava-hf directory) [default: the manifest's source_model.name]. Use it when a bundle was exported from a local directory that has moved.")
@click.option("--images", type=click.Path(path_type=Path), help=f"Directory whose image files ({', '.join(IMAGE_SUFFIXES)}) are checked [default: the bundled photos {', '.join(DEFAULT_IMAGES)}].")
@click.option("--prompts", type=click.Path(path_type=Path), help="Text file, one prompt per line (blank lines skipped) [default: " + " / ".join(repr(p) for p in DEFAULT_PROMPTS) + "].")
@click.option("--num-samples", type=int, help="Most (image, prompt) pairs to check; every image is paired with every prompt, image-major [default: all pairs, 6 with the defaults].")
@click.option("--max-new-tokens", type=int, help=f"Greedy tokens generated per sample (levels 2 and 3) [default: {DEFAULT_MAX_NEW_TOKENS}, capped by the bundle's shape_ranges.max_new_tokens].")
@click.option("--atol", type=float, help="Absolute tolerance of the stage check (Polygraphy semantics) [default: 1e-4 fp32, 5e-2 fp16 and quantized].")
@click.option("--rtol", type=float, help="Relative tolerance of the stage check (Polygraphy semantics) [default: 1e-3 fp32, 5e-2 fp16 and quantized].")
@click.option("--check-error-stat", type=click.Choice(list(ERROR_STATS)), help="Error statistic the stage check compares with atol/rtol, as Polygraphy: elemwise (every element within atol OR rtol), or mean/median/max error within atol OR rtol [default: elemwise fp32, mean fp16 and quantized]. Given for a quantized bundle, it turns the tolerance gate on.")
@click.option("--min-cosine", type=float, help="Least cosine similarity of every stage output to PyTorch [default: off for fp32, 0.99 for fp16 and quantized bundles, which are judged by it].")
@click.option("--max-norm-deviation", type=float, help="Largest |norm ratio - 1| of every stage output, the ratio being ||bundle|| / ||PyTorch|| [default: off for fp32, 0.25 for fp16 and quantized bundles].")
@click.option("--min-token-match", type=float, help="Least exact-match rate of the backend's free-running greedy tokens vs the reduced PyTorch model, over all positions of all samples [default: 1.0 fp32, 0.5 quantized; fp16: reported, not gated].")
@click.option("--min-forced-match", type=float, help="Least share of the reference's greedy positions where the backend, given the same prefix, picks the same token or a near-tie (see --tie-margin) [default: 1.0 fp16; fp32 and quantized: reported, not gated].")
@click.option("--tie-margin", type=float, help=f"A different teacher-forced pick is a near-tie when the reference preferred its own token by at most this many standard deviations of its logits over the vocabulary [default: 0 fp32, {TIE_MARGIN:g} fp16 and quantized].")
@click.option("--max-kl", type=float, help="Fail when the mean first-token KL(p_unreduced || p_reduced), in nats, exceeds this [default: informational, no gate].")
@click.option("--min-reduction-agreement", type=float, help="Fail when the greedy token agreement of the reduced vs the unreduced PyTorch model (rate in [0, 1]) is below this [default: informational, no gate].")
@click.option("--task-images", type=int, help=f"Level 4: answer the questions of this many easy-vqa test images per split (easy-vqa, mosaic) with the bundle and with PyTorch; 0 turns it off [default: {TASK_IMAGES} for a model trained on easy-vqa ({', '.join(TASK_MODELS)}), else 0].")
@click.option("--max-accuracy-drop", type=float, help="Level 4: fail when the bundle's answer accuracy is more than this fraction below PyTorch's (0.01 = one point) [default: 0 fp32, 0.01 fp16, 0.02 quantized].")
@click.option("--save-reference", type=click.Path(path_type=Path), help="Also save the PyTorch reference's results for these inputs to this .npz file, so the bundle can be judged later where there is no PyTorch (--reference).")
@click.option("--reference", type=click.Path(path_type=Path), help="Judge the bundle against a reference saved by --save-reference (no PyTorch needed): the same gates, the saved inputs; the file must be for this very bundle. Level 4 (--task-images) is not saved.")
@click.option("--report-dir", type=click.Path(path_type=Path), help="Where check.json and check.md go [default: BUNDLE/reports].")
@click.option("--device", type=int, default=0, show_default=True, help="CUDA device index (TensorRT / ONNX Runtime CUDA).")
@click.option("--threads", type=click.IntRange(min=1), help="ONNX Runtime CPU threads [default: all cores].")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundle's files (large models).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging (every stage output's comparison) and full tracebacks.")
def main(bundle: Path, **kw: Any) -> None:
    """Check a BUNDLE's backend against the PyTorch reference: stage outputs, greedy tokens, and what the
    reduction costs against the unreduced model.

    Writes BUNDLE/reports/check.json and check.md and prints the table. Exit 0 when every gate passes,
    1 when a threshold fails (named on stderr), 2 for bad input.

    Example: ficoco-check out/llava7b-vl25 --num-samples 4 --max-new-tokens 32
    """
    run_command(bool(kw["verbose"]), lambda: _check(bundle, kw))


def _check(bundle: Path, kw: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    options = CheckOptions(
        backend=kw["backend"], ort_provider=kw["ort_provider"], device=int(kw["device"]), threads=kw["threads"],
        model=kw["model"], images=kw["images"], prompts=kw["prompts"], num_samples=kw["num_samples"],
        max_new_tokens=kw["max_new_tokens"], atol=kw["atol"], rtol=kw["rtol"], check_error_stat=kw["check_error_stat"],
        min_cosine=kw["min_cosine"], max_norm_deviation=kw["max_norm_deviation"], min_token_match=kw["min_token_match"],
        min_forced_match=kw["min_forced_match"], tie_margin=kw["tie_margin"], max_kl=kw["max_kl"],
        min_reduction_agreement=kw["min_reduction_agreement"], task_images=kw["task_images"],
        max_accuracy_drop=kw["max_accuracy_drop"], verify=not kw["no_verify"], verbose=bool(kw["verbose"]),
    )
    console = Console(file=sys.stderr)
    with Progress(
        TextColumn("checking"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"),
        console=console, transient=True, disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task("", total=None)

        def progress(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, description=label[:60])

        if kw["reference"] is not None and kw["save_reference"] is not None:
            raise click.BadParameter("give --save-reference (on a machine with PyTorch) or --reference (on the device), not both")
        if kw["reference"] is not None:
            from engines.check.saved import check_with_reference

            report = check_with_reference(bundle, kw["reference"], options, progress)
        elif kw["save_reference"] is not None:
            from engines.check.saved import save_reference

            report = save_reference(bundle, kw["save_reference"], options, progress)
            click.echo(f"reference: {kw['save_reference']}", err=True)
        else:
            from engines.check.runner import run_check

            report = run_check(bundle, options, progress)
    report_dir = kw["report_dir"] or Path(bundle) / "reports"
    json_path, _ = write_report(report, report_dir)
    click.echo(report.to_markdown(), nl=False)
    click.echo(f"report: {json_path}", err=True)
    if report.passed:
        click.secho(f"PASS ({len(report.samples)} samples, {report.seconds:.1f} s)", fg="green")
        return
    for line in report.failures:
        click.secho(f"error: {line}", fg="red", err=True)
    click.secho(f"FAIL: {len(report.failures)} gate(s) failed", fg="red")
    sys.exit(1)


if __name__ == "__main__":  # `python -m commands.check BUNDLE ...`
    main(prog_name="ficoco-check")
