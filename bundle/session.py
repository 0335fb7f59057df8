"""One session interface for every backend, and the stage adapter that stitches a bundle's sessions together.

A `Session` runs one graph: inputs by name in, outputs by name out, in the session's kind of array
(`ops`, `bundle.arrays`): numpy arrays for ONNX Runtime on CPU (no torch anywhere), torch tensors in CUDA
memory for TensorRT and ONNX Runtime's CUDA provider, so the decode loop never copies the KV cache to the
host. A caller may pass preallocated `outputs`; the session writes into them and returns them (TensorRT
writes there directly; other backends copy).

`SessionStages` puts the graph sessions (vision_encoder, embed_tokens, the decoder splice, segments and
reductions) behind `ficoco.generation.StagedModel`, so `ficoco.generation.generate_tokens` drives every backend with
the same loop, sampler and stopping rule as the PyTorch reference.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bundle.arrays import ArrayOps
from bundle.names import (
    EMBED,
    SPLICE,
    VISION,
    graph_names,
    past_names,
    present_names,
    reduce_graph,
    segment_graph,
)
from ficoco.generation import host_ids, host_logits
from ficoco.segments import DecoderSegment


class SessionError(RuntimeError):
    """A graph could not be run with the given inputs (the message names the graph, the input and why)."""


class BackendUnavailable(RuntimeError):
    """The requested backend (or its GPU) is not available on this machine; the message says what to install."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its name, element type ("float32", "int64", ... `bundle.arrays`) and
    shape (ints, or None where the axis is dynamic)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]


class Session(abc.ABC):
    """One graph, run by name. Implementations: `OrtSession`, `TrtSession`."""

    #: the graph's name (one of bundle.names.graph_names)
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    #: where its tensors live and how they are made (numpy on the host, or torch on a device)
    ops: ArrayOps

    @property
    def device(self) -> str:
        return self.ops.device

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.outputs)

    def input_spec(self, name: str) -> TensorSpec:
        for s in self.inputs:
            if s.name == name:
                return s
        raise SessionError(f"{self.name} has no input {name!r} (inputs: {', '.join(self.input_names)})")

    def max_shape(self, name: str) -> tuple[int, ...] | None:
        """The largest shape this session accepts for input `name` (None: the backend sets no limit)."""
        return None

    def min_shape(self, name: str) -> tuple[int, ...] | None:
        """The smallest shape this session accepts for input `name` (None: the backend sets no limit)."""
        return None

    def check_feeds(self, feeds: Mapping[str, Any]) -> None:
        """Every input present, right rank, static axes equal, dynamic axes within the backend's range."""
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing or extra:
            raise SessionError(f"{self.name}: inputs missing {missing}, unexpected {extra}")
        for spec in self.inputs:
            shape = tuple(feeds[spec.name].shape)
            if len(shape) != len(spec.shape) or any(s is not None and s != d for s, d in zip(spec.shape, shape, strict=True)):
                raise SessionError(f"{self.name}: input {spec.name} has shape {list(shape)}, the graph wants {_fmt(spec.shape)}")
            lo, hi = self.min_shape(spec.name), self.max_shape(spec.name)
            if (lo is not None and any(d < m for d, m in zip(shape, lo, strict=True))) or (
                hi is not None and any(d > m for d, m in zip(shape, hi, strict=True))
            ):
                raise SessionError(
                    f"{self.name}: input {spec.name} has shape {list(shape)}, outside the engine's optimization "
                    f"profile {list(lo or ())} .. {list(hi or ())}; rebuild the engines with a larger range "
                    "(ficoco-build --trt-max-shapes) or shorten the input"
                )

    @abc.abstractmethod
    def run(self, feeds: Mapping[str, Any], outputs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Run the graph; returns every output by name (the given `outputs` tensors where passed)."""

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on CPU); used by timing hooks, never inside the decode loop."""
        self.ops.synchronize()


def _fmt(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


class SessionStages:
    """A bundle's graph sessions behind `ficoco.generation.StagedModel` (encode_image / embed / prefill / step).

    Prefill runs the splice, then each decoder segment with an empty past and, between two, the reduction
    graph; a decode step runs the same segment graphs on one token and the cache (`ficoco.segments`:
    segment s numbers its token `position - offset_s`). Inputs arrive as numpy arrays from the generation
    loop (token ids, positions), as arrays of an earlier graph (already in the sessions' storage), or as
    another backend's tensors (a comparison feeding the reference's); the visual tokens, hidden states and
    the KV cache stay in the sessions' storage. Logits go back to the host as float32 numpy ([B, V], the
    one transfer per decode step the host sampler needs). Every graph runs through `run_graph`
    (a subclass may record what a graph returned there, or manage the KV buffers itself).
    """

    def __init__(self, sessions: Mapping[str, Session], segments: Sequence[DecoderSegment]) -> None:
        self.segments = tuple(segments)
        missing = [g for g in graph_names(len(self.segments)) if g not in sessions]
        if missing:
            raise SessionError(f"missing graph sessions: {', '.join(missing)}")
        self.sessions = dict(sessions)
        self.num_layers = sum(len(seg.attention_blocks) for seg in self.segments)
        self.past_names = past_names(self.num_layers)
        self.present_names = present_names(self.num_layers)
        self.ops = self.sessions[VISION].ops
        self.device = self.ops.device
        self.dtype = self.sessions[VISION].input_spec("pixel_values").dtype
        with_cache = next((seg for seg in self.segments if seg.attention_blocks), None)
        if with_cache is None:
            raise SessionError("the decoder segments hold no attention block; re-export the bundle")
        spec = self.sessions[segment_graph(with_cache.index)].input_spec(past_names(with_cache.attention_blocks)[0])
        if spec.shape[1] is None or spec.shape[3] is None:
            raise SessionError(f"{spec.name} needs static KV heads and head size, got {list(spec.shape)}")
        self.kv_heads, self.head_dim, self.kv_dtype = int(spec.shape[1]), int(spec.shape[3]), spec.dtype

    # -- helpers ---------------------------------------------------------------------------------------------
    def _feed(self, graph: str, name: str, t: Any) -> Any:
        return self.ops.to(t, self.sessions[graph].input_spec(name).dtype)

    def _logits(self, logits: Any) -> np.ndarray:
        return host_logits(logits)

    def run_graph(self, graph: str, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """One graph's session on `feeds` (already on the device, in the graph's dtypes): every output by name."""
        return self.sessions[graph].run(feeds)

    def synchronize(self) -> None:
        self.sessions[VISION].synchronize()

    def max_batch(self, graph: str) -> int | None:
        """The largest batch a graph's session accepts (None: no backend limit)."""
        sess = self.sessions[graph]
        hi = sess.max_shape(sess.input_names[0])
        return None if hi is None else int(hi[0])

    def segment_feeds(self, seg: DecoderSegment, hidden: Any, position_ids: Any,
                      past: Sequence[Any] | None) -> dict[str, Any]:
        """The inputs of segment `seg`'s graph; `past` None: an empty cache (a prefill)."""
        graph = segment_graph(seg.index)
        feeds = {"hidden_states": self._feed(graph, "hidden_states", hidden),
                 "position_ids": self._feed(graph, "position_ids", position_ids)}
        names = past_names(seg.attention_blocks)
        if past is None:
            empty = self.ops.zeros((hidden.shape[0], self.kv_heads, 0, self.head_dim), self.kv_dtype)
            feeds.update(dict.fromkeys(names, empty))
        else:
            feeds.update({n: self._feed(graph, n, p) for n, p in zip(names, past, strict=True)})
        return feeds

    # -- StagedModel -------------------------------------------------------------------------------------------
    def encode_image(self, pixel_values: Any) -> Any:
        out = self.run_graph(VISION, {"pixel_values": self._feed(VISION, "pixel_values", pixel_values)})
        return out["visual_tokens"]

    def embed(self, input_ids: Any) -> Any:
        return self.run_graph(EMBED, {"input_ids": self._feed(EMBED, "input_ids", input_ids)})["inputs_embeds"]

    def prefill(self, embeds: Any, visual: Any, image_offset: Any) -> tuple[Any, list[Any]]:
        offset = self._feed(SPLICE, "image_offset", image_offset)
        h = self.run_graph(SPLICE, {
            "inputs_embeds": self._feed(SPLICE, "inputs_embeds", embeds),
            "visual_tokens": self._feed(SPLICE, "visual_tokens", visual),
            "image_offset": offset,
        })["hidden_states"]
        b, length = h.shape[0], h.shape[1]
        position_ids = self.ops.positions(b, length)
        presents: list[Any] = []
        for seg in self.segments:
            out = self.run_graph(segment_graph(seg.index), self.segment_feeds(seg, h, position_ids, None))
            presents += [out[n] for n in present_names(seg.attention_blocks)]
            if seg.closing_step is None:
                return self._logits(out["logits"]), presents
            graph = reduce_graph(seg.index + 1)
            red = self.run_graph(graph, {
                "hidden_states": self._feed(graph, "hidden_states", out["hidden_out"]),
                "query_states": self._feed(graph, "query_states", out["query_states"]),
                "key_states": self._feed(graph, "key_states", out[f"present.{seg.closing_step.layer}.key"]),
                "image_offset": self._feed(graph, "image_offset", offset),
                "position_ids": self._feed(graph, "position_ids", position_ids),
            })
            h, position_ids = red["hidden_out"], red["position_ids_out"]
        raise SessionError("the decoder has no last segment; re-export the bundle")

    def step(self, embeds: Any, position: Any, past: list[Any]) -> tuple[Any, list[Any]]:
        return self.extend(embeds, position, past)

    def extend(self, embeds: Any, position: Any, past: list[Any]) -> tuple[Any, list[Any]]:
        """T tokens [B, T, D] on the cache: every segment graph on them (T = 1: a decode step)."""
        h = embeds
        b, t = int(embeds.shape[0]), int(embeds.shape[1])
        positions = host_ids(position).reshape(b, 1) + np.arange(t, dtype=np.int64)[None, :]
        presents: list[Any] = []
        first = 0
        for seg in self.segments:
            n = 2 * len(seg.attention_blocks)
            feeds = self.segment_feeds(seg, h, positions - seg.position_offset, past[first:first + n])
            out = self.run_graph(segment_graph(seg.index), feeds)
            presents += [out[name] for name in present_names(seg.attention_blocks)]
            first += n
            if seg.closing_step is None:
                return self._logits(out["logits"]), presents
            h = out["hidden_out"]
        raise SessionError("the decoder has no last segment; re-export the bundle")
