"""The check's inputs: the (image, prompt) samples, and the reduced PyTorch reference rebuilt from a manifest."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundle.manifest import Manifest
from engines.check.options import DEFAULT_IMAGES, DEFAULT_PROMPTS, IMAGE_SUFFIXES, CheckInputError

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One (image, prompt) pair; `image` is a PIL image, `image_name` what the report calls it."""

    image_name: str
    image: Any
    prompt: str


def load_prompts(path: Path | None) -> list[str]:
    """The prompts of a file (one per non-blank line), or DEFAULT_PROMPTS; CheckInputError if none."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CheckInputError(f"cannot read the prompt file {path}: {err}; give a UTF-8 text file with one prompt per line") from err
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise CheckInputError(f"the prompt file {path} has no prompts; write one prompt per line")
    return prompts


def load_images(directory: Path | None) -> list[tuple[str, Any]]:
    """(name, RGB image) for every image file in `directory` (sorted), or the bundled test photos."""
    if directory is None:
        from ficoco.images import test_image

        return [(n, test_image(n)) for n in DEFAULT_IMAGES]
    from ficoco.preprocess import load_image

    d = Path(directory)
    if not d.is_dir():
        raise CheckInputError(f"--images {d}: not a directory; give a directory of image files")
    try:
        files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as err:
        raise CheckInputError(f"--images {d}: cannot list the directory ({err})") from err
    if not files:
        raise CheckInputError(f"--images {d}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it")
    return [(p.name, load_image(p)) for p in files]  # ImageError (exit 2) names an unreadable file


def make_samples(images: Sequence[tuple[str, Any]], prompts: Sequence[str], num_samples: int | None) -> list[Sample]:
    """Every image with every prompt (image-major), capped at `num_samples`."""
    pairs = [Sample(name, im, p) for name, im in images for p in prompts]
    return pairs if num_samples is None else pairs[:num_samples]


def reference_for_bundle(manifest: Manifest, model: str | None = None) -> tuple[Any, Any]:
    """(LoadedModel, ReducedLlava) in fp32: the source model (or `model`, e.g. a moved local directory)
    with the manifest's schedule. CheckInputError when the model cannot be found or does not fit."""
    import torch

    from ficoco.models import ModelNotFoundError, load_model
    from ficoco.reduced_llava import ReducedLlava
    from ficoco.schedule import Schedule

    source = manifest.source_model
    name = model or source.get("name")
    if not name:
        raise CheckInputError("the manifest names no source model; pass --model NAME_OR_DIR")
    try:
        loaded = load_model(str(name), dtype=torch.float32)
    except ModelNotFoundError as err:
        hint = "" if model else " (a bundle exported from a local directory that moved: pass --model DIR)"
        raise CheckInputError(f"reference model {name!r} not found{hint}: {err}") from err
    want = source.get("revision")
    if want and loaded.revision != want:
        log.warning("reference model %s is revision %s, the bundle was exported from %s", name, loaded.revision, want)
    try:
        schedule = Schedule.from_dict(manifest.schedule)
        reduced = ReducedLlava(loaded.model, schedule).eval()
    except (KeyError, TypeError) as err:
        raise CheckInputError(f"the manifest's schedule cannot be read ({err}); re-export the bundle") from err
    except ValueError as err:
        raise CheckInputError(f"the bundle does not fit the reference model {name!r}: {err}") from err
    return loaded, reduced

