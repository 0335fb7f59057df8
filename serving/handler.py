"""The HTTP handler of `ficoco-serve`: routing, the body limit, JSON errors, and the answers — one JSON
object, or server-sent events over chunked transfer encoding when the request streams.

Each connection has its own thread (`ThreadingHTTPServer`); a handler reads and checks the request through
`ChatServer.submit_chat`, which queues it, then waits on the job's events (`serving.worker`). It never
touches the pipeline. Errors the base class finds itself (a malformed request line, headers too large) get
the same JSON shape as the server's own refusals.
"""

from __future__ import annotations

import json
import logging
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from serving import protocol as P
from serving.protocol import RequestError
from serving.worker import Job, Result

if TYPE_CHECKING:
    from serving.server import ChatServer

log = logging.getLogger(__name__)

#: an idle keep-alive connection is closed after this long (seconds); also bounds a stalled body upload
IDLE_TIMEOUT_S = 60.0
#: a refused request's unread body is read away (keeping the connection) up to this many times the body limit
DISCARD_FACTOR = 4
CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
HEALTH_PATH = "/health"


class HTTPServer(ThreadingHTTPServer):
    """A thread per connection; `app` is the `ChatServer` the handlers answer for."""

    daemon_threads = True  # an idle keep-alive connection never holds the process up
    block_on_close = False

    def __init__(self, address: tuple[str, int], app: ChatServer) -> None:
        self.app = app
        super().__init__(address, Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """What escaped a handler (a connection that broke while an error was being written): logged, not
        printed as a bare traceback; the connection is closed by the caller."""
        log.warning("connection from %s ended with an error", client_address[0] if client_address else "?",
                    exc_info=True)


class Handler(BaseHTTPRequestHandler):
    """One connection (HTTP/1.1 keep-alive): each request is routed by `_dispatch`."""

    protocol_version = "HTTP/1.1"
    server_version = "ficoco-serve"
    timeout = IDLE_TIMEOUT_S
    server: HTTPServer

    # -- plumbing ----------------------------------------------------------------------------------------------
    def setup(self) -> None:
        super().setup()
        self.server.app.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.app.track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log.info('%s "%s" %s', self.address_string(), self.requestline, code)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors the base class raises itself (bad request line, headers too long...) in OpenAI's JSON shape."""
        self.close_connection = True
        status = HTTPStatus(code)
        self._json(code, P.error_body(message or status.phrase, type="invalid_request_error" if code < 500 else "server_error",
                                      code=status.phrase.lower().replace(" ", "_")))

    def _json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection or self.server.app.draining.is_set():
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    # -- routing -----------------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _dispatch(self) -> None:
        app = self.server.app
        app.begin()
        self._started = False  # a response status line has been written
        self._body_read = False
        try:
            self._route(urlsplit(self.path).path.rstrip("/") or "/")
        except RequestError as err:
            self._refuse(err)
        except (BrokenPipeError, ConnectionResetError, TimeoutError) as err:
            log.info("%s: connection lost: %s", self.address_string(), err)
            self.close_connection = True
        except Exception:
            log.exception("unexpected error answering %s %s", self.command, self.path)
            self._refuse(RequestError(500, "internal server error (logged by the server)", code="internal_error"))
        finally:
            self._discard_unread_body()
            app.end()

    def _discard_unread_body(self) -> None:
        """Read away the body of a request refused before its body was read (404, 405, 413...), so the
        connection stays in step and the client reads the answer instead of a reset; a body of more than
        DISCARD_FACTOR times the limit closes the connection instead."""
        if self._body_read:
            return
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            self.close_connection = True  # an unread chunked body: no way to stay in step
            return
        try:
            left = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            left = -1
        if left == 0:
            return
        if left < 0 or left > DISCARD_FACTOR * self.server.app.options.max_body_bytes:
            self.close_connection = True
            return
        try:
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass
        if left:
            self.close_connection = True

    def _refuse(self, err: RequestError) -> None:
        if err.status >= 500:
            log.warning("%s %s: %d %s", self.command, self.path, err.status, err.message)
        if self._started:  # too late for a status: drop the connection
            self.close_connection = True
            return
        self._json(err.status, err.body(), {"Retry-After": "1"} if err.status == 503 else None)

    def _route(self, path: str) -> None:
        routes = {CHAT_PATH: ("POST", self._chat), MODELS_PATH: ("GET", self._models), HEALTH_PATH: ("GET", self._health)}
        prefix = MODELS_PATH + "/"
        if path not in routes and path.startswith(prefix):
            routes[path] = ("GET", lambda: self._model(unquote(path[len(prefix):])))
        if path not in routes:
            raise RequestError(404, f"no route {path!r}; this server answers POST {CHAT_PATH}, GET {MODELS_PATH} "
                                    f"and GET {HEALTH_PATH}", code="not_found")
        method, handler = routes[path]
        if self.command != method:
            err = RequestError(405, f"{self.command} {path} is not allowed; use {method}", code="method_not_allowed")
            self._json(405, err.body(), {"Allow": method})
            return
        handler()

    def _health(self) -> None:
        if self.server.app.draining.is_set():
            raise RequestError(503, "shutting down", code="shutting_down")
        self._json(200, {"status": "ok"})

    def _models(self) -> None:
        app = self.server.app
        self._json(200, P.models_body(app.model_id, app.created))

    def _model(self, name: str) -> None:
        app = self.server.app
        if name != app.model_id:
            raise RequestError(404, f"the model {name!r} does not exist; this server serves {app.model_id!r}",
                               param="model", code="model_not_found")
        self._json(200, P.model_object(app.model_id, app.created))

    def _read_body(self) -> bytes:
        app = self.server.app
        raw = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            raise RequestError(411, "chunked request bodies are not accepted; send a Content-Length", code="length_required")
        if raw is None:
            raise RequestError(411, "a Content-Length header is required", code="length_required")
        try:
            n = int(raw)
            if n < 0:
                raise ValueError(raw)
        except ValueError:
            raise RequestError(400, f"bad Content-Length {raw!r}", code="invalid_header") from None
        if n > app.options.max_body_bytes:
            raise RequestError(413, f"the request body is {n:,} bytes; this server accepts at most "
                                    f"{app.options.max_body_bytes:,} (--max-body-bytes)", code="request_too_large")
        body = self.rfile.read(n)
        self._body_read = True
        if len(body) != n:
            self.close_connection = True
            raise RequestError(400, f"the request body ended after {len(body)} of {n} bytes", code="incomplete_body")
        return body

    # -- chat completions --------------------------------------------------------------------------------------
    def _chat(self) -> None:
        app = self.server.app
        job, req = app.submit_chat(self._read_body())
        cid, created = P.completion_id(), P.now()
        t0 = time.perf_counter()
        try:
            if req.stream:
                self._stream(job, req, cid, created)
            else:
                result = self._wait(job)
                self._json(200, P.completion_body(cid, created, app.model_id, result.text, result.finish_reason,
                                                  result.prompt_tokens, result.completion_tokens))
        except BaseException:
            job.cancel()
            raise
        log.info("%s: %s in %.0f ms", cid, "stream" if req.stream else "completion", (time.perf_counter() - t0) * 1e3)

    def _wait(self, job: Job) -> Result:
        worker = self.server.app.worker
        while True:
            kind, value = worker.next_event(job)
            if kind == "error":
                raise value
            if kind == "done":
                return value

    def _stream(self, job: Job, req: P.ChatRequest, cid: str, created: int) -> None:
        worker, model = self.server.app.worker, self.server.app.model_id
        kind, value = worker.next_event(job)
        if kind == "error":  # refused before any output (a prompt too long...): an ordinary JSON error
            raise value
        prompt_tokens = value
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._started = True
        self._chunk(P.sse(P.chunk_body(cid, created, model, {"role": "assistant", "content": ""})))
        while True:
            kind, value = worker.next_event(job)
            if kind == "text":
                self._chunk(P.sse(P.chunk_body(cid, created, model, {"content": value})))
            elif kind == "done":
                self._chunk(P.sse(P.chunk_body(cid, created, model, {}, value.finish_reason)))
                if req.include_usage:
                    self._chunk(P.sse(P.chunk_body(cid, created, model, None, None,
                                                   P.usage(prompt_tokens, value.completion_tokens))))
                break
            else:  # failed mid-answer: the status is sent, so the error travels as an event
                self._chunk(P.sse(value.body()))
                break
        self._chunk(P.SSE_DONE)
        self._chunk(b"")
