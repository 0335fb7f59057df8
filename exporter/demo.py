"""`make demo`: the main job on the embedded tiny model, end to end as far as the toolkit goes today.

plan -> export (check, lint, ONNX Runtime validation) -> answer a question about a scikit-image photo
from the bundle's ONNX graphs, next to the reduced and the unreduced PyTorch model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from rich.console import Console

from exporter.bundle import load_manifest
from exporter.export import ExportOptions
from exporter.pipeline import PlanRequest, export_bundle
from exporter.validate import OrtStages
from ficoco.generation import generate_tokens
from ficoco.images import test_image
from ficoco.inputs import encode_prompt, format_prompt
from ficoco.models import build_tiny
from ficoco.planner import format_table, plan
from ficoco.preprocess import preprocess_image
from ficoco.reduced_llava import ReducedLlava


def main(out: str = "out/demo-tiny-VL-r0.25") -> None:
    console = Console()
    tiny = build_tiny()
    request = PlanRequest(variant="VL", method="ficoco", ratio=0.25)
    schedule = request.make(tiny.geometry)
    console.rule("1. plan: FiCoCo-VL keeping 25 % of the 576 visual tokens")
    console.print(format_table(schedule, tiny.geometry))
    console.rule("2. export: four ONNX graphs, checked, linted for TensorRT 10, validated in ONNX Runtime")
    path = export_bundle(tiny, request, out, ExportOptions(max_batch_size=2), force=True,
                         progress=lambda stage, event: event == "done" and console.print(f"  {stage}: done"))
    manifest = load_manifest(path)
    v = manifest["validation"]
    for stage, r in v["stages"].items():
        console.print(f"  {stage:16s} max |ONNX Runtime - PyTorch| = {r['max_abs_err']:.2e}")
    console.print(f"  greedy tokens over {v['greedy']['steps']} steps identical: {v['greedy']['identical']}")
    console.rule("3. answer from the bundle (ONNX Runtime) vs PyTorch")
    question = "What is in the picture?"
    px = preprocess_image(test_image("chelsea"), tiny.processor_config)
    prompt = encode_prompt(tiny.tokenizer, format_prompt(tiny.chat_template, question), tiny.image_token_id)
    reduced = ReducedLlava(tiny.model, schedule)
    unreduced = ReducedLlava(tiny.model, plan(tiny.geometry, "none"))
    with torch.no_grad():
        answers = {
            "bundle (ONNX Runtime)": generate_tokens(OrtStages(Path(path) / "onnx"), px, prompt.text_ids, prompt.image_offset, 16),
            "reduced PyTorch": reduced.generate(px, prompt.text_ids, prompt.image_offset, 16),
            "unreduced PyTorch": unreduced.generate(px, prompt.text_ids, prompt.image_offset, 16),
        }
    console.print(f"  photo: chelsea (scikit-image), question: {question!r} (tiny has random weights: the words are noise)")
    for name, ids in answers.items():
        console.print(f"  {name:22s} {tiny.tokenizer.decode(ids[0])!r}", highlight=False)
    same = answers["bundle (ONNX Runtime)"].tolist() == answers["reduced PyTorch"].tolist()
    console.print(f"\nbundle == reduced PyTorch: {same}; bundle at {path}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main(*sys.argv[1:])
