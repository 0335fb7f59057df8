"""`ficoco-serve` (serving/): the official OpenAI client against a server on the session's tiny bundle, bad
requests as JSON 4xx while the server keeps serving, queued requests answered in order without interleaving,
the queue limit and shutdown (on a stand-in pipeline that blocks on demand), and SIGTERM on the real command.

The server runs in-process on 127.0.0.1, port 0; answers are kept to a few tokens so the module stays quick.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from engines.runtime import Pipeline
from ficoco.images import test_image
from serving.protocol import parse_chat_request
from serving.server import ChatServer, ServeOptions

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ("What is in the picture?", "What colour is it?")
IMAGES = ("chelsea", "astronaut")
TOKENS = 6
BODY_LIMIT = 256 * 1024


def _png(name: str) -> bytes:
    buf = io.BytesIO()
    test_image(name).resize((96, 96)).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _messages(url: str, question: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def pngs() -> dict[str, bytes]:
    return {name: _png(name) for name in IMAGES}


@pytest.fixture(scope="module")
def pipe(tiny_bundle: Path) -> Pipeline:
    return Pipeline.from_bundle(tiny_bundle, backend="onnxruntime", verify=False)


@pytest.fixture(scope="module")
def expected(pipe: Pipeline, pngs: dict[str, bytes]) -> dict[tuple[str, str], str]:
    """Greedy answers straight from the pipeline, taken before the server (and its worker) owns it:
    single questions, a conversation with a given history, and one the pipeline's own chat continued."""
    out = {
        (name, q): pipe.generate(Image.open(io.BytesIO(png)), q, max_new_tokens=TOKENS).text
        for name, png in pngs.items() for q in QUESTIONS
    }
    image = Image.open(io.BytesIO(pngs["astronaut"]))
    out[("astronaut", "history")] = pipe.chat(image, [("Describe it.", "A picture.")]).ask(QUESTIONS[1], max_new_tokens=TOKENS).text
    chat = pipe.chat(Image.open(io.BytesIO(pngs["chelsea"])))
    out[("chelsea", "turn0")] = chat.ask(QUESTIONS[0], max_new_tokens=TOKENS).text
    out[("chelsea", "turn1")] = chat.ask(QUESTIONS[1], max_new_tokens=TOKENS).text
    return out


@pytest.fixture(scope="module")
def server(pipe: Pipeline, expected: dict[tuple[str, str], str]):
    srv = ChatServer(pipe, ServeOptions(port=0, max_body_bytes=BODY_LIMIT, max_queue=32))
    srv.start()
    yield srv
    srv.shutdown()


@pytest.fixture(scope="module")
def client(server: ChatServer):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _post(server: ChatServer, body: bytes | str, path: str = "/v1/chat/completions", method: str = "POST",
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def _chat_body(url: str, question: str = QUESTIONS[0], **fields: Any) -> str:
    return json.dumps({"messages": _messages(url, question), "max_tokens": TOKENS, **fields})


# -- the official client ---------------------------------------------------------------------------------------


def test_openai_client_plain_and_streamed(client: Any, server: ChatServer, pngs: dict[str, bytes],
                                          expected: dict[tuple[str, str], str]) -> None:
    url = _data_url(pngs["chelsea"])
    want = expected[("chelsea", QUESTIONS[0])]
    r = client.chat.completions.create(model=server.model_id, messages=_messages(url, QUESTIONS[0]), max_tokens=TOKENS)
    assert r.object == "chat.completion" and r.model == server.model_id and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= TOKENS and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(client.chat.completions.create(
        model=server.model_id, messages=_messages(url, QUESTIONS[0]), max_completion_tokens=TOKENS, stream=True,
        stream_options={"include_usage": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == want == choice.message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [choice.finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    models = client.models.list()
    assert [m.id for m in models.data] == [server.model_id] == ["tiny"]


def test_image_as_file_url_and_earlier_turn(client: Any, server: ChatServer, pngs: dict[str, bytes],
                                            expected: dict[tuple[str, str], str], tmp_path: Path) -> None:
    """A file:// image in the first user turn, a history, the question in the last: the answer is the
    pipeline's given that history."""
    path = tmp_path / "astronaut.png"
    path.write_bytes(pngs["astronaut"])
    messages = [
        {"role": "system", "content": "Be brief."},
        *_messages(path.as_uri(), "Describe it."),
        {"role": "assistant", "content": "A picture."},
        {"role": "user", "content": QUESTIONS[1]},
    ]
    r = client.chat.completions.create(model=server.model_id, messages=messages, max_tokens=TOKENS, temperature=0)
    assert r.choices[0].message.content == expected[("astronaut", "history")]


def test_follow_up_continues_the_kept_conversation(client: Any, server: ChatServer, pngs: dict[str, bytes],
                                                   expected: dict[tuple[str, str], str]) -> None:
    """The client sends the history back (as OpenAI clients do): the server continues the cached chat."""
    url = _data_url(pngs["chelsea"])
    first = client.chat.completions.create(model=server.model_id, messages=_messages(url, QUESTIONS[0]), max_tokens=TOKENS)
    a0 = first.choices[0].message.content
    assert a0 == expected[("chelsea", "turn0")]
    before = server.worker.reused
    messages = [*_messages(url, QUESTIONS[0]), {"role": "assistant", "content": a0}, {"role": "user", "content": QUESTIONS[1]}]
    second = client.chat.completions.create(model=server.model_id, messages=messages, max_tokens=TOKENS)
    assert server.worker.reused == before + 1
    assert second.choices[0].message.content == expected[("chelsea", "turn1")]
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens - 1


def test_stop_strings_are_applied(client: Any, server: ChatServer, pngs: dict[str, bytes],
                                  expected: dict[tuple[str, str], str]) -> None:
    full = expected[("astronaut", QUESTIONS[0])]
    if len(full) < 3:
        pytest.skip(f"the tiny model's answer {full!r} is too short to cut")
    stop = full[1:3]
    r = client.chat.completions.create(model=server.model_id, messages=_messages(_data_url(pngs["astronaut"]), QUESTIONS[0]),
                                       max_tokens=TOKENS, stop=[stop])
    assert r.choices[0].message.content == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_parse_keeps_the_conversation() -> None:
    req = parse_chat_request({
        "messages": [*_messages("/tmp/x.png", "first"), {"role": "assistant", "content": "ok"},
                     {"role": "user", "content": [{"type": "text", "text": "second"}]}],
        "stop": ["\n", "END"], "temperature": 0.5, "seed": 3, "n": 1,
    })
    assert req.question == "second" and req.image.path == "/tmp/x.png" and req.image_message == 0
    assert [m.role for m in req.history] == ["user", "assistant"] and req.stop == ("\n", "END")
    assert req.sampling() is not None and req.sampling().seed == 3
    assert parse_chat_request({"messages": _messages("/tmp/x.png", "q"), "temperature": 0}).sampling() is None


# -- bad requests ----------------------------------------------------------------------------------------------


def test_bad_requests_are_json_errors_and_the_server_keeps_serving(server: ChatServer, pngs: dict[str, bytes],
                                                                   expected: dict[tuple[str, str], str]) -> None:
    url = _data_url(pngs["chelsea"])
    garbage = _data_url(b"\x89PNG\r\n\x1a\n not really a png")
    cases: list[tuple[str, dict[str, Any], int, str | None]] = [
        ("malformed JSON", {"body": '{"messages": [}'}, 400, "invalid_json"),
        ("a JSON list", {"body": "[1, 2]"}, 400, "invalid_json"),
        ("no messages", {"body": json.dumps({"model": "tiny"})}, 400, "missing_messages"),
        ("no user message", {"body": json.dumps({"messages": [{"role": "system", "content": "hi"}]})}, 400, None),
        ("no image", {"body": json.dumps({"messages": [{"role": "user", "content": "hi"}]})}, 400, "missing_image"),
        ("unreadable image", {"body": _chat_body(garbage)}, 400, "invalid_image"),
        ("missing image file", {"body": _chat_body("/nonexistent/cat.png")}, 400, "invalid_image"),
        ("too many max_tokens", {"body": _chat_body(url, max_tokens=10_000)}, 400, "max_tokens_exceeded"),
        ("prompt too long", {"body": _chat_body(url, "why " * 400)}, 400, "invalid_prompt"),
        ("bad temperature", {"body": _chat_body(url, temperature=-1)}, 400, "invalid_value"),
        ("malformed stop", {"body": _chat_body(url, stop=[1, 2])}, 400, "invalid_value"),
        ("seed too large", {"body": _chat_body(url, temperature=0.7, seed=1 << 70)}, 400, "invalid_value"),
        ("negative top_k", {"body": _chat_body(url, top_k=-1)}, 400, "invalid_value"),
        ("zero repetition_penalty", {"body": _chat_body(url, repetition_penalty=0)}, 400, "invalid_value"),
        ("min_tokens not a number", {"body": _chat_body(url, min_tokens="many")}, 400, "invalid_value"),
        ("two user turns in a row", {"body": json.dumps({"messages": _messages(url, "a") + [{"role": "user", "content": "b"}]})},
         400, "invalid_conversation"),
        ("two images", {"body": json.dumps({"messages": _messages(url, "a") + _messages(url, "b")})}, 400, "too_many_images"),
        ("unknown model", {"body": _chat_body(url, model="gpt-4o")}, 404, "model_not_found"),
        ("body over the limit", {"body": _chat_body(url, pad="x" * BODY_LIMIT)}, 413, "request_too_large"),
        ("unknown path", {"body": "{}", "path": "/v1/completions"}, 404, "not_found"),
        ("wrong method", {"body": None, "path": "/v1/chat/completions", "method": "GET"}, 405, "method_not_allowed"),
    ]
    good = _chat_body(url)
    for what, request, status, code in cases:
        got, body = _post(server, **request)
        assert got == status, (what, body)
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], what
        assert err["type"] == "invalid_request_error" and (code is None or err["code"] == code), (what, err)
        got, body = _post(server, good)
        assert got == 200 and body["choices"][0]["message"]["content"] == expected[("chelsea", QUESTIONS[0])], what


# -- concurrency -----------------------------------------------------------------------------------------------


def test_concurrent_requests_are_queued_not_interleaved(client: Any, server: ChatServer, pngs: dict[str, bytes],
                                                        expected: dict[tuple[str, str], str]) -> None:
    urls = {name: _data_url(png) for name, png in pngs.items()}
    single = [k for k in expected if k[1] in QUESTIONS]  # the single-question answers
    keys = [single[i % len(single)] for i in range(16)]

    def ask(i: int) -> str:
        name, q = keys[i]
        if i % 2:  # half of them streamed
            r = client.chat.completions.create(model=server.model_id, messages=_messages(urls[name], q), max_tokens=TOKENS)
            return r.choices[0].message.content
        chunks = client.chat.completions.create(model=server.model_id, messages=_messages(urls[name], q),
                                                max_tokens=TOKENS, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(len(keys))))
    assert answers == [expected[k] for k in keys]


# -- the queue limit and shutdown, on a stand-in pipeline --------------------------------------------------------


class _BlockingPipe:
    """The part of `Pipeline` the server uses; a chat's `ask` waits until `release` is set."""

    max_new_tokens_limit = 8

    def __init__(self, bundle: Path) -> None:
        from ficoco.sampling import SamplingConfig

        self.bundle = bundle
        self.manifest = SimpleNamespace(source_model={"name": "stand-in"})
        self.default_sampling = SamplingConfig()
        self.started = threading.Semaphore(0)
        self.release = threading.Event()

    def chat(self, image: Any, history: Any = ()) -> Any:
        pipe = self

        class _Chat:
            turns: list[Any] = []

            def ask(self, question: str, *, on_text: Any, on_start: Any, **kw: Any) -> Any:
                on_start(3)
                pipe.started.release()
                assert pipe.release.wait(20)
                on_text("done")
                turn = SimpleNamespace(text="done", token_ids=[5], stopped=True, context_tokens=3)
                self.turns = [turn]
                return turn

        return _Chat()


def test_queue_full_then_shutdown_drains(tmp_path: Path, pngs: dict[str, bytes]) -> None:
    fake = _BlockingPipe(tmp_path)
    srv = ChatServer(fake, ServeOptions(port=0, max_queue=1))
    srv.start()
    body = _chat_body(_data_url(pngs["chelsea"]), max_tokens=4)
    results: dict[str, tuple[int, dict[str, Any]]] = {}

    def post(name: str) -> None:
        results[name] = _post(srv, body)

    running = threading.Thread(target=post, args=("running",))
    running.start()
    assert fake.started.acquire(timeout=20)  # the first request is in the worker
    queued = threading.Thread(target=post, args=("queued",))
    queued.start()
    deadline = time.monotonic() + 20
    while srv.worker.waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    status, err = _post(srv, body)  # one running, one waiting: the queue (1) is full
    assert status == 503 and err["error"]["code"] == "queue_full"

    stopper = threading.Thread(target=srv.shutdown)
    stopper.start()
    queued.join(20)
    assert results["queued"][0] == 503 and results["queued"][1]["error"]["code"] == "shutting_down"
    assert running.is_alive() and stopper.is_alive()  # the running request holds the shutdown up
    fake.release.set()
    running.join(20)
    stopper.join(20)
    assert not stopper.is_alive()
    status, done = results["running"]
    assert status == 200 and done["choices"][0]["message"]["content"] == "done"
    assert done["choices"][0]["finish_reason"] == "stop" and done["model"] == "stand-in"
    with pytest.raises(OSError):
        _post(srv, body)


def test_sigterm_stops_the_command(tiny_bundle: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "commands.serve", str(tiny_bundle), "--port", "0", "--no-verify", "--backend", "onnxruntime"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stderr is not None
        lines = []
        for _ in range(50):  # the address is printed once the pipeline is loaded and the port bound
            lines.append(proc.stderr.readline())
            if "http://127.0.0.1:" in lines[-1] or not lines[-1]:
                break
        line = lines[-1]
        assert "http://127.0.0.1:" in line, "".join(lines)
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.request("GET", "/health")
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read()) == {"status": "ok"}
        conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serving_imports_no_torch() -> None:
    """The server's own modules import neither torch nor the runtime at module level."""
    code = ("import sys, serving, serving.server, serving.worker, serving.images, commands.serve; "
            "print(sorted(m for m in ('torch', 'engines.runtime', 'bundle.frontend') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
