"""`ficoco-bench BUNDLE`: measured speed, memory and theoretical FLOPs of a ratio sweep, in one run.

What one run does (so that every number in a report comes from the same machine state):

1. Reads BUNDLE's manifest (source model, variant, method, preset, the layer ranges of its schedule, its
   export options) and plans a sweep: the unreduced model (variant ``none``, ratio 1.0) and, for every
   ``--variants`` entry, every ``--ratios`` entry. Bundles missing for the sweep are exported with
   `exporter.pipeline.export_bundle` (validation off: that is ficoco-check's job; BUNDLE's export options)
   into ``--work-dir``, one directory per request keyed by a hash of it, so a re-run reuses them. BUNDLE
   itself serves its own (variant, ratio) entry; ``--also`` adds extra bundles (e.g. a quantized copy).
2. Times every configuration in its own fresh subprocess (``python -m engines.bench.worker``): the
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

This module plans and runs the sweep; `engines.bench.worker` times one configuration,
`engines.bench.profiling` holds the measuring, `engines.bench.report` the report and `commands.bench`
the command.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bundle.layout import MANIFEST, ONNX_DIR, BundleError
from bundle.manifest import Manifest, load_manifest
from engines.bench.common import (
    SWEEP_VARIANTS,
    BenchFailed,
    BenchInputError,
    BenchOptions,
    ConfigSpec,
    layer_ranges,
    resolve_image,
)
from engines.bench.profiling import summarize
from engines.bench.report import build_report, write_reports
from ficoco.atomic import write_atomic
from ficoco.planner import ScheduleRequest

log = logging.getLogger(__name__)

#: the module `run_worker` starts with ``python -m``
WORKER_MODULE = "engines.bench.worker"

# ---------------------------------------------------------------------------------------------------------
# options and configurations
# ---------------------------------------------------------------------------------------------------------


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

def sibling_request(manifest: Manifest, variant: str, ratio: float, overrides: dict[str, int | None] | None = None) -> Any:
    """The `ScheduleRequest` of a sweep entry: BUNDLE's method, preset, positions and layer ranges, this budget.

    Ratio 1.0 is the unreduced model (variant "none"). Layer ranges come from BUNDLE's schedule for the
    stages the variant reduces (V: vision, L: decoder, VL: both), `overrides` win; a stage BUNDLE does not
    reduce gets the planner's defaults.
    """
    text_tokens = int(manifest.schedule_request.get("text_tokens", 60))
    if ratio >= 1.0:
        return ScheduleRequest(variant="none", method=manifest.method, ratio=None, preset=manifest.preset,
                               positions=manifest.positions, text_tokens=text_tokens)
    ranges = {**layer_ranges(manifest.schedule), **{k: v for k, v in (overrides or {}).items() if v is not None}}
    keep = {"V": ("v_start", "v_end"), "L": ("l_start", "l_end"), "VL": ("v_start", "v_end", "l_start", "l_end")}[variant]
    return ScheduleRequest(
        variant=variant,
        method=manifest.method,
        ratio=ratio,
        preset=manifest.preset,
        positions=manifest.positions,
        layers={k: ranges[k] for k in keep if k in ranges},
        text_tokens=text_tokens,
    )


def request_key(source: dict[str, Any], request: Any, export: dict[str, Any]) -> str:
    """sha256 of (model name + revision, schedule request, export options): the sibling cache key."""
    blob = json.dumps({"model": [source.get("name"), source.get("revision")], "request": asdict(request), "export": export},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _same_schedule(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("variant", "method", "preset", "positions", "vision", "decoder")
    norm = lambda d: json.loads(json.dumps({k: d.get(k) for k in keys}))  # noqa: E731  (tuples vs lists)
    return bool(norm(a) == norm(b))


def _label(variant: str, ratio: float) -> str:
    return "unreduced (1.0)" if variant == "none" else f"{variant} {ratio:g}"


def model_ref(manifest: Manifest) -> str:
    """The name `load_model` needs to rebuild BUNDLE's source model (a built-in, an alias, a local dir)."""
    from ficoco.models import ALIASES, BUILTINS

    src = manifest.source_model
    name, source = str(src.get("name") or ""), str(src.get("source") or "")
    if name in BUILTINS or name in ALIASES:
        return name
    if source and Path(source).is_dir():
        return source
    if "/" in source and not source.startswith("builtin:") and not Path(source).exists():
        return source  # a HF repo id in the local cache
    return name


# ---------------------------------------------------------------------------------------------------------
# planning the sweep, exporting the siblings
# ---------------------------------------------------------------------------------------------------------


def plan_configs(manifest: Manifest, opts: BenchOptions) -> list[ConfigSpec]:
    """The sweep's bundle configurations in report order (unreduced first), without exporting anything."""
    if manifest.graph_only:
        raise BenchInputError(f"{opts.bundle} is a --graph-only bundle (no weights); export it with weights to benchmark it")
    geometry = manifest.geometry_object()
    own_variant = manifest.variant
    variants = opts.variants or ((own_variant,) if own_variant in SWEEP_VARIANTS else ("VL",))
    entries: list[tuple[str, float]] = [("none", 1.0)]
    entries += [(v, r) for v in variants for r in opts.ratios if r < 1.0]
    own = manifest.schedule
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
        m = load_manifest(extra, verify=opts.verify)
        final, total = int(m.visual_tokens["final"]), int(m.visual_tokens["in"])
        configs.append(ConfigSpec(
            label=f"also: {extra.name}", kind="bundle", role="also", variant=m.variant, method=m.method,
            ratio=final / total, bundle=str(extra.resolve()), origin="--also", schedule=m.schedule,
        ))
    return configs


def ensure_bundles(
    configs: list[ConfigSpec], manifest: Manifest, opts: BenchOptions, say: Callable[[str], None]
) -> dict[str, Any]:
    """Fill in `bundle` for every sweep entry: a cached sibling under the work dir, or a fresh export.

    The exports share one loaded model and one `exporter.reuse.GraphReuse`: a graph that does not depend
    on the ratio (the embedding, the decoder segments when the steps sit in the same blocks) is exported
    once and linked into the other bundles. Returns what the exports cost: seconds per bundle, the model
    load, and the graphs linked instead of exported."""
    from exporter.export import ExportOptions
    from exporter.pipeline import ValidationOptions, export_bundle
    from exporter.reuse import GraphReuse

    work = opts.resolved_work_dir()
    export = dict(manifest.export)
    export["graph_only"] = False
    source = manifest.source_model
    loaded: Any = None
    reuse = GraphReuse()
    cost: dict[str, Any] = {"load_seconds": None, "bundles": {}, "reused_graphs": reuse.reused}
    for cfg in configs:
        if cfg.bundle is not None or cfg.request is None:
            continue
        layers = cfg.request.get("layers") or {}
        request = ScheduleRequest(**{**cfg.request, "layers": dict(layers)})
        key = request_key(source, request, export)
        name = f"{source.get('name') or 'model'}-{cfg.variant}-{cfg.method}-r{cfg.ratio:g}-{key[:12]}"
        target = work / name
        if (target / MANIFEST).is_file():
            try:
                m = load_manifest(target, verify=opts.verify)
                if _same_schedule(m.schedule, cfg.schedule or {}):
                    cfg.bundle, cfg.origin = str(target), "cached"
                    say(f"{cfg.label}: cached {target}")
                    continue
            except BundleError as err:
                say(f"{cfg.label}: cached bundle unusable ({err}); exporting it again")
        if loaded is None:
            t0 = time.perf_counter()
            loaded = _load_source_model(manifest, say)
            cost["load_seconds"] = round(time.perf_counter() - t0, 1)
        say(f"{cfg.label}: exporting into {target} (validation off)")
        t0 = time.perf_counter()
        before = len(reuse.reused)
        export_bundle(loaded, request, target, ExportOptions(**export), ValidationOptions(enabled=False), force=True,
                      lint=False, reuse=reuse)
        cfg.bundle, cfg.origin = str(target), "exported"
        seconds = time.perf_counter() - t0
        cost["bundles"][cfg.label] = {"seconds": round(seconds, 1), "graphs_linked": len(reuse.reused) - before}
        say(f"{cfg.label}: exported in {seconds:.0f} s ({len(reuse.reused) - before} graphs linked from earlier bundles)")
    if loaded is not None:  # give the source model's memory back before the timed workers start
        del loaded
        import gc

        gc.collect()
    return cost


def _load_source_model(manifest: Manifest, say: Callable[[str], None]) -> Any:
    from ficoco.models import ModelNotFoundError, load_model

    ref = model_ref(manifest)
    say(f"loading the source model {ref!r} to export the sweep's bundles")
    try:
        loaded = load_model(ref)
    except ModelNotFoundError as err:
        raise BenchInputError(f"the sweep needs BUNDLE's source model to export its other ratios: {err}") from err
    want = manifest.source_model.get("revision")
    if want and loaded.revision != want:
        raise BenchInputError(
            f"BUNDLE was exported from {ref} revision {want}, but this machine has revision {loaded.revision}; "
            "the sweep would compare different weights. Re-export BUNDLE from this model, or point --work-dir at "
            "bundles exported from the same weights."
        )
    return loaded


# ---------------------------------------------------------------------------------------------------------
# running the workers
# ---------------------------------------------------------------------------------------------------------


def run_worker(spec: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter; its result dict, or BenchFailed with its log's tail."""
    scratch.mkdir(parents=True, exist_ok=True)
    spec_path, out_path, log_path = scratch / "spec.json", scratch / "result.json", scratch / "worker.log"
    out_path.unlink(missing_ok=True)
    write_atomic(spec_path, json.dumps(spec, default=str), make_parents=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), PYTHONWARNINGS="ignore")
    with open(log_path, "w") as logf:
        proc = subprocess.run(
            [sys.executable, "-m", WORKER_MODULE, str(spec_path), str(out_path)],
            stdout=logf, stderr=subprocess.STDOUT, env=env, check=False,
        )
    if proc.returncode != 0 or not out_path.is_file():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise BenchFailed(f"{spec.get('label')}: worker exited with status {proc.returncode} (log {log_path}):\n{tail}")
    return json.loads(out_path.read_text())


def run_bench(opts: BenchOptions, say: Callable[[str], None] | None = None) -> tuple[dict[str, Any], dict[str, Path]]:
    """The whole benchmark (see the module docstring); returns the report and the written files' paths."""
    import onnx

    from exporter.regions import reduction_node_names

    say = say or (lambda s: log.info(s))
    t_start = time.perf_counter()
    manifest = load_manifest(opts.bundle, verify=opts.verify)
    limit = manifest.max_new_tokens
    if opts.max_new_tokens > limit:
        raise BenchInputError(f"--max-new-tokens {opts.max_new_tokens} is above BUNDLE's limit of {limit} (shape_ranges.max_new_tokens); ask for fewer")
    resolve_image(opts.image)  # a bad --image fails before any export
    configs = plan_configs(manifest, opts)
    export_cost = ensure_bundles(configs, manifest, opts, say)
    if opts.pytorch:
        configs.append(ConfigSpec(label="PyTorch generate (unreduced)", kind="pytorch", role="pytorch", variant="none",
                                  method="none", ratio=1.0, origin="transformers", schedule=None))
    ref = model_ref(manifest)
    geometry = manifest.geometry_object()
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
                "profile": opts.profile and cfg.kind == "bundle", "trace_dir": str(scratch / "traces"),
                # the machine's GEMM peak, once per run, in the unreduced configuration's worker (engines.bench.roofline)
                "roofline": cfg.role == "unreduced" and cfg.kind == "bundle"}
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
            # reduction nodes a decode step runs: those of the segment graphs (the reductions are prefill-only)
            step_nodes[cfg.bundle] = sum(
                len(reduction_node_names(onnx.load(str(path), load_external_data=False)))
                for path in (Path(cfg.bundle) / ONNX_DIR).glob("decoder_segment_*.onnx"))
    report = build_report(configs, results, errors, manifest, opts, geometry, step_nodes)
    report["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    report["export"] = export_cost
    paths = write_reports(report, opts.resolved_report_dir())
    if errors:
        raise BenchFailed(f"{len(errors)} configuration(s) failed ({', '.join(errors)}); the reports in {paths['json'].parent} mark them. "
                          f"First: {next(iter(errors.values()))}")
    return report, paths
