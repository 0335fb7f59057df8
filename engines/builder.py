"""`ficoco-build`: a bundle's ONNX graphs -> TensorRT engines with the TensorRT 10 Python builder.

One engine per bundle graph (`Manifest.graph_names()`: vision_encoder, embed_tokens, decoder_splice, the
decoder segments decoder_segment_{s} and the reductions decoder_reduce_{s}; docs/export-notes.md §14).
Every optimization profile of the graph's entry in the manifest's `trt_profiles` ({profile: {input:
{min, opt, max}}}) goes into the builder config, in the manifest's order: a segment engine gets two,
`prefill` (an empty past, P = 0) and `decode` (one token, T = 1), over one copy of its weights (the
reason for the layout: the decoder's weights once); every other engine one, `all`.

Shape overrides (Polygraphy syntax, `--trt-{min,opt,max}-shapes KEY:[d0,d1,...]`) take one of four keys,
the most specific that matches wins:

    graph:profile/name   one profile of one graph         decoder_segment_0:decode/past_key_values.0.key
    graph/name           every profile of one graph        vision_encoder/pixel_values
    *:profile/name       that profile of every graph       *:decode/hidden_states
    name                 every profile of every graph      input_ids

An unknown graph, profile or input is an error that lists what exists. Axes may be 0 (the prefill
profile's empty past: TensorRT accepts empty tensors).

Precision: the ONNX graphs' own types when the network is strongly typed (fp16/bf16 exports, explicit
Q/DQ graphs), else the weak-typing flags `--fp16` / `--bf16` (TensorRT 10; removed in TensorRT 11).
INT8 / FP8 only from explicit Q/DQ nodes in the graphs: implicit calibration is never used (TensorRT 11
removed it). A timing cache file is read before and written after every build, so later builds of the
same or another bundle on this TensorRT + GPU reuse the measured tactics. `--workspace` caps the builder's
scratch memory pool (Jetson: the GPU shares the board's RAM).

Engines go to `<bundle>/engines/trt-<version>-sm<cc>/<graph>.plan` with `engines.json` (engine schema
`ENGINE_SCHEMA_VERSION`: TensorRT version, GPU name, SM, each engine's profile names in index order and
their shapes, build options, hashes of the plans and of the ONNX they came from), written into a staging
directory and renamed into place only when every engine is built.

Everything that needs no TensorRT (option checks, profiles, Q/DQ scan) happens in `plan_build`, before
TensorRT is imported, so bad options fail the same way on machines without it. Nothing here is x86
specific: on Jetson, TensorRT comes from JetPack and the same code runs.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bundle import layout as B
from bundle.manifest import Manifest, load_manifest
from engines.engine_store import (
    ENGINE_MANIFEST,
    ENGINES_DIR,
)
from engines.trt_backend import (
    EngineManifest,
    GpuTarget,
    import_tensorrt,
    local_target,
)

log = logging.getLogger(__name__)

PRECISIONS = ("fp16", "bf16", "int8", "fp8")
_WEAK_FLAGS = {"fp16": "FP16", "bf16": "BF16", "int8": "INT8", "fp8": "FP8"}
_SHAPE_RE = re.compile(r"^\s*(?P<name>[^\s:\[\]][^\[\]]*?)\s*:\s*\[(?P<dims>[\s0-9,]*)\]\s*$")

Progress = Callable[[str, str], None]  # (graph, event) with event in {"start", "done"}
Profile = dict[str, dict[str, list[int]]]  # input -> {"min": [...], "opt": [...], "max": [...]}
Profiles = dict[str, Profile]  # profile name -> Profile, in the engine's profile index order
ANY_GRAPH = "*"


class BuildConfigError(ValueError):
    """The build options do not fit the bundle (bad shapes, precision without Q/DQ, ...): fix the command."""


class BuildError(RuntimeError):
    """TensorRT failed to parse or build a graph (the message carries TensorRT's own errors)."""


def parse_shape_args(values: Sequence[str], option: str = "--trt-max-shapes") -> dict[str, list[int]]:
    """Polygraphy syntax `key:[d0,d1,...]` (several per value, space separated) -> {key: dims}.

    `key` is an input name (every profile of every graph with that input), `graph/name` (every profile of
    one graph), `graph:profile/name` (one profile of one graph) or `*:profile/name` (that profile of every
    graph); `resolve_profiles` checks the graphs, profiles and inputs.
    """
    out: dict[str, list[int]] = {}
    for value in values:
        for item in re.findall(r"[^\s\[\]]+:\s*\[[^\]]*\]", value) or [value]:
            m = _SHAPE_RE.match(item)
            if not m:
                raise BuildConfigError(f"{option}: cannot read {item!r}; write name:[d0,d1,...], e.g. input_ids:[1,128]")
            dims_text = m["dims"].replace(" ", "")
            try:
                dims = [int(d) for d in dims_text.split(",")] if dims_text else []
            except ValueError as err:
                raise BuildConfigError(f"{option}: {item!r} has a dimension that is not an integer") from err
            if any(d < 0 for d in dims):
                raise BuildConfigError(f"{option}: {item!r} has a negative dimension")
            out[m["name"]] = dims
    return out


@dataclass(frozen=True)
class BuildOptions:
    """What `ficoco-build` was asked for. Shape overrides are parsed `parse_shape_args` results."""

    precisions: tuple[str, ...] = ()
    strongly_typed: bool | None = None  # None: decide from the graphs and precisions (see plan_build)
    workspace_mib: int | None = None
    timing_cache: Path | None = None  # None: default_timing_cache(target)
    builder_optimization_level: int | None = None  # 0..5; None: TensorRT's default (3)
    min_shapes: Mapping[str, list[int]] = field(default_factory=dict)
    opt_shapes: Mapping[str, list[int]] = field(default_factory=dict)
    max_shapes: Mapping[str, list[int]] = field(default_factory=dict)
    tf32: bool = True  # TensorRT's default for fp32 layers on Ampere and later; False for bit-closer fp32
    force: bool = False
    device: int = 0
    verify: bool = True


@dataclass
class BuildPlan:
    """Everything decided before TensorRT is imported."""

    bundle: Path
    manifest: Manifest
    onnx: dict[str, Path]  # graph -> ONNX file
    profiles: dict[str, Profiles]  # graph -> profile name -> input -> min/opt/max
    strongly_typed: bool
    flags: tuple[str, ...]  # weak-typing precision flags (names of trt.BuilderFlag)
    qdq: dict[str, set[str]]  # graph -> quantized types found in its Q/DQ nodes
    options: BuildOptions


def default_timing_cache(target: GpuTarget) -> Path:
    """`$FICOCO_CACHE/tensorrt/timing-trt<version>-sm<cc>.cache` (one per TensorRT version and GPU)."""
    from ficoco.models import ficoco_cache

    return ficoco_cache() / "tensorrt" / f"timing-{target.dirname}.cache"


def qdq_types(onnx_path: Path) -> set[str]:
    """Quantized types of the graph's QuantizeLinear/DequantizeLinear nodes: {'int8', 'fp8', 'int4', ...}."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    g = model.graph
    inits = {t.name: t.data_type for t in g.initializer}
    consts: dict[str, int] = {}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t is not None:
                    consts[n.output[0]] = a.t.data_type
    P = onnx.TensorProto
    names = {P.INT8: "int8", P.UINT8: "int8", P.FLOAT8E4M3FN: "fp8", P.FLOAT8E5M2: "fp8"}
    for extra in ("INT4", "UINT4", "FLOAT4E2M1"):
        if hasattr(P, extra):
            names[getattr(P, extra)] = "fp4" if extra.startswith("FLOAT") else "int4"
    found: set[str] = set()
    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        kind = "int8"  # no zero point: uint8 by the ONNX spec
        if n.op_type == "DequantizeLinear" and n.input and n.input[0] in inits:
            kind = names.get(inits[n.input[0]], kind)
        if len(n.input) > 2 and n.input[2]:
            zp = inits.get(n.input[2], consts.get(n.input[2]))
            if zp is not None:
                kind = names.get(zp, kind)
        for a in n.attribute:  # opset 21+: output_dtype
            if a.name == "output_dtype" and a.i:
                kind = names.get(a.i, kind)
        found.add(kind)
    return found


def _graph_inputs(manifest: Manifest, graph: str) -> dict[str, list[Any]]:
    return {i["name"]: list(i["shape"]) for i in manifest.graphs[graph].inputs}


def _manifest_graphs(manifest: Manifest) -> tuple[str, ...]:
    """The bundle's graphs (`Manifest.graph_names()`), each checked to have a record in the manifest."""
    graphs = manifest.graph_names()
    missing = [g for g in graphs if g not in manifest.graphs]
    if missing:
        raise B.BundleError(f"the manifest lists no {', '.join(missing)} graph (a damaged bundle); re-export the bundle.")
    return graphs


def _override_key(key: str) -> tuple[str | None, str | None, str]:
    """(graph, profile, input) of an override key; None where the key does not narrow it (see the module)."""
    if "/" not in key:
        return None, None, key
    head, name = key.split("/", 1)
    graph, colon, profile = head.partition(":")
    if not name or not graph or "/" in name or (colon and not profile):
        raise BuildConfigError(
            f"shape override {key!r}: write name, graph/name, graph:profile/name or *:profile/name "
            "(e.g. decoder_segment_0:decode/past_key_values.0.key)"
        )
    return (None if graph == ANY_GRAPH else graph), (profile or None), name


def _describe_inputs(names: set[str]) -> str:
    """Input names for a message, the per-block K/V inputs as one range: past_key_values.{0..31}.key/value."""
    blocks = sorted({int(m[1]) for n in names if (m := re.fullmatch(r"past_key_values\.(\d+)\.(key|value)", n))})
    rest = sorted(n for n in names if not n.startswith("past_key_values."))
    if blocks:
        ids = str(blocks[0]) if len(blocks) == 1 else f"{{{blocks[0]}..{blocks[-1]}}}"
        rest.append(f"past_key_values.{ids}.key/value")
    return ", ".join(rest)


def _check_overrides(keys: set[str], graphs: Sequence[str], base: Mapping[str, Profiles],
                     inputs: Mapping[str, Mapping[str, Any]]) -> None:
    """BuildConfigError unless each override key's graph, profile and input exist (the message lists the choices)."""
    for key in sorted(keys):
        graph, profile, name = _override_key(key)
        if graph is not None and graph not in graphs:
            raise BuildConfigError(f"shape override for {key}: the bundle has no graph {graph}; its graphs are {', '.join(graphs)}")
        scope = [graph] if graph is not None else list(graphs)
        if profile is not None:
            scope = [g for g in scope if profile in base[g]]
            if not scope:
                where = f"{graph} has the profiles {', '.join(base[graph])}" if graph is not None else (
                    "the profiles are " + ", ".join(sorted({p for g in graphs for p in base[g]})))
                raise BuildConfigError(f"shape override for {key}: no profile {profile}; {where}")
        if not any(name in inputs[g] for g in scope):
            if graph is None and profile is None:
                names = _describe_inputs({n for g in graphs for n in inputs[g]})
                raise BuildConfigError(
                    f"shape override for {key}: no graph has such an input; the inputs are {names} "
                    f"(qualify one as graph/name or graph:profile/name, e.g. {graphs[-1]}:decode/hidden_states, "
                    "to change one graph or profile)"
                )
            what = f"{graph} has no input {name}" if graph is not None else f"no graph with a {profile} profile has an input {name}"
            choices = _describe_inputs({n for g in scope for n in inputs[g]})
            raise BuildConfigError(f"shape override for {key}: {what}; the inputs are {choices}")


def resolve_profiles(manifest: Manifest, options: BuildOptions) -> dict[str, Profiles]:
    """The manifest's `trt_profiles` for every graph to build ({graph: {profile: {input: {min, opt, max}}}}),
    with the overrides applied (the most specific key wins, see the module docstring) and checked."""
    graphs = _manifest_graphs(manifest)
    base: dict[str, Profiles] = {g: dict((manifest.trt_profiles or {}).get(g) or {"all": {}}) for g in graphs}
    inputs = {g: _graph_inputs(manifest, g) for g in graphs}
    overrides = {"min": options.min_shapes, "opt": options.opt_shapes, "max": options.max_shapes}
    _check_overrides(set().union(*overrides.values()), graphs, base, inputs)
    profiles: dict[str, Profiles] = {}
    for graph in graphs:
        profiles[graph] = {}
        for pname, ranges in base[graph].items():
            where = f"{graph} (profile {pname})"
            prof: Profile = {}
            for name, shape in inputs[graph].items():
                dynamic = any(not isinstance(d, int) for d in shape)
                entry = {k: list(v) for k, v in (ranges.get(name) or {}).items()}
                for kind, table in overrides.items():
                    for key in (f"{graph}:{pname}/{name}", f"{graph}/{name}", f"{ANY_GRAPH}:{pname}/{name}", name,
                                f"{ANY_GRAPH}/{name}"):
                        if key in table:
                            entry[kind] = list(table[key])
                            break
                if not dynamic and not entry:
                    continue
                if dynamic and not all(k in entry for k in ("min", "opt", "max")):
                    raise BuildConfigError(
                        f"{where}: input {name} {shape} is dynamic but has no complete min/opt/max range in the "
                        f"manifest's trt_profiles; pass --trt-min-shapes/--trt-opt-shapes/--trt-max-shapes for "
                        f"{graph}:{pname}/{name}"
                    )
                for k in ("min", "opt", "max"):
                    if k not in entry:  # a static input: its one shape
                        entry[k] = [int(d) for d in shape]
                    dims = entry[k]
                    if len(dims) != len(shape):
                        raise BuildConfigError(f"{where}: {k} shape {dims} for {name} has rank {len(dims)}, the input has rank {len(shape)} {shape}")
                    for axis, (d, s) in enumerate(zip(dims, shape, strict=True)):
                        if isinstance(s, int) and d != s:
                            raise BuildConfigError(f"{where}: {k} shape {dims} for {name}: axis {axis} is fixed at {s} in the graph")
                        if d < 0:
                            raise BuildConfigError(f"{where}: {k} shape {dims} for {name}: axis {axis} is negative")
                lo, opt, hi = entry["min"], entry["opt"], entry["max"]
                if any(not (a <= b <= c) for a, b, c in zip(lo, opt, hi, strict=True)):
                    raise BuildConfigError(f"{where}: input {name} needs min <= opt <= max on every axis; got min {lo}, opt {opt}, max {hi}")
                prof[name] = {"min": lo, "opt": opt, "max": hi}
            profiles[graph][pname] = prof
    return profiles


def plan_build(bundle: str | os.PathLike[str], options: BuildOptions) -> BuildPlan:
    """Check the bundle and the options and decide typing, flags and profiles; needs no TensorRT.

    Typing: strongly typed (the graphs' own types, no precision flags) when the export is fp16/bf16, when
    only Q/DQ precisions (int8/fp8) are asked for, or when nothing is asked for; weakly typed with the
    TensorRT 10 flags when --fp16/--bf16 is asked for on an fp32 export. `options.strongly_typed`
    overrides the choice (a strongly typed build ignores --fp16/--bf16 on fp16/bf16 exports and refuses
    them on fp32 exports).
    """
    root = Path(bundle)
    manifest = load_manifest(root, verify=options.verify)
    if manifest.graph_only:
        raise BuildConfigError(f"{root} is a --graph-only bundle (no weights); export it with weights to build engines")
    bad = [p for p in options.precisions if p not in PRECISIONS]
    if bad:
        raise BuildConfigError(f"unknown precision {', '.join(bad)}; choose from {', '.join(PRECISIONS)}")
    if options.workspace_mib is not None and options.workspace_mib <= 0:
        raise BuildConfigError(f"--workspace must be a positive number of MiB (got {options.workspace_mib})")
    lvl = options.builder_optimization_level
    if lvl is not None and not 0 <= lvl <= 5:
        raise BuildConfigError(f"--builder-optimization-level must be 0..5 (got {lvl}); TensorRT's default is 3")
    onnx_files: dict[str, Path] = {}
    for g in _manifest_graphs(manifest):
        rel = manifest.graphs[g].file
        if not (root / rel).is_file():
            raise B.BundleError(f"bundle file {rel} is missing from {root}; re-export the bundle.")
        onnx_files[g] = root / rel
    profiles = resolve_profiles(manifest, options)
    qdq = {g: qdq_types(p) for g, p in onnx_files.items()}
    all_q = set().union(*qdq.values()) if qdq else set()
    for p in ("int8", "fp8"):
        if p in options.precisions and p not in all_q:
            raise BuildConfigError(
                f"--{p} needs explicit Q/DQ graphs: the bundle's graphs have no {p.upper()} QuantizeLinear/DequantizeLinear "
                "nodes. Quantize the bundle with the calibration tools first (explicit quantization); ficoco-build never "
                "uses TensorRT's implicit INT8 calibration (deprecated in TensorRT 10, removed in TensorRT 11)."
            )
    onnx_precision = manifest.precision
    float_flags = [p for p in options.precisions if p in ("fp16", "bf16")]
    if len(float_flags) > 1:
        raise BuildConfigError("choose one of --fp16 / --bf16")
    if options.strongly_typed is None:
        # A ficoco-quantize bundle (manifest "quantization") is built strongly typed: TensorRT's explicit
        # quantization section says to use Q/DQ graphs with strong typing and no precision flags.
        strongly = onnx_precision in ("fp16", "bf16") or not float_flags or manifest.is_quantized
    else:
        strongly = options.strongly_typed
    flags: list[str] = []
    if strongly:
        if float_flags and onnx_precision == "fp32":
            raise BuildConfigError(
                f"--{float_flags[0]} with a strongly typed build of an fp32 export: a strongly typed network runs in the "
                f"graph's own types. Export with --precision {float_flags[0]}, or drop --strongly-typed."
            )
        if float_flags:
            log.info("the graphs are %s already; built strongly typed, --%s adds nothing", onnx_precision, float_flags[0])
    else:
        flags = [_WEAK_FLAGS[p] for p in options.precisions]
        for q in sorted(all_q & {"int8", "fp8"}):
            if _WEAK_FLAGS[q] not in flags:
                log.info("the graphs hold %s Q/DQ nodes: enabling the %s flag for the weakly typed build", q, _WEAK_FLAGS[q])
                flags.append(_WEAK_FLAGS[q])
    return BuildPlan(root, manifest, onnx_files, profiles, strongly, tuple(flags), qdq, options)


def _read_cache(path: Path | None) -> bytes:
    if path is None or not path.is_file():
        return b""
    return path.read_bytes()


def _write_cache(path: Path, data: bytes) -> None:
    from ficoco.atomic import write_atomic

    write_atomic(path, data, make_parents=True)


def _build_one(
    trt: Any, logger: Any, plan: BuildPlan, graph: str, cache_bytes: bytes
) -> tuple[bytes, bytes]:
    """Parse and build one graph with every profile of `plan.profiles[graph]` (one set of weights, one
    optimization profile each, in order); returns (serialized engine, updated timing cache)."""
    opts = plan.options
    builder = trt.Builder(logger)
    flags = 0
    if plan.strongly_typed:
        st = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if st is None:
            raise BuildError(f"TensorRT {trt.__version__} has no strongly typed networks; use TensorRT 10 or later")
        flags |= 1 << int(st)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    onnx_path = plan.onnx[graph]
    # parse_from_file resolves the .onnx.data external weights next to the file
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"TensorRT cannot parse {onnx_path}:\n  " + "\n  ".join(errors or ["(no error reported)"]))
    config = builder.create_builder_config()
    if opts.workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_mib) << 20)
    if opts.builder_optimization_level is not None:
        config.builder_optimization_level = int(opts.builder_optimization_level)
    for name in plan.flags:
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is None:
            raise BuildConfigError(
                f"TensorRT {trt.__version__} has no BuilderFlag.{name} (weak typing was removed in TensorRT 11): "
                "export the bundle in the precision you want (--precision fp16/bf16) or quantize it with Q/DQ nodes, "
                "and build strongly typed"
            )
        config.set_flag(flag)
    if not opts.tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, False):
        log.warning("the timing cache does not match TensorRT %s on this GPU; starting a new one", trt.__version__)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    for index, (pname, ranges) in enumerate(plan.profiles[graph].items()):
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            dims = tuple(tensor.shape)
            if tensor.is_shape_tensor:
                raise BuildError(f"{graph}: input {tensor.name} is a shape tensor; the exporter should not produce those")
            if all(d >= 0 for d in dims) and tensor.name not in ranges:
                continue
            r = ranges.get(tensor.name)
            if r is None:
                raise BuildConfigError(
                    f"{graph}: TensorRT sees input {tensor.name} {list(dims)} as dynamic but profile {pname} has no range for it"
                )
            profile.set_shape(tensor.name, r["min"], r["opt"], r["max"])
        got = config.add_optimization_profile(profile)
        if got != index:  # -1: TensorRT found the profile invalid (its errors are in the log)
            raise BuildError(f"{graph}: TensorRT refused optimization profile {pname} (index {got}, expected {index}); "
                             "see the TensorRT errors above")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT could not build {graph} (see the TensorRT errors above)")
    new_cache = bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(memoryview(serialized)), new_cache


def build_engines(plan: BuildPlan, progress: Progress | None = None, target: GpuTarget | None = None) -> Path:
    """Build one engine per planned graph (in running order); returns the engine directory. Needs TensorRT and a GPU."""
    notify = progress or (lambda graph, event: None)
    trt = import_tensorrt()
    target = target or local_target(plan.options.device)
    opts = plan.options
    out = plan.bundle / ENGINES_DIR / target.dirname
    if out.exists() and any(out.iterdir()) and not opts.force:
        raise BuildConfigError(f"engines for {target.describe()} already exist in {out}; pass --force to rebuild them")
    cache_path = opts.timing_cache or default_timing_cache(target)
    cache_bytes = _read_cache(cache_path)
    log.info("timing cache %s (%s)", cache_path, f"{len(cache_bytes)} bytes" if cache_bytes else "new")
    logger = trt.Logger(trt.Logger.WARNING)
    files = plan.manifest.files
    engines: dict[str, dict[str, Any]] = {}
    (plan.bundle / ENGINES_DIR).mkdir(exist_ok=True)
    import torch

    # TensorRT builds on the current CUDA device (no torch CUDA: cuda-python's device info, TensorRT's device 0)
    on_device = torch.cuda.device(opts.device) if torch.cuda.is_available() else nullcontext()
    with on_device, B.staging_dir(out, force=opts.force) as stage:
        for graph in plan.onnx:
            notify(graph, "start")
            t0 = time.perf_counter()
            data, cache_bytes = _build_one(trt, logger, plan, graph, cache_bytes)
            _write_cache(cache_path, cache_bytes)  # after every graph: a later failure keeps what was measured
            plan_file = stage / f"{graph}.plan"
            plan_file.write_bytes(data)
            rel = plan.manifest.graphs[graph].file
            engines[graph] = {
                "file": plan_file.name,
                "sha256": B.sha256_file(plan_file),
                "bytes": plan_file.stat().st_size,
                "source": rel,
                "source_sha256": files.get(rel),
                "profiles": list(plan.profiles[graph]),  # the engine's profile names, in profile index order
                "build_seconds": round(time.perf_counter() - t0, 2),
            }
            notify(graph, "done")
        em = EngineManifest(
            tensorrt_version=target.tensorrt_version,
            sm=target.sm,
            gpu_name=target.gpu_name,
            machine=platform.machine(),
            engines=engines,
            profiles=plan.profiles,
            build={
                "strongly_typed": plan.strongly_typed,
                "flags": list(plan.flags),
                "precisions": list(opts.precisions),
                "onnx_precision": plan.manifest.precision,
                "qdq": {g: sorted(v) for g, v in plan.qdq.items()},
                "workspace_mib": opts.workspace_mib,
                "builder_optimization_level": opts.builder_optimization_level,
                "tf32": opts.tf32,
                "timing_cache": str(cache_path),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
        B.write_json(stage / ENGINE_MANIFEST, em.to_dict())
    return out
