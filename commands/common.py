"""What every console command shares: click's context settings, logging, and the error contract.

The error contract (docs/reliability.md): a failure is one red `error: ...` line on stderr and a non-zero
exit, never a bare traceback (`--verbose` adds it).

- exit 2: the input is wrong and the user can fix it — a bad option, image, prompt, model directory,
  bundle (missing, edited, from an older schema), a missing optional backend (TensorRT) or dataset.
  Library code raises `ValueError` subclasses for these, or one of the few other classes listed in
  `input_error_types`;
- exit 1: running failed (export, validation, a TensorRT build, a check gate);
- exit 130: interrupted (Ctrl-C); the libraries write through `ficoco.atomic`, so nothing half-written stays.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import NoReturn

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
VERBOSE_HELP = "Debug logging and full tracebacks."


def setup_logging(verbose: bool) -> None:
    """Warnings (debug with --verbose) from the libraries' loggers, on stderr."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def fail(message: str, code: int) -> NoReturn:
    """Print `error: message` as one red line on stderr (whitespace runs folded) and exit with `code`."""
    from rich.console import Console
    from rich.text import Text

    line = " ".join(str(message).split())
    Console(stderr=True, soft_wrap=True).print(Text.assemble(("error: ", "bold red"), (line, "red")))
    raise SystemExit(code)


#: the modules only the export extra installs (a runtime-only install has none of them)
EXPORT_MODULES = frozenset({"torch", "transformers", "onnx", "onnxscript", "onnx_ir", "safetensors", "easy_vqa", "skimage"})
EXPORT_EXTRA = "pip install 'ficoco-export[export]'"


def input_error_types() -> tuple[type[BaseException], ...]:
    """The exception classes, besides ValueError, that mean "the input is wrong" (exit 2)."""
    from bundle.layout import BundleError
    from bundle.session import BackendUnavailable

    types: list[type[BaseException]] = [BundleError, BackendUnavailable, click.BadParameter]
    try:  # the model side needs the export extra; a runtime-only install has neither error to raise
        from ficoco.models import ModelNotFoundError
        from ficoco.vqa import DatasetError

        types += [ModelNotFoundError, DatasetError]
    except ImportError:
        pass
    return tuple(types)


def missing_extra(err: BaseException) -> str | None:
    """The message for a command that needs the export extra on a runtime-only install (else None)."""
    if isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0] in EXPORT_MODULES:
        return (f"this needs {err.name}, which the runtime-only install leaves out (it runs bundles: ficoco-run, "
                f"ficoco-serve, ficoco-check --reference); install the export side with {EXPORT_EXTRA}")
    return None


def exit_code(err: BaseException) -> int:
    """2 when the input is wrong (a ValueError or an `input_error_types` class), 1 when running failed."""
    if isinstance(err, input_error_types()):
        return 2
    if isinstance(err, ValueError) and not isinstance(err, UnicodeError):
        return 2
    return 1


def guarded(verbose: bool, body: Callable[[], None], interrupted: str = "interrupted") -> None:
    """Run a command's body under the error contract above."""
    try:
        body()
    except KeyboardInterrupt:
        fail(interrupted, 130)
    except (click.exceptions.Exit, click.exceptions.Abort, SystemExit):
        raise
    except click.ClickException as err:  # raised by a command's own checks: the same one-line form
        fail(err.format_message(), err.exit_code)
    except Exception as err:  # every failure becomes one clear line; --verbose shows the traceback
        extra = missing_extra(err)
        if extra is not None:
            fail(extra, 2)
        if verbose:
            import traceback

            traceback.print_exc()
        fail(str(err) or type(err).__name__, exit_code(err))


def run_command(verbose: bool, body: Callable[[], None], interrupted: str = "interrupted") -> None:
    """`setup_logging` then `guarded`: the first two lines of every command."""
    setup_logging(verbose)
    guarded(verbose, body, interrupted)
