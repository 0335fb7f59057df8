"""`make demo`: the main job on the embedded tiny model, end to end.

plan -> export (check, lint, ONNX Runtime validation) -> the bundled runtime streams an answer about a
scikit-image photo -> the answer is compared with the reduced and the unreduced PyTorch model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from rich.console import Console

from engines.runtime import Pipeline
from exporter.bundle import load_manifest
from exporter.export import ExportOptions
from exporter.pipeline import PlanRequest, export_bundle
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
    console.rule("3. the bundled runtime answers (streamed), then the same question to PyTorch")
    question = "What is in the picture?"
    photo = Path(path).parent / "demo-chelsea.png"
    test_image("chelsea").save(photo)
    console.print(f"  $ ficoco-run {path} --image {photo} --prompt {question!r} --max-new-tokens 16")
    pipe = Pipeline.from_bundle(path, backend="auto")
    console.print("  answer: ", end="")
    answer = pipe.generate(photo, question, max_new_tokens=16, stop_token_ids=[],
                           on_text=lambda text: console.print(text, end="", highlight=False, markup=False))
    console.print()
    px = preprocess_image(test_image("chelsea"), tiny.processor_config)
    prompt = encode_prompt(tiny.tokenizer, format_prompt(tiny.chat_template, question), tiny.image_token_id)
    reduced = ReducedLlava(tiny.model, schedule)
    unreduced = ReducedLlava(tiny.model, plan(tiny.geometry, "none"))
    with torch.no_grad():
        ref = reduced.generate(px, prompt.text_ids, prompt.image_offset, 16)[0].tolist()
        full = unreduced.generate(px, prompt.text_ids, prompt.image_offset, 16)[0].tolist()
    console.print("  (tiny has random weights: the words are noise; what matters is that they agree)")
    console.print(f"  reduced PyTorch    {tiny.tokenizer.decode(ref)!r}", highlight=False)
    console.print(f"  unreduced PyTorch  {tiny.tokenizer.decode(full)!r}", highlight=False)
    same = answer.token_ids == ref
    console.print(f"\nruntime ({pipe.backend}) == reduced PyTorch: {same}; bundle at {path}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main(*sys.argv[1:])
