"""Numbers for a quantized bundle against the fp32 bundle it came from, on ONNX Runtime CPU.

Per graph of the bundle: file size. Per stage: latency (vision, prefill: median of `repeats` runs, batch 1; the
prefill stage is the splice, every decoder segment and the reductions between them); max
absolute error and cosine similarity of the stage outputs (each stage fed the *same* fp32 inputs, so the
error is that graph's own; `bundle.compare.error_stats`); greedy token agreement over `new_tokens`
tokens (end to end, quantized vision -> quantized decoder; `bundle.compare.token_agreement`); and the
selection check of `calibration.selection`, per reduction step: vision on the same pixels, prefill on
the same inputs ("isolated") and end to end; the decoder's kept sets are read out of its reduction graphs
(`decoder_reduce_{s}`, one step each, `calibration.selection.ProbeStages`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bundle.compare import ErrorStats, error_stats, token_agreement
from bundle.names import PREFILL, VISION, graph_names
from calibration import selection as S
from exporter.probe import ProbeStages
from ficoco.generation import generate_tokens


@dataclass(frozen=True)
class EvalOptions:
    images: int = 3  # bundled photos (ficoco.images.TEST_IMAGES order) used for errors, selection, greedy
    new_tokens: int = 16  # greedy tokens compared end to end
    repeats: int = 3  # timed runs per stage (median reported), after one warm-up
    question: str = "What is in the picture?"
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _worst(items: list[ErrorStats]) -> dict[str, float]:
    return {"max_abs_err": max(i.max_abs_err for i in items), "mean_abs_err": float(np.mean([i.mean_abs_err for i in items])),
            "cosine_min": min(i.cosine for i in items)}


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 3)


def file_sizes(fp32_dir: Path, quant_dir: Path, graphs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per graph (with its external data): the fp32 and the quantized bytes on disk."""
    from calibration.quantize import graph_bytes

    out = {}
    for g in graphs:
        a, b = graph_bytes(fp32_dir / f"{g}.onnx"), graph_bytes(quant_dir / f"{g}.onnx")
        out[g] = {"fp32_bytes": a, "quantized_bytes": b, "ratio": round(b / a, 4) if a else None}
    return out


def evaluate(fp32_bundle: Path, quant_bundle: Path, opts: EvalOptions, *, optimize_quant: bool = True) -> dict[str, Any]:
    """Compare the quantized bundle with the fp32 one (see the module docstring); returns the report dict."""
    from bundle.frontend import Frontend
    from ficoco.images import test_images

    front = Frontend.from_bundle(fp32_bundle, verify=False)
    ref = ProbeStages(fp32_bundle / "onnx", threads=opts.threads)
    q = ProbeStages(quant_bundle / "onnx", optimize=optimize_quant, threads=opts.threads, like=ref)
    photos = test_images()[: max(1, opts.images)]
    ids, offset = front.tokenize([opts.question])
    n_new = max(1, min(opts.new_tokens, front.max_new_tokens_limit))
    vis_err, pre_err, pre_e2e_err = [], [], []
    sel_v: tuple[list, list] = ([], [])
    sel_p: tuple[list, list, list] = ([], [], [])
    agree: list[float] = []
    first_div: list[int | None] = []
    same_all = True
    with torch.inference_mode():
        embeds = ref.embed(ids)
        for _, image in photos:
            px = front.preprocess([image])
            vr = ref.encode_image(px)
            sel_v[0].append(ref.vision_selection)
            vq = q.encode_image(px)
            sel_v[1].append(q.vision_selection)
            vis_err.append(error_stats(vq, vr))
            lr, _ = ref.prefill(embeds, vr, offset)
            sel_p[0].append(ref.prefill_selection)
            lqi, _ = q.prefill(embeds, vr, offset)
            sel_p[1].append(q.prefill_selection)
            pre_err.append(error_stats(lqi, lr))
            lqe, _ = q.prefill(q.embed(ids), vq, offset)
            sel_p[2].append(q.prefill_selection)
            pre_e2e_err.append(error_stats(lqe, lr))
            tr = generate_tokens(ref, px, ids, offset, n_new)[0].tolist()
            tokens = token_agreement(generate_tokens(q, px, ids, offset, n_new)[0].tolist(), tr)
            agree.append(tokens.match_rate)
            first_div.append(tokens.first_divergence)
            same_all = same_all and tokens.identical
        px0 = front.preprocess([photos[0][1]])
        vis0 = ref.encode_image(px0)
        latency = {
            VISION: {"fp32_ms": _median_ms(lambda: ref.encode_image(px0), opts.repeats),
                     "quantized_ms": _median_ms(lambda: q.encode_image(px0), opts.repeats)},
            PREFILL: {"fp32_ms": _median_ms(lambda: ref.prefill(embeds, vis0, offset), opts.repeats),
                      "quantized_ms": _median_ms(lambda: q.prefill(embeds, vis0, offset), opts.repeats)},
        }
    for v in latency.values():
        v["speedup"] = round(v["fp32_ms"] / v["quantized_ms"], 3) if v["quantized_ms"] else None
    vsteps = S.compare(sel_v[0], sel_v[1], ref.vision.steps)
    psteps = ref.prefill_steps
    piso = S.compare(sel_p[0], sel_p[1], psteps)
    pe2e = S.compare(sel_p[0], sel_p[2], psteps)
    return {
        "images": [n for n, _ in photos],
        "question": opts.question,
        "ort_graph_optimizations": optimize_quant,
        "sizes": file_sizes(fp32_bundle / "onnx", quant_bundle / "onnx", graph_names(len(ref.segments))),
        "latency_ort_cpu": latency,
        "errors": {VISION: _worst(vis_err), f"{PREFILL}:logits": _worst(pre_err),
                   f"{PREFILL}:logits_end_to_end": _worst(pre_e2e_err)},
        "greedy": {"new_tokens": n_new, "agreement_mean": round(float(np.mean(agree)), 4),
                   "identical": same_all, "first_divergence": first_div},
        "selection": {
            VISION: {"summary": S.summary(vsteps), "steps": vsteps},
            f"{PREFILL}:isolated": {"summary": S.summary(piso), "steps": piso},
            f"{PREFILL}:end_to_end": {"summary": S.summary(pe2e), "steps": pe2e},
        },
        "options": opts.to_dict(),
    }
