"""Paired decode timing: two bundles' decode steps interleaved, step for step (`make decode-pair`).

A decode step's gain from a shorter cache is a few percent at most (below), which separate runs cannot
resolve on a machine whose speed drifts with other load. So both bundles (typically the unreduced one
and a reduced one) are prefilled once on the same image and prompt, and then their decode steps
alternate, A B B A A B ..., each timed on its own: drift hits both alike, and the order within a pair is
swapped every other pair. Each bundle runs in a worker process of its own, and the two are stepped in
lock-step over pipes: loaded into one process, the bundle loaded second decoded ~20 % faster whichever it
was (docs/bench.md), so a shared process is not a fair pairing (`--in-process` still measures that way). The report gives each side's step time (median and
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


def _result(side: dict[str, Any]) -> dict[str, Any]:
    """What a side hands back once its steps are done."""
    return {k: side[k] for k in ("times", "tokens", "kv_lengths")}


class _InProcess:
    """A side whose pipeline lives in this process."""

    def __init__(self, pipe: Any, image: Any, prompt: str) -> None:
        self.side = _side(pipe, image, prompt)
        self.bundle = str(pipe.bundle)

    def step(self, timed: bool) -> None:
        _step(self.side, timed)

    def finish(self) -> dict[str, Any]:
        return _result(self.side)


def _worker(conn: Any, bundle: str, threads: int | None, image: str, prompt: str) -> None:
    """A side in its own process: load, prefill, then one decode step per "step" message (lock-step)."""
    from engines.bench.common import resolve_image
    from engines.runtime import Pipeline

    try:
        pipe = Pipeline.from_bundle(bundle, backend="onnxruntime", ort_provider="cpu", threads=threads, verify=False)
        side = _side(pipe, resolve_image(image), prompt)
        conn.send(("ready", None))
        while True:
            msg = conn.recv()
            if msg == "finish":
                conn.send(("result", _result(side)))
                return
            _step(side, timed=bool(msg))
            conn.send(("stepped", None))
    except Exception as err:  # reported to the parent, which raises it
        conn.send(("error", f"{type(err).__name__}: {err}"))


class _OwnProcess:
    """A side whose pipeline lives in a child process of its own, stepped in lock-step over a pipe: neither
    side shares a process (its memory, its thread pools) with the other, so the one loaded second does not
    gain what it gained in a shared process (docs/bench.md: two runs still differ beyond their intervals)."""

    def __init__(self, bundle: str | Path, threads: int | None, image: str, prompt: str) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.bundle = str(bundle)
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, self.bundle, threads, image, prompt), daemon=True)
        self.proc.start()
        self._expect("ready")

    def _expect(self, kind: str) -> Any:
        got, payload = self.conn.recv()
        if got == "error":
            raise RuntimeError(f"decode worker for {self.bundle}: {payload}")
        assert got == kind, (got, kind)
        return payload

    def step(self, timed: bool) -> None:
        self.conn.send(timed)
        self._expect("stepped")

    def finish(self) -> dict[str, Any]:
        self.conn.send("finish")
        out = self._expect("result")
        self.proc.join(timeout=30)
        return out


def _interleave(sides: list[Any], steps: int, warmup: int) -> list[dict[str, Any]]:
    """A B, then B A, in alternate pairs; every step timed by the side that runs it."""
    for i in range(warmup + steps):
        order = sides if (i // 2) % 2 == 0 else sides[::-1]
        for side in order:
            side.step(timed=i >= warmup)
    return [side.finish() for side in sides]


def paired_decode(a: Any, b: Any, image: Any, prompt: str, steps: int = 128, warmup: int = 8) -> dict[str, Any]:
    """Interleave `steps` timed decode steps (after `warmup` untimed ones) of pipelines `a` and `b`, both in
    this process (their load order can bias the result: `paired_decode_processes` avoids that)."""
    results = _interleave([_InProcess(a, image, prompt), _InProcess(b, image, prompt)], steps, warmup)
    text_len = int(a.tokenize([prompt])[0].shape[1])
    return _report(results, [str(a.bundle), str(b.bundle)], [_decode_flops(a, text_len), _decode_flops(b, text_len)],
                   steps, warmup, prompt, text_len, "one process")


def paired_decode_processes(a: Path, b: Path, image: str, prompt: str, steps: int = 128, warmup: int = 8,
                            threads: int | None = None) -> dict[str, Any]:
    """`paired_decode` with each bundle in a process of its own, stepped in lock-step."""
    from bundle.frontend import Frontend

    sides = [_OwnProcess(a, threads, image, prompt), _OwnProcess(b, threads, image, prompt)]
    try:
        results = _interleave(sides, steps, warmup)
    finally:
        for s in sides:
            if s.proc.is_alive():
                s.proc.terminate()
    pa, pb = (Frontend.from_bundle(p, verify=False) for p in (a, b))  # the planner's figures: manifest and tokenizer
    text_len = int(pa.tokenize([prompt])[0].shape[1])
    return _report(results, [str(a), str(b)], [_decode_flops(pa, text_len), _decode_flops(pb, text_len)],
                   steps, warmup, prompt, text_len, "a process per bundle, in lock-step")


def _report(results: list[dict[str, Any]], bundles: list[str], flops: list[float | None], steps: int, warmup: int,
            prompt: str, text_len: int, layout: str) -> dict[str, Any]:
    sa, sb = (_summary(r["times"]) for r in results)
    lo, hi = _ratio_interval(results[0]["times"], results[1]["times"])
    fa, fb = flops
    return {
        "steps": steps, "warmup": warmup, "prompt": prompt, "text_tokens": text_len, "layout": layout,
        "a": {"bundle": bundles[0], **sa, "kv_lengths": results[0]["kv_lengths"], "decode_gflops_per_token": None if fa is None else fa * 1e3},
        "b": {"bundle": bundles[1], **sb, "kv_lengths": results[1]["kv_lengths"], "decode_gflops_per_token": None if fb is None else fb * 1e3},
        "step_ratio_a_over_b": sa["median_ms"] / sb["median_ms"], "step_ratio_95": [lo, hi],
        "flops_ratio_a_over_b": (fa / fb) if fa and fb else None,
        "same_tokens": results[0]["tokens"] == results[1]["tokens"],
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def render_markdown(r: dict[str, Any]) -> str:
    def kv(lengths: list[int]) -> str:
        return ", ".join(str(n) for n in lengths)

    load = "–" if r.get("loadavg_1min") is None else f"{r['loadavg_1min']:.2f}"
    lines = [
        "# Paired decode timing", "",
        f"Command: `make decode-pair` (`python -m engines.bench.decode_pair`). {r['steps']} timed steps per side after "
        f"{r['warmup']} warm-up, interleaved A B / B A ({r.get('layout', 'one process')}); {r['text_tokens']} text tokens; 1-minute load "
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
    ap.add_argument("--in-process", action="store_true",
                    help="load both bundles in this process (the bundle loaded second can run faster: docs/bench.md) "
                         "[default: a process per bundle, stepped in lock-step]")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from bundle.frontend import Frontend
    from bundle.layout import BundleError
    from engines.bench.common import BenchInputError, resolve_image
    from ficoco.atomic import write_atomic

    if args.steps < 2 or args.warmup < 0:
        raise SystemExit("error: --steps must be at least 2 and --warmup at least 0")
    try:
        for p in (args.a, args.b):
            Frontend.from_bundle(p, verify=False)
        image = resolve_image(args.image)
    except (BundleError, BenchInputError, OSError) as err:
        raise SystemExit(f"error: {err}") from None
    if args.in_process:
        from engines.runtime import Pipeline

        pipes = [Pipeline.from_bundle(p, backend="onnxruntime", ort_provider="cpu", threads=args.threads, verify=False)
                 for p in (args.a, args.b)]
        report = paired_decode(pipes[0], pipes[1], image, args.prompt, args.steps, args.warmup)
    else:
        report = paired_decode_processes(args.a, args.b, args.image, args.prompt, args.steps, args.warmup, args.threads)
    write_atomic(args.json, json.dumps(report, indent=1) + "\n", make_parents=True)
    write_atomic(args.md, render_markdown(report), make_parents=True)
    print(render_markdown(report))

if __name__ == "__main__":
    main()
