"""Does quantization change which visual tokens the reduction keeps?

The probe that exposes every reduction step's kept set T is `exporter.probe`; `ProbeStages` runs a whole
bundle with the probes in place of the graphs that select: the vision encoder (every vision step) and
each decoder reduction graph `decoder_reduce_{s}` (decoder step s; docs/export-notes.md §14). `compare`
reports per step how many kept indices differ as sets (|T_fp32 \\ T_quant| summed over the images; equal
to the number of differing sources, since |T| is fixed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from bundle.names import VISION, graph_names, reduce_index
from bundle.ort import OrtSession, session_options
from bundle.session import SessionStages
from exporter.probe import (
    SelectionProbe,
    SelectionStep,
    selection_steps,
    set_differences,
)
from ficoco.segments import DecoderSegment

__all__ = ["ProbeStages", "SelectionProbe", "SelectionStep", "compare", "selection_steps", "set_differences", "summary"]


class ProbeStages(SessionStages):
    """A bundle's graphs in ONNX Runtime (CPU) with the kept sets of every reduction step exposed.

    The vision encoder and the reduction graphs run as `SelectionProbe`s, the other graphs as plain
    sessions. After `encode_image`, `vision_selection` holds the kept indices [B, n_kept] of each vision
    step; after `prefill`, `prefill_selection` those of each decoder step (one per reduction graph, in
    running order). `prefill_steps` names the decoder steps, numbered across the reduction graphs, their
    node as `<graph>/<TopK node>`.
    """

    def __init__(self, onnx_dir: str | Path, *, segments: Sequence[DecoderSegment] | None = None,
                 optimize: bool = True, threads: int | None = None, like: ProbeStages | None = None) -> None:
        """`segments`: None reads them from the bundle's manifest. `like`: probe the same selection steps as
        that (fp32) bundle's, found by node name (for graphs whose node metadata a rewrite dropped)."""
        d = Path(onnx_dir)
        if segments is None:
            from bundle.manifest import load_manifest

            segments = load_manifest(d.parent, verify=False).decoder_segments()
        names = graph_names(len(segments))
        self.vision = SelectionProbe(d / f"{VISION}.onnx", optimize=optimize, threads=threads,
                                     steps=None if like is None else like.vision.steps)
        self.reductions: dict[str, SelectionProbe] = {
            g: SelectionProbe(d / f"{g}.onnx", optimize=optimize, threads=threads,
                              steps=None if like is None else like.reductions[g].steps)
            for g in names if reduce_index(g) is not None
        }
        so = session_options(threads, optimize=optimize)
        sessions = {VISION: self.vision.session, **{g: p.session for g, p in self.reductions.items()}}
        for g in names:
            if g not in sessions:
                sessions[g] = OrtSession(d / f"{g}.onnx", options=so)
        super().__init__(sessions, segments)
        self.vision_selection: list[np.ndarray] = []
        self.prefill_selection: list[np.ndarray] = []
        self._kept: list[np.ndarray] = []

    @property
    def usable(self) -> bool:
        """Whether every reduction graph's selection could be found (False: a rewrite dropped the metadata)."""
        return all(p.usable for p in self.reductions.values())

    @property
    def prefill_steps(self) -> list[SelectionStep]:
        """The decoder's steps across the reduction graphs, in running order."""
        out: list[SelectionStep] = []
        for g, p in self.reductions.items():
            for s in p.steps:
                out.append(SelectionStep(len(out), f"{g}/{s.node}", s.output, s.namespace))
        return out

    def run_graph(self, graph: str, feeds: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = super().run_graph(graph, feeds)
        if graph == VISION:
            self.vision_selection = [out[s.output].cpu().numpy() for s in self.vision.steps]
        elif graph in self.reductions:
            self._kept += [out[s.output].cpu().numpy() for s in self.reductions[graph].steps]
        return out

    def prefill(self, embeds: Tensor, visual: Tensor, image_offset: Tensor) -> tuple[Tensor, list[Tensor]]:
        self._kept = []
        result = super().prefill(embeds, visual, image_offset)
        self.prefill_selection, self._kept = self._kept, []
        return result


def compare(
    ref: Sequence[list[np.ndarray]], got: Sequence[list[np.ndarray]], steps: Sequence[SelectionStep]
) -> list[dict[str, Any]]:
    """Per step: kept-token count, differing indices per sample and in total."""
    out = []
    for s in steps:
        per_sample: list[int] = []
        kept = 0
        for r, g in zip(ref, got, strict=True):
            per_sample.extend(set_differences(r[s.index], g[s.index]))
            kept = int(r[s.index].shape[-1])
        out.append({"step": s.index, "node": s.node, "kept": kept, "differ": int(sum(per_sample)),
                    "differ_per_sample": per_sample, "max_fraction": (max(per_sample) / kept) if kept and per_sample else 0.0})
    return out


def summary(steps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"steps": len(steps), "steps_with_differences": sum(1 for s in steps if s["differ"]),
            "differ_total": int(sum(s["differ"] for s in steps))}
