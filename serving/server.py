"""`ChatServer`: the pipeline's worker, the HTTP server in front of it, its life cycle and shutdown.

    server = ChatServer(pipe, ServeOptions(port=0))   # binds at once; server.url has the port
    server.start()                                     # HTTP in a background thread, plus the worker
    ...
    server.shutdown()                                  # stop accepting, 503 the queued, finish the running one

`serve_until_signal` (what the CLI runs) does the same around SIGTERM / SIGINT. Standard library only:
`http.server.ThreadingHTTPServer` gives each connection a thread (`serving.handler`) that parses, validates
and decodes the image, then waits on its job; only `serving.worker.Worker` touches the pipeline
(docs/serving.md).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving import protocol as P
from serving.handler import HTTPServer
from serving.images import open_image
from serving.protocol import RequestError
from serving.worker import Job, Worker

log = logging.getLogger(__name__)

MiB = 1 << 20


class BindError(ValueError):
    """The address cannot be listened on (a port in use, a host not of this machine)."""


@dataclass(frozen=True)
class ServeOptions:
    """Where to listen and the limits (docs/serving.md)."""

    host: str = "127.0.0.1"
    port: int = 8000  # 0: an ephemeral port (ChatServer.port says which)
    max_body_bytes: int = 20 * MiB
    max_queue: int = 16  # requests waiting behind the running one; more get 503
    chat_cache: int = 4  # conversations kept with their KV cache for follow-ups (0: none)
    model_id: str | None = None  # default: the manifest's source model name, else the bundle directory's name
    drain_timeout_s: float = 600.0  # at shutdown, the longest wait for the running request


def model_id_of(pipe: Any) -> str:
    """The id a bundle is served under: its manifest's source model name, else the bundle directory's name."""
    name = (getattr(pipe.manifest, "source_model", None) or {}).get("name")
    return str(name) if name else Path(pipe.bundle).name


class ChatServer:
    """An OpenAI-compatible chat-completions server over one loaded pipeline."""

    def __init__(self, pipe: Any, options: ServeOptions | None = None) -> None:
        self.options = options or ServeOptions()
        self.model_id = self.options.model_id or model_id_of(pipe)
        manifest_file = Path(pipe.bundle) / "manifest.json"
        self.created = int(manifest_file.stat().st_mtime) if manifest_file.exists() else P.now()
        self.worker = Worker(pipe, self.options.max_queue, self.options.chat_cache)
        self.draining = threading.Event()
        self._active = 0  # requests being answered
        self._idle = threading.Condition()
        self._connections: set[socket.socket] = set()
        self._serve_thread: threading.Thread | None = None
        self._closed = False
        try:
            self.httpd = HTTPServer((self.options.host, self.options.port), self)
        except OSError as err:
            raise BindError(f"cannot listen on {self.options.host}:{self.options.port}: {err.strerror or err}; "
                            "choose another --host/--port") from err

    @property
    def host(self) -> str:
        return str(self.httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # -- life cycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker and serve HTTP on a background thread."""
        self.worker.start()
        self._serve_thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                              name="ficoco-serve-http", daemon=True)
        self._serve_thread.start()
        log.info("serving %s on %s", self.model_id, self.url)

    def serve_until_signal(self) -> None:
        """`start`, then block until SIGTERM or SIGINT, then `shutdown`. A second signal while draining, a
        second or more after the first (a signal sent to the process and to its group arrives twice at
        once), interrupts the drain (KeyboardInterrupt). Call from the main thread."""
        stop = threading.Event()
        first: list[float] = []

        def on_signal(signum: int, frame: Any) -> None:
            if first:
                if time.monotonic() - first[0] >= 1.0:
                    raise KeyboardInterrupt
                return
            first.append(time.monotonic())
            log.warning("%s: shutting down (the running request finishes, queued ones get 503)",
                        signal.Signals(signum).name)
            stop.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not stop.wait(0.5):
                pass
            self.shutdown()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def shutdown(self) -> None:
        """Stop accepting connections, answer queued requests 503, let the running one finish and its answer
        be sent, close idle connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.draining.set()
        if self._serve_thread is not None:
            self.httpd.shutdown()  # the accept loop ends; the listening socket closes below
        self.worker.stop(self.options.drain_timeout_s)
        with self._idle:
            self._idle.wait_for(lambda: self._active == 0, timeout=30.0)
            for conn in list(self._connections):  # idle keep-alive connections: their threads see EOF and end
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.httpd.server_close()
        log.info("stopped")

    # -- bookkeeping for the handlers --------------------------------------------------------------------------
    def begin(self) -> None:
        with self._idle:
            self._active += 1

    def end(self) -> None:
        with self._idle:
            self._active -= 1
            self._idle.notify_all()

    def track(self, conn: socket.socket, open_: bool) -> None:
        with self._idle:
            if open_:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    # -- requests ----------------------------------------------------------------------------------------------
    def submit_chat(self, body: bytes) -> tuple[Job, P.ChatRequest]:
        """Parse and check a chat request, decode its image, queue it. RequestError for every refusal."""
        req = P.parse_chat_request(P.decode_json(body))
        if req.model is not None and req.model != self.model_id:
            raise RequestError(404, f"the model {req.model!r} does not exist; this server serves {self.model_id!r}",
                               param="model", code="model_not_found")
        limit = self.worker.max_new_tokens_limit
        if req.max_tokens is not None and req.max_tokens > limit:
            raise RequestError(400, f"{req.max_tokens_param}={req.max_tokens} is more than this bundle's limit of "
                                    f"{limit} new tokens (shape_ranges.max_new_tokens); ask for at most {limit}",
                               param=req.max_tokens_param, code="max_tokens_exceeded")
        if self.draining.is_set():
            raise RequestError(503, "the server is shutting down", code="shutting_down")
        self.worker.refuse_if_full()  # before the image is decoded: a busy server refuses cheaply
        job = Job(req, open_image(req.image))
        self.worker.submit(job)
        return job, req
