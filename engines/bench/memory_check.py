"""Predicted (`ficoco.memory`) vs measured memory of a bundle on ONNX Runtime CPU (`make memory-check`, not in CI).

    python -m engines.bench.memory_check out/smol-vl25 [--model smol --variant VL --ratio 0.25 ...] [--json FILE]

Exports the bundle first when BUNDLE has no manifest (`ficoco-export` in a subprocess, so this process's peak
RSS never sees the export), then in this process: RSS after the imports (base), after opening every graph in
ONNX Runtime (the weights), and after a prefill at the bundle's largest batch and text length plus
max_new_tokens decode steps (the KV cache at its largest, and the arenas' activations); VmHWM is the peak.
The present tensors are then dropped to see how much RSS the KV cache itself held (glibc / the arena may keep
it: then 0). `--no-arena` turns ONNX Runtime's CPU arena off, which makes the peak comparable with the plan's
weights + KV + largest graph's activations; with the arena each of the many sessions keeps its own peak.

Compared with the plan (`plan_memory` at the manifest's precision and shape ranges): weights vs RSS after load
minus base, KV vs the bytes of the presents and vs the RSS they free, and weights + KV + activations vs the
peak minus base (the TensorRT workspace allowance is left out: no TensorRT here). ONNX Runtime CPU upcasts
fp16 weights at load (docs/export-notes.md §7), so compare fp32 bundles.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from engines.bench.profiling import rss_now, rss_peak


def _export(bundle: Path, args: argparse.Namespace) -> float:
    exe = shutil.which("ficoco-export") or str(Path(sys.executable).with_name("ficoco-export"))
    cmd = [exe, "--model", args.model, "--variant", args.variant, "--ratio", str(args.ratio), "--no-validate",
           "--max-batch-size", str(args.max_batch_size), "--max-text-len", str(args.max_text_len),
           "--max-new-tokens", str(args.max_new_tokens), "-o", str(bundle), *args.export_arg]
    print("exporting:", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def _stages(bundle: Path, threads: int | None, arena: bool) -> Any:
    """The bundle's graphs in ONNX Runtime CPU sessions; `arena=False` turns the CPU memory arena off, so a
    graph's activations go back to the allocator after its run instead of staying in the session's arena."""
    from bundle.manifest import load_manifest
    from bundle.names import graph_names
    from bundle.ort import OrtSession, ort_stages, session_options
    from bundle.session import SessionStages

    if arena:
        return ort_stages(bundle / "onnx", provider="cpu", threads=threads)
    segments = load_manifest(bundle, verify=False).decoder_segments()
    sessions = {}
    for graph in graph_names(len(segments)):
        so = session_options(threads)
        so.enable_cpu_mem_arena = False
        sessions[graph] = OrtSession(bundle / "onnx" / f"{graph}.onnx", ["CPUExecutionProvider"], options=so)
    return SessionStages(sessions, segments)


def measure(bundle: Path, threads: int | None = None, arena: bool = True) -> dict[str, Any]:
    import torch

    from bundle.manifest import load_manifest
    from ficoco.memory import ShapeLimits, plan_memory
    from ficoco.schedule import Schedule

    m = load_manifest(bundle, verify=False)
    geometry, schedule = m.geometry_object(), Schedule.from_dict(m.schedule)
    limits = ShapeLimits.from_shape_ranges(m.shape_ranges)
    plan = plan_memory(geometry, schedule, limits, m.precision)
    gc.collect()
    base = rss_now()
    t0 = time.perf_counter()
    stages = _stages(bundle, threads, arena)
    load_s = time.perf_counter() - t0
    gc.collect()
    loaded = rss_now()

    b, t, n = limits.max_batch_size, limits.max_text_len, limits.max_new_tokens
    gen = torch.Generator().manual_seed(0)
    side = geometry.vision.image_size
    t0 = time.perf_counter()
    visual = stages.encode_image(torch.randn(b, 3, side, side, generator=gen))
    vocab = geometry.decoder.vocab_size
    embeds = stages.embed(torch.randint(0, vocab - 1, (b, t), generator=gen))
    _, past = stages.prefill(embeds, visual, torch.full((b,), 1, dtype=torch.long))
    n_v = schedule.decoder.span_in
    for k in range(n):
        tok = stages.embed(torch.randint(0, vocab - 1, (b, 1), generator=gen))
        _, past = stages.step(tok, torch.full((b,), t + n_v + k, dtype=torch.long), past)
    run_s = time.perf_counter() - t0
    del visual, embeds, tok
    gc.collect()
    after = rss_now()
    peak = rss_peak()
    present_bytes = sum(p.numel() * p.element_size() for p in past)
    lengths = [int(p.shape[2]) for p in past[0::2]]
    del past
    gc.collect()
    dropped = rss_now()

    def ratio(measured: int, predicted: int) -> float | None:
        return round(measured / predicted, 4) if predicted else None

    predicted_run = plan.weight_bytes + plan.kv_bytes + plan.activation_bytes
    return {
        "bundle": str(bundle), "precision": m.precision, "cpu_mem_arena": arena, "limits": plan.to_dict()["limits"],
        "load_s": round(load_s, 2), "run_s": round(run_s, 2),
        "rss": {"base": base, "after_load": loaded, "after_run": after, "after_dropping_kv": dropped, "peak": peak},
        "predicted": {"weights": plan.weight_bytes, "kv": plan.kv_bytes, "activations_max": plan.activation_bytes,
                      "activations_sum": plan.activation_sum_bytes, "weights_kv_activations": predicted_run},
        "measured": {"weights_rss": loaded - base, "kv_present_bytes": present_bytes, "kv_rss_freed": after - dropped,
                     "peak_minus_base": peak - base},
        "kv_lengths_match": lengths == list(plan.kv_lengths),
        "ratios": {
            "weights_rss / predicted": ratio(loaded - base, plan.weight_bytes),
            "kv_present / predicted": ratio(present_bytes, plan.kv_bytes),
            "kv_rss_freed / predicted": ratio(after - dropped, plan.kv_bytes),
            "weights_kv_rss (after_run - base) / predicted weights + kv": ratio(after - base, plan.weight_bytes + plan.kv_bytes),
            "peak_minus_base / predicted weights + kv + activations": ratio(peak - base, predicted_run),
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--model", default="smol", help="model to export when BUNDLE has no manifest [default: smol]")
    p.add_argument("--variant", default="VL")
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--max-batch-size", type=int, default=1)
    p.add_argument("--max-text-len", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--export-arg", action="append", default=[], help="one more ficoco-export argument (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads [default: all cores]")
    p.add_argument("--no-arena", action="store_true", help="ONNX Runtime's CPU memory arena off (each session's "
                   "arena otherwise keeps its graph's peak, rounded up to powers of two)")
    p.add_argument("--json", type=Path, help="also write the result to FILE")
    args = p.parse_args(argv)
    export_s = None
    if not (args.bundle / "manifest.json").is_file():
        export_s = _export(args.bundle, args)
    result = measure(args.bundle, args.threads, arena=not args.no_arena)
    result["export_s"] = None if export_s is None else round(export_s, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n", encoding="utf-8")
    within = all(abs(result["ratios"][k] - 1) <= 0.10 for k in ("weights_rss / predicted", "kv_present / predicted"))
    print(f"weights and KV within 10 %: {'yes' if within else 'no'}")
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
