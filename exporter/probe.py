"""A bundle graph with its token selections exposed: the kept set T of every reduction step as an output.

Every reduction step of every method ends in `ficoco.paradigm.complement_sorted`, a ``TopK`` whose
*indices* are used: the kept set T, ascending span indices (the complement of the sources S the filter
removed). Other TopKs of a step (the correlate's quantile) use only their values. `selection_steps` finds
the index-producing TopKs among the reduction nodes (`exporter.regions`), in graph order, one per step.

`SelectionProbe` loads the graph without its weights, adds those indices as graph outputs and saves the
copy to a temporary directory. ONNX Runtime refuses external data outside a model's own directory
(symbolic links included), so the weights are memory-mapped from the bundle's own files and handed over
with `SessionOptions.add_external_initializers`: nothing in the bundle changes, no weight is copied, and
the graph may be of any size. The copy opens as a `bundle.ort.OrtSession` (`SelectionProbe.session`), so
it also runs as a stage of `bundle.session.SessionStages`. Used by the quantizer's report
(`calibration.evaluate`, `calibration.selection`) and by `ficoco-check`'s selection flips (`exporter.selection`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper
from torch import Tensor

from bundle.arrays import to_numpy
from bundle.names import VISION, graph_names, reduce_index
from bundle.ort import OrtSession, session_options
from bundle.session import SessionStages
from exporter.regions import has_namespaces, node_namespace, reduction_node_names
from ficoco.segments import DecoderSegment


@dataclass(frozen=True)
class SelectionStep:
    index: int  # step number in graph order
    node: str  # TopK node name
    output: str  # its indices output (kept token positions within the span)
    namespace: str


def selection_steps(model: onnx.ModelProto) -> list[SelectionStep]:
    """The reduction's index-producing TopK nodes, in graph order (one per reduction step)."""
    red = reduction_node_names(model)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    steps = []
    for n in model.graph.node:
        if n.op_type == "TopK" and n.name in red and len(n.output) > 1 and n.output[1] in used:
            steps.append(SelectionStep(len(steps), n.name, n.output[1], node_namespace(n)))
    return steps


@dataclass(frozen=True)
class ExternalTensor:
    """Where an initializer's bytes lie in an external-data file."""

    name: str
    location: str
    offset: int
    dtype: Any
    shape: tuple[int, ...]


def external_tensors(model: onnx.ModelProto) -> list[ExternalTensor]:
    """The initializers of `model` stored in external-data files."""
    out = []
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        out.append(ExternalTensor(t.name, info["location"], int(info.get("offset", 0)),
                                  helper.tensor_dtype_to_np_dtype(t.data_type), tuple(t.dims)))
    return out


def external_initializers(tensors: Sequence[ExternalTensor], base: Path) -> tuple[list[str], list[Any]]:
    """(names, OrtValues) of `tensors`, memory-mapped from their files under `base`."""
    import onnxruntime as ort

    values = [ort.OrtValue.ortvalue_from_numpy(np.asarray(np.memmap(base / t.location, dtype=t.dtype, mode="r",
                                                                    offset=t.offset, shape=t.shape)))
              for t in tensors]
    return [t.name for t in tensors], values


class SelectionProbe:
    """An ONNX Runtime CPU session of a graph with its selection indices as extra outputs.

    `session` is the `OrtSession` (torch tensors by name, the kept sets among the outputs); `run` takes
    and returns numpy arrays. `usable` is False when the graph lost its node metadata (rewritten by an external tool), so its
    reduction nodes cannot be found; `steps` is then empty unless given.
    """

    def __init__(self, path: str | os.PathLike[str], *, optimize: bool = True, threads: int | None = None,
                 steps: Sequence[SelectionStep] | None = None, keep_loaded: bool = True,
                 before_open: Callable[[], object] | None = None) -> None:
        """`steps`: the steps to expose (e.g. those of the fp32 graph, when a rewrite dropped the metadata).
        `keep_loaded=False`: the session opens for each run only (`bundle.ort.OrtSession`), and the mapped
        weights are unmapped when it closes."""
        path = Path(path)
        model = onnx.load(str(path), load_external_data=False)
        self.usable = steps is not None or has_namespaces(model)
        self.steps = list(steps) if steps is not None else selection_steps(model)
        existing = {o.name for o in model.graph.output}
        for s in self.steps:
            if s.output not in existing:
                model.graph.output.append(helper.make_tensor_value_info(s.output, TensorProto.INT64, None))
        self.input_names = [i.name for i in model.graph.input]
        tensors, base = external_tensors(model), path.parent

        def options() -> tuple[Any, object]:
            so = session_options(threads, optimize=optimize)
            names, weights = external_initializers(tensors, base)
            if names:
                so.add_external_initializers(names, weights)
            return so, weights  # the mapped weights must outlive the session

        # the copy stays while the probe lives: a low-memory session opens it again for every run
        self._tmp = tempfile.TemporaryDirectory(prefix="ficoco-probe-")
        copy = Path(self._tmp.name) / path.name
        onnx.save_model(model, str(copy))
        self.session = OrtSession(copy, options=options, keep_loaded=keep_loaded, before_open=before_open)
        self.input_types = {s.name: s.dtype for s in self.session.inputs}

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        """(the graph's own outputs by name, the kept indices [B, n_kept] of each step)."""
        by_name = self.session.run({k: feeds[k] for k in self.input_names})
        return by_name, [by_name[s.output] for s in self.steps]


def set_differences(ref: np.ndarray, got: np.ndarray) -> list[int]:
    """Per batch row, |set(ref row) - set(got row)| (= the flips of a step: both sets have n - r members)."""
    return [len(set(r.tolist()) - set(g.tolist())) for r, g in zip(ref, got, strict=True)]


class ProbeStages(SessionStages):
    """A bundle's graphs in ONNX Runtime (CPU) with the kept sets of every reduction step exposed.

    The vision encoder and the reduction graphs run as `SelectionProbe`s, the other graphs as plain
    sessions. After `encode_image`, `vision_selection` holds the kept indices [B, n_kept] of each vision
    step; after `prefill`, `prefill_selection` those of each decoder step (one per reduction graph, in
    running order). `prefill_steps` names the decoder steps, numbered across the reduction graphs, their
    node as `<graph>/<TopK node>`.
    """

    def __init__(self, onnx_dir: str | Path, *, segments: Sequence[DecoderSegment] | None = None,
                 optimize: bool = True, threads: int | None = None, like: ProbeStages | None = None,
                 keep_loaded: bool = True, before_open: Callable[[], object] | None = None) -> None:
        """`segments`: None reads them from the bundle's manifest. `like`: probe the same selection steps as
        that (fp32) bundle's, found by node name (for graphs whose node metadata a rewrite dropped).
        `keep_loaded=False`: every graph opens only while it runs (`bundle.ort.OrtSession`'s low-memory
        mode), each after `before_open()`."""
        d = Path(onnx_dir)
        if segments is None:
            from bundle.manifest import load_manifest

            segments = load_manifest(d.parent, verify=False).decoder_segments()
        names = graph_names(len(segments))
        self.vision = SelectionProbe(d / f"{VISION}.onnx", optimize=optimize, threads=threads,
                                     steps=None if like is None else like.vision.steps, keep_loaded=keep_loaded,
                                     before_open=before_open)
        self.reductions: dict[str, SelectionProbe] = {
            g: SelectionProbe(d / f"{g}.onnx", optimize=optimize, threads=threads,
                              steps=None if like is None else like.reductions[g].steps, keep_loaded=keep_loaded,
                              before_open=before_open)
            for g in names if reduce_index(g) is not None
        }
        so = session_options(threads, optimize=optimize)
        sessions = {VISION: self.vision.session, **{g: p.session for g, p in self.reductions.items()}}
        for g in names:
            if g not in sessions:
                sessions[g] = OrtSession(d / f"{g}.onnx", options=so, keep_loaded=keep_loaded, before_open=before_open)
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
            self.vision_selection = [to_numpy(out[s.output]) for s in self.vision.steps]
        elif graph in self.reductions:
            self._kept += [to_numpy(out[s.output]) for s in self.reductions[graph].steps]
        return out

    def prefill(self, embeds: Tensor, visual: Tensor, image_offset: Tensor) -> tuple[Tensor, list[Tensor]]:
        self._kept = []
        result = super().prefill(embeds, visual, image_offset)
        self.prefill_selection, self._kept = self._kept, []
        return result
