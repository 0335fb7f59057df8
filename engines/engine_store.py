"""Which TensorRT engines a bundle holds and whether they fit this machine; no TensorRT needed.

Engines are not portable: `engines/trt-<version>-sm<cc>/engines.json` (`EngineManifest`) records the
TensorRT version, GPU name and SM they were built with and the optimization profiles each engine holds;
`find_engines` refuses any other combination (or engines of another bundle layout, or built from an earlier
export) with a message that says to rebuild. The local target is passed in, so this is tested anywhere;
`tensorrt` itself is imported lazily (`import_tensorrt`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bundle.layout import BundleError, sha256_file
from bundle.manifest import Manifest
from bundle.session import BackendUnavailable

log = logging.getLogger(__name__)


ENGINES_DIR = "engines"
ENGINE_MANIFEST = "engines.json"
ENGINE_SCHEMA_VERSION = 2  # 2: one engine per graph of the segmented decoder, named profiles per engine
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
    import torch

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
    # graph -> {file, sha256, bytes, source (onnx rel path), source_sha256, build_seconds,
    #           profiles: the engine's optimization profile names in index order}
    engines: dict[str, dict[str, Any]]
    profiles: dict[str, dict[str, dict[str, dict[str, list[int]]]]]  # graph -> profile -> input -> {min, opt, max}
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

    def profile_names(self, graph: str) -> list[str]:
        """The optimization profile names of `graph`'s engine, in the engine's profile index order."""
        names = self.engines.get(graph, {}).get("profiles")
        if names is None:
            names = list(self.profiles.get(graph, {}))
        return [str(n) for n in names]


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
        graphs = manifest.graph_names()
        missing = [g for g in graphs if g not in em.engines]
        if missing:
            raise EngineError(f"{d} has no engine for {', '.join(missing)}; {rebuild}")
        for graph in graphs:
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
