"""The one thread that owns the `Pipeline`, and the bounded queue of jobs in front of it.

A `Pipeline` runs one generation at a time: its sessions, KV caches and tokenizer are not shared between
concurrent calls, so every request becomes a `Job` on one queue and one worker thread runs them in order.
HTTP threads only wait on their job's events. A full queue, or a queue that is shutting down, is a 503.

Each request is one turn of a chat (`engines.chat`): a conversation the worker answered before (same
image, same questions, same answers back) continues in the `ChatSession` that holds its cache, so a
follow-up feeds only its own tokens; any other history is prefilled once. The worker keeps the most recent
`chat_cache` conversations.

Events a job sends its HTTP thread, in order: ("start", prompt_tokens) once the prompt is tokenized and
checked, then ("text", piece) per new piece of the answer, then ("done", `Result`); or ("error",
`RequestError`) at any point instead of the rest.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from serving.protocol import ChatRequest, RequestError

log = logging.getLogger(__name__)

#: how often a waiting HTTP thread checks that the worker is still alive (seconds)
POLL_S = 1.0


@dataclass(frozen=True)
class Result:
    """A finished generation: the answer, why it ended ("stop" or "length") and the token counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class Cancelled(Exception):
    """Raised inside the text callback to end the generation of a job whose client went away."""


class Job:
    """One request on its way through the queue: the parsed request, its decoded image, and its events."""

    def __init__(self, request: ChatRequest, image: Any) -> None:
        self.request = request
        self.image = image
        self.events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.cancelled = threading.Event()
        self.emitted = ""  # the text sent as ("text", ...) events so far

    def emit(self, piece: str) -> None:
        self.emitted += piece
        self.events.put(("text", piece))

    def fail(self, err: RequestError) -> None:
        self.events.put(("error", err))

    def cancel(self) -> None:
        self.cancelled.set()


class Worker:
    """Runs jobs one at a time on its own thread; at most `max_queue` jobs wait behind the running one."""

    def __init__(self, pipe: Any, max_queue: int, chat_cache: int = 4) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1 (got {max_queue})")
        if chat_cache < 0:
            raise ValueError(f"chat_cache must be >= 0 (got {chat_cache})")
        self.pipe = pipe
        #: conversations kept for their follow-ups (most recent last), keyed by image and turns so far;
        #: only the worker thread touches it
        self.chat_cache = chat_cache
        self._chats: OrderedDict[tuple[str, tuple[str, ...], tuple[str, ...]], Any] = OrderedDict()
        self.reused = 0  # requests that continued a kept conversation
        self.max_new_tokens_limit = int(pipe.max_new_tokens_limit)
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._accepting = True
        self._thread = threading.Thread(target=self._loop, name="ficoco-serve-worker", daemon=True)

    # -- the HTTP side -----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def waiting(self) -> int:
        """Jobs queued behind the running one."""
        return self._jobs.qsize()

    def refuse_if_full(self) -> None:
        """RequestError(503) when a job submitted now would be refused (a hint: `submit` decides)."""
        if not self._accepting:
            raise RequestError(503, "the server is shutting down", code="shutting_down")
        if self._jobs.full():
            raise self._busy()

    def submit(self, job: Job) -> None:
        """Queue `job`; RequestError(503) when the queue is full or the server is shutting down."""
        with self._lock:
            if not self._accepting:
                raise RequestError(503, "the server is shutting down", code="shutting_down")
            try:
                self._jobs.put_nowait(job)
            except queue.Full:
                raise self._busy() from None

    def _busy(self) -> RequestError:
        return RequestError(503, f"the server is busy: {self._jobs.maxsize} requests are already waiting; retry later",
                            code="queue_full")

    def next_event(self, job: Job) -> tuple[str, Any]:
        """The job's next event; an error event if the worker thread has died."""
        while True:
            try:
                return job.events.get(timeout=POLL_S)
            except queue.Empty:
                if not self.alive:
                    return "error", RequestError(500, "the generation worker stopped", code="worker_stopped")

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new jobs, fail the queued ones with 503, let the running one finish, end the thread."""
        with self._lock:
            self._accepting = False
            cancelled = 0
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job.fail(RequestError(503, "the server is shutting down; the request was not started",
                                          code="shutting_down"))
                    cancelled += 1
            self._jobs.put_nowait(None)  # the queue is empty and closed: there is room for the sentinel
        if cancelled:
            log.info("shutdown: %d queued request(s) answered 503", cancelled)
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the worker thread -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            try:
                job.events.put(("done", self._generate(job)))
            except Cancelled:
                log.info("generation cancelled: the client went away")
            except RequestError as err:
                job.fail(err)
            except Exception as err:  # the worker must outlive any one request
                refused = _as_request_error(err)
                if refused is None:
                    log.exception("generation failed")
                    refused = RequestError(500, f"generation failed: {type(err).__name__}: {err}", code="internal_error")
                job.fail(refused)

    def _sampling(self, req: ChatRequest) -> Any:
        """The bundle's defaults (its generation_config.json) with what the request sets: temperature 0 is
        greedy, a temperature or top_p samples (with the request's seed, else a fresh one)."""
        base = self.pipe.default_sampling
        do_sample: bool | None = None
        if req.temperature == 0:
            do_sample = False
        elif req.temperature is not None or req.top_p is not None or req.top_k is not None:
            do_sample = True
        seed = req.seed
        if seed is None and (do_sample or (do_sample is None and base.do_sample)):
            seed = secrets.randbelow(1 << 31)
        try:
            return base.merged(do_sample=do_sample, temperature=req.temperature or None, top_p=req.top_p,
                               top_k=req.top_k, repetition_penalty=req.repetition_penalty,
                               min_new_tokens=req.min_tokens, seed=seed)
        except ValueError as err:
            raise RequestError(400, str(err), param="temperature") from err

    def _chat(self, req: ChatRequest, image: Any) -> tuple[Any, list[str]]:
        """The chat session that holds this conversation so far (its cache reused), or a new one."""
        questions, answers = req.conversation()
        key = (_image_key(req), tuple(questions[:-1]), tuple(answers))
        chat = self._chats.pop(key, None)
        if chat is None:
            chat = self.pipe.chat(image, history=list(zip(questions[:-1], answers, strict=True)))
        else:
            self.reused += 1
        return chat, [*key[1], questions[-1]]

    def _generate(self, job: Job) -> Result:
        req = job.request
        chat, asked = self._chat(req, job.image)
        n_new = self.max_new_tokens_limit if req.max_tokens is None else req.max_tokens
        if n_new > self.max_new_tokens_limit:
            raise RequestError(400, f"{req.max_tokens_param}={n_new}: this bundle generates at most "
                               f"{self.max_new_tokens_limit} tokens per answer", param=req.max_tokens_param)
        sampling = self._sampling(req)

        def on_text(piece: str) -> None:
            if job.cancelled.is_set():
                raise Cancelled
            job.emit(piece)

        turn = chat.ask(req.question, max_new_tokens=n_new, sampling=sampling, stop_strings=list(req.stop) or None,
                        on_text=on_text, on_start=lambda n: job.events.put(("start", n)))
        if self.chat_cache:
            key = (_image_key(req), tuple(asked), tuple(t.text for t in chat.turns))
            self._chats[key] = chat
            while len(self._chats) > self.chat_cache:
                self._chats.popitem(last=False)
        if turn.text.startswith(job.emitted):
            if len(turn.text) > len(job.emitted):
                job.emit(turn.text[len(job.emitted):])
        else:  # the incremental detokenizer emitted text the final decode changed: say so, keep the final text
            log.warning("streamed text %r is not a prefix of the answer %r", job.emitted, turn.text)
        return Result(turn.text, "stop" if turn.stopped else "length", turn.context_tokens, len(turn.token_ids))


def _image_key(req: ChatRequest) -> str:
    """What identifies a request's image across requests: its bytes, or its file's path, size and mtime."""
    import hashlib
    import os

    img = req.image
    if img.source == "data":
        return "data:" + hashlib.sha256(img.data).hexdigest()
    try:
        st = os.stat(img.path)
    except OSError:
        return "file:" + img.path
    return f"file:{img.path}:{st.st_size}:{st.st_mtime_ns}"


def _as_request_error(err: Exception) -> RequestError | None:
    """The runtime's "this input cannot be served" errors as 400s (imported here: they live beside torch)."""
    from bundle.frontend import InputError
    from ficoco.inputs import PromptError
    from ficoco.preprocess import ImageError

    if isinstance(err, ImageError):
        return RequestError(400, f"unreadable image: {err}", param="messages", code="invalid_image")
    if isinstance(err, (InputError, PromptError)):
        return RequestError(400, str(err), param="messages", code="invalid_prompt")
    return None
