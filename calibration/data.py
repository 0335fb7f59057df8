"""Calibration data: images + prompts -> the exact inputs of each graph, keyed by ONNX input names.

The bundle's own front end (`engines.runtime.Frontend`: preprocessor_config.json, chat template,
tokenizer) turns each (image, prompt) pair into pixel_values and text ids; the *fp32* bundle in ONNX
Runtime then runs the earlier graphs, so every graph is calibrated on what it really sees:

    vision_encoder       pixel_values
    decoder_segment_{s}  hidden_states, position_ids, past_key_values.{i}.key/.value of its blocks, in both
                         phases it serves (docs/export-notes.md §14): the prefill (the prompt, an empty past)
                         and the greedy decode steps after it (one token, the real cache; `step_samples`
                         steps per pair)

The decoder feeds are what `bundle.session.SessionStages` hands each segment graph (recorded in its
`run_graph` hook), so a segment gets one prefill sample and `step_samples` decode samples per pair.
The weightless splice and reduction graphs are never quantized and can be recorded the same way.

Samples are batch 1 (text lengths differ between prompts). `CalibrationSet.save` writes one `.npz` per
sample and graph (`<dir>/<graph>/0000.npz`, arrays keyed by input name); `load` reads them back.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bundle.arrays import to_numpy
from bundle.names import VISION, is_decoder_graph, weighted_decoder_graph
from bundle.session import SessionStages
from ficoco.atomic import atomic_path

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")

#: Default calibration prompts: short, varied questions of the kind a VLM is asked.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "What is in the picture?",
    "Describe the image in detail.",
    "What colours dominate this photo?",
    "How many objects can you see?",
    "Is there a person in the image? What are they doing?",
    "Where could this photo have been taken?",
    "Write a one-sentence caption for this image.",
    "What is unusual about this picture?",
)

Progress = Callable[[int, int], None]  # (done, total)


class CalibrationInputError(ValueError):
    """Calibration images or prompts are missing, empty or unreadable (the message says which and what to do)."""


@dataclass
class CalibrationSet:
    """Per graph, a list of feeds (input name -> array, batch 1)."""

    samples: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)
    sources: list[dict[str, str]] = field(default_factory=list)  # per pair: image name, prompt

    def size(self, graph: str) -> int:
        return len(self.samples.get(graph, []))

    def feeds(self, graph: str) -> list[dict[str, np.ndarray]]:
        if not self.samples.get(graph):
            raise CalibrationInputError(f"no calibration samples for {graph}")
        return self.samples[graph]

    def save(self, root: str | os.PathLike[str]) -> Path:
        """One npz per sample: `<root>/<graph>/<i>.npz` (keys: ONNX input names)."""
        root = Path(root)
        for graph, feeds in self.samples.items():
            d = root / graph
            d.mkdir(parents=True, exist_ok=True)
            for i, f in enumerate(feeds):
                with atomic_path(d / f"{i:04d}.npz") as tmp, open(tmp, "wb") as fh:
                    np.savez(fh, **f)
        return root

    @classmethod
    def load(cls, root: str | os.PathLike[str]) -> CalibrationSet:
        root = Path(root)
        out = cls()
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            feeds = []
            for f in sorted(d.glob("*.npz")):
                with np.load(f) as z:
                    feeds.append({k: z[k] for k in z.files})
            if feeds:
                out.samples[d.name] = feeds
        if not out.samples:
            raise CalibrationInputError(f"{root} holds no calibration samples (<graph>/<i>.npz)")
        return out


def load_images(folder: str | os.PathLike[str] | None) -> list[tuple[str, Image.Image]]:
    """(name, RGB image) for every image file in `folder` (sorted), or the bundled scikit-image photos."""
    if folder is None:
        from ficoco.images import test_images

        return test_images()
    d = Path(folder)
    if not d.is_dir():
        raise CalibrationInputError(f"--calib-images {d}: no such directory; give a folder of images (jpg/png/...)")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationInputError(
            f"--calib-images {d} holds no images ({', '.join(IMAGE_SUFFIXES)}); add some, or omit the option to use "
            "the bundled scikit-image photos"
        )
    out = []
    for p in files:
        try:
            with Image.open(p) as im:
                out.append((p.name, im.convert("RGB")))
        except OSError as err:
            raise CalibrationInputError(f"cannot read calibration image {p}: {err}; remove or replace it") from err
    return out


def load_prompts(path: str | os.PathLike[str] | None) -> list[str]:
    """Prompts from a text file (one per line; blank lines and lines starting with # skipped), or the defaults."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise CalibrationInputError(f"--calib-prompts {p}: cannot read it ({err.strerror or err})") from err
    prompts = [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]
    if not prompts:
        raise CalibrationInputError(f"--calib-prompts {p} has no prompts; write one question per line")
    return prompts


def pairs(images: Sequence[tuple[str, Image.Image]], prompts: Sequence[str], size: int) -> list[tuple[str, Image.Image, str]]:
    """`size` (image, prompt) pairs: images in order, prompts cycling at a different stride so pairs vary."""
    if size < 1:
        raise CalibrationInputError(f"--calib-size must be at least 1 (got {size})")
    if not images or not prompts:
        raise CalibrationInputError("calibration needs at least one image and one prompt")
    return [(images[i % len(images)][0], images[i % len(images)][1], prompts[(i + i // len(images)) % len(prompts)])
            for i in range(size)]


class RecordingStages(SessionStages):
    """A bundle's `SessionStages` that keeps the feeds of the graphs in `record` (numpy, batch 1) as they run."""

    def __init__(self, stages: SessionStages, record: Sequence[str]) -> None:
        super().__init__(stages.sessions, stages.segments)
        self.recorded: dict[str, list[dict[str, np.ndarray]]] = {g: [] for g in record}

    def run_graph(self, graph: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if graph in self.recorded:
            self.recorded[graph].append({n: _np(t) for n, t in feeds.items()})
        return super().run_graph(graph, feeds)


def collect(
    bundle: str | os.PathLike[str],
    images: Sequence[tuple[str, Image.Image]],
    prompts: Sequence[str],
    size: int,
    *,
    graphs: Sequence[str] | None = None,
    step_samples: int = 2,
    threads: int | None = None,
    progress: Progress | None = None,
) -> CalibrationSet:
    """Run the fp32 bundle in ONNX Runtime (CPU) on `size` pairs and record each graph's inputs.

    `graphs`: the graphs to record (None: the vision encoder and every decoder segment). Decoder graphs
    are recorded in prefill and, for `step_samples` greedy tokens per pair, in decode (segments only:
    the splice and the reductions run in prefill alone).
    """
    from bundle.frontend import Frontend, InputError
    from bundle.manifest import load_manifest
    from bundle.ort import ort_stages

    front = Frontend.from_bundle(bundle, verify=False)
    segments = load_manifest(bundle, verify=False).decoder_segments()
    base = ort_stages(Path(bundle) / "onnx", provider="cpu", threads=threads, segments=segments)
    if graphs is None:
        graphs = [VISION, *(g for g in base.sessions if weighted_decoder_graph(g))]
    unknown = [g for g in graphs if g not in base.sessions]
    if unknown:
        raise CalibrationInputError(f"the bundle has no graph {', '.join(unknown)} to calibrate "
                                    f"(its graphs: {', '.join(base.sessions)})")
    decoder = [g for g in graphs if is_decoder_graph(g)]
    stages = RecordingStages(base, decoder)
    decode_steps = step_samples if any(weighted_decoder_graph(g) for g in decoder) else 0
    chosen = pairs(images, prompts, size)
    out = CalibrationSet(samples={g: [] for g in graphs})
    for i, (name, image, prompt) in enumerate(chosen):
        px = front.preprocess([image])
        ids, offset = front.tokenize([prompt])
        try:
            front.check_request(int(ids.shape[1]), max(1, step_samples))
        except InputError as err:
            raise CalibrationInputError(f"calibration prompt {prompt!r}: {err}") from err
        out.sources.append({"image": name, "prompt": prompt})
        with torch.inference_mode():
            if VISION in graphs:
                out.samples[VISION].append({"pixel_values": _np(px)})
            if decoder:
                visual = stages.encode_image(px)
                embeds = stages.embed(ids)
                logits, past = stages.prefill(embeds, visual, offset)
                position = np.full((1,), int(ids.shape[1] + visual.shape[1]), dtype=np.int64)
                for _ in range(decode_steps):
                    tok = np.argmax(logits, axis=-1)[:, None].astype(np.int64)
                    logits, past = stages.step(stages.embed(tok), position, past)
                    position = position + 1
        if progress is not None:
            progress(i + 1, len(chosen))
    for g, feeds in stages.recorded.items():
        out.samples[g] = feeds
    return out


def _np(t: Any) -> np.ndarray:
    return np.ascontiguousarray(to_numpy(t))


class FeedReader:
    """An `onnxruntime.quantization.CalibrationDataReader` over a list of feeds (restricted to `names`)."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]], names: Sequence[str]) -> None:
        self._feeds = [{n: f[n] for n in names} for f in feeds]
        self._it: Iterator[dict[str, np.ndarray]] = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)

    def __len__(self) -> int:
        return len(self._feeds)
