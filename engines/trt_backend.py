"""TensorRT backend (TensorRT 10 Python API): engines deserialized from the bundle, run on torch CUDA tensors.

Per graph one engine with one optimization profile and one execution context (`TrtSession`): inputs and
outputs are bound by name with `set_tensor_address` to torch CUDA tensors, `set_input_shape` before each
call, and `execute_async_v3` on the current torch CUDA stream, so TensorRT and PyTorch work stay ordered
without synchronising. `TrtStages` preallocates the decoder's KV cache as two buffer sets sized from the
engines' profiles (which come from the manifest's `trt_profiles`): prefill writes set A, each step reads
one set and writes the next length into the other, so no KV byte is allocated or copied to the host in
the decode loop. Only the [B, V] logits go to the host for the sampler.

Engines are not portable: `engines/trt-<version>-sm<cc>/engines.json` records the TensorRT version, GPU
name and SM they were built with, and `find_engines` refuses any other combination with a message that
says to rebuild. That check needs no TensorRT (the local target is passed in), so it is tested anywhere.

`tensorrt` is imported lazily: this module imports on machines without it.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bundle.layout import BundleError, sha256_file
from bundle.manifest import Manifest
from bundle.names import PREFILL, STAGES, STEP
from bundle.session import BackendUnavailable, Session, SessionError, SessionStages, TensorSpec

log = logging.getLogger(__name__)

ENGINES_DIR = "engines"
ENGINE_MANIFEST = "engines.json"
ENGINE_SCHEMA_VERSION = 1
INSTALL_HINT = "pip install tensorrt / JetPack"


class EngineError(BundleError):
    """The bundle has no usable TensorRT engines for this machine (missing, damaged, or built elsewhere)."""


class EngineMismatch(EngineError):
    """Engines exist but were built for another TensorRT version or GPU architecture: rebuild them."""


@dataclass(frozen=True)
class GpuTarget:
    """What an engine is tied to: the TensorRT version and the GPU's compute capability (SM)."""

    tensorrt_version: str
    sm: int  # compute capability as major * 10 + minor, e.g. 87 for Jetson Orin, 90 for H100
    gpu_name: str = ""

    @property
    def dirname(self) -> str:
        return engine_dirname(self.tensorrt_version, self.sm)

    def describe(self) -> str:
        gpu = f" ({self.gpu_name})" if self.gpu_name else ""
        return f"TensorRT {self.tensorrt_version} on sm{self.sm}{gpu}"


def engine_dirname(tensorrt_version: str, sm: int) -> str:
    return f"trt-{tensorrt_version}-sm{sm}"


def import_tensorrt() -> Any:
    """`import tensorrt`, or BackendUnavailable saying how to install it."""
    try:
        import tensorrt as trt
    except ImportError as err:
        raise BackendUnavailable(
            f"TensorRT is not installed ({INSTALL_HINT}): the TensorRT path needs TensorRT 10 and an NVIDIA GPU "
            f"(x86_64/SBSA: `pip install tensorrt`; Jetson: the TensorRT that ships with JetPack) [{err}]"
        ) from err
    return trt


def cuda_device_info(device: int = 0) -> tuple[int, str]:
    """(SM as major*10+minor, GPU name) of CUDA device `device`, from PyTorch, else cuda-python."""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        return major * 10 + minor, torch.cuda.get_device_name(device)
    try:  # cuda-python (a TensorRT dependency on some installs) works without a CUDA build of PyTorch
        from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[import-not-found,no-redef]
        except ImportError:
            cudart = None
    if cudart is not None:
        err, props = cudart.cudaGetDeviceProperties(device)
        if int(err) == 0:
            name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
            return props.major * 10 + props.minor, name.rstrip("\x00")
    raise BackendUnavailable(
        "no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False); the TensorRT backend needs a "
        "CUDA build of PyTorch (on Jetson: NVIDIA's JetPack wheel) and a GPU"
    )


def local_target(device: int = 0) -> GpuTarget:
    """The TensorRT version and GPU of this machine; BackendUnavailable without TensorRT or a GPU."""
    trt = import_tensorrt()
    sm, name = cuda_device_info(device)
    return GpuTarget(str(trt.__version__), sm, name)


# ---------------------------------------------------------------------------------------------------------
# The engine manifest: written by engines.builder, checked here before any engine is deserialized
# ---------------------------------------------------------------------------------------------------------


@dataclass
class EngineManifest:
    """`engines/trt-<version>-sm<cc>/engines.json`."""

    tensorrt_version: str
    sm: int
    gpu_name: str
    machine: str
    engines: dict[str, dict[str, Any]]  # graph -> {file, sha256, bytes, source (onnx rel path), source_sha256, build_seconds}
    profiles: dict[str, dict[str, dict[str, list[int]]]]
    build: dict[str, Any]  # precision flags, strongly typed, workspace, optimization level, timing cache
    schema_version: int = ENGINE_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineManifest:
        return cls(
            tensorrt_version=str(d["tensorrt_version"]),
            sm=int(d["sm"]),
            gpu_name=str(d.get("gpu_name", "")),
            machine=str(d.get("machine", "")),
            engines=dict(d["engines"]),
            profiles=dict(d.get("profiles", {})),
            build=dict(d.get("build", {})),
            schema_version=int(d.get("schema_version", 0)),
        )

    @property
    def target(self) -> GpuTarget:
        return GpuTarget(self.tensorrt_version, self.sm, self.gpu_name)


def read_engine_manifest(engine_dir: Path) -> EngineManifest:
    path = engine_dir / ENGINE_MANIFEST
    try:
        data = json.loads(path.read_text())
        em = EngineManifest.from_dict(data)
    except FileNotFoundError as err:
        raise EngineError(f"{engine_dir} has no {ENGINE_MANIFEST}: an interrupted build? Rebuild with ficoco-build.") from err
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise EngineError(f"{path} is damaged ({err}); rebuild the engines with ficoco-build") from err
    if em.schema_version != ENGINE_SCHEMA_VERSION:
        raise EngineError(
            f"{path} has engine schema version {em.schema_version}; this ficoco-export reads {ENGINE_SCHEMA_VERSION}. "
            "Rebuild the engines with ficoco-build."
        )
    return em


def engine_dirs(bundle: Path) -> list[Path]:
    root = bundle / ENGINES_DIR
    return sorted(p for p in root.glob("trt-*") if p.is_dir()) if root.is_dir() else []


def find_engines(
    bundle: str | os.PathLike[str], manifest: Manifest, target: GpuTarget, verify: bool = True
) -> tuple[Path, EngineManifest]:
    """The engine directory built for `target` (same TensorRT version and SM) from this bundle's ONNX.

    Raises EngineError when the bundle has no engines, EngineMismatch when its engines were built for
    another TensorRT version or GPU (the message lists what was found and says to rebuild), or when they
    were built from different ONNX files than the bundle now holds. With `verify`, checks each plan's sha256.
    """
    root = Path(bundle)
    dirs = engine_dirs(root)
    rebuild = f"rebuild them on this machine with `ficoco-build {root}`"
    if not dirs:
        raise EngineError(f"{root} has no TensorRT engines; build them with `ficoco-build {root}` (or use --backend onnxruntime)")
    found: list[EngineManifest] = []
    for d in dirs:
        try:
            em = read_engine_manifest(d)
        except EngineError as err:
            log.warning("%s", err)
            continue
        found.append(em)
        if em.tensorrt_version != target.tensorrt_version or em.sm != target.sm:
            continue
        bundle_files = manifest.files
        for graph, info in em.engines.items():
            src = info.get("source")
            if src is not None and bundle_files.get(src) != info.get("source_sha256"):
                raise EngineMismatch(
                    f"the engine for {graph} in {d} was built from a different {src} than this bundle holds "
                    f"(the bundle was re-exported after the build); {rebuild}"
                )
        missing = [g for g in STAGES if g not in em.engines]
        if missing:
            raise EngineError(f"{d} has no engine for {', '.join(missing)}; {rebuild}")
        for graph in STAGES:
            info = em.engines[graph]
            plan = d / info["file"]
            if not plan.is_file():
                raise EngineError(f"engine file {plan} is missing; {rebuild}")
            if verify and info.get("sha256") and sha256_file(plan) != info["sha256"]:
                raise EngineError(f"engine file {plan} was modified after the build (sha256 mismatch); {rebuild}")
        return d, em
    if not found:
        raise EngineError(f"the engine directories in {root / ENGINES_DIR} are damaged; {rebuild}")
    built = "; ".join(f"{e.target.describe()} in {ENGINES_DIR}/{e.target.dirname}" for e in found)
    raise EngineMismatch(
        f"the bundle's TensorRT engines were built for {built}, but this machine has {target.describe()}. "
        f"TensorRT engines only run with the TensorRT version and GPU architecture they were built for: {rebuild}."
    )


# ---------------------------------------------------------------------------------------------------------
# Sessions
# ---------------------------------------------------------------------------------------------------------


def _dtype_map(trt: Any) -> dict[Any, torch.dtype]:
    pairs = [
        ("FLOAT", torch.float32),
        ("HALF", torch.float16),
        ("BF16", torch.bfloat16),
        ("INT32", torch.int32),
        ("INT64", torch.int64),
        ("INT8", torch.int8),
        ("UINT8", torch.uint8),
        ("BOOL", torch.bool),
        ("FP8", getattr(torch, "float8_e4m3fn", None)),
    ]
    return {getattr(trt.DataType, k): v for k, v in pairs if hasattr(trt.DataType, k) and v is not None}


class TrtSession(Session):
    """One TensorRT engine (one optimization profile, one execution context) on one CUDA device."""

    def __init__(self, plan: Path, runtime: Any, trt: Any, device: torch.device, name: str | None = None) -> None:
        self.name = name or plan.stem
        self.device = device
        self._trt = trt
        with torch.cuda.device(device):
            self.engine = runtime.deserialize_cuda_engine(plan.read_bytes())
            if self.engine is None:
                raise EngineError(
                    f"TensorRT {trt.__version__} cannot deserialize {plan} (built with another TensorRT version, "
                    "for another GPU, or damaged); rebuild the engines with ficoco-build"
                )
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise SessionError(f"{self.name}: TensorRT could not create an execution context (out of GPU memory?)")
        dtypes = _dtype_map(trt)
        inputs: list[TensorSpec] = []
        outputs: list[TensorSpec] = []
        self._host_inputs: set[str] = set()
        self._profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}
        for i in range(self.engine.num_io_tensors):
            tname = self.engine.get_tensor_name(i)
            dt = self.engine.get_tensor_dtype(tname)
            if dt not in dtypes:
                raise SessionError(f"{self.name}: tensor {tname} has TensorRT type {dt}, which this runtime does not map")
            shape = tuple(int(d) for d in self.engine.get_tensor_shape(tname))
            spec = TensorSpec(tname, dtypes[dt], tuple(None if d < 0 else d for d in shape))
            if self.engine.get_tensor_mode(tname) == trt.TensorIOMode.INPUT:
                inputs.append(spec)
                if self.engine.get_tensor_location(tname) == trt.TensorLocation.HOST:
                    self._host_inputs.add(tname)  # a shape tensor read by TensorRT from host memory
                if any(d < 0 for d in shape):
                    lo, opt, hi = self.engine.get_tensor_profile_shape(tname, 0)
                    self._profile[tname] = (tuple(lo), tuple(opt), tuple(hi))
            else:
                outputs.append(spec)
        self.inputs, self.outputs = tuple(inputs), tuple(outputs)
        stream = torch.cuda.current_stream(device)
        if self.engine.num_optimization_profiles > 1:
            log.warning("%s: engine has %d profiles; this runtime uses profile 0", self.name, self.engine.num_optimization_profiles)
        self.context.set_optimization_profile_async(0, stream.cuda_stream)

    def min_shape(self, name: str) -> tuple[int, ...] | None:
        p = self._profile.get(name)
        return None if p is None else p[0]

    def max_shape(self, name: str) -> tuple[int, ...] | None:
        p = self._profile.get(name)
        if p is not None:
            return p[2]
        spec = self.input_spec(name)
        return tuple(int(d) for d in spec.shape) if all(d is not None for d in spec.shape) else None  # type: ignore[misc]

    def run(self, feeds: Mapping[str, Tensor], outputs: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        self.check_feeds(feeds)
        ctx = self.context
        keep: list[Tensor] = []
        for spec in self.inputs:
            t = feeds[spec.name]
            if spec.name in self._host_inputs:
                t = t.detach().to(device="cpu", dtype=spec.dtype).contiguous()
            else:
                t = t.detach().to(device=self.device, dtype=spec.dtype, non_blocking=True).contiguous()
            keep.append(t)
            if not ctx.set_input_shape(spec.name, tuple(t.shape)):
                raise SessionError(f"{self.name}: TensorRT rejected shape {list(t.shape)} for input {spec.name}")
            ctx.set_tensor_address(spec.name, t.data_ptr())
        result: dict[str, Tensor] = {}
        for spec in self.outputs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                raise SessionError(f"{self.name}: output {spec.name} has unresolved shape {list(shape)} after setting the inputs")
            dst = (outputs or {}).get(spec.name)
            if dst is None:
                dst = torch.empty(shape, dtype=spec.dtype, device=self.device)
            elif tuple(dst.shape) != shape or dst.dtype != spec.dtype or dst.device != self.device or not dst.is_contiguous():
                raise SessionError(
                    f"{self.name}: the buffer for {spec.name} is {list(dst.shape)} {dst.dtype} on {dst.device}; "
                    f"the engine writes {list(shape)} {spec.dtype} on {self.device}"
                )
            ctx.set_tensor_address(spec.name, dst.data_ptr())
            result[spec.name] = dst
        # the current torch stream: the inputs were produced and the outputs will be read in stream order, and
        # the caching allocator only reuses `keep`'s memory for later work on this same stream
        stream = torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise SessionError(f"{self.name}: TensorRT execute_async_v3 failed (see the TensorRT log above)")
        del keep
        return result


class TrtStages(SessionStages):
    """The four engines behind `StagedModel`, with the decoder's KV cache in two preallocated buffer sets.

    Buffer capacity per layer = the step engine's profile maximum past length + 1 (the present output is
    one token longer), batch = the step profile's maximum batch; allocated on the first prefill for the
    batch in use (grown if a later call needs a larger batch), then reused by every generation.
    """

    def __init__(self, sessions: Mapping[str, Session]) -> None:
        super().__init__(sessions)
        step = self.sessions[STEP]
        self._kv_spec: list[tuple[int, int, int]] = []  # per flat past tensor: (heads, capacity, head_dim)
        for n in self.past_names:
            spec = step.input_spec(n)
            hi = step.max_shape(n)
            if hi is None or spec.shape[1] is None or spec.shape[3] is None:
                raise SessionError(f"{STEP}: input {n} needs static heads/head_dim and a profile range, got {spec.shape}")
            self._kv_spec.append((int(spec.shape[1]), int(hi[2]) + 1, int(spec.shape[3])))
        self._kv_dtype = step.input_spec(self.past_names[0]).dtype
        self._sets: list[list[Tensor]] = []
        self._batch = 0
        self._logits: Tensor | None = None

    def _ensure(self, batch: int, vocab: int, logits_dtype: torch.dtype) -> None:
        if batch <= self._batch and self._logits is not None and self._logits.numel() >= batch * vocab:
            return
        self._sets = [
            [torch.empty(batch * h * cap * hd, dtype=self._kv_dtype, device=self.device) for (h, cap, hd) in self._kv_spec]
            for _ in range(2)
        ]
        self._logits = torch.empty(batch * vocab, dtype=logits_dtype, device=self.device)
        self._batch = batch
        mib = sum(t.numel() * t.element_size() for s in self._sets for t in s) / 2**20
        log.info("TensorRT KV cache: 2 x %d layers, batch %d, %.1f MiB", len(self._kv_spec) // 2, batch, mib)

    def _views(self, which: int, batch: int, lengths: list[int]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, buf, (h, cap, hd), n in zip(self.present_names, self._sets[which], self._kv_spec, lengths, strict=True):
            if n > cap:
                raise SessionError(f"KV length {n} exceeds the engine's capacity {cap} for {name}; rebuild with a larger range")
            out[name] = buf[: batch * h * n * hd].view(batch, h, n, hd)
        return out

    def _vocab(self) -> tuple[int, torch.dtype]:
        spec = next(s for s in self.sessions[PREFILL].outputs if s.name == "logits")
        if spec.shape[-1] is None:
            raise SessionError(f"{PREFILL}: logits need a static vocabulary axis, got {spec.shape}")
        return int(spec.shape[-1]), spec.dtype

    def prefill(self, embeds: Tensor, visual: Tensor, image_offset: Tensor) -> tuple[Tensor, list[Tensor]]:
        b = int(embeds.shape[0])
        vocab, ldt = self._vocab()
        self._ensure(b, vocab, ldt)
        sess = self.sessions[PREFILL]
        feeds = {
            "inputs_embeds": self._feed(PREFILL, "inputs_embeds", embeds),
            "visual_tokens": self._feed(PREFILL, "visual_tokens", visual),
            "image_offset": self._feed(PREFILL, "image_offset", image_offset),
        }
        # present lengths: ask the engine (they depend on the schedule), then bind views of buffer set 0
        shapes = self._present_shapes(sess, feeds)
        outs = self._views(0, b, [s[2] for s in shapes])
        assert self._logits is not None
        outs["logits"] = self._logits[: b * vocab].view(b, vocab)
        res = sess.run(feeds, outs)
        return self._logits_host(res["logits"]), [res[n] for n in self.present_names]

    def _present_shapes(self, sess: Session, feeds: Mapping[str, Tensor]) -> list[tuple[int, ...]]:
        if not isinstance(sess, TrtSession):
            raise SessionError("TrtStages needs TensorRT sessions")
        ctx = sess.context
        for name, t in feeds.items():
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise SessionError(f"{sess.name}: TensorRT rejected shape {list(t.shape)} for input {name}")
        return [tuple(int(d) for d in ctx.get_tensor_shape(n)) for n in self.present_names]

    def step(self, embeds: Tensor, position: Tensor, past: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        b = int(embeds.shape[0])
        vocab, ldt = self._vocab()
        self._ensure(b, vocab, ldt)
        src = 0 if self._sets and past[0].data_ptr() == self._sets[0][0].data_ptr() else 1
        dst = 1 - src
        feeds = {
            "inputs_embeds": self._feed(STEP, "inputs_embeds", embeds),
            "position": self._feed(STEP, "position", position),
        }
        feeds.update({n: self._feed(STEP, n, p) for n, p in zip(self.past_names, past, strict=True)})
        outs = self._views(dst, b, [int(p.shape[2]) + 1 for p in past])
        assert self._logits is not None
        outs["logits"] = self._logits[: b * vocab].view(b, vocab)
        res = self.sessions[STEP].run(feeds, outs)
        return self._logits_host(res["logits"]), [res[n] for n in self.present_names]

    def _logits_host(self, logits: Tensor) -> Tensor:
        return logits.float().cpu()


def trt_stages(
    bundle: str | os.PathLike[str],
    manifest: Manifest,
    device: int = 0,
    verify: bool = True,
    target: GpuTarget | None = None,
) -> tuple[TrtStages, Path, EngineManifest]:
    """Load the bundle's engines for this machine. Raises BackendUnavailable / EngineError / EngineMismatch."""
    target = target or local_target(device)
    engine_dir, em = find_engines(bundle, manifest, target, verify=verify)
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    dev = torch.device("cuda", device)
    sessions: dict[str, Session] = {
        g: TrtSession(engine_dir / em.engines[g]["file"], runtime, trt, dev, name=g) for g in STAGES
    }
    log.info("TensorRT %s engines from %s (%s, %s)", trt.__version__, engine_dir, em.gpu_name, platform.machine())
    return TrtStages(sessions), engine_dir, em
