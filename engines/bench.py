"""`ficoco-bench BUNDLE`: measured speed, memory and theoretical FLOPs of a ratio sweep, in one run.

What one run does (so that every number in a report comes from the same machine state):

1. Reads BUNDLE's manifest (source model, variant, method, preset, the layer ranges of its schedule, its
   export options) and plans a sweep: the unreduced model (variant ``none``, ratio 1.0) and, for every
   ``--variants`` entry, every ``--ratios`` entry. Bundles missing for the sweep are exported with
   `exporter.pipeline.export_bundle` (validation off: that is ficoco-check's job; BUNDLE's export options)
   into ``--work-dir``, one directory per request keyed by a hash of it, so a re-run reuses them. BUNDLE
   itself serves its own (variant, ratio) entry; ``--also`` adds extra bundles (e.g. a quantized copy).
2. Times every configuration in its own fresh subprocess (``python -m engines.bench --worker``): the
   runtime's `Pipeline` on ONNX Runtime (CPU provider, ``--threads`` intra-op threads) generates greedily
   with EOS ignored; ``--warmup`` runs are dropped, ``--repeats`` runs are kept; per-stage times come from
   `engines.runtime.Timings` (vision, embed, prefill, TTFT = vision start to first token, decode tokens/s).
   Peak memory is the worker's own peak RSS (``VmHWM`` of /proc/self/status) read right after the
   timed runs, so each configuration's figure holds its sessions and nothing of another's; the RSS after
   imports (before any session) is reported beside it as the baseline.
3. One extra profiled pass per configuration: the vision, embed and prefill graphs are reloaded with ONNX
   Runtime profiling on (``SessionOptions.enable_profiling``; the decode-step graph has no reduction
   nodes and is not profiled), run once to warm up and once measured; the JSON trace's node events of the
   measured pass are classified with `exporter.regions.reduction_node_names` and summed per stage. Nodes
   that ONNX Runtime created by fusion (names not in the graph) are reported as unattributed.
4. transformers' PyTorch ``generate`` of the unreduced model (greedy, same image and prompt, same number
   of new tokens, EOS ignored, ``torch.set_num_threads(--threads)``). One ``generate`` call per run, with
   a logits processor stamping the time each token's logits are ready: TTFT runs from the call to the first
   stamp (what ``generate(max_new_tokens=1)`` takes, less one greedy pick; one such call is also timed and
   reported as a cross-check), decode tokens/s from the first stamp to the last; vision time from hooks on
   the vision tower and projector, prefill = TTFT − vision (so it includes ``generate``'s own overhead).

Theoretical FLOPs are the planner's (`ficoco.flops.flops_report`: vision + decoder prefill, lm_head
excluded) at the prompt's real text length. The reports ``bench.json``, ``bench.md`` and ``bench.png``
go to ``BUNDLE/reports/`` (``--report-dir``), each written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from engines.cli import CONTEXT, _guarded, _setup_logging
from ficoco.atomic import atomic_path

log = logging.getLogger(__name__)

REPORT_SCHEMA = 1
DEFAULT_RATIOS: tuple[float, ...] = (1.0, 0.5, 0.25, 0.11)
SWEEP_VARIANTS: tuple[str, ...] = ("V", "L", "VL")
#: the issue's target: measured TTFT speedup >= TARGET_EFFICIENCY x the theoretical FLOPs speedup
TARGET_EFFICIENCY = 0.9
PROFILED_STAGES: tuple[str, ...] = ("vision_encoder", "embed_tokens", "decoder_prefill")
TIMED_FIELDS: tuple[str, ...] = ("vision_ms", "embed_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s", "step_ms_mean")
DEFAULT_IMAGE = "astronaut"
DEFAULT_PROMPT = "What is in the picture?"


class BenchInputError(ValueError):
    """A bench request that cannot be served (bad option, unusable bundle); exit status 2."""


class BenchFailed(RuntimeError):
    """A configuration's worker failed while running (the message carries the tail of its log); exit 1."""


# ---------------------------------------------------------------------------------------------------------
# options and configurations
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchOptions:
    """Everything one `ficoco-bench` run is asked to do (the CLI flags, parsed and checked)."""

    bundle: Path
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    variants: tuple[str, ...] = ()  # empty: the bundle's own variant
    also: tuple[Path, ...] = ()
    work_dir: Path | None = None  # default: BUNDLE/../.bench-<name>
    report_dir: Path | None = None  # default: BUNDLE/reports
    warmup: int = 1
    repeats: int = 3
    max_new_tokens: int = 16
    threads: int = 0  # 0: every core this process may use
    image: str = DEFAULT_IMAGE
    prompt: str = DEFAULT_PROMPT
    pytorch: bool = True
    profile: bool = True
    verify: bool = True
    layers: dict[str, int | None] = field(default_factory=dict)  # v_start, v_end, l_start, l_end overrides

    def resolved_threads(self) -> int:
        return self.threads if self.threads > 0 else available_cores()

    def resolved_work_dir(self) -> Path:
        return self.work_dir if self.work_dir is not None else self.bundle.resolve().parent / f".bench-{self.bundle.resolve().name}"

    def resolved_report_dir(self) -> Path:
        return self.report_dir if self.report_dir is not None else self.bundle / "reports"


@dataclass
class ConfigSpec:
    """One configuration to time: a bundle (BUNDLE, a sibling, an --also) or transformers' generate."""

    label: str
    kind: str  # "bundle" | "pytorch"
    role: str  # "unreduced" | "sweep" | "also" | "pytorch"
    variant: str
    method: str
    ratio: float
    bundle: str | None = None
    origin: str = ""  # "BUNDLE" | "exported" | "cached" | "--also" | "transformers"
    schedule: dict[str, Any] | None = None
    request: dict[str, Any] | None = None


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_ratios(text: str) -> tuple[float, ...]:
    """'1.0,0.5,0.25' -> (1.0, 0.5, 0.25); each in (0, 1], no duplicates."""
    out: list[float] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            r = float(part)
        except ValueError as err:
            raise BenchInputError(f"--ratios: {part!r} is not a number; give fractions kept in (0, 1], e.g. 1.0,0.5,0.25") from err
        if not 0.0 < r <= 1.0 or math.isnan(r):
            raise BenchInputError(f"--ratios: {r} is outside (0, 1]; a ratio is the fraction of visual tokens kept (0.25 keeps 144 of 576)")
        if r not in out:
            out.append(r)
    if not out:
        raise BenchInputError("--ratios is empty; give e.g. 1.0,0.5,0.25,0.11")
    return tuple(out)


def parse_variants(text: str | None) -> tuple[str, ...]:
    """'V,L,VL' -> ('V', 'L', 'VL') (case-insensitive); None -> () meaning the bundle's own variant."""
    if text is None:
        return ()
    out: list[str] = []
    for part in text.split(","):
        v = part.strip().upper()
        if not v:
            continue
        if v not in SWEEP_VARIANTS:
            raise BenchInputError(f"--variants: {part.strip()!r} is not one of {', '.join(SWEEP_VARIANTS)} (ratio 1.0 is always the unreduced model)")
        if v not in out:
            out.append(v)
    if not out:
        raise BenchInputError("--variants is empty; give e.g. VL or V,L,VL")
    return tuple(out)


def layer_ranges(schedule: dict[str, Any]) -> dict[str, int]:
    """The block ranges a schedule's steps span: v_start/v_end (vision) and l_start/l_end (decoder)."""
    out: dict[str, int] = {}
    for stage, (lo, hi) in (("vision", ("v_start", "v_end")), ("decoder", ("l_start", "l_end"))):
        layers = [int(s["layer"]) for s in (schedule.get(stage) or {}).get("steps", [])]
        if layers:
            out[lo], out[hi] = min(layers), max(layers)
    return out


def sibling_request(manifest: dict[str, Any], variant: str, ratio: float, overrides: dict[str, int | None] | None = None) -> Any:
    """The `PlanRequest` of a sweep entry: BUNDLE's method, preset, positions and layer ranges, this budget.

    Ratio 1.0 is the unreduced model (variant "none"). Layer ranges come from BUNDLE's schedule for the
    stages the variant reduces (V: vision, L: decoder, VL: both), `overrides` win; a stage BUNDLE does not
    reduce gets the planner's defaults.
    """
    from exporter.pipeline import PlanRequest

    asked = manifest.get("plan_request") or {}  # recorded since manifest schema 2
    text_tokens = int(asked.get("text_tokens", 60))
    if ratio >= 1.0:
        return PlanRequest(variant="none", method=manifest.get("method", "ficoco"), ratio=None,
                           preset=manifest.get("preset", "paper"), positions=manifest.get("positions", "compact"),
                           text_tokens=text_tokens)
    ranges = {**layer_ranges(manifest.get("schedule") or {}), **{k: v for k, v in (overrides or {}).items() if v is not None}}
    keep = {"V": ("v_start", "v_end"), "L": ("l_start", "l_end"), "VL": ("v_start", "v_end", "l_start", "l_end")}[variant]
    return PlanRequest(
        variant=variant,
        method=manifest.get("method", "ficoco"),
        ratio=ratio,
        preset=manifest.get("preset", "paper"),
        positions=manifest.get("positions", "compact"),
        layers={k: ranges[k] for k in keep if k in ranges},
        text_tokens=text_tokens,
    )


def request_key(source: dict[str, Any], request: Any, export: dict[str, Any]) -> str:
    """sha256 of (model name + revision, plan request, export options): the sibling cache key."""
    blob = json.dumps({"model": [source.get("name"), source.get("revision")], "request": asdict(request), "export": export},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _same_schedule(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("variant", "method", "preset", "positions", "vision", "decoder")
    norm = lambda d: json.loads(json.dumps({k: d.get(k) for k in keys}))  # noqa: E731  (tuples vs lists)
    return bool(norm(a) == norm(b))


def _label(variant: str, ratio: float) -> str:
    return "unreduced (1.0)" if variant == "none" else f"{variant} {ratio:g}"


def model_ref(manifest: dict[str, Any]) -> str:
    """The name `load_model` needs to rebuild BUNDLE's source model (a built-in, an alias, a local dir)."""
    from ficoco.models import ALIASES, BUILTINS

    src = manifest.get("source_model") or {}
    name, source = str(src.get("name") or ""), str(src.get("source") or "")
    if name in BUILTINS or name in ALIASES:
        return name
    if source and Path(source).is_dir():
        return source
    if "/" in source and not source.startswith("builtin:") and not Path(source).exists():
        return source  # a HF repo id in the local cache
    return name


# ---------------------------------------------------------------------------------------------------------
# statistics, profile parsing, agreement
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


def load_trace(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The events of an ONNX Runtime profile file (a JSON list; tolerates a missing closing bracket)."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = json.loads(text.rstrip().rstrip(",") + "]")
    return list(data if isinstance(data, list) else data.get("traceEvents", []))


def node_times(events: Sequence[dict[str, Any]], last_runs: int = 1) -> list[tuple[str, str, float]]:
    """(node name, op type, microseconds) of every node kernel in the last `last_runs` session runs.

    ONNX Runtime writes one ``Session/model_run`` event per `run()` and, per node, ``<name>_kernel_time``
    events (``cat == "Node"``, ``dur`` in µs, ``args.op_name``). Earlier runs (warm-up) are dropped by
    keeping the nodes that start inside the last `last_runs` model_run windows.
    """
    runs = sorted(
        ((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
    )
    windows = runs[-last_runs:] if runs and last_runs > 0 else []
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


def token_agreement(tokens: Sequence[int], reference: Sequence[int]) -> dict[str, float | int]:
    """Positional greedy-token agreement with a reference run, and the length of the common prefix."""
    n = min(len(tokens), len(reference))
    if n == 0:
        return {"agreement": 0.0, "prefix": 0, "compared": 0}
    same = sum(1 for a, b in zip(tokens[:n], reference[:n], strict=True) if a == b)
    prefix = next((i for i in range(n) if tokens[i] != reference[i]), n)
    return {"agreement": same / n, "prefix": prefix, "compared": n}


# ---------------------------------------------------------------------------------------------------------
# worker (runs in its own process: one configuration, fresh memory)
# ---------------------------------------------------------------------------------------------------------


def _proc_status_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss_now() -> int:
    """Current resident set size in bytes (Linux /proc; elsewhere the peak so far)."""
    now = _proc_status_bytes("VmRSS")
    return now if now is not None else _rss_peak()


def _rss_peak() -> int:
    """This process's peak RSS in bytes: VmHWM on Linux (the high-water mark of this process image, reset by
    exec), else ru_maxrss (which on Linux also carries the parent's peak across fork + exec)."""
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


def _loadavg() -> float | None:
    """The 1-minute load average (other processes competing for the cores show up here), None if unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def resolve_image(spec: str) -> Any:
    """An image file path, or the name of a built-in test photo (ficoco.images)."""
    from ficoco.preprocess import load_image

    if Path(spec).expanduser().is_file():
        return load_image(Path(spec).expanduser())
    from ficoco.images import test_image, test_images

    names = [n for n, _ in test_images()]
    if spec in names:
        return test_image(spec)
    raise BenchInputError(f"--image {spec!r} is neither an image file nor a built-in test photo ({', '.join(names)})")


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _worker_bundle(spec: dict[str, Any]) -> dict[str, Any]:
    import gc

    from engines.runtime import Pipeline, Timings

    threads = int(spec["threads"])
    _set_threads(threads)
    base_rss = _rss_now()
    load_before = _loadavg()
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
    peak = _rss_peak()
    result: dict[str, Any] = {
        "runs": runs, "tokens": tokens, "text_len": int(ids.shape[1]), "load_s": load_s,
        "peak_rss_bytes": peak, "base_rss_bytes": base_rss, "threads": threads,
        "loadavg_1min": [load_before, _loadavg()],
    }
    onnx_dir = Path(spec["bundle"]) / "onnx"
    del pipe
    gc.collect()
    if spec.get("profile"):
        result["profile"] = _profile_bundle(onnx_dir, px, ids, offsets, threads, warm=int(spec["warmup"]) > 0,
                                            trace_dir=Path(spec["trace_dir"]))
    return result


def _profile_bundle(onnx_dir: Path, px: Any, ids: Any, offsets: Any, threads: int, *, warm: bool, trace_dir: Path) -> dict[str, Any]:
    """Profile vision, embed and prefill once more (a warm-up pass, then the measured pass); share per stage."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from exporter.regions import has_namespaces, reduction_node_names
    from exporter.validate import session_options

    trace_dir.mkdir(parents=True, exist_ok=True)
    sessions: dict[str, Any] = {}
    graphs: dict[str, tuple[set[str], set[str], bool]] = {}
    for stage in PROFILED_STAGES:
        path = onnx_dir / f"{stage}.onnx"
        proto = onnx.load(str(path), load_external_data=False)
        graphs[stage] = (reduction_node_names(proto), {n.name for n in proto.graph.node}, has_namespaces(proto))
        del proto
        so = session_options(threads)
        so.enable_profiling = True
        so.profile_file_prefix = str(trace_dir / stage)
        sessions[stage] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def feed(stage: str, values: dict[str, Any]) -> dict[str, Any]:
        types = {i.name: i.type for i in sessions[stage].get_inputs()}
        np_types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32}
        return {k: np.ascontiguousarray(np.asarray(v), dtype=np_types.get(types[k], None)) for k, v in values.items()}

    px_np, ids_np, off_np = px.numpy(), ids.numpy(), offsets.numpy()
    passes = 2 if warm else 1
    for _ in range(passes):
        visual = sessions["vision_encoder"].run(None, feed("vision_encoder", {"pixel_values": px_np}))[0]
        embeds = sessions["embed_tokens"].run(None, feed("embed_tokens", {"input_ids": ids_np}))[0]
        sessions["decoder_prefill"].run(None, feed("decoder_prefill", {"inputs_embeds": embeds, "visual_tokens": visual, "image_offset": off_np}))
    out: dict[str, Any] = {}
    for stage in PROFILED_STAGES:
        trace = sessions[stage].end_profiling()
        nodes = node_times(load_trace(trace), last_runs=1)
        reduction, names, namespaced = graphs[stage]
        out[stage] = {**reduction_share(nodes, reduction, names), "namespaces": namespaced, "trace": str(trace)}
    sessions.clear()
    return out


def _worker_pytorch(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from ficoco.inputs import encode_prompt, format_prompt, hf_input_ids
    from ficoco.models import load_model
    from ficoco.preprocess import preprocess_image

    threads = int(spec["threads"])
    _set_threads(threads)
    base_rss = _rss_now()
    load_before = _loadavg()
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

    marks: dict[str, float] = {}
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

    def gen(n: int) -> tuple[Any, float]:
        stamps.clear()
        start = time.perf_counter()
        marks["g0"] = start
        with torch.inference_mode():
            out = model.generate(input_ids=ids, pixel_values=px, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                 pad_token_id=pad, eos_token_id=None, logits_processor=LogitsProcessorList([_Stamp()]))
        return out, time.perf_counter() - start

    runs: list[dict[str, Any]] = []
    tokens: list[int] = []
    for i in range(int(spec["warmup"]) + int(spec["repeats"])):
        marks.clear()
        out, total_s = gen(n_new)
        new = out[0, ids.shape[1]:].tolist()
        start = marks.get("g0", float("nan"))
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
    _, one_s = gen(1)  # cross-check: a whole generate(max_new_tokens=1) call
    for h in hooks:
        h.remove()
    return {"runs": runs, "tokens": tokens, "text_len": int(prompt.text_ids.shape[1]), "load_s": load_s,
            "peak_rss_bytes": _rss_peak(), "base_rss_bytes": base_rss, "threads": threads,
            "generate_max_new_tokens_1_ms": one_s * 1e3, "loadavg_1min": [load_before, _loadavg()]}


def _worker_cli(argv: Sequence[str]) -> int:
    """`python -m engines.bench --worker SPEC.json RESULT.json`: run one configuration, write its result."""
    if len(argv) != 3 or argv[0] != "--worker":
        sys.stderr.write("usage: python -m engines.bench --worker SPEC.json RESULT.json (internal; use ficoco-bench)\n")
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    spec = json.loads(Path(argv[1]).read_text())
    result = _worker_pytorch(spec) if spec["kind"] == "pytorch" else _worker_bundle(spec)
    _write_text(Path(argv[2]), json.dumps(result, default=_json_default))
    return 0


def run_worker(spec: dict[str, Any], scratch: Path, timeout_s: float | None = None) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter; its result dict, or BenchFailed with its log's tail."""
    scratch.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log_path = scratch / "spec.json", scratch / "result.json", scratch / "worker.log"
    out_path.unlink(missing_ok=True)
    _write_text(spec_path, json.dumps(spec, default=_json_default))
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), PYTHONWARNINGS="ignore")
    with open(log_path, "w") as logf:
        proc = subprocess.run(
            [sys.executable, "-m", "engines.bench", "--worker", str(spec_path), str(out_path)],
            stdout=logf, stderr=subprocess.STDOUT, env=env, timeout=timeout_s, check=False,
        )
    if proc.returncode != 0 or not out_path.is_file():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise BenchFailed(f"{spec.get('label')}: worker exited with status {proc.returncode} (log {log_path}):\n{tail}")
    return json.loads(out_path.read_text())


# ---------------------------------------------------------------------------------------------------------
# planning the sweep, exporting the siblings
# ---------------------------------------------------------------------------------------------------------


def plan_configs(manifest: dict[str, Any], opts: BenchOptions) -> list[ConfigSpec]:
    """The sweep's bundle configurations in report order (unreduced first), without exporting anything."""
    from ficoco.geometry import LlavaGeometry

    if manifest.get("graph_only"):
        raise BenchInputError(f"{opts.bundle} is a --graph-only bundle (no weights); export it with weights to benchmark it")
    geometry = LlavaGeometry.from_dict(manifest["geometry"])
    own_variant = str(manifest.get("variant", "none"))
    variants = opts.variants or ((own_variant,) if own_variant in SWEEP_VARIANTS else ("VL",))
    entries: list[tuple[str, float]] = [("none", 1.0)]
    entries += [(v, r) for v in variants for r in opts.ratios if r < 1.0]
    own = manifest.get("schedule") or {}
    configs: list[ConfigSpec] = []
    for variant, ratio in entries:
        request = sibling_request(manifest, variant, ratio, opts.layers)
        schedule = request.make(geometry)
        sched = schedule.to_dict()
        is_own = _same_schedule(sched, own)
        configs.append(ConfigSpec(
            label=_label(variant, ratio), kind="bundle", role="unreduced" if variant == "none" else "sweep",
            variant=variant, method=schedule.method, ratio=ratio,
            bundle=str(opts.bundle.resolve()) if is_own else None, origin="BUNDLE" if is_own else "",
            schedule=sched, request=asdict(request),
        ))
    for extra in opts.also:
        from exporter.bundle import load_manifest

        m = load_manifest(extra, verify=opts.verify)
        final = int((m.get("visual_tokens") or {}).get("final", 0))
        total = int((m.get("schedule") or {}).get("visual_tokens_in", 576)) or 576
        configs.append(ConfigSpec(
            label=f"also: {extra.name}", kind="bundle", role="also", variant=str(m.get("variant")), method=str(m.get("method")),
            ratio=final / total, bundle=str(extra.resolve()), origin="--also", schedule=m.get("schedule"),
        ))
    return configs


def ensure_bundles(
    configs: list[ConfigSpec], manifest: dict[str, Any], opts: BenchOptions, say: Callable[[str], None]
) -> None:
    """Fill in `bundle` for every sweep entry: a cached sibling under the work dir, or a fresh export."""
    from exporter import bundle as B
    from exporter.export import ExportOptions
    from exporter.pipeline import PlanRequest, ValidationOptions, export_bundle

    work = opts.resolved_work_dir()
    export = dict(manifest.get("export") or {})
    export["graph_only"] = False
    source = manifest.get("source_model") or {}
    loaded: Any = None
    for cfg in configs:
        if cfg.bundle is not None or cfg.request is None:
            continue
        layers = cfg.request.get("layers") or {}
        request = PlanRequest(**{**cfg.request, "layers": dict(layers)})
        key = request_key(source, request, export)
        name = f"{source.get('name') or 'model'}-{cfg.variant}-{cfg.method}-r{cfg.ratio:g}-{key[:12]}"
        target = work / name
        if (target / B.MANIFEST).is_file():
            try:
                m = B.load_manifest(target, verify=opts.verify)
                if _same_schedule(m.get("schedule") or {}, cfg.schedule or {}):
                    cfg.bundle, cfg.origin = str(target), "cached"
                    say(f"{cfg.label}: cached {target}")
                    continue
            except B.BundleError as err:
                say(f"{cfg.label}: cached bundle unusable ({err}); exporting it again")
        if loaded is None:
            loaded = _load_source_model(manifest, say)
        say(f"{cfg.label}: exporting into {target} (validation off)")
        t0 = time.perf_counter()
        export_bundle(loaded, request, target, ExportOptions(**export), ValidationOptions(enabled=False), force=True, lint=False)
        cfg.bundle, cfg.origin = str(target), "exported"
        say(f"{cfg.label}: exported in {time.perf_counter() - t0:.0f} s")
    if loaded is not None:  # give the source model's memory back before the timed workers start
        del loaded
        import gc

        gc.collect()


def _load_source_model(manifest: dict[str, Any], say: Callable[[str], None]) -> Any:
    from ficoco.models import ModelNotFoundError, load_model

    ref = model_ref(manifest)
    say(f"loading the source model {ref!r} to export the sweep's bundles")
    try:
        loaded = load_model(ref)
    except ModelNotFoundError as err:
        raise BenchInputError(f"the sweep needs BUNDLE's source model to export its other ratios: {err}") from err
    want = (manifest.get("source_model") or {}).get("revision")
    if want and loaded.revision != want:
        raise BenchInputError(
            f"BUNDLE was exported from {ref} revision {want}, but this machine has revision {loaded.revision}; "
            "the sweep would compare different weights. Re-export BUNDLE from this model, or point --work-dir at "
            "bundles exported from the same weights."
        )
    return loaded


# ---------------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------------


def _flops(schedule: dict[str, Any] | None, text_tokens: int, geometry: Any) -> dict[str, float]:
    from ficoco.flops import flops_report
    from ficoco.schedule import Schedule

    if schedule is None:
        return {}
    s = Schedule.from_dict(schedule)
    f = flops_report(geometry, s.vision, s.decoder, text_tokens=text_tokens)
    return {k: f[k] for k in ("vision", "prefill", "total", "decode_per_token")}


def _median(summary: dict[str, Any] | None) -> float:
    if not summary or not summary.get("n"):
        return float("nan")
    return float(summary["median"])


def _ratio(a: float, b: float) -> float | None:
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or b == 0:
        return None
    return a / b


def build_report(
    configs: Sequence[ConfigSpec], results: dict[str, dict[str, Any]], errors: dict[str, str], manifest: dict[str, Any],
    opts: BenchOptions, geometry: Any, step_reduction_nodes: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Aggregate the workers' results into the bench.json structure (speedups, FLOPs ratios, agreement)."""
    text_len = next((int(r["text_len"]) for r in results.values() if "text_len" in r), 0)
    entries: list[dict[str, Any]] = []
    for cfg in configs:
        res = results.get(cfg.label, {})
        runs = res.get("runs", [])
        timings = {k: summarize([r[k] for r in runs if r.get(k) is not None and math.isfinite(r[k])]) for k in TIMED_FIELDS}
        vt = None
        if cfg.schedule:
            vt = {"to_decoder": int(cfg.schedule["decoder"]["span_in"]),
                  "final": int(cfg.schedule["decoder"]["span_in"]) - sum(int(s["r"]) for s in cfg.schedule["decoder"]["steps"])}
        entry: dict[str, Any] = {
            "label": cfg.label, "kind": cfg.kind, "role": cfg.role, "variant": cfg.variant, "method": cfg.method,
            "ratio": cfg.ratio, "bundle": cfg.bundle, "origin": cfg.origin, "visual_tokens": vt,
            "layers": layer_ranges(cfg.schedule or {}),
            "flops_tflops": _flops(cfg.schedule, text_len, geometry) if cfg.schedule else {},
            "timings": timings, "runs": runs, "tokens": res.get("tokens", []),
            "load_s": res.get("load_s"), "peak_rss_bytes": res.get("peak_rss_bytes"), "base_rss_bytes": res.get("base_rss_bytes"),
            "profile": res.get("profile"), "error": errors.get(cfg.label),
            "loadavg_1min": res.get("loadavg_1min"),
        }
        if "generate_max_new_tokens_1_ms" in res:
            entry["generate_max_new_tokens_1_ms"] = res["generate_max_new_tokens_1_ms"]
        if cfg.kind == "pytorch":
            entry["flops_tflops"] = {}
        entries.append(entry)
    ref = next((e for e in entries if e["role"] == "unreduced"), None)
    torch_e = next((e for e in entries if e["role"] == "pytorch"), None)
    ref_flops = (ref or {}).get("flops_tflops", {}).get("total")
    for e in entries:
        tot = e["flops_tflops"].get("total")
        e["flops_ratio"] = _ratio(tot, ref_flops) if tot is not None and ref_flops else None  # reduced / unreduced
        e["flops_speedup"] = _ratio(ref_flops, tot) if tot else None  # unreduced / reduced
        stage_flops = {s: _ratio(e["flops_tflops"].get(s), (ref or {}).get("flops_tflops", {}).get(s)) for s in ("vision", "prefill")} if ref else {}
        ttft = _median(e["timings"].get("ttft_ms"))
        e["ttft_speedup"] = _ratio(_median(ref["timings"].get("ttft_ms")), ttft) if ref else None
        e["ttft_speedup_vs_pytorch"] = _ratio(_median(torch_e["timings"].get("ttft_ms")), ttft) if torch_e else None
        e["stage_speedups"] = {
            s: {"measured": _ratio(_median(ref["timings"].get(f"{s}_ms")), _median(e["timings"].get(f"{s}_ms"))) if ref else None,
                "flops": _ratio(1.0, stage_flops.get(s)) if stage_flops.get(s) else None}
            for s in ("vision", "prefill")
        }
        e["efficiency"] = _ratio(e["ttft_speedup"], e["flops_speedup"]) if e["flops_speedup"] else None
        e["meets_target"] = (e["efficiency"] >= TARGET_EFFICIENCY) if (e["efficiency"] is not None and e["role"] == "sweep") else None
        if ref and ref.get("tokens") and e["tokens"] and e is not ref:
            e["agreement"] = token_agreement(e["tokens"], ref["tokens"])
        else:
            e["agreement"] = {"agreement": 1.0, "prefix": len(e["tokens"]), "compared": len(e["tokens"])} if e is ref else None
        prof = e.get("profile") or {}
        red = sum(p.get("reduction_ms", 0.0) for p in prof.values())
        tot_ms = sum(p.get("total_node_ms", 0.0) for p in prof.values())
        e["reduction_share"] = (red / tot_ms) if tot_ms > 0 else None
        e["profiled_node_ms"] = tot_ms if tot_ms > 0 else None
    # A second speedup estimate from the profiled pass (kernel time only, one pass, taken right after the timed
    # runs): less exposed to other processes' load than wall-clock TTFT, blind to framework overhead.
    ref_prof = (ref or {}).get("profile") or {}
    for e in entries:
        prof = e.get("profile") or {}
        e["profile_speedup"] = _ratio((ref or {}).get("profiled_node_ms"), e.get("profiled_node_ms"))
        e["profile_efficiency"] = _ratio(e["profile_speedup"], e["flops_speedup"]) if e["flops_speedup"] else None
        for s, graph in (("vision", "vision_encoder"), ("prefill", "decoder_prefill")):
            e["stage_speedups"][s]["profiled"] = _ratio((ref_prof.get(graph) or {}).get("total_node_ms"), (prof.get(graph) or {}).get("total_node_ms"))
    if step_reduction_nodes is not None:
        for e in entries:
            if e.get("bundle") in step_reduction_nodes and e.get("profile"):
                e["profile"]["decoder_step"] = {"profiled": False, "reduction_nodes_in_graph": step_reduction_nodes[e["bundle"]],
                                                "note": "no reduction nodes in the step graph" if not step_reduction_nodes[e["bundle"]] else "not profiled"}
    import onnxruntime
    import torch

    target_entry = next((e for e in entries if e["role"] == "sweep" and e["variant"] == "VL" and abs(e["ratio"] - 0.25) < 1e-9), None)
    return {
        "schema": REPORT_SCHEMA,
        "bundle": str(opts.bundle.resolve()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source_model": manifest.get("source_model"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cores_available": available_cores(), "threads": opts.resolved_threads(),
                    "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "options": {"ratios": list(opts.ratios), "variants": sorted({c.variant for c in configs if c.role == "sweep"}),
                    "warmup": opts.warmup, "repeats": opts.repeats, "max_new_tokens": opts.max_new_tokens,
                    "image": opts.image, "prompt": opts.prompt, "ignore_eos": True, "backend": "onnxruntime (CPUExecutionProvider)",
                    "profile": opts.profile, "pytorch": opts.pytorch},
        "text_tokens": text_len,
        "notes": [
            "flops_tflops: ficoco.flops at the prompt's real text length; vision + decoder prefill, lm_head and embedding excluded.",
            "flops_ratio = reduced / unreduced total FLOPs; flops_speedup = its inverse; efficiency = ttft_speedup / flops_speedup.",
            "peak_rss_bytes: the configuration's own worker process (VmHWM after the timed runs, before profiling); base_rss_bytes: RSS after imports.",
            "reduction share: ONNX Runtime profile of one pass of vision + embed + prefill after a warm-up pass; "
            "node events attributed with exporter.regions.reduction_node_names.",
            "load avg: the machine's 1-minute load average when the configuration's worker started and when its timed "
            "runs ended; a load above the thread count means other processes competed for the cores and the "
            "configurations' times are not comparable.",
        ],
        "target": {"rule": f"ttft_speedup >= {TARGET_EFFICIENCY} x flops_speedup at VL 0.25",
                   "config": target_entry["label"] if target_entry else None,
                   "efficiency": target_entry["efficiency"] if target_entry else None,
                   "met": target_entry["meets_target"] if target_entry else None,
                   "profile_efficiency": target_entry["profile_efficiency"] if target_entry else None},
        "configs": entries,
    }


def _fmt(x: Any, spec: str = ".0f", none: str = "–") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, spec)


def _ms(summary: dict[str, Any] | None) -> str:
    if not summary or not summary.get("n"):
        return "–"
    return f"{summary['median']:.0f} [{summary['min']:.0f}–{summary['max']:.0f}]"


def render_markdown(report: dict[str, Any]) -> str:
    """bench.md: the machine, the options, one table row per configuration, the target and the notes."""
    m, o = report["machine"], report["options"]
    lines = [
        f"# ficoco-bench: {Path(report['bundle']).name}",
        "",
        f"Model `{(report.get('source_model') or {}).get('name')}`, {report['text_tokens']} text tokens, image `{o['image']}`, "
        f"{o['max_new_tokens']} new tokens (EOS ignored), {o['warmup']} warm-up + {o['repeats']} timed runs per configuration, "
        f"{o['backend']}, {m['threads']} threads of {m['cores_available']} cores ({m['processor']}); onnxruntime {m['onnxruntime']}, "
        f"torch {m['torch']}. Times: median [min–max] in ms.",
        "",
        "| config | visual tokens | TFLOPs | FLOPs ratio | vision ms | prefill ms | TTFT ms | TTFT speedup | vs PyTorch "
        "| speedup / FLOPs speedup | decode tok/s | peak RSS GB | reduction share (vision / prefill) | agreement | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in report["configs"]:
        vt = e.get("visual_tokens")
        vts = "–" if not vt else (f"{vt['to_decoder']}" if vt["to_decoder"] == vt["final"] else f"{vt['to_decoder']} → {vt['final']}")
        prof = e.get("profile") or {}
        shares = " / ".join(_fmt((prof.get(s) or {}).get("share"), ".1%") for s in ("vision_encoder", "decoder_prefill")) if prof else "–"
        agr = e.get("agreement")
        row = [
            e["label"] + (f" ({e['error'].splitlines()[0][:60]})" if e.get("error") else ""),
            vts,
            _fmt(e["flops_tflops"].get("total"), ".3f"),
            _fmt(e.get("flops_ratio"), ".2f"),
            _ms(e["timings"].get("vision_ms")),
            _ms(e["timings"].get("prefill_ms")),
            _ms(e["timings"].get("ttft_ms")),
            _fmt(e.get("ttft_speedup"), ".2f") + ("×" if e.get("ttft_speedup") else ""),
            _fmt(e.get("ttft_speedup_vs_pytorch"), ".2f") + ("×" if e.get("ttft_speedup_vs_pytorch") else ""),
            _fmt(e.get("efficiency"), ".2f"),
            _fmt(_median(e["timings"].get("decode_tokens_per_s")), ".2f"),
            _fmt((e.get("peak_rss_bytes") or float("nan")) / 2**30, ".2f"),
            shares,
            _fmt((agr or {}).get("agreement"), ".0%"),
            " → ".join(_fmt(x, ".1f") for x in (e.get("loadavg_1min") or [])) or "–",
        ]
        lines.append("| " + " | ".join(row) + " |")
    t = report.get("target") or {}
    if t.get("config"):
        verdict = "met" if t.get("met") else "NOT met"
        lines += ["", f"Target ({t['rule']}): {t['config']} efficiency {_fmt(t.get('efficiency'), '.2f')} → **{verdict}** "
                  f"(from the profiled kernel time instead of wall-clock TTFT: {_fmt(t.get('profile_efficiency'), '.2f')})."]
    lines += ["", "Speedups vs unreduced: wall-clock (timed runs) / kernel time (profiled pass) / theoretical (FLOPs):", "",
              "| config | vision | prefill | vision + embed + prefill kernels | top prefill ops (ms) |", "|---|---|---|---|---|"]
    for e in report["configs"]:
        if e["role"] not in ("sweep", "also"):
            continue
        ss = e.get("stage_speedups") or {}
        cell = [" / ".join(_fmt((ss.get(s) or {}).get(k), ".2f") + "×" for k in ("measured", "profiled", "flops")) for s in ("vision", "prefill")]
        whole = f"{_fmt(e.get('profile_speedup'), '.2f')}× (÷ FLOPs speedup {_fmt(e.get('flops_speedup'), '.2f')}× = {_fmt(e.get('profile_efficiency'), '.2f')})"
        top = ((e.get("profile") or {}).get("decoder_prefill") or {}).get("top_ops_ms") or {}
        tops = ", ".join(f"{k} {v:.0f}" for k, v in list(top.items())[:4]) or "–"
        lines.append(f"| {e['label']} | {cell[0]} | {cell[1]} | {whole} | {tops} |")
    lines += ["", "Notes:", ""] + [f"- {n}" for n in report.get("notes", [])]
    return "\n".join(lines) + "\n"


def render_plot(report: dict[str, Any], path: Path) -> None:
    """bench.png: TTFT (median, min–max bars) and greedy agreement vs ratio per variant; PyTorch as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = report["configs"]
    ref = next((e for e in entries if e["role"] == "unreduced"), None)
    torch_e = next((e for e in entries if e["role"] == "pytorch"), None)
    variants = sorted({e["variant"] for e in entries if e["role"] == "sweep"})
    fig, (ax_t, ax_a) = plt.subplots(1, 2, figsize=(11, 4.2))
    for v in variants:
        pts = [e for e in entries if (e["role"] == "sweep" and e["variant"] == v) or e is ref]
        pts = [e for e in pts if e["timings"].get("ttft_ms", {}).get("n")]
        pts.sort(key=lambda e: e["ratio"])
        if not pts:
            continue
        xs = [e["ratio"] for e in pts]
        med = [e["timings"]["ttft_ms"]["median"] for e in pts]
        err = [[m - e["timings"]["ttft_ms"]["min"] for m, e in zip(med, pts, strict=True)],
               [e["timings"]["ttft_ms"]["max"] - m for m, e in zip(med, pts, strict=True)]]
        line = ax_t.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=f"{v} (measured)")
        if ref and ref["timings"].get("ttft_ms", {}).get("n"):
            base = ref["timings"]["ttft_ms"]["median"]
            ideal = [base * e["flops_ratio"] if e.get("flops_ratio") else float("nan") for e in pts]
            ax_t.plot(xs, ideal, linestyle=":", color=line[0].get_color(), label=f"{v} (FLOPs-proportional)")
        agr = [(e["ratio"], (e.get("agreement") or {}).get("agreement")) for e in pts]
        agr = [(x, a) for x, a in agr if a is not None]
        if agr:
            ax_a.plot([x for x, _ in agr], [a for _, a in agr], marker="o", label=v)
    for e in entries:
        if e["role"] == "also" and e["timings"].get("ttft_ms", {}).get("n"):
            ax_t.scatter([e["ratio"]], [e["timings"]["ttft_ms"]["median"]], marker="s", label=e["label"])
    if torch_e and torch_e["timings"].get("ttft_ms", {}).get("n"):
        ax_t.axhline(torch_e["timings"]["ttft_ms"]["median"], color="gray", linestyle="--", label="PyTorch generate (unreduced)")
    ax_t.set_xlabel("ratio of visual tokens kept")
    ax_t.set_ylabel("TTFT ms (median, min–max)")
    ax_t.set_title("time to first token")
    ax_t.set_ylim(bottom=0)
    ax_t.legend(fontsize=7)
    ax_a.set_xlabel("ratio of visual tokens kept")
    ax_a.set_ylabel("greedy token agreement with unreduced")
    ax_a.set_ylim(-0.05, 1.05)
    ax_a.set_title(f"accuracy proxy ({report['options']['max_new_tokens']} greedy tokens)")
    if ax_a.lines:
        ax_a.legend(fontsize=7)
    fig.suptitle(f"ficoco-bench {Path(report['bundle']).name} ({report['machine']['threads']} threads, onnxruntime CPU)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path, make_parents=True) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------------------


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path, make_parents=True) as tmp:
        tmp.write_text(text)


def _json_default(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


def _finite(x: Any) -> Any:
    """Replace NaN/inf by None recursively (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_reports(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """bench.json, bench.md and bench.png in `out_dir`, each written atomically."""
    paths = {"json": out_dir / "bench.json", "md": out_dir / "bench.md", "png": out_dir / "bench.png"}
    _write_text(paths["json"], json.dumps(_finite(report), indent=2, allow_nan=False) + "\n")
    _write_text(paths["md"], render_markdown(report))
    render_plot(report, paths["png"])
    return paths


# ---------------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------------


def run_bench(opts: BenchOptions, say: Callable[[str], None] | None = None) -> tuple[dict[str, Any], dict[str, Path]]:
    """The whole benchmark (see the module docstring); returns the report and the written files' paths."""
    import onnx

    from exporter.bundle import load_manifest
    from exporter.regions import reduction_node_names
    from ficoco.geometry import LlavaGeometry

    say = say or (lambda s: log.info(s))
    t_start = time.perf_counter()
    manifest = load_manifest(opts.bundle, verify=opts.verify)
    limit = int((manifest.get("shape_ranges") or {}).get("max_new_tokens", 1 << 30))
    if opts.max_new_tokens > limit:
        raise BenchInputError(f"--max-new-tokens {opts.max_new_tokens} is above BUNDLE's limit of {limit} (shape_ranges.max_new_tokens); ask for fewer")
    resolve_image(opts.image)  # a bad --image fails before any export
    configs = plan_configs(manifest, opts)
    ensure_bundles(configs, manifest, opts, say)
    if opts.pytorch:
        configs.append(ConfigSpec(label="PyTorch generate (unreduced)", kind="pytorch", role="pytorch", variant="none",
                                  method="none", ratio=1.0, origin="transformers", schedule=None))
    ref = model_ref(manifest)
    geometry = LlavaGeometry.from_dict(manifest["geometry"])
    work = opts.resolved_work_dir()
    threads = opts.resolved_threads()
    results: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    step_nodes: dict[str, int] = {}
    for i, cfg in enumerate(configs):
        slug = "".join(ch if ch.isalnum() else "-" for ch in cfg.label).strip("-")
        scratch = work / "runs" / f"{i:02d}-{slug}"
        spec = {"label": cfg.label, "kind": cfg.kind, "bundle": cfg.bundle, "model": ref, "image": opts.image, "prompt": opts.prompt,
                "warmup": opts.warmup, "repeats": opts.repeats, "max_new_tokens": opts.max_new_tokens, "threads": threads,
                "profile": opts.profile and cfg.kind == "bundle", "trace_dir": str(scratch / "traces")}
        say(f"{cfg.label}: timing ({opts.warmup} warm-up + {opts.repeats} runs{', profiled pass' if spec['profile'] else ''})")
        t0 = time.perf_counter()
        try:
            results[cfg.label] = run_worker(spec, scratch)
        except BenchFailed as err:
            errors[cfg.label] = str(err)
            say(f"{cfg.label}: FAILED: {str(err).splitlines()[0]}")
            continue
        med = summarize([r["ttft_ms"] for r in results[cfg.label]["runs"]]).get("median", float("nan"))
        say(f"{cfg.label}: TTFT median {med:.0f} ms ({time.perf_counter() - t0:.0f} s)")
        if cfg.kind == "bundle" and cfg.bundle:
            proto = onnx.load(str(Path(cfg.bundle) / "onnx" / "decoder_step.onnx"), load_external_data=False)
            step_nodes[cfg.bundle] = len(reduction_node_names(proto))
    report = build_report(configs, results, errors, manifest, opts, geometry, step_nodes)
    report["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    paths = write_reports(report, opts.resolved_report_dir())
    if errors:
        raise BenchFailed(f"{len(errors)} configuration(s) failed ({', '.join(errors)}); the reports in {paths['json'].parent} mark them. "
                          f"First: {next(iter(errors.values()))}")
    return report, paths


@click.command(context_settings=CONTEXT)
@click.version_option(package_name="ficoco-export")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--ratios", default=",".join(f"{r:g}" for r in DEFAULT_RATIOS), show_default=True,
              help="Comma-separated fractions of the visual tokens kept, in (0, 1]; 1.0 is the unreduced model.")
@click.option("--variants", help="Comma-separated variants to sweep: V, L, VL [default: BUNDLE's variant].")
@click.option("--also", "also", multiple=True, type=click.Path(path_type=Path),
              help="An extra bundle to time on the same inputs (e.g. a quantized copy of BUNDLE); repeatable.")
@click.option("--work-dir", type=click.Path(path_type=Path),
              help="Where the sweep's bundles are exported and cached, and the workers' logs and traces go "
                   "[default: BUNDLE/../.bench-<BUNDLE name>]. Several GB per bundle for large models.")
@click.option("--report-dir", type=click.Path(path_type=Path), help="Where bench.json/.md/.png go [default: BUNDLE/reports].")
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed runs per configuration before the timed ones.")
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed runs per configuration (median and min/max are reported).")
@click.option("--max-new-tokens", type=int, default=16, show_default=True, help="Tokens generated per run (greedy, EOS ignored); at most BUNDLE's limit.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="ONNX Runtime intra-op threads and torch.set_num_threads for every configuration [0: every available core].")
@click.option("--image", default=DEFAULT_IMAGE, show_default=True, help="Image file, or the name of a built-in test photo (astronaut, chelsea, coffee, ...).")
@click.option("--prompt", default=DEFAULT_PROMPT, show_default=True, help="The question asked about the image.")
@click.option("--l-start", type=int, help="First decoder block with a step for the sweep [default: BUNDLE's schedule].")
@click.option("--l-end", type=int, help="Last decoder block with a step for the sweep [default: BUNDLE's schedule].")
@click.option("--v-start", type=int, help="First CLIP block with a step for the sweep [default: BUNDLE's schedule].")
@click.option("--v-end", type=int, help="Last CLIP block with a step for the sweep [default: BUNDLE's schedule].")
@click.option("--no-pytorch", is_flag=True, help="Skip transformers' PyTorch generate reference.")
@click.option("--no-profile", is_flag=True, help="Skip the ONNX Runtime profiled pass (no reduction share).")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundles' files (large models).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and full tracebacks.")
def main(bundle: Path, **kw: Any) -> None:
    """Benchmark BUNDLE on this machine: a ratio sweep of sibling bundles, --also bundles and transformers'
    PyTorch generate, timed in one run; writes bench.json, bench.md and bench.png to BUNDLE/reports/.

    Reports per configuration: vision / prefill / TTFT ms (median and min–max over --repeats), decode
    tokens/s, peak RSS, theoretical TFLOPs and the FLOPs ratio, the TTFT speedup vs the unreduced bundle and
    vs PyTorch, the share of stage time in the reduction ops (ONNX Runtime profile) and greedy token
    agreement with the unreduced bundle.

    Example: ficoco-bench out/bench-vl25 --ratios 1.0,0.5,0.25,0.11 --variants VL
    """
    verbose = bool(kw["verbose"])
    _setup_logging(verbose)
    _guarded(verbose, lambda: _main(bundle, kw))


def options_from_cli(bundle: Path, kw: dict[str, Any]) -> BenchOptions:
    """Check the flags (BenchInputError naming the flag and the fix) and build BenchOptions."""
    for flag, value, lo in (("--warmup", kw["warmup"], 0), ("--repeats", kw["repeats"], 1), ("--max-new-tokens", kw["max_new_tokens"], 1), ("--threads", kw["threads"], 0)):
        if value < lo:
            raise BenchInputError(f"{flag} must be at least {lo} (got {value})")
    for extra in kw["also"]:
        if not Path(extra).is_dir():
            raise BenchInputError(f"--also {extra}: no bundle directory there")
    return BenchOptions(
        bundle=bundle, ratios=parse_ratios(kw["ratios"]), variants=parse_variants(kw["variants"]), also=tuple(kw["also"]),
        work_dir=kw["work_dir"], report_dir=kw["report_dir"], warmup=kw["warmup"], repeats=kw["repeats"],
        max_new_tokens=kw["max_new_tokens"], threads=kw["threads"], image=kw["image"], prompt=kw["prompt"],
        pytorch=not kw["no_pytorch"], profile=not kw["no_profile"], verify=not kw["no_verify"],
        layers={k: kw[k] for k in ("v_start", "v_end", "l_start", "l_end")},
    )


def _main(bundle: Path, kw: dict[str, Any]) -> None:
    opts = options_from_cli(bundle, kw)
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        click.echo(f"[{time.perf_counter() - t0:7.1f}s] {msg}", err=True)

    report, paths = run_bench(opts, say)
    t = report.get("target") or {}
    if t.get("config"):
        say(f"target {t['rule']}: {t['config']} efficiency {_fmt(t.get('efficiency'), '.2f')} -> {'met' if t.get('met') else 'NOT met'}")
    for kind, p in paths.items():
        click.secho(f"{kind}: {p}", fg="green", err=True)


if __name__ == "__main__":
    sys.exit(_worker_cli(sys.argv[1:]))
