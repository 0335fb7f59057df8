"""`python -m commands.kept_objects`: object patches kept by each vision-side method (`evaluation.kept_objects`)."""

from __future__ import annotations

import click

from commands.common import CONTEXT, run_command


@click.command(context_settings=CONTEXT)
@click.option("--images", type=click.IntRange(min=1), default=8, show_default=True, help="easy-vqa test images.")
@click.option("--ratio", type=click.FloatRange(0, 1, min_open=True), default=0.25, show_default=True,
              help="Kept fraction of the 576 visual tokens (variant V).")
@click.option("--model", default="shapes", show_default=True, help="Model (built-in, alias or llava-hf directory).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and full tracebacks.")
def main(images: int, ratio: float, model: str, verbose: bool) -> None:
    """Object patches kept by each vision-side method on easy-vqa test images."""

    def body() -> None:
        from evaluation.kept_objects import markdown_table, measure

        rows = measure(images, ratio, model)
        click.echo(f"object patches kept / object patches, per image (first {images} easy-vqa test images, V {ratio:g}, {model})")
        for line in markdown_table(rows):
            click.echo(line)

    run_command(verbose, body)


if __name__ == "__main__":
    main()
