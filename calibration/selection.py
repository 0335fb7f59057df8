"""Does quantization change which visual tokens the reduction keeps?

The probe that exposes every reduction step's kept set T is `exporter.probe`; its `ProbeStages` runs a
whole bundle with the probes in place of the graphs that select: the vision encoder (every vision step) and
each decoder reduction graph `decoder_reduce_{s}` (decoder step s; docs/export-notes.md §14). `compare`
reports per step how many kept indices differ as sets (|T_fp32 \\ T_quant| summed over the images; equal
to the number of differing sources, since |T| is fixed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from exporter.probe import (
    ProbeStages,
    SelectionProbe,
    SelectionStep,
    selection_steps,
    set_differences,
)

__all__ = ["ProbeStages", "SelectionProbe", "SelectionStep", "compare", "selection_steps", "set_differences", "summary"]


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
