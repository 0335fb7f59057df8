"""One configuration timed in its own fresh process: `python -m engines.bench.worker SPEC.json RESULT.json`.

The sweep (`engines.bench.sweep.run_worker`) writes SPEC.json and starts this module; it times a bundle on
ONNX Runtime (and profiles it when asked) or transformers' PyTorch ``generate``, and writes RESULT.json.
Nothing in the package imports this module, so running it with ``-m`` loads it once.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engines.bench.common import TIMED_FIELDS, resolve_image
from engines.bench.profiling import PROFILE_PASSES, loadavg, profile_bundle, rss_now, rss_peak
from ficoco.atomic import write_atomic

USAGE = "usage: python -m engines.bench.worker SPEC.json RESULT.json (internal; use ficoco-bench)\n"


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def time_bundle(spec: dict[str, Any]) -> dict[str, Any]:
    """The bundle's `Pipeline` on ONNX Runtime (CPU): warm-up and timed greedy runs, EOS ignored; then,
    if ``spec["profile"]``, the profiled pass with the pipeline's sessions released."""
    import gc

    from engines.runtime import Pipeline, Timings

    threads = int(spec["threads"])
    _set_threads(threads)
    base_rss = rss_now()
    load_before = loadavg()
    t0 = time.perf_counter()
    pipe = Pipeline.from_bundle(spec["bundle"], backend="onnxruntime", verify=False, ort_provider="cpu", threads=threads)
    load_s = time.perf_counter() - t0
    px = pipe.preprocess([resolve_image(spec["image"])])
    ids, offsets = pipe.tokenize([spec["prompt"]])
    n_new = int(spec["max_new_tokens"])
    runs: list[dict[str, Any]] = []
    tokens: list[int] = []
    for i in range(int(spec["warmup"]) + int(spec["repeats"])):
        tm = Timings(backend=pipe.backend, batch=1, text_len=int(ids.shape[1]))
        out = pipe.generate_ids(px, ids, offsets, n_new, stop_token_ids=[], timings=tm)
        if i >= int(spec["warmup"]):
            runs.append({k: getattr(tm, k) for k in TIMED_FIELDS})
        tokens = [int(t) for t in out[0].tolist()]
    peak = rss_peak()
    result: dict[str, Any] = {
        "runs": runs, "tokens": tokens, "text_len": int(ids.shape[1]), "load_s": load_s,
        "peak_rss_bytes": peak, "base_rss_bytes": base_rss, "threads": threads,
        "loadavg_1min": [load_before, loadavg()],
    }
    if spec.get("roofline"):  # after the timed runs, so it never competes with them
        from engines.bench.roofline import gemm_peak, model_shapes
        from ficoco.geometry import LlavaGeometry

        geometry = LlavaGeometry.from_dict(pipe.manifest.geometry)
        result["roofline"] = gemm_peak(model_shapes(geometry, int(ids.shape[1])), threads)
    onnx_dir = Path(spec["bundle"]) / "onnx"
    del pipe
    gc.collect()
    if spec.get("profile"):
        result["profile"] = profile_bundle(onnx_dir, px, ids, offsets, threads, warm=int(spec["warmup"]) > 0,
                                           passes=int(spec.get("profile_passes", PROFILE_PASSES)),
                                           trace_dir=Path(spec["trace_dir"]))
    return result


def time_pytorch(spec: dict[str, Any]) -> dict[str, Any]:
    """transformers' ``generate`` of the source model: one call per run, a logits processor stamping each
    token, hooks timing the vision tower and projector; one ``generate(max_new_tokens=1)`` as a cross-check."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from ficoco.inputs import encode_prompt, format_prompt, hf_input_ids
    from ficoco.models import load_model
    from ficoco.preprocess import preprocess_image

    threads = int(spec["threads"])
    _set_threads(threads)
    base_rss = rss_now()
    load_before = loadavg()
    t0 = time.perf_counter()
    loaded = load_model(spec["model"])
    load_s = time.perf_counter() - t0
    model = loaded.model.eval()
    model.generation_config.eos_token_id = None  # ignore EOS, as the bundle runs do (stop ids [])
    px = preprocess_image(resolve_image(spec["image"]), loaded.processor_config).to(model.dtype)
    prompt = encode_prompt(loaded.tokenizer, format_prompt(loaded.chat_template, spec["prompt"]), loaded.image_token_id)
    ids = hf_input_ids(prompt, loaded.image_token_id, loaded.geometry.visual_tokens)
    mask = torch.ones_like(ids)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    n_new = int(spec["max_new_tokens"])

    marks: dict[str, float] = {}  # v0 / v1: the vision tower's start, the projector's end
    stamps: list[float] = []
    hooks = [
        model.model.vision_tower.register_forward_pre_hook(lambda *a: marks.__setitem__("v0", time.perf_counter())),
        model.model.multi_modal_projector.register_forward_hook(lambda *a: marks.__setitem__("v1", time.perf_counter())),
    ]

    class _Stamp(LogitsProcessor):
        """Records when each new token's logits are ready (called once per generated token)."""

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            stamps.append(time.perf_counter())
            return scores

    def gen(n: int) -> tuple[Any, float, float]:
        """One ``generate`` call: its output, its start time and its duration in seconds."""
        marks.clear()
        stamps.clear()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                 pad_token_id=pad, eos_token_id=None, logits_processor=LogitsProcessorList([_Stamp()]))
        return out, start, time.perf_counter() - start

    runs: list[dict[str, Any]] = []
    tokens: list[int] = []
    for i in range(int(spec["warmup"]) + int(spec["repeats"])):
        out, start, _ = gen(n_new)
        new = out[0, ids.shape[1]:].tolist()
        vision_ms = (marks["v1"] - marks["v0"]) * 1e3 if {"v0", "v1"} <= marks.keys() else float("nan")
        ttft_ms = (stamps[0] - start) * 1e3 if stamps else float("nan")  # generate() start -> first token's logits
        decode_s = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0  # first token's logits -> last token's
        if i >= int(spec["warmup"]):
            runs.append({
                "vision_ms": vision_ms,
                "embed_ms": float("nan"),
                "prefill_ms": ttft_ms - vision_ms,
                "ttft_ms": ttft_ms,
                "decode_tokens_per_s": (len(stamps) - 1) / decode_s if decode_s > 0 else float("nan"),
                "step_ms_mean": decode_s * 1e3 / (len(stamps) - 1) if decode_s > 0 else float("nan"),
            })
        tokens = [int(t) for t in new]
    _, _, one_s = gen(1)  # cross-check: a whole generate(max_new_tokens=1) call
    for h in hooks:
        h.remove()
    return {"runs": runs, "tokens": tokens, "text_len": int(prompt.text_ids.shape[1]), "load_s": load_s,
            "peak_rss_bytes": rss_peak(), "base_rss_bytes": base_rss, "threads": threads,
            "generate_max_new_tokens_1_ms": one_s * 1e3, "loadavg_1min": [load_before, loadavg()]}


def worker_main(argv: Sequence[str]) -> int:
    """Run the configuration SPEC.json describes and write its result to RESULT.json; 2 on a bad command line."""
    if len(argv) != 2:
        sys.stderr.write(USAGE)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    spec = json.loads(Path(argv[0]).read_text())
    result = time_pytorch(spec) if spec["kind"] == "pytorch" else time_bundle(spec)
    write_atomic(Path(argv[1]), json.dumps(result, default=str), make_parents=True)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
