"""ONNX Runtime backend: one `InferenceSession` per graph behind the `Session` interface.

The one way the project opens a bundle graph in ONNX Runtime (`OrtSession`, with `session_options`) and
runs a bundle's graphs (`ort_stages`): the runtime's backend, the export validation, the quantizer's
calibration and report, and the selection probes all go through it.

On CPU the feeds and outputs are numpy arrays (`bundle.arrays.NumpyOps`): this path imports no torch,
which is what the torch-free runtime runs on. With the CUDA (or TensorRT) execution provider and a CUDA
build of PyTorch, the session binds torch CUDA tensors by address through an `IOBinding` and hands the
outputs, left on the GPU by ONNX Runtime, back as torch tensors through DLPack, so the KV cache stays on
the device (`bundle.arrays.TorchOps`). The IOBinding path also runs on CPU (`io_binding=True`), which is
how it is tested without a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bundle.arrays import ArrayOps, NumpyOps, TorchOps, numpy_dtype, to_numpy
from bundle.names import graph_names
from bundle.session import BackendUnavailable, Session, SessionError, SessionStages, TensorSpec
from ficoco.segments import DecoderSegment

log = logging.getLogger(__name__)

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}

_ORT_DTYPES: dict[str, str] = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def session_options(threads: int | None = None, *, optimize: bool = True) -> ort.SessionOptions:
    """Quiet ONNX Runtime session options; `threads` intra-op threads (None: all cores); `optimize=False`
    turns every graph optimization off (for graphs ONNX Runtime's CPU optimizer cannot rewrite).

    Intra-op threads do not spin-wait: every session has its own pool, and a bundle runs its graphs one
    after another (a decode token runs every decoder segment), so a finished session's spinning threads
    take the cores from the next one. On the bench bundle (2 cores, 3 segments) spinning cut decode from
    9.7 to 4.0 tokens/s (docs/export-notes.md §16)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return so


def _dtype_name(ort_type: str) -> str:
    try:
        return _ORT_DTYPES[ort_type]
    except KeyError as err:
        raise SessionError(f"unsupported ONNX Runtime tensor type {ort_type}") from err


def _np_dtype(name: str) -> np.dtype:
    try:
        return numpy_dtype(name)
    except ValueError as err:
        raise SessionError(str(err)) from err


#: The way to onnxruntime-gpu: the two wheels install the same `onnxruntime` module and overwrite each other.
GPU_SWAP = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"


def installed_ort_distributions() -> list[str]:
    """Which of the ONNX Runtime wheels are installed (both at once is a broken install)."""
    import importlib.metadata

    out = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            importlib.metadata.version(dist)
            out.append(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def resolve_providers(choice: str = "auto", cache_dir: Path | None = None) -> list[str | tuple[str, dict[str, Any]]]:
    """Execution providers for `choice` (auto | cpu | cuda | tensorrt), most preferred first, CPU last.

    auto takes CUDA where this onnxruntime has it, else CPU; the TensorRT provider (which builds its own
    engines on first use) is only used when asked for. Raises BackendUnavailable when `choice` is not
    in `ort.get_available_providers()`.
    """
    available = ort.get_available_providers()
    if len(installed_ort_distributions()) > 1:
        log.warning("onnxruntime and onnxruntime-gpu are both installed and overwrite each other's files; "
                    "keep one: %s", GPU_SWAP)
    if choice == "auto":
        choice = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if choice not in PROVIDER_ALIASES:
        raise SessionError(f"unknown ONNX Runtime provider {choice!r}; choose one of auto, {', '.join(PROVIDER_ALIASES)}")
    name = PROVIDER_ALIASES[choice]
    if name not in available:
        raise BackendUnavailable(
            f"onnxruntime {ort.__version__} has no {name} (available: {', '.join(available)}); "
            "for the CUDA and TensorRT providers replace onnxruntime by onnxruntime-gpu: "
            + GPU_SWAP
        )
    providers: list[str | tuple[str, dict[str, Any]]] = []
    if name == "TensorrtExecutionProvider":
        opts: dict[str, Any] = {"trt_engine_cache_enable": True, "trt_timing_cache_enable": True}
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            opts["trt_engine_cache_path"] = str(cache_dir)
            opts["trt_timing_cache_path"] = str(cache_dir)
        providers.append((name, opts))
        if "CUDAExecutionProvider" in available:
            providers.append("CUDAExecutionProvider")
    elif name == "CUDAExecutionProvider":
        providers.append(name)
    providers.append("CPUExecutionProvider")
    return providers


#: Graph optimizers a session opened for a single run goes without (`OrtSession(keep_loaded=False)`).
#: On the 7B bundle's largest decoder segment (1.63 GiB of fp16 weights) ConstantFolding raises the open's
#: peak from 3.45 to 4.94 GiB and its time from 12.7 to 22.9 s (`make ort-open`); outputs are identical.
LOW_MEMORY_DISABLED_OPTIMIZERS: tuple[str, ...] = ("ConstantFolding",)


def trim_heap() -> bool:
    """Give the C heap's free memory back to the kernel (glibc `malloc_trim(0)`); False where there is none.

    A closed ONNX Runtime session frees its weights to the C heap, and glibc keeps freed blocks below its
    mmap threshold (up to 32 MB each: most of a CLIP encoder's tensors) mapped for reuse: after the 7B
    vision encoder's session closed, 1.46 GiB stayed resident until this call. The low-memory mode opens a
    graph per run, so without it the freed pages of earlier graphs pile up beside the next one."""
    import ctypes

    try:  # the process's own symbols (no library search: this runs after every low-memory graph run)
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    fn.argtypes = (ctypes.c_size_t,)
    fn(0)
    return True


class OrtSession(Session):
    """One ONNX graph in ONNX Runtime. Its arrays: numpy on the host, unless it binds by address (a CUDA
    provider with PyTorch's CUDA, or `io_binding=True`): then torch tensors on cuda:N (or the CPU).
    `options` replaces `session_options(threads)` (then `threads` is unused); it may be a function that
    makes fresh options for every open, with an object that must outlive the session (weights handed over
    with `add_external_initializers`: `exporter.probe.SelectionProbe`).

    `keep_loaded=False` (low-memory mode): the `InferenceSession` is opened for each run and released after
    it, so only the graph that runs holds its weights. ONNX Runtime's CPU provider upcasts fp16 weights to
    fp32 when it opens a graph, so a 7B fp16 bundle (13 GB of weights) needs ~27 GB with every graph open
    and ~1 GB per decoder segment opened in turn; the price is a session creation per graph per call.
    A session opened for one run skips ONNX Runtime's constant folding (`LOW_MEMORY_DISABLED_OPTIMIZERS`):
    folding materialises every fp16 weight's fp32 cast beside the fp16 initializer while the graph opens,
    so the open costs about three copies where the run needs two; unfolded, the Cast runs inside the one
    run instead, with outputs bit-identical (docs/export-notes.md §16).
    After a graph opened for one run closes, the heap it freed goes back to the kernel (`trim_heap`).
    `before_open` is called before every session creation (the export's validation hands the PyTorch
    reference's mapped pages back to the kernel there, `exporter.pages`).
    """

    def __init__(
        self,
        path: str | Path,
        providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
        threads: int | None = None,
        io_binding: bool | None = None,
        device_id: int = 0,
        options: ort.SessionOptions | Callable[[], tuple[ort.SessionOptions, object]] | None = None,
        keep_loaded: bool = True,
        before_open: Callable[[], object] | None = None,
    ) -> None:
        path = Path(path)
        self._before_open = before_open
        self.name = path.stem
        self.path = path
        self._options = session_options(threads) if options is None else options
        self._providers = list(providers or ["CPUExecutionProvider"])
        self.keep_loaded = keep_loaded
        self.session: ort.InferenceSession | None = self._open()
        self.inputs = tuple(
            TensorSpec(i.name, _dtype_name(i.type), tuple(d if isinstance(d, int) else None for d in i.shape))
            for i in self.session.get_inputs()
        )
        self.outputs = tuple(
            TensorSpec(o.name, _dtype_name(o.type), tuple(d if isinstance(d, int) else None for d in o.shape))
            for o in self.session.get_outputs()
        )
        on_gpu = any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in self.session.get_providers())
        self.ops: ArrayOps = _ops(on_gpu, device_id, io_binding)
        self.io_binding = isinstance(self.ops, TorchOps)
        log.debug("%s: providers %s, device %s, io_binding %s", self.name, self.session.get_providers(), self.device, self.io_binding)
        if not keep_loaded:
            self.session = None
            trim_heap()

    def _open(self) -> ort.InferenceSession:
        if self._before_open is not None:
            self._before_open()
        try:
            so, keep = self._options() if callable(self._options) else (self._options, None)
            extra: dict[str, Any] = {} if self.keep_loaded else {"disabled_optimizers": list(LOW_MEMORY_DISABLED_OPTIMIZERS)}
            sess = ort.InferenceSession(str(self.path), so, providers=self._providers, **extra)
            sess._ficoco_keep_alive = keep  # released with the session
            return sess
        except Exception as err:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise SessionError(f"ONNX Runtime cannot load {self.path}: {err}") from err

    def run(self, feeds: Mapping[str, Any], outputs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        self.check_feeds(feeds)
        sess = self.session if self.session is not None else self._open()
        try:
            if self.io_binding:
                result = self._run_bound(sess, feeds, outputs)
            else:
                result = self._run_numpy(sess, feeds)
        finally:
            del sess  # released here unless keep_loaded
            if not self.keep_loaded:
                trim_heap()
        for name, dst in (outputs or {}).items():
            if self.io_binding:
                if result[name].data_ptr() != dst.data_ptr():
                    dst.copy_(result[name])
            else:
                np.copyto(dst, result[name])
            result[name] = dst
        return result

    def _run_numpy(self, sess: ort.InferenceSession, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        np_feeds = {s.name: np.ascontiguousarray(to_numpy(feeds[s.name]), dtype=_np_dtype(s.dtype)) for s in self.inputs}
        try:
            out = sess.run(None, np_feeds)
        except Exception as err:
            raise SessionError(f"{self.name}: ONNX Runtime failed: {err}") from err
        return {s.name: a for s, a in zip(self.outputs, out, strict=True)}

    def _run_bound(self, sess: ort.InferenceSession, feeds: Mapping[str, Any], outputs: Mapping[str, Any] | None) -> dict[str, Any]:
        import torch

        assert isinstance(self.ops, TorchOps)
        binding = sess.io_binding()
        device = self.ops.torch_device
        dev_type = device.type
        dev_id = device.index or 0
        keep: list[Any] = []  # the bound inputs must outlive the run
        for s in self.inputs:
            t = self.ops.to(feeds[s.name], s.dtype)
            keep.append(t)
            binding.bind_input(s.name, dev_type, dev_id, _np_dtype(s.dtype), tuple(t.shape), t.data_ptr())
        for s in self.outputs:
            dst = (outputs or {}).get(s.name)
            if dst is not None and dst.is_contiguous() and dst.device == device and dst.dtype == self.ops.dtype(s.dtype):
                binding.bind_output(s.name, dev_type, dev_id, _np_dtype(s.dtype), tuple(dst.shape), dst.data_ptr())
            else:
                binding.bind_output(s.name, dev_type, dev_id)
        try:
            binding.synchronize_inputs()
            sess.run_with_iobinding(binding)
            binding.synchronize_outputs()
        except Exception as err:
            raise SessionError(f"{self.name}: ONNX Runtime failed: {err}") from err
        values = binding.get_outputs()
        result: dict[str, Any] = {}
        for s, v in zip(self.outputs, values, strict=True):
            dst = (outputs or {}).get(s.name)
            if dst is not None and v.data_ptr() == dst.data_ptr():
                result[s.name] = dst
            else:
                result[s.name] = torch.from_dlpack(v)
        return result


def _ops(on_gpu: bool, device_id: int, io_binding: bool | None) -> ArrayOps:
    """numpy on the host, unless the session binds by address: a CUDA provider when PyTorch has CUDA (by
    default), or `io_binding=True` (torch on the CPU when there is no CUDA)."""
    if io_binding is False:
        return NumpyOps()
    if on_gpu or io_binding:
        try:
            import torch
        except ImportError as err:
            if io_binding:
                raise BackendUnavailable("io_binding needs PyTorch (torch tensors are bound by address)") from err
            log.warning("ONNX Runtime runs on CUDA without PyTorch: every graph's inputs and outputs go through host memory")
            return NumpyOps()
        if on_gpu and torch.cuda.is_available():
            return TorchOps(torch.device("cuda", device_id))
        if io_binding:
            return TorchOps(torch.device("cpu"))
    return NumpyOps()


def ort_stages(
    onnx_dir: str | Path,
    provider: str = "auto",
    threads: int | None = None,
    io_binding: bool | None = None,
    cache_dir: Path | None = None,
    segments: Sequence[DecoderSegment] | None = None,
    keep_loaded: bool = True,
    before_open: Callable[[], object] | None = None,
) -> SessionStages:
    """The bundle's graphs in ONNX Runtime sessions, ready for `generate_tokens`.

    `segments`: the decoder's segments (None: planned from the manifest of the bundle `onnx_dir` is in).
    `keep_loaded=False`: each graph is opened only while it runs (`OrtSession`'s low-memory mode).
    `before_open`: called before each session creation (`OrtSession`).
    """
    d = Path(onnx_dir)
    if segments is None:
        from bundle.manifest import load_manifest

        segments = load_manifest(d.parent, verify=False).decoder_segments()
    providers = resolve_providers(provider, cache_dir)
    sessions: dict[str, Session] = {}
    for graph in graph_names(len(segments)):
        path = d / f"{graph}.onnx"
        if not path.is_file():
            raise SessionError(f"{path} is missing; the bundle has no {graph} graph (a damaged bundle: re-export it)")
        sessions[graph] = OrtSession(path, providers, threads=threads, io_binding=io_binding, keep_loaded=keep_loaded,
                                       before_open=before_open)
    return SessionStages(sessions, segments)
