"""Graphs shared by the bundles of one sweep: export each once, link it into every bundle that has it.

A ratio sweep exports one bundle per ratio from one loaded model. Most of what those bundles hold does not
depend on the ratio: the token embedding, and, when the decoder's reduction steps sit in the same blocks,
every decoder segment (`ficoco.segments`: the decoder's weights). Only the vision encoder (its budgets), the
splice (the number of visual tokens it takes) and the weightless reduction graphs (their budgets) change.

`GraphReuse` names each graph by what it is made of (`graph_key`): the graph's name, the export options,
and for a segment the blocks whose attention and MLP it runs and whether it ends in a reduction or the LM
head; for the vision encoder its schedule. Nothing else enters a segment's computation
(`ReducedLlava.run_segment`), and the shape ranges a segment is exported with (its token and past axes)
are symbolic dimensions whose bounds live in the manifest's TensorRT profiles, not in the graph. The
sweep's test exports the same segments at two ratios without reuse and asserts that the files are
byte-identical, which is what makes linking them safe.

A reused graph is hard-linked into the new bundle's staging directory (copied where the two directories
are on different file systems), with its external-data file; bundles are never written after they are
made, so sharing the inodes is safe. The keys are only valid for one loaded model: a `GraphReuse` lives
for one sweep.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bundle.names import EMBED, VISION, segment_index

log = logging.getLogger(__name__)


def graph_key(graph: str, model: Any, export: dict[str, Any], source: dict[str, Any]) -> str | None:
    """What graph `graph` of the reduced model `model` is made of, as a digest (`source`: the model's
    name, origin and revision); None for a graph that depends on the budgets (splice, reductions), which
    is never shared."""
    what: dict[str, Any]
    seg = segment_index(graph)
    if graph == EMBED:
        what = {}
    elif graph == VISION:
        sch = model.schedule
        what = {"vision": asdict(sch.vision), "method": sch.method, "preset": sch.preset}
    elif seg is not None:
        s = model.segments[seg]
        what = {"opening_mlp": s.opening_mlp, "attention_blocks": list(s.attention_blocks),
                "closing_block": None if s.closing_step is None else s.closing_step.layer}
    else:
        return None
    blob = json.dumps({"graph": graph, "export": export, "source": source, **what}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


@dataclass
class GraphReuse:
    """The graphs of the bundles exported so far in one sweep, by `graph_key`."""

    files: dict[str, Path] = field(default_factory=dict)  # key -> the .onnx file in a finished bundle
    reused: list[str] = field(default_factory=list)  # "<bundle>/<graph>" linked instead of exported

    def take(self, key: str | None, dst: Path, bundle: str) -> bool:
        """Link the graph named `key` (and its external data) to `dst`, a graph file of the bundle being
        made (`bundle`: its name, for the record); False when none is known."""
        src = self.files.get(key) if key is not None else None
        if src is None or not src.is_file():
            return False
        dst.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(src, dst)
        data = src.with_name(src.name + ".data")
        if data.is_file():
            _link_or_copy(data, dst.with_name(dst.name + ".data"))
        self.reused.append(f"{bundle}/{dst.stem}")
        log.info("%s: the same graph as %s (linked, not exported again)", dst.stem, src.parent.parent.name)
        return True

    def remember(self, keys: dict[str, str | None], bundle: Path, onnx_dir: str) -> None:
        """Register the graphs of the finished bundle `bundle` under their keys (graph name -> key)."""
        for graph, key in keys.items():
            if key is not None and key not in self.files:
                self.files[key] = bundle / onnx_dir / f"{graph}.onnx"
