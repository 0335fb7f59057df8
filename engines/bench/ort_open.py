"""What opening one bundle graph in ONNX Runtime costs in memory (`make ort-open`, not in CI).

    python -m engines.bench.ort_open GRAPH.onnx [GRAPH.onnx ...] [--json FILE] [--md FILE]

For every graph, two fresh processes each open it once on the CPU provider, as a kept-loaded session does
(every graph optimization, constant folding included) and as a low-memory session does (constant
folding off, `bundle.ort.LOW_MEMORY_DISABLED_OPTIMIZERS`). Each reports, above its RSS just before the
open: the peak while opening (the kernel's ru_maxrss), the RSS once open, after the session is released,
and after `bundle.ort.trim_heap` hands the freed heap back; and the open's seconds. This is where the
export's low-memory validation spends its memory beside the PyTorch reference (docs/export-notes.md §16).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GiB = 2**30
MODES = ("folded", "unfolded")


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _child(path: str, mode: str) -> dict[str, Any]:
    import gc

    import onnxruntime as ort

    from bundle.ort import LOW_MEMORY_DISABLED_OPTIMIZERS, session_options, trim_heap

    extra = {"disabled_optimizers": list(LOW_MEMORY_DISABLED_OPTIMIZERS)} if mode == "unfolded" else {}
    so = session_options()
    trim_heap()
    base = _rss()
    t0 = time.perf_counter()
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"], **extra)
    seconds = time.perf_counter() - t0
    open_rss = _rss()
    # the kernel's high-water mark is synced lazily and can trail the current RSS by a few pages
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, open_rss)
    del sess
    gc.collect()
    closed = _rss()
    trim_heap()
    trimmed = _rss()
    return {"graph": path, "mode": mode, "open_seconds": round(seconds, 2), "baseline_bytes": base,
            "peak_bytes": peak - base, "open_bytes": open_rss - base, "after_close_bytes": closed - base,
            "after_trim_bytes": trimmed - base}


def render_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["# Opening a graph in ONNX Runtime: memory", "",
             "Command: `make ort-open` (`python -m engines.bench.ort_open`). GiB above the process's RSS just before the "
             "open; each row a fresh process.", "",
             "| graph | weights on disk GiB | mode | open s | peak while opening | open | after release | after trim_heap |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{Path(r['graph']).name}` | {r['weights_bytes'] / GiB:.2f} | {r['mode']} | {r['open_seconds']:.1f} | "
                     f"{r['peak_bytes'] / GiB:.2f} | {r['open_bytes'] / GiB:.2f} | {r['after_close_bytes'] / GiB:.2f} | "
                     f"{r['after_trim_bytes'] / GiB:.2f} |")
    load = f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "–"
    lines += ["", "folded: every graph optimization (a kept-loaded session); unfolded: without ConstantFolding "
              f"(a low-memory session). 1-minute load average at the end: {load}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("graphs", nargs="*", type=Path, help="ONNX graph files (their .data beside them)")
    ap.add_argument("--json", type=Path, default=Path("reports/ort-open.json"))
    ap.add_argument("--md", type=Path, default=Path("reports/ort-open.md"))
    ap.add_argument("--child", nargs=2, metavar=("GRAPH", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1])))
        return 0
    if not args.graphs:
        ap.error("give at least one graph file (BUNDLE/onnx/NAME.onnx)")
    if not sys.platform.startswith("linux"):
        raise SystemExit("error: ort_open reads /proc/self/status (Linux only)")
    from ficoco.atomic import write_atomic

    rows = []
    for g in args.graphs:
        if not g.is_file():
            raise SystemExit(f"error: {g} is not a file; give the path of a bundle graph (BUNDLE/onnx/NAME.onnx)")
        data = g.with_name(g.name + ".data")
        for mode in MODES:
            out = subprocess.run([sys.executable, "-m", "engines.bench.ort_open", "--child", str(g), mode],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"error: opening {g} ({mode}) failed:\n{out.stderr[-2000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["weights_bytes"] = data.stat().st_size if data.is_file() else 0
            rows.append(row)
            print(f"{g.name} {mode}: peak {row['peak_bytes'] / GiB:.2f} GiB, open {row['open_seconds']:.1f} s", flush=True)
    write_atomic(args.json, json.dumps(rows, indent=1) + "\n", make_parents=True)
    write_atomic(args.md, render_markdown(rows), make_parents=True)
    print(render_markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
