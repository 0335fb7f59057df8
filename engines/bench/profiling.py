"""Measuring inside a worker: run statistics, the process's memory and the machine's load, and ONNX Runtime
profiling (the profiled pass over vision, embed and prefill, its trace parsed and attributed to the
graphs' reduction nodes)."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engines.bench.common import PROFILED_STAGES

#: measured profiled passes per configuration (a median of several: one pass is too noisy to trust)
PROFILE_PASSES = 5

# ---------------------------------------------------------------------------------------------------------
# statistics of the timed runs
# ---------------------------------------------------------------------------------------------------------


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """median, min, max, the quartiles and n of a list of measurements (linear-interpolated quantiles)."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return {"n": 0}

    def q(p: float) -> float:
        pos = p * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {"n": len(xs), "median": q(0.5), "min": xs[0], "max": xs[-1], "q1": q(0.25), "q3": q(0.75)}


# ---------------------------------------------------------------------------------------------------------
# memory and load of the worker process
# ---------------------------------------------------------------------------------------------------------


def _proc_status_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_now() -> int:
    """Current resident set size in bytes (Linux /proc; elsewhere the peak so far)."""
    now = _proc_status_bytes("VmRSS")
    return now if now is not None else rss_peak()


def rss_peak() -> int:
    """This process's peak RSS in bytes: VmHWM on Linux (the high-water mark of this process image, reset by
    exec), else ru_maxrss (which on Linux also carries the parent's peak across fork + exec)."""
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


def loadavg() -> float | None:
    """The 1-minute load average (other processes competing for the cores show up here), None if unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------------------
# ONNX Runtime profiles
# ---------------------------------------------------------------------------------------------------------


def load_trace(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The events of an ONNX Runtime profile file (a JSON list; tolerates a missing closing bracket)."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = json.loads(text.rstrip().rstrip(",") + "]")
    return list(data if isinstance(data, list) else data.get("traceEvents", []))


def node_times(events: Sequence[dict[str, Any]], last_runs: int = 1, skip_last: int = 0) -> list[tuple[str, str, float]]:
    """(node name, op type, microseconds) of every node kernel in `last_runs` session runs, counted back
    from the last run but `skip_last` (0: the last runs; 1: the runs before the last one, ...).

    ONNX Runtime writes one ``Session/model_run`` event per `run()` and, per node, ``<name>_kernel_time``
    events (``cat == "Node"``, ``dur`` in µs, ``args.op_name``). Other runs (warm-up, other passes) are
    dropped by keeping the nodes that start inside the chosen model_run windows.
    """
    runs = sorted(
        ((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
    )
    end = len(runs) - skip_last
    windows = runs[max(0, end - last_runs):end] if runs and last_runs > 0 else []
    out: list[tuple[str, str, float]] = []
    for e in events:
        name = str(e.get("name", ""))
        if e.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        ts = float(e.get("ts", 0))
        if windows and not any(lo <= ts <= hi for lo, hi in windows):
            continue
        op = str((e.get("args") or {}).get("op_name", ""))
        out.append((name[: -len("_kernel_time")], op, float(e.get("dur", 0))))
    return out


def graph_node_of(name: str, graph_nodes: set[str]) -> str | None:
    """The graph node a profiled kernel comes from: itself, or for a node ONNX Runtime created by fusion
    (``<original>/MatMulScaleFusion/``, ``<original>/GatherSliceToSplitFusion``) the original before the
    first slash; None for nodes the runtime inserted (layout transposes such as ``Transpose_token_4``)."""
    if name in graph_nodes:
        return name
    head = name.split("/", 1)[0]
    return head if head in graph_nodes else None


def reduction_share(
    nodes: Sequence[tuple[str, str, float]], reduction: set[str], graph_nodes: set[str], top: int = 8
) -> dict[str, Any]:
    """Per-stage attribution: ms in reduction nodes, in all nodes, in nodes no graph node accounts for
    (inserted by ONNX Runtime), and the top op types by time."""
    nodes = [(graph_node_of(n, graph_nodes) or n, op, d) for n, op, d in nodes]
    total = sum(d for _, _, d in nodes)
    red = sum(d for n, _, d in nodes if n in reduction)
    unknown = sum(d for n, _, d in nodes if n not in graph_nodes)
    by_op: dict[str, float] = {}
    for _, op, d in nodes:
        by_op[op] = by_op.get(op, 0.0) + d
    ops = sorted(by_op.items(), key=lambda kv: -kv[1])[:top]
    return {
        "reduction_ms": red / 1e3,
        "total_node_ms": total / 1e3,
        "share": (red / total) if total > 0 else 0.0,
        "unattributed_ms": unknown / 1e3,
        "nodes_profiled": len(nodes),
        "reduction_nodes_in_graph": len(reduction),
        "reduction_nodes_profiled": sum(1 for n, _, _ in nodes if n in reduction),
        "top_ops_ms": {op: d / 1e3 for op, d in ops},
    }


def _merge_shares(parts: Sequence[dict[str, Any]], top: int = 8) -> dict[str, Any]:
    """One stage's attribution from its graphs' (`reduction_share` of each): times and counts summed."""
    out: dict[str, Any] = {}
    for key in ("reduction_ms", "total_node_ms", "unattributed_ms", "nodes_profiled", "reduction_nodes_in_graph",
                "reduction_nodes_profiled"):
        out[key] = sum(p[key] for p in parts)
    out["share"] = out["reduction_ms"] / out["total_node_ms"] if out["total_node_ms"] > 0 else 0.0
    ops: dict[str, float] = {}
    for p in parts:
        for op, ms in p["top_ops_ms"].items():
            ops[op] = ops.get(op, 0.0) + ms
    out["top_ops_ms"] = dict(sorted(ops.items(), key=lambda kv: -kv[1])[:top])
    return out


def profile_bundle(onnx_dir: Path, px: Any, ids: Any, offsets: Any, threads: int, *, warm: bool, trace_dir: Path,
                   passes: int = PROFILE_PASSES) -> dict[str, Any]:
    """Profile vision, embed and prefill again (a warm-up pass first if `warm`, then `passes` measured
    passes); the reduction share per stage from the node events. The prefill stage is the decoder splice,
    every segment and every reduction graph (`bundle.session.SessionStages.prefill`), its figures the sum
    over those graphs. One pass is noisy (other processes, caches), so each stage reports its median pass
    by kernel time (every figure from that one pass, so they stay consistent), with every pass's kernel
    time and reduction share beside it (`passes`, `total_node_ms_all`, `share_all`)."""
    import onnx

    from bundle.manifest import load_manifest
    from bundle.names import EMBED, VISION
    from bundle.ort import OrtSession, session_options
    from bundle.session import SessionStages
    from exporter.regions import has_namespaces, reduction_node_names

    trace_dir.mkdir(parents=True, exist_ok=True)
    segments = load_manifest(onnx_dir.parent, verify=False).decoder_segments()
    sessions: dict[str, OrtSession] = {}
    graphs: dict[str, tuple[set[str], set[str], bool]] = {}
    for path in sorted(onnx_dir.glob("*.onnx")):
        proto = onnx.load(str(path), load_external_data=False)
        graphs[path.stem] = (reduction_node_names(proto), {n.name for n in proto.graph.node}, has_namespaces(proto))
        del proto
        so = session_options(threads)
        so.enable_profiling = True
        so.profile_file_prefix = str(trace_dir / path.stem)
        sessions[path.stem] = OrtSession(path, options=so)
    stages = SessionStages(sessions, segments)
    passes = max(1, int(passes))
    for _ in range(passes + (1 if warm else 0)):
        visual = stages.encode_image(px)
        stages.prefill(stages.embed(ids), visual, offsets)
    # parts[stage][k]: that stage's graphs in pass k (counted back from the last)
    parts: dict[str, list[list[dict[str, Any]]]] = {stage: [[] for _ in range(passes)] for stage in PROFILED_STAGES}
    traces: dict[str, list[str]] = {stage: [] for stage in PROFILED_STAGES}
    namespaced: dict[str, bool] = dict.fromkeys(PROFILED_STAGES, True)
    for graph, sess in sessions.items():
        stage = graph if graph in (VISION, EMBED) else PROFILED_STAGES[2]
        trace = sess.session.end_profiling()
        reduction, names, spaced = graphs[graph]
        events = load_trace(trace)
        for k in range(passes):  # each graph runs once per pass
            parts[stage][k].append(reduction_share(node_times(events, last_runs=1, skip_last=k), reduction, names))
        traces[stage].append(str(trace))
        namespaced[stage] = namespaced[stage] and spaced
    out: dict[str, Any] = {}
    for stage in PROFILED_STAGES:
        merged = [_merge_shares(p) for p in reversed(parts[stage])]  # in running order
        median = sorted(merged, key=lambda m: m["total_node_ms"])[(len(merged) - 1) // 2]
        out[stage] = {**median, "passes": passes, "total_node_ms_all": [m["total_node_ms"] for m in merged],
                      "share_all": [m["share"] for m in merged], "namespaces": namespaced[stage], "traces": traces[stage]}
    sessions.clear()
    return out

