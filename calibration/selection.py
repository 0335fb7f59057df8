"""Does quantization change which visual tokens the reduction keeps?

Every reduction step ends in a TopK whose *indices* are used: `ficoco.paradigm.complement_sorted`, the
kept set T (the complement of the sources S the filter removed). Other TopKs of a step (the correlate's
quantile) use only their values. `selection_steps` finds the index-producing TopKs among the reduction
nodes (`exporter.regions.reduction_node_names`), in graph order, one per step; `SelectionProbe` runs a
graph with those indices exposed as extra outputs (an in-memory copy: the graph proto is re-saved in a
temporary directory beside a link to its weights, nothing in the bundle changes); `compare` reports per
step how many kept indices differ as sets (|T_fp32 \\ T_quant| summed over the images; equal to the
number of differing sources, since |T| is fixed).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from exporter.regions import node_namespace, reduction_node_names


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


def _session_options(optimize: bool, threads: int | None) -> Any:
    from exporter.validate import session_options

    so = session_options(threads)
    if not optimize:
        import onnxruntime as ort

        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return so


class SelectionProbe:
    """An ONNX Runtime session of a graph with its selection indices as extra outputs."""

    def __init__(self, path: str | os.PathLike[str], *, optimize: bool = True, threads: int | None = None,
                 steps: Sequence[SelectionStep] | None = None) -> None:
        """`steps`: the steps to expose (e.g. those of the fp32 graph, when a rewrite dropped the metadata)."""
        import onnxruntime as ort

        path = Path(path)
        model = onnx.load(str(path), load_external_data=False)
        self.steps = list(steps) if steps is not None else selection_steps(model)
        existing = {o.name for o in model.graph.output}
        for s in self.steps:
            if s.output not in existing:
                model.graph.output.append(helper.make_tensor_value_info(s.output, TensorProto.INT64, None))
        self.input_names = [i.name for i in model.graph.input]
        so = _session_options(optimize, threads)
        data_bytes = sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))
        if data_bytes < INLINE_LIMIT:
            onnx.load_external_data_for_model(model, str(path.parent))
            self.session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        else:
            # > 2 GB protos cannot be passed as bytes, and ONNX Runtime refuses weights outside the model's
            # directory (symlinks included): hard-link (or copy) the weights beside the modified proto
            with tempfile.TemporaryDirectory(prefix="ficoco-sel-", dir=_tmp_parent(path)) as tmp:
                for loc in {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}:
                    _link_or_copy(path.parent / loc, Path(tmp) / loc)
                copy = Path(tmp) / path.name
                onnx.save_model(model, str(copy))
                self.session = ort.InferenceSession(str(copy), so, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        """(the graph's own outputs by name, the kept indices [B, n_kept] of each step)."""
        out = self.session.run(None, {k: feeds[k] for k in self.input_names})
        by_name = dict(zip(self.output_names, out, strict=True))
        return by_name, [by_name[s.output] for s in self.steps]


INLINE_LIMIT = 1_500_000_000  # bytes: below this the probe's graph is handed to ONNX Runtime in memory


def _tmp_parent(path: Path) -> str | None:
    """A temporary-directory parent on the weights' file system (so a hard link works), if writable."""
    parent = path.parent.parent.parent
    return str(parent) if os.access(parent, os.W_OK) else None


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        import shutil

        shutil.copyfile(src, dst)


def set_differences(ref: np.ndarray, got: np.ndarray) -> list[int]:
    """Per batch row, |set(ref row) - set(got row)|."""
    return [len(set(r.tolist()) - set(g.tolist())) for r, g in zip(ref, got, strict=True)]


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
