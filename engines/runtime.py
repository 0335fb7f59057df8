"""`Pipeline`: a bundle -> answers. Image + question in, streamed text out, on ONNX Runtime or TensorRT.

    pipe = Pipeline.from_bundle("out/llava-vl25", backend="auto")
    answer = pipe.generate("cat.jpg", "What is in the picture?", on_text=lambda row, s: print(s, end=""))

Flow (`bundle.frontend.Frontend` for the input side): the bundle's preprocessor_config.json turns each image into pixel_values; the manifest's chat
template and the bundle's tokenizer turn the question into text ids plus the image offset; the vision
stage runs (in chunks of its batch limit), then `ficoco.generation.decode_tokens` (the loop every backend
shares with the PyTorch reference) runs embed -> prefill (which splices the visual tokens in at the
offset) -> decode steps with per-layer KV growth, greedy or seeded temperature/top-p sampling, and stop
tokens.

Limits come from the bundle: prompts longer than `shape_ranges.text_len`, more new tokens than
`shape_ranges.max_new_tokens`, are refused with an `InputError` that says so. Batches larger than the
decoder accepts (`shape_ranges.batch`, or the engines' profiles) are run in chunks; the vision tower runs
in chunks of its own limit. Prompts in one decoder batch must tokenize to the same length (the graphs
take no attention mask).

`generate(..., timings=d)` fills `d` with per-stage times for benchmarks (see `Timings`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bundle import layout as B
from bundle.frontend import Frontend, InputError, TextRequest
from bundle.names import VISION
from bundle.session import BackendUnavailable, SessionStages
from engines.chat import ChatSession, ChatTurn
from engines.streaming import TextCallback, TextStream
from ficoco.generation import decode_tokens, host_ids, host_offsets
from ficoco.inputs import PromptError
from ficoco.preprocess import ImageError, ImageLike
from ficoco.sampling import SamplingConfig

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "tensorrt")
_ALIASES = {"ort": "onnxruntime", "onnx": "onnxruntime", "trt": "tensorrt"}


__all__ = ["Answer", "BACKENDS", "ChatSession", "ChatTurn", "ImageError", "InputError", "Pipeline", "PromptError", "TextRequest", "Timings"]


@dataclass
class Answer:
    """One generated answer: the token ids up to (not including) the first stop token, and their text."""

    text: str
    token_ids: list[int]
    stopped: bool  # True when a stop token ended it, False when max_new_tokens did


@dataclass
class Timings:
    """Per-stage wall-clock times of one `generate` call (milliseconds; device work synchronised).

    ttft_ms runs from the start of the vision tower to the first chosen token (vision + prompt embedding +
    prefill + first sampling); decode covers every later token; decode_tokens_per_s is per sequence
    (a batch of B produces B times as many tokens in that time).
    """

    backend: str = ""
    batch: int = 0
    text_len: int = 0
    preprocess_ms: float = 0.0
    tokenize_ms: float = 0.0
    vision_ms: float = 0.0
    embed_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    decode_steps: int = 0
    step_ms_mean: float = 0.0
    decode_tokens_per_s: float = 0.0
    new_tokens: int = 0
    total_ms: float = 0.0
    step_ms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _TimedStages:
    """The decoder-side stages of a session, timed per call when `timings` is given."""

    def __init__(self, stages: SessionStages, timings: Timings | None) -> None:
        self.stages = stages
        self.timings = timings

    def _timed(self, key: str, fn: Callable[[], Any]) -> Any:
        if self.timings is None:
            return fn()
        t0 = time.perf_counter()
        out = fn()
        self.stages.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        if key == "step":
            self.timings.step_ms.append(ms)
        else:
            setattr(self.timings, key, getattr(self.timings, key) + ms)
        return out

    def embed(self, input_ids: Any) -> Any:
        if input_ids.shape[1] == 1:  # a decode token (prompts have >= 2): part of the decode time
            return self.stages.embed(input_ids)
        return self._timed("embed_ms", lambda: self.stages.embed(input_ids))

    def prefill(self, embeds: Any, visual: Any, image_offset: Any) -> tuple[Any, list[Any]]:
        return self._timed("prefill_ms", lambda: self.stages.prefill(embeds, visual, image_offset))

    def step(self, embeds: Any, position: Any, past: list[Any]) -> tuple[Any, list[Any]]:
        return self._timed("step", lambda: self.stages.step(embeds, position, past))


def _normalise_backend(backend: str) -> str:
    b = _ALIASES.get(backend.lower(), backend.lower())
    if b not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return b


class Pipeline(Frontend):
    """A loaded bundle with one backend; `generate` answers questions about images."""

    def __init__(self, front: Frontend, stages: SessionStages, backend: str, engine_dir: Path | None = None) -> None:
        super().__init__(front.bundle, front.manifest, front.tokenizer, front.processor_config, front.generation_config)
        self.stages = stages
        self.backend = backend
        self.engine_dir = engine_dir

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_bundle(  # type: ignore[override]
        cls,
        path: str | os.PathLike[str] | Frontend,
        backend: str = "auto",
        *,
        verify: bool = True,
        device: int = 0,
        ort_provider: str = "auto",
        threads: int | None = None,
        low_memory: bool = False,
    ) -> Pipeline:
        """Load a bundle (a path, or a `Frontend` already read) with `backend` (auto | onnxruntime | tensorrt).

        `low_memory` (ONNX Runtime): each graph is opened only while it runs (`bundle.ort.OrtSession`).

        auto takes TensorRT when it is installed, a GPU is visible and the bundle has engines built for
        this TensorRT version and GPU; otherwise ONNX Runtime (CUDA provider where available, else CPU),
        logging why. An explicit `tensorrt` raises instead: BackendUnavailable (no TensorRT / GPU),
        EngineError (no engines) or EngineMismatch (engines for another TensorRT version or SM).
        With `verify`, every bundle file's sha256 (and each engine's) is checked first.
        """
        backend = _normalise_backend(backend)
        front = path if isinstance(path, Frontend) else Frontend.from_bundle(path, verify=verify)
        engine_dir: Path | None = None
        stages: SessionStages | None = None
        if backend in ("auto", "tensorrt"):
            try:
                from engines.trt_backend import EngineError, trt_stages
            except ImportError as err:  # the runtime-only install: the TensorRT backend's buffers are torch's
                if backend == "tensorrt":
                    raise BackendUnavailable(
                        f"the TensorRT backend needs PyTorch for its CUDA buffers ({err}); install a CUDA build of "
                        "torch beside TensorRT, or use --backend onnxruntime"
                    ) from err
                log.info("backend auto: using ONNX Runtime, not TensorRT: %s", err)
            else:
                try:
                    stages, engine_dir, _ = trt_stages(front.bundle, front.manifest, device=device, verify=verify)
                    backend = "tensorrt"
                except (BackendUnavailable, EngineError) as err:
                    if backend == "tensorrt":
                        raise
                    log.info("backend auto: using ONNX Runtime, not TensorRT: %s", err)
        if stages is None:
            from bundle.ort import ort_stages

            stages = ort_stages(
                front.bundle / B.ONNX_DIR, provider=ort_provider, threads=threads, cache_dir=front.bundle / B.ENGINES_DIR / "ort-trt-cache",
                segments=front.manifest.decoder_segments(), keep_loaded=not low_memory,
            )
            backend = "onnxruntime"
        log.info("backend %s on %s", backend, stages.device)
        return cls(front, stages, backend, engine_dir)

    # -- limits ----------------------------------------------------------------------------------------------
    @property
    def max_decoder_batch(self) -> int:
        limits = [int(self.batch_range[1])]
        for graph in self.stages.sessions:
            if graph == VISION:
                continue
            m = self.stages.max_batch(graph)
            if m is not None:
                limits.append(m)
        return max(1, min(limits))

    @property
    def max_vision_batch(self) -> int:
        m = self.stages.max_batch(VISION)
        return max(1, m if m is not None else int(self.batch_range[1]))

    # -- generation ------------------------------------------------------------------------------------------
    def chat(self, image: ImageLike, history: Sequence[tuple[str, str]] = ()) -> ChatSession:
        """A multi-turn conversation about `image`: each `ask` reuses the cache of the turns before it
        (`engines.chat`); `history`: earlier (question, answer) turns to start from (prefilled once)."""
        return ChatSession(self.stages, self, self.preprocess([image]), history)

    def generate(
        self,
        image: ImageLike,
        question: str,
        *,
        max_new_tokens: int | None = None,
        sampling: SamplingConfig | None = None,
        stop_token_ids: Sequence[int] | None = None,
        stop_strings: Sequence[str] | None = None,
        on_text: Callable[[str], None] | None = None,
        timings: dict[str, Any] | None = None,
    ) -> Answer:
        """Answer one question about one image; `on_text` receives the answer as it is generated."""
        cb: TextCallback | None = None if on_text is None else (lambda row, s: on_text(s))
        return self.generate_batch(
            [image], [question], max_new_tokens=max_new_tokens, sampling=sampling,
            stop_token_ids=stop_token_ids, stop_strings=stop_strings, on_text=cb, timings=timings,
        )[0]

    def generate_batch(
        self,
        images: Sequence[ImageLike],
        questions: str | Sequence[str] | TextRequest,
        *,
        max_new_tokens: int | None = None,
        sampling: SamplingConfig | None = None,
        stop_token_ids: Sequence[int] | None = None,
        stop_strings: Sequence[str] | None = None,
        on_text: TextCallback | None = None,
        timings: dict[str, Any] | None = None,
    ) -> list[Answer]:
        """Answer one question per image (a single question is asked of every image), or a `TextRequest`
        that `prepare_text` made (then `max_new_tokens`, `stop_token_ids` and `stop_strings` are the request's).

        `sampling` defaults to the bundle's generation_config.json (greedy when it sets nothing).
        `stop_token_ids` default to the bundle's EOS id; pass [] to generate exactly `max_new_tokens`.
        `stop_strings` end an answer where its text first contains one (`engines.streaming`).
        `max_new_tokens` defaults to the bundle's limit. `timings`, when given, is filled with `Timings`
        fields (per-stage milliseconds, TTFT, decode tokens/s).
        """
        t_start = time.perf_counter()
        if isinstance(questions, TextRequest):
            text = questions
        else:
            qs = [questions] * len(images) if isinstance(questions, str) else list(questions)
            if len(qs) != len(images):
                raise InputError(f"{len(images)} images but {len(qs)} questions; give one question, or one per image")
            text = self.prepare_text(qs, max_new_tokens, stop_token_ids, stop_strings)
        if int(text.input_ids.shape[0]) != len(images):
            raise InputError(f"{len(images)} images for {int(text.input_ids.shape[0])} prompts")
        tm = Timings(backend=self.backend, batch=len(images)) if timings is not None else None
        t0 = time.perf_counter()
        pixel_values = self.preprocess(images)
        if tm is not None:
            tm.preprocess_ms, tm.tokenize_ms = (time.perf_counter() - t0) * 1e3, text.tokenize_ms
            tm.text_len = int(text.input_ids.shape[1])
        streams: list[TextStream] = []
        self._generate(pixel_values, text, sampling=sampling, on_text=on_text, timings=tm, streams=streams)
        answers = [Answer(st.answer_text(), list(st.ids), st.stopped) for st in streams]
        if tm is not None and timings is not None:
            tm.total_ms = (time.perf_counter() - t_start) * 1e3
            timings.update(tm.to_dict())
        return answers

    def generate_ids(
        self,
        pixel_values: Any,
        input_ids: Any,
        image_offset: Any | int,
        max_new_tokens: int,
        *,
        sampling: SamplingConfig | None = None,
        stop_token_ids: Sequence[int] | None = None,
        on_text: TextCallback | None = None,
        timings: Timings | None = None,
    ) -> Any:
        """Token ids [B, n] (n <= max_new_tokens; rows that stopped early repeat their stop token), from
        preprocessed pixel_values [B, 3, H, W] and text ids [B, T] without the image placeholder.

        Runs the vision tower in chunks of its batch limit, then `decode_tokens` per decoder chunk.
        Sampling uses one seeded generator per decoder chunk, so a seed reproduces a run exactly.
        """
        b = int(input_ids.shape[0])
        if pixel_values.shape[0] != b:
            raise InputError(f"{pixel_values.shape[0]} images for {b} prompts")
        self.check_request(int(input_ids.shape[1]), max_new_tokens)
        offsets = host_offsets(image_offset, b)
        input_ids = host_ids(input_ids)
        stops = tuple(int(t) for t in (self.eos_token_ids if stop_token_ids is None else stop_token_ids))
        text = TextRequest(input_ids, offsets, int(max_new_tokens), stops)
        return self._generate(pixel_values, text, sampling=sampling, on_text=on_text, timings=timings)

    def _generate(self, pixel_values: Any, text: TextRequest, *, sampling: SamplingConfig | None,
                  on_text: TextCallback | None, timings: Timings | None, streams: list[TextStream] | None = None) -> Any:
        """`generate_ids` on a checked request; `streams`, when given, receives each row's `TextStream`."""
        input_ids, offsets, max_new_tokens = text.input_ids, text.image_offsets, text.max_new_tokens
        sampling = self.default_sampling if sampling is None else sampling
        b = int(input_ids.shape[0])
        stops = list(text.stop_token_ids)
        streams = [] if streams is None else streams
        streams += [TextStream(self.tokenizer, set(stops), r, on_text, text.stop_strings) for r in range(b)]
        # vision, in chunks of the vision tower's limit
        tv = time.perf_counter()
        vb = self.max_vision_batch
        visual_parts = [self.stages.encode_image(pixel_values[i : i + vb]) for i in range(0, b, vb)]
        visual = visual_parts[0] if len(visual_parts) == 1 else _concat(visual_parts)
        if timings is not None:
            self.stages.synchronize()
            timings.vision_ms = (time.perf_counter() - tv) * 1e3
        token_times: list[list[float]] = []  # per decoder chunk: when each token column was chosen
        outputs: list[Any] = []
        db = self.max_decoder_batch
        for start in range(0, b, db):
            rows = slice(start, min(b, start + db))
            times: list[float] = []
            token_times.append(times)

            def on_token(col: np.ndarray, chunk: list[TextStream] = streams[rows], times: list[float] = times) -> None:
                times.append(time.perf_counter())
                for s, t in zip(chunk, col.tolist(), strict=True):
                    s.push(int(t))

            ids = decode_tokens(  # the vision tower already ran, in chunks of its own batch limit
                _TimedStages(self.stages, timings),
                visual[rows],
                input_ids[rows],
                offsets[rows],
                max_new_tokens,
                sampling,
                stops or None,
                on_token,
                should_stop=(lambda col, chunk=streams[rows]: np.array([st.stopped for st in chunk]))
                if text.stop_strings else None,
            )
            outputs.append(ids)
        for s in streams:
            s.flush()
        n = max(int(o.shape[1]) for o in outputs)
        fill = stops[0] if stops else 0
        tokens = np.concatenate([np.pad(o, ((0, 0), (0, n - o.shape[1])), constant_values=fill) for o in outputs], axis=0)
        if timings is not None:
            timings.ttft_ms = (token_times[0][0] - tv) * 1e3 if token_times[0] else 0.0
            timings.decode_steps = len(timings.step_ms)
            timings.step_ms_mean = sum(timings.step_ms) / len(timings.step_ms) if timings.step_ms else 0.0
            decode_s = sum(t[-1] - t[0] for t in token_times if t)
            later = sum(max(0, len(t) - 1) for t in token_times)
            timings.decode_ms = decode_s * 1e3
            timings.decode_tokens_per_s = later / decode_s if decode_s > 0 else 0.0
            timings.new_tokens = n
        return tokens


def _concat(parts: Sequence[Any]) -> Any:
    """Concatenate a backend's arrays along the batch (numpy arrays, or torch tensors on a device)."""
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts, axis=0)
    import torch

    return torch.cat(list(parts), dim=0)


def describe(pipe: Pipeline) -> Mapping[str, Any]:
    """A short description of a loaded pipeline (for logs and --verbose)."""
    m = pipe.manifest
    return {
        "bundle": str(pipe.bundle),
        "backend": pipe.backend,
        "device": str(pipe.stages.device),
        "engine_dir": str(pipe.engine_dir) if pipe.engine_dir else None,
        "model": m.source_model.get("name"),
        "variant": m.variant,
        "visual_tokens": m.visual_tokens,
        "precision": m.precision,
        "text_len": list(pipe.text_len_range),
        "max_new_tokens": pipe.max_new_tokens_limit,
        "batch": list(pipe.batch_range),
    }
