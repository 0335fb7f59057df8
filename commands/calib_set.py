"""`python -m commands.calib_set OUT`: write an easy-vqa (train part) calibration set (`evaluation.calib`)."""

from __future__ import annotations

from pathlib import Path

import click

from commands.common import CONTEXT, run_command


@click.command(context_settings=CONTEXT)
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--images", type=click.IntRange(min=1), default=16, show_default=True,
              help="Calibration images: half easy-vqa train tiles, half train mosaics.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and full tracebacks.")
def main(out: Path, images: int, verbose: bool) -> None:
    """Write an easy-vqa (train part) calibration set to OUT/images and OUT/prompts.txt."""

    def body() -> None:
        from evaluation.calib import write_calibration_set

        try:
            path = write_calibration_set(out, images)
        except FileExistsError as err:
            raise ValueError(str(err)) from err
        click.echo(f"wrote {path}/images ({images} images) and {path}/prompts.txt")

    run_command(verbose, body)


if __name__ == "__main__":
    main()
