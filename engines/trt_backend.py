"""TensorRT backend (TensorRT 10 Python API): engines deserialized from the bundle, run on torch CUDA tensors.

One engine per bundle graph (`bundle.names.graph_names`: vision, embed, the decoder splice, segments and
reductions, docs/export-notes.md §14). A `TrtSession` holds one engine and one execution context per
optimization profile of it: the decoder segment engines carry two profiles over one copy of their weights,
`prefill` (an empty past, P = 0) and `decode` (one token, T = 1), every other engine one (`all`). Each call
picks the first profile whose min..max ranges contain the feeds' shapes (prefill when P = 0, decode when
T = 1 and P > 0) and runs that profile's context. Inputs and outputs are bound by name with
`set_tensor_address` to torch CUDA tensors (an empty tensor, the prefill's zero-length past, is bound to a
small real allocation: TensorRT wants a non-null address for it), `set_input_shape` before each call, and
`execute_async_v3` on the current torch CUDA stream, so TensorRT and PyTorch work stay ordered without
synchronising. Where TensorRT has user-managed context memory (10.1+), every context of every engine shares
one scratch buffer sized to the largest profile (the graphs run one after another on one stream).

`TrtStages` (the `SessionStages` orchestration of the graphs) preallocates the decoder's KV cache as two
buffer sets, one tensor per block and K/V, sized from the segment engines' profiles (capacity = the decode
profile's largest past + 1): a prefill writes every segment's presents into set 0, each decode step reads
one set and writes the presents, one token longer, into the other, through `Session.run(outputs=...)`, so no
KV byte is allocated or copied to the host in the decode loop. Only the [B, V] logits go to the host.

Which engines fit this machine is `engines.engine_store` (no TensorRT needed there).

`tensorrt` is imported lazily: this module imports on machines without it.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bundle.arrays import TorchOps
from bundle.manifest import Manifest
from bundle.names import graph_names, past_names, present_names, segment_graph, segment_index
from bundle.session import Session, SessionError, SessionStages, TensorSpec
from engines.engine_store import (
    EngineError,
    EngineManifest,
    GpuTarget,
    find_engines,
    import_tensorrt,
    local_target,
)
from ficoco.generation import host_ids
from ficoco.segments import DecoderSegment

log = logging.getLogger(__name__)

#: (min, opt, max) shapes of one input in one optimization profile
ShapeRange = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def _dtype_map(trt: Any) -> dict[Any, str]:
    pairs = [
        ("FLOAT", "float32"),
        ("HALF", "float16"),
        ("BF16", "bfloat16"),
        ("INT32", "int32"),
        ("INT64", "int64"),
        ("INT8", "int8"),
        ("UINT8", "uint8"),
        ("BOOL", "bool"),
        ("FP8", "float8_e4m3fn"),
    ]
    return {getattr(trt.DataType, k): v for k, v in pairs if hasattr(trt.DataType, k)}


def _on(device: torch.device) -> Any:
    """`torch.cuda.device(device)` for a CUDA device (a no-op context elsewhere: the tests' fake engines)."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def _stream(device: torch.device) -> int:
    """The handle of the current torch stream on `device` (0, the default stream, off CUDA)."""
    return int(torch.cuda.current_stream(device).cuda_stream) if device.type == "cuda" else 0


def shares_context_memory(trt: Any) -> bool:
    """Whether this TensorRT lets the caller own an execution context's scratch memory (TensorRT 10.1+):
    `ExecutionContextAllocationStrategy.USER_MANAGED`, `get_device_memory_size_for_profile_v2` and
    `IExecutionContext.set_device_memory`."""
    strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
    return (
        strategy is not None
        and hasattr(strategy, "USER_MANAGED")
        and hasattr(getattr(trt, "ICudaEngine", None), "get_device_memory_size_for_profile_v2")
        and hasattr(getattr(trt, "IExecutionContext", None), "set_device_memory")
    )


class DeviceScratch:
    """One device buffer that is the scratch memory of every execution context attached to it.

    The bundle's graphs run one after another on one stream, so their contexts (two per segment engine)
    never need their activation memory at the same time: one buffer of the largest profile's size serves
    all, instead of one allocation per context. Attaching a context that needs more grows the buffer and
    rebinds the contexts attached before (only done while loading, before anything runs)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffer: Tensor | None = None
        self._contexts: list[Any] = []

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else int(self.buffer.numel())

    def attach(self, context: Any, size: int) -> None:
        if self.buffer is None or size > self.buffer.numel():
            self.buffer = torch.empty(max(int(size), 1), dtype=torch.uint8, device=self.device)
            for c in self._contexts:
                c.set_device_memory(self.buffer.data_ptr(), self.nbytes)
        self._contexts.append(context)
        context.set_device_memory(self.buffer.data_ptr(), self.nbytes)


class TrtSession(Session):
    """One TensorRT engine on one CUDA device: one execution context per optimization profile.

    `profile_names`: the engine's profile names in index order (engines.json; None: "all", or profile<k>).
    `scratch`: share the contexts' scratch memory through it (only where `shares_context_memory`).
    Each `run` takes the first profile whose ranges contain the feeds (`profile_for`).
    """

    def __init__(
        self,
        plan: Path,
        runtime: Any,
        trt: Any,
        device: torch.device,
        name: str | None = None,
        profile_names: Sequence[str] | None = None,
        scratch: DeviceScratch | None = None,
    ) -> None:
        self.name = name or plan.stem
        self.ops = TorchOps(device)
        self._dev = self.ops.torch_device
        self._trt = trt
        with _on(device):
            self.engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise EngineError(
                f"TensorRT {trt.__version__} cannot deserialize {plan} (built with another TensorRT version, "
                "for another GPU, or damaged); rebuild the engines with ficoco-build"
            )
        count = int(self.engine.num_optimization_profiles)
        if profile_names is None:
            names = ["all"] if count == 1 else [f"profile{k}" for k in range(count)]
        else:
            names = [str(n) for n in profile_names]
            if len(names) != count:
                raise EngineError(
                    f"{plan} holds {count} optimization profile(s) but engines.json lists {names}; "
                    "rebuild the engines with ficoco-build"
                )
        dtypes = _dtype_map(trt)
        inputs: list[TensorSpec] = []
        outputs: list[TensorSpec] = []
        self._host_inputs: set[str] = set()
        dynamic: list[str] = []
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
                    dynamic.append(tname)
            else:
                outputs.append(spec)
        self.inputs, self.outputs = tuple(inputs), tuple(outputs)
        #: per profile index: (name, {dynamic input: (min, opt, max)})
        self.profiles: tuple[tuple[str, dict[str, ShapeRange]], ...] = tuple(
            (names[k], {t: self._profile_shape(t, k) for t in dynamic}) for k in range(count)
        )
        shared = scratch is not None and shares_context_memory(trt)
        self.contexts: list[Any] = []
        with _on(device):
            stream = _stream(device)
            for k in range(count):
                if shared:
                    ctx = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
                else:
                    ctx = self.engine.create_execution_context()
                if ctx is None:
                    raise SessionError(f"{self.name}: TensorRT could not create an execution context (out of GPU memory?)")
                if shared:
                    assert scratch is not None
                    scratch.attach(ctx, int(self.engine.get_device_memory_size_for_profile_v2(k)))
                if not ctx.set_optimization_profile_async(k, stream):
                    raise SessionError(f"{self.name}: TensorRT could not select optimization profile {k} ({names[k]})")
                self.contexts.append(ctx)
            if device.type == "cuda":  # the profile switches are enqueued; later runs may use another stream
                torch.cuda.current_stream(device).synchronize()
        self._null: Tensor | None = None

    def _profile_shape(self, name: str, k: int) -> ShapeRange:
        lo, opt, hi = self.engine.get_tensor_profile_shape(name, k)
        return tuple(int(d) for d in lo), tuple(int(d) for d in opt), tuple(int(d) for d in hi)

    @property
    def profile_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.profiles)

    @property
    def context(self) -> Any:
        """The first profile's execution context."""
        return self.contexts[0]

    def profile_range(self, profile: str | int, name: str) -> ShapeRange | None:
        """(min, opt, max) of input `name` in a profile (by name or index); None: a static input."""
        k = self.profile_names.index(profile) if isinstance(profile, str) else int(profile)
        return self.profiles[k][1].get(name)

    def _hull(self, name: str, which: int) -> tuple[int, ...] | None:
        shapes = [ranges[name][which] for _, ranges in self.profiles if name in ranges]
        if not shapes:
            return None
        pick = min if which == 0 else max
        return tuple(pick(dims) for dims in zip(*shapes, strict=True))

    def min_shape(self, name: str) -> tuple[int, ...] | None:
        """The smallest shape over all profiles (`profile_for` then picks the profile)."""
        return self._hull(name, 0)

    def max_shape(self, name: str) -> tuple[int, ...] | None:
        """The largest shape over all profiles (a static input: its one shape)."""
        hi = self._hull(name, 2)
        if hi is not None:
            return hi
        spec = self.input_spec(name)
        return tuple(int(d) for d in spec.shape) if all(d is not None for d in spec.shape) else None  # type: ignore[misc]

    def profile_for(self, feeds: Mapping[str, Tensor]) -> int:
        """The index of the first profile whose min..max ranges contain every feed's shape.

        A segment engine: `prefill` for an empty past (P = 0), `decode` for one token on a cache (T = 1,
        P > 0); several tokens on a cache (T > 1, P > 0) fit neither and are refused."""
        misfits: list[str] = []
        for k, (pname, ranges) in enumerate(self.profiles):
            bad = None
            for name, (lo, _, hi) in ranges.items():
                shape = tuple(int(d) for d in feeds[name].shape)
                if len(shape) != len(lo) or any(not a <= d <= b for d, a, b in zip(shape, lo, hi, strict=True)):
                    bad = f"{pname}: {name} {list(shape)} outside {list(lo)} .. {list(hi)}"
                    break
            if bad is None:
                return k
            misfits.append(bad)
        raise SessionError(
            f"{self.name}: no optimization profile of the engine takes these inputs ({'; '.join(misfits)}); "
            "rebuild the engines with a larger range (ficoco-build --trt-max-shapes) or change the input"
        )

    def check_feeds(self, feeds: Mapping[str, Tensor]) -> None:
        """`Session.check_feeds` against the hull of the profiles, then one profile must take them all."""
        super().check_feeds(feeds)
        self.profile_for(feeds)

    def _address(self, t: Tensor) -> int:
        # TensorRT needs a non-null address even for an empty tensor (the prefill's zero-length past)
        if t.numel() > 0:
            return int(t.data_ptr())
        if self._null is None:
            self._null = torch.empty(256, dtype=torch.uint8, device=self._dev)
        return int(self._null.data_ptr())

    def run(self, feeds: Mapping[str, Tensor], outputs: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        super().check_feeds(feeds)
        k = self.profile_for(feeds)
        ctx = self.contexts[k]
        keep: list[Tensor] = []
        for spec in self.inputs:
            t = feeds[spec.name]
            if spec.name in self._host_inputs:
                t = torch.as_tensor(t).detach().to(device="cpu", dtype=self.ops.dtype(spec.dtype)).contiguous()
            else:
                t = self.ops.to(t, spec.dtype)
            keep.append(t)
            if not ctx.set_input_shape(spec.name, tuple(t.shape)):
                raise SessionError(f"{self.name}: TensorRT rejected shape {list(t.shape)} for input {spec.name} "
                                   f"(profile {self.profiles[k][0]})")
            ctx.set_tensor_address(spec.name, self._address(t))
        result: dict[str, Tensor] = {}
        for spec in self.outputs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                raise SessionError(f"{self.name}: output {spec.name} has unresolved shape {list(shape)} after setting the inputs")
            dst = (outputs or {}).get(spec.name)
            want = self.ops.dtype(spec.dtype)
            if dst is None:
                dst = torch.empty(shape, dtype=want, device=self._dev)
            elif tuple(dst.shape) != shape or dst.dtype != want or dst.device != self._dev or not dst.is_contiguous():
                raise SessionError(
                    f"{self.name}: the buffer for {spec.name} is {list(dst.shape)} {dst.dtype} on {dst.device}; "
                    f"the engine writes {list(shape)} {spec.dtype} on {self._dev}"
                )
            ctx.set_tensor_address(spec.name, self._address(dst))
            result[spec.name] = dst
        # the current torch stream: the inputs were produced and the outputs will be read in stream order, and
        # the caching allocator only reuses `keep`'s memory for later work on this same stream
        if not ctx.execute_async_v3(_stream(self._dev)):
            raise SessionError(f"{self.name}: TensorRT execute_async_v3 failed (see the TensorRT log above)")
        del keep
        return result


class TrtStages(SessionStages):
    """The bundle's engines behind `StagedModel`, with the decoder's KV cache in two preallocated buffer sets.

    One flat device buffer per decoder block and K/V in each of two sets. A buffer's capacity is the
    longest present its segment engine can write: over the engine's profiles, max past + max tokens (the
    decode profile's max past + 1; the prefill profile's max tokens, never more). Batch: the batch in use,
    allocated on the first segment run (grown when a later call needs a larger batch) and then reused by
    every generation. A segment run with an empty past (a prefill) writes its presents into set 0; one on
    a cache writes into the set the cache is not in, so each decode step reads one set and writes the
    other. The last segment writes its [B, V] logits into one preallocated buffer too.
    """

    def __init__(self, sessions: Mapping[str, Session], segments: Sequence[DecoderSegment],
                 scratch: DeviceScratch | None = None) -> None:
        super().__init__(sessions, segments)
        self.scratch = scratch  # the contexts' shared scratch memory, kept alive with the sessions
        self._kv_spec: dict[str, tuple[int, int, int]] = {}  # present name -> (heads, capacity, head_dim)
        for seg in self.segments:
            graph = segment_graph(seg.index)
            sess = self.sessions[graph]
            profiles = getattr(sess, "profiles", None)
            if profiles is None:
                raise SessionError(f"TrtStages needs TensorRT sessions; {graph} is a {type(sess).__name__}")
            for past, present in zip(past_names(seg.attention_blocks), present_names(seg.attention_blocks), strict=True):
                spec = sess.input_spec(past)
                cap = 0
                for _, ranges in profiles:
                    p, t = ranges.get(past), ranges.get("hidden_states")
                    p_max = int(p[2][2]) if p is not None else int(spec.shape[2] or 0)
                    t_max = int(t[2][1]) if t is not None else int(sess.input_spec("hidden_states").shape[1] or 0)
                    cap = max(cap, p_max + t_max)
                if spec.shape[1] is None or spec.shape[3] is None or cap < 1:
                    raise SessionError(f"{graph}: input {past} needs static heads/head_dim and a profile range, got {spec.shape}")
                self._kv_spec[present] = (int(spec.shape[1]), cap, int(spec.shape[3]))
        last = segment_graph(self.segments[-1].index)
        logits = next((s for s in self.sessions[last].outputs if s.name == "logits"), None)
        if logits is None or logits.shape[-1] is None:
            raise SessionError(f"{last}: needs a logits output with a static vocabulary axis, got {logits}")
        self._vocab, self._logits_dtype = int(logits.shape[-1]), logits.dtype
        self._sets: list[dict[str, Tensor]] = []
        self._batch = 0
        self._logits_buf: Tensor | None = None

    @property
    def kv_capacity(self) -> dict[str, int]:
        """present name -> the longest KV sequence its buffers hold."""
        return {n: cap for n, (_, cap, _) in self._kv_spec.items()}

    def _ensure(self, batch: int) -> None:
        if batch <= self._batch and self._sets:
            return
        self._sets = [
            {n: torch.empty(batch * h * cap * hd, dtype=self.ops.dtype(self.kv_dtype), device=self.ops.torch_device)
             for n, (h, cap, hd) in self._kv_spec.items()}
            for _ in range(2)
        ]
        self._logits_buf = torch.empty(batch * self._vocab, dtype=self.ops.dtype(self._logits_dtype), device=self.ops.torch_device)
        self._batch = batch
        mib = sum(t.numel() * t.element_size() for s in self._sets for t in s.values()) / 2**20
        log.info("TensorRT KV cache: 2 x %d blocks, batch %d, %.1f MiB", len(self._kv_spec) // 2, batch, mib)

    def _views(self, which: int, batch: int, length: int, names: Sequence[str]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name in names:
            h, cap, hd = self._kv_spec[name]
            if length > cap:
                raise SessionError(f"KV length {length} exceeds the engine's capacity {cap} for {name}; rebuild with a larger range")
            out[name] = self._sets[which][name][: batch * h * length * hd].view(batch, h, length, hd)
        return out

    def _in_set(self, which: int, present: str, t: Tensor) -> bool:
        return bool(self._sets) and t.numel() > 0 and t.data_ptr() == self._sets[which][present].data_ptr()

    def extend(self, embeds: Tensor, position: Any, past: list[Tensor]) -> tuple[Any, list[Tensor]]:
        """T tokens on the cache as T decode steps: the engines' profiles are a prefill (no past) and a
        decode step (one token), so several tokens on a cache fit neither."""
        t = int(embeds.shape[1])
        if t == 1:
            return super().extend(embeds, position, past)
        base = host_ids(position).reshape(-1)
        logits: Any = None
        for i in range(t):
            logits, past = super().extend(embeds[:, i : i + 1], base + i, past)
        return logits, past

    def run_graph(self, graph: str, feeds: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Segment graphs write their presents into a KV buffer set and their logits into the logits buffer."""
        s = segment_index(graph)
        if s is None:
            return super().run_graph(graph, feeds)
        seg = self.segments[s]
        batch, tokens = int(feeds["hidden_states"].shape[0]), int(feeds["hidden_states"].shape[1])
        pasts, presents = past_names(seg.attention_blocks), present_names(seg.attention_blocks)
        past_len = int(feeds[pasts[0]].shape[2])
        self._ensure(batch)
        # a cache in set 0 -> write set 1; an empty past (prefill) or a cache elsewhere -> set 0
        dst = 1 if past_len > 0 and self._in_set(0, presents[0], feeds[pasts[0]]) else 0
        outs = self._views(dst, batch, past_len + tokens, presents)
        if seg.is_last:
            assert self._logits_buf is not None
            outs["logits"] = self._logits_buf[: batch * self._vocab].view(batch, self._vocab)
        return self.sessions[graph].run(feeds, outs)


def trt_stages(
    bundle: str | os.PathLike[str],
    manifest: Manifest,
    device: int = 0,
    verify: bool = True,
    target: GpuTarget | None = None,
    torch_device: torch.device | None = None,
) -> tuple[TrtStages, Path, EngineManifest]:
    """Load the engines of every bundle graph for this machine. Raises BackendUnavailable / EngineError / EngineMismatch.

    `torch_device`: where the tensors live (default cuda:`device`; the tests' fake engines run on the CPU).
    """
    target = target or local_target(device)
    engine_dir, em = find_engines(bundle, manifest, target, verify=verify)
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    dev = torch_device or torch.device("cuda", device)
    segments = manifest.decoder_segments()
    scratch = DeviceScratch(dev) if shares_context_memory(trt) else None
    sessions: dict[str, Session] = {}
    for g in graph_names(len(segments)):
        sessions[g] = TrtSession(engine_dir / em.engines[g]["file"], runtime, trt, dev, name=g,
                                 profile_names=em.profile_names(g), scratch=scratch)
    log.info("TensorRT %s engines from %s (%s, %s)%s", trt.__version__, engine_dir, em.gpu_name, platform.machine(),
             f", one {scratch.nbytes / 2**20:.1f} MiB scratch buffer for every context" if scratch else "")
    return TrtStages(sessions, segments, scratch=scratch), engine_dir, em
