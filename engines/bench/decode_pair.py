"""Paired decode timing: two bundles' decode steps interleaved in one process (`make decode-pair`).

A decode step's gain from a shorter cache is a few percent at most (below), which separate runs cannot
resolve on a machine whose speed drifts with other load. So both bundles (typically the unreduced one
and a reduced one) are loaded in one process, each prefilled once on the same image and prompt, and then
their decode steps alternate, A B B A A B ..., each timed on its own: drift hits both alike, and the
order within a pair is swapped every other pair. The report gives each side's step time (median and
quartiles over the timed steps), tokens/s, the ratio of the medians with a 95 % bootstrap interval, the
per-layer KV lengths each side decodes over, and what the planner's FLOPs predict for the ratio
(`ficoco.flops.flops_report`'s ``decode_per_token``).

Why the gain is small: a decode step reads every weight once for one token (matrix-vector products), and
only the attention's score and value products (4 · L · d per layer) and the copy of the cache into the
next step's inputs grow with the cache length L. At LLaVA-7B width (d = 4096, MLP 11008) a layer's
projections and MLP are ~400 MFLOP per token and its attention over L = 600 ~10 MFLOP, so cutting L to a
quarter in some layers saves 1-2 % of a step.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def _side(pipe: Any, image: Any, prompt: str) -> dict[str, Any]:
    px = pipe.preprocess([image])
    ids, offsets = pipe.tokenize([prompt])
    st = pipe.stages
    visual = st.encode_image(px)
    logits, past = st.prefill(st.embed(ids), visual, offsets)
    return {"stages": st, "past": past, "token": np.argmax(logits, axis=-1).astype(np.int64),
            "position": np.full((1,), ids.shape[1] + visual.shape[1], dtype=np.int64),
            "kv_lengths": [int(p.shape[2]) for p in past[0::2]], "times": [], "tokens": []}


def _step(side: dict[str, Any], timed: bool) -> None:
    st = side["stages"]
    t0 = time.perf_counter()
    logits, side["past"] = st.step(st.embed(side["token"][:, None]), side["position"], side["past"])
    st.synchronize()
    if timed:
        side["times"].append((time.perf_counter() - t0) * 1e3)
    side["token"] = np.argmax(logits, axis=-1).astype(np.int64)
    side["position"] = side["position"] + 1
    side["tokens"].append(int(side["token"][0]))


def _ratio_interval(a: list[float], b: list[float], seed: int = 0, draws: int = 2000) -> tuple[float, float]:
    """95 % bootstrap interval of median(a) / median(b), resampling the paired steps together."""
    rng = np.random.default_rng(seed)
    x, y = np.asarray(a), np.asarray(b)
    idx = rng.integers(0, len(x), size=(draws, len(x)))
    r = np.median(x[idx], axis=1) / np.median(y[idx], axis=1)
    return float(np.quantile(r, 0.025)), float(np.quantile(r, 0.975))


def _summary(times: list[float]) -> dict[str, float]:
    q = np.quantile(np.asarray(times), [0.25, 0.5, 0.75])
    return {"n": len(times), "median_ms": float(q[1]), "q1_ms": float(q[0]), "q3_ms": float(q[2]),
            "tokens_per_s": 1e3 / float(q[1])}


def _decode_flops(pipe: Any, text_tokens: int) -> float | None:
    try:
        from ficoco.flops import flops_report
        from ficoco.geometry import LlavaGeometry
        from ficoco.schedule import Schedule
    except ImportError:  # the runtime-only install has the timings, not the planner
        return None
    s = Schedule.from_dict(pipe.manifest.schedule)
    g = LlavaGeometry.from_dict(pipe.manifest.geometry)
    return float(flops_report(g, s.vision, s.decoder, text_tokens=text_tokens)["decode_per_token"])  # TFLOPs


def paired_decode(a: Any, b: Any, image: Any, prompt: str, steps: int = 128, warmup: int = 8) -> dict[str, Any]:
    """Interleave `steps` timed decode steps (after `warmup` untimed ones) of pipelines `a` and `b`."""
    sides = [_side(a, image, prompt), _side(b, image, prompt)]
    for i in range(warmup + steps):
        order = sides if (i // 2) % 2 == 0 else sides[::-1]  # A B, then B A, in alternate pairs
        for side in order:
            _step(side, timed=i >= warmup)
    sa, sb = (_summary(s["times"]) for s in sides)
    lo, hi = _ratio_interval(sides[0]["times"], sides[1]["times"])
    text_len = int(a.tokenize([prompt])[0].shape[1])
    fa, fb = _decode_flops(a, text_len), _decode_flops(b, text_len)
    return {
        "steps": steps, "warmup": warmup, "prompt": prompt, "text_tokens": text_len,
        "a": {"bundle": str(a.bundle), **sa, "kv_lengths": sides[0]["kv_lengths"], "decode_gflops_per_token": None if fa is None else fa * 1e3},
        "b": {"bundle": str(b.bundle), **sb, "kv_lengths": sides[1]["kv_lengths"], "decode_gflops_per_token": None if fb is None else fb * 1e3},
        "step_ratio_a_over_b": sa["median_ms"] / sb["median_ms"], "step_ratio_95": [lo, hi],
        "flops_ratio_a_over_b": (fa / fb) if fa and fb else None,
        "same_tokens": sides[0]["tokens"] == sides[1]["tokens"],
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def render_markdown(r: dict[str, Any]) -> str:
    def kv(lengths: list[int]) -> str:
        return ", ".join(str(n) for n in lengths)

    load = "–" if r.get("loadavg_1min") is None else f"{r['loadavg_1min']:.2f}"
    lines = [
        "# Paired decode timing", "",
        f"Command: `make decode-pair` (`python -m engines.bench.decode_pair`). {r['steps']} timed steps per side after "
        f"{r['warmup']} warm-up, interleaved A B / B A in one process; {r['text_tokens']} text tokens; 1-minute load "
        f"average at the end {load}.", "",
        "| side | bundle | step ms (median [q1–q3]) | tokens/s | KV length per layer at the first step | decode GFLOP/token |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("a", "b"):
        s = r[name]
        gf = "–" if s["decode_gflops_per_token"] is None else f"{s['decode_gflops_per_token']:.2f}"
        lines.append(f"| {name.upper()} | `{s['bundle']}` | {s['median_ms']:.2f} [{s['q1_ms']:.2f}–{s['q3_ms']:.2f}] | "
                     f"{s['tokens_per_s']:.2f} | {kv(s['kv_lengths'])} | {gf} |")
    lo, hi = r["step_ratio_95"]
    fr = r.get("flops_ratio_a_over_b")
    predicted = f"; FLOPs predict {fr:.3f}" if fr else ""
    lines += ["", f"Step time A / B: {r['step_ratio_a_over_b']:.3f} (95 % bootstrap interval {lo:.3f}–{hi:.3f}){predicted}.", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path, help="first bundle (e.g. the unreduced one)")
    ap.add_argument("b", type=Path, help="second bundle (e.g. FiCoCo-VL 0.25)")
    ap.add_argument("--steps", type=int, default=128, help="timed decode steps per side [default: 128]")
    ap.add_argument("--warmup", type=int, default=8, help="untimed steps per side first [default: 8]")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime CPU threads [default: all cores]")
    ap.add_argument("--image", default="astronaut", help="a bundled photo name or an image file [default: astronaut]")
    ap.add_argument("--prompt", default="What is in the picture?")
    ap.add_argument("--json", type=Path, default=Path("reports/decode-pair.json"))
    ap.add_argument("--md", type=Path, default=Path("reports/decode-pair.md"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from engines.bench.common import resolve_image
    from engines.runtime import Pipeline
    from ficoco.atomic import write_atomic

    if args.steps < 2 or args.warmup < 0:
        raise SystemExit("error: --steps must be at least 2 and --warmup at least 0")
    pipes = [Pipeline.from_bundle(p, backend="onnxruntime", ort_provider="cpu", threads=args.threads, verify=False)
             for p in (args.a, args.b)]
    report = paired_decode(pipes[0], pipes[1], resolve_image(args.image), args.prompt, args.steps, args.warmup)
    write_atomic(args.json, json.dumps(report, indent=1) + "\n", make_parents=True)
    write_atomic(args.md, render_markdown(report), make_parents=True)
    print(render_markdown(report))


if __name__ == "__main__":
    main()
