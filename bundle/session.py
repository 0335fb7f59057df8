"""One session interface for every backend, and the stage adapter that stitches four sessions together.

A `Session` runs one graph: inputs by name in, outputs by name out, all torch tensors on the session's
`device` (CPU for ONNX Runtime on CPU; CUDA memory for TensorRT and ONNX Runtime's CUDA provider, so the
decode loop never copies the KV cache to the host). A caller may pass preallocated `outputs`; the session
writes into them and returns them (TensorRT writes there directly; other backends copy).

`SessionStages` puts the four graph sessions (vision_encoder, embed_tokens, decoder_prefill, decoder_step)
behind `ficoco.generation.StagedModel`, so `ficoco.generation.generate_tokens` drives every backend with
the same loop, sampler and stopping rule as the PyTorch reference.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bundle.names import EMBED, PREFILL, STAGES, STEP, VISION, past_names, present_names


class SessionError(RuntimeError):
    """A graph could not be run with the given inputs (the message names the graph, the input and why)."""


class BackendUnavailable(RuntimeError):
    """The requested backend (or its GPU) is not available on this machine; the message says what to install."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its name, dtype and shape (ints, or None where the axis is dynamic)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int | None, ...]


class Session(abc.ABC):
    """One graph, run by name. Implementations: `OrtSession`, `TrtSession`."""

    #: the graph's name (one of bundle.names.STAGES)
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    device: torch.device

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

    def check_feeds(self, feeds: Mapping[str, Tensor]) -> None:
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
    def run(self, feeds: Mapping[str, Tensor], outputs: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Run the graph; returns every output by name (the given `outputs` tensors where passed)."""

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on CPU); used by timing hooks, never inside the decode loop."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _fmt(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


class SessionStages:
    """Four sessions behind `ficoco.generation.StagedModel` (encode_image / embed / prefill / step).

    Inputs arrive as CPU tensors from the generation loop (token ids, positions) or as tensors of an
    earlier stage (already on `device`); the visual tokens, embeddings and the KV cache stay on the
    session device. Logits go back to the host as float32 ([B, V], the one transfer per decode step the
    CPU sampler needs). Every stage runs through `run_stage` (a subclass may record what a stage
    returned there); subclasses may override `prefill` / `step` to manage KV buffers themselves.
    """

    def __init__(self, sessions: Mapping[str, Session]) -> None:
        missing = [s for s in STAGES if s not in sessions]
        if missing:
            raise SessionError(f"missing graph sessions: {', '.join(missing)}")
        self.sessions = dict(sessions)
        step_inputs = self.sessions[STEP].input_names
        self.num_layers = sum(1 for n in step_inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        self.past_names = past_names(self.num_layers)
        self.present_names = present_names(self.num_layers)
        self.device = self.sessions[VISION].device
        self.dtype = self.sessions[VISION].input_spec("pixel_values").dtype

    # -- helpers ---------------------------------------------------------------------------------------------
    def _to(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        return t.to(device=self.device, dtype=dtype, non_blocking=True).contiguous()

    def _feed(self, stage: str, name: str, t: Tensor) -> Tensor:
        return self._to(t, self.sessions[stage].input_spec(name).dtype)

    def _logits(self, logits: Tensor) -> Tensor:
        return logits.float().cpu()

    def run_stage(self, stage: str, feeds: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """One stage's session on `feeds` (already on the device, in the graph's dtypes): every output by name."""
        return self.sessions[stage].run(feeds)

    def synchronize(self) -> None:
        self.sessions[STEP].synchronize()

    def max_batch(self, stage: str) -> int | None:
        """The largest batch a stage's session accepts (None: no backend limit)."""
        sess = self.sessions[stage]
        hi = sess.max_shape(sess.input_names[0])
        return None if hi is None else int(hi[0])

    # -- StagedModel -------------------------------------------------------------------------------------------
    def encode_image(self, pixel_values: Tensor) -> Tensor:
        out = self.run_stage(VISION, {"pixel_values": self._feed(VISION, "pixel_values", pixel_values)})
        return out["visual_tokens"]

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.run_stage(EMBED, {"input_ids": self._feed(EMBED, "input_ids", input_ids)})["inputs_embeds"]

    def prefill(self, embeds: Tensor, visual: Tensor, image_offset: Tensor) -> tuple[Tensor, list[Tensor]]:
        out = self.run_stage(
            PREFILL,
            {
                "inputs_embeds": self._feed(PREFILL, "inputs_embeds", embeds),
                "visual_tokens": self._feed(PREFILL, "visual_tokens", visual),
                "image_offset": self._feed(PREFILL, "image_offset", image_offset),
            },
        )
        return self._logits(out["logits"]), [out[n] for n in self.present_names]

    def step(self, embeds: Tensor, position: Tensor, past: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        feeds = {
            "inputs_embeds": self._feed(STEP, "inputs_embeds", embeds),
            "position": self._feed(STEP, "position", position),
        }
        feeds.update({n: self._feed(STEP, n, p) for n, p in zip(self.past_names, past, strict=True)})
        out = self.run_stage(STEP, feeds)
        return self._logits(out["logits"]), [out[n] for n in self.present_names]
