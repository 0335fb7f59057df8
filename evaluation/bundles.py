"""Bundles on the easy-vqa test splits: answers through the runtime beside the reduced PyTorch model.

`evaluate_bundle` runs one bundle (ONNX Runtime or TensorRT) and the PyTorch model reduced with the
bundle's own schedule on the same questions, and counts the answers they agree on.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from bundle.manifest import Manifest


def machine_line() -> str:
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return f"{platform.machine()}, {os.cpu_count()} cores, load {load:.2f}"


def bundle_label(path: Path, manifest: Manifest, backend: str) -> str:
    req = (manifest.quantization or {}).get("request") or {}
    kind = f"vision {req.get('vision')}, decoder {req.get('decoder')}" if req else manifest.precision
    return f"bundle {path.name} ({backend}, {kind})"


def evaluate_bundle(path: Path, backend: str, splits: list, progress, references: dict[str, list]) -> tuple[list, list[dict[str, Any]]]:
    """The bundle through the runtime and the reduced PyTorch model with the bundle's schedule, same questions.

    `references` caches the PyTorch results by (source model, schedule): bundles exported with one schedule
    (fp32, fp16, quantized copies) are compared with one reference run, whose rows appear once."""
    from engines.check import reference_for_bundle
    from engines.runtime import Pipeline
    from evaluation import grid as G
    from ficoco import vqa
    from ficoco.answering import Prompting

    pipe = Pipeline.from_bundle(path, backend=backend)
    loaded, reduced = reference_for_bundle(pipe.manifest)
    sched = reduced.schedule
    label = bundle_label(path, pipe.manifest, pipe.backend)
    got = G.evaluate_stages(label, pipe.stages, Prompting.of_frontend(pipe), splits, sched, {"bundle": str(path)}, progress)
    key = json.dumps([loaded.name, pipe.manifest.schedule], sort_keys=True)
    fresh = key not in references
    if fresh:
        references[key] = G.evaluate_stages(f"PyTorch, schedule of {path.name}", reduced.stages(), Prompting.of_model(loaded),
                                            splits, sched, {"reference_of": str(path)}, progress)
    ref = references[key]
    agree = []
    for g, r, s in zip(got, ref, splits, strict=True):
        same = sum(vqa.normalize_answer(a) == vqa.normalize_answer(b) for a, b in zip(g.predictions, r.predictions, strict=True))
        agree.append({"bundle": str(path), "split": s.name, "n": len(s.questions), "same": same,
                      "bundle_accuracy": g.score["accuracy"], "reference_accuracy": r.score["accuracy"]})
    return got + (ref if fresh else []), agree
