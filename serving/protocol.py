"""The wire format of `ficoco-serve`: OpenAI chat-completion requests in, chat.completion (or chunk) JSON out.

Standard library only, so it can be tested and extended without the runtime. `parse_chat_request` is the
one place a request body is read; everything it accepts is in `ChatRequest`. What it takes from a
conversation today (docs/serving.md): the single image, from whichever user message carries it, and the
text of the last message, which must come from the user. Earlier turns are parsed and kept in
`ChatRequest.messages` but not fed to the model (no multi-turn cache reuse yet).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

#: roles a message may have; system and developer messages are accepted and not used (the bundles'
#: chat template has no system turn)
ROLES = ("system", "developer", "user", "assistant")
#: the most stop sequences a request may give (OpenAI's limit)
MAX_STOP = 4


class RequestError(Exception):
    """A request the server refuses: the HTTP status and the fields of OpenAI's error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> RequestError:
    return RequestError(400, message, param=param, code=code)


@dataclass(frozen=True)
class ImageRef:
    """Where a request's image is: decoded bytes of a data URL (`data`), or a local file (`path`)."""

    source: str  # "data" or "file"
    data: bytes = b""
    path: str = ""
    media_type: str = ""
    param: str = "messages"  # the request field it came from, for error messages

    def describe(self) -> str:
        return f"a {self.media_type or 'image'} data URL ({len(self.data)} bytes)" if self.source == "data" else self.path


@dataclass(frozen=True)
class ChatMessage:
    """One message of the conversation: its role, its text parts joined by newlines, and whether it had the image."""

    role: str
    text: str
    has_image: bool = False


@dataclass(frozen=True)
class SamplingParams:
    """Temperature / top-p sampling with a seed (None: the server picks one per request)."""

    temperature: float
    top_p: float
    seed: int | None


@dataclass(frozen=True)
class ChatRequest:
    """Everything `parse_chat_request` accepted from one request body."""

    model: str | None  # None: the client did not name one (the served model is used)
    messages: tuple[ChatMessage, ...]
    question: str  # the text of the last user message
    image: ImageRef
    image_message: int  # index in `messages` of the user message that carried the image
    max_tokens: int | None = None  # None: the bundle's limit
    max_tokens_param: str = "max_tokens"  # which field gave it (max_tokens or max_completion_tokens)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings: the answer ends before the first one it produces
    top_k: int | None = None  # the extensions vLLM and others accept beside OpenAI's fields
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    extra: dict[str, Any] = field(default_factory=dict)  # fields this server does not interpret

    @property
    def history(self) -> tuple[ChatMessage, ...]:
        """The turns before the last user message."""
        return self.messages[:-1]

    def conversation(self) -> tuple[list[str], list[str]]:
        """(user questions, assistant answers) from the message with the image on, system messages left out:
        user and assistant alternate, the image comes with the first question, the last question is unanswered."""
        turns = [m for m in self.messages[self.image_message:] if m.role != "system"]
        if any(m.role == "user" for m in self.messages[: self.image_message]):
            raise bad_request("the image must come with the first user message of the conversation", "messages")
        questions = [m.text for m in turns[0::2]]
        answers = [m.text for m in turns[1::2]]
        roles_ok = all(m.role == "user" for m in turns[0::2]) and all(m.role == "assistant" for m in turns[1::2])
        if not roles_ok or len(answers) != len(questions) - 1:
            raise bad_request("after the system messages, user and assistant messages must alternate, starting and "
                              "ending with the user", "messages", "invalid_conversation")
        return questions, answers

    def sampling(self) -> SamplingParams | None:
        """None for greedy decoding: no temperature and no top_p, or temperature 0. Otherwise sampling at
        the temperature given (default 1) and top_p (default 1), with the request's seed."""
        if self.temperature == 0 or (self.temperature is None and self.top_p is None):
            return None
        t = 1.0 if self.temperature is None else self.temperature
        p = 1.0 if self.top_p is None else self.top_p
        return SamplingParams(temperature=t, top_p=p, seed=self.seed)


# -- parsing ---------------------------------------------------------------------------------------------------


def decode_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object; 400 for anything else."""
    try:
        data = json.loads(body)
    except UnicodeDecodeError as err:
        raise bad_request(f"the request body is not UTF-8 text: {err}", code="invalid_json") from err
    except json.JSONDecodeError as err:
        raise bad_request(f"the request body is not valid JSON: {err}", code="invalid_json") from err
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, not {_kind(data)}", code="invalid_json")
    return data


def parse_chat_request(data: dict[str, Any]) -> ChatRequest:
    """Check a chat-completion request body and return what it asks for; `RequestError` (400) when malformed.

    Exactly one image in the conversation (a user message's image_url part: a data URL, a local path or a
    file:// URL), and the last message from the user with some text: that text is the question.
    """
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request(f"model must be a string, not {_kind(model)}", "model")
    messages, images = _messages(data.get("messages"))
    if not images:
        raise bad_request("no image in the messages: add an image_url part (a data:image/...;base64 URL or a local "
                          "file path) to a user message", "messages", "missing_image")
    if len(images) > 1:
        raise bad_request(f"{len(images)} images in the messages; this server takes exactly one image per request "
                          "(the bundle's chat template has one <image>)", "messages", "too_many_images")
    last = messages[-1]
    if last.role != "user":
        raise bad_request(f"the last message must come from the user (it is from {last.role!r}): its text is the "
                          "question", f"messages[{len(messages) - 1}].role")
    if not last.text.strip():
        raise bad_request("the last user message has no text: ask a question about the image",
                          f"messages[{len(messages) - 1}].content")
    max_tokens, max_param = _max_tokens(data)
    n = data.get("n")
    if n is not None and (_int(n, "n") != 1):
        raise bad_request(f"n={n}: this server returns one choice per request", "n")
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request(f"stream must be true or false, not {_kind(stream)}", "stream")
    known = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
             "stream", "stream_options", "n", "top_k", "repetition_penalty", "min_tokens"}
    image_at, image = images[0]
    return ChatRequest(
        model=model or None,
        messages=tuple(messages),
        question=last.text,
        image=image,
        image_message=image_at,
        max_tokens=max_tokens,
        max_tokens_param=max_param,
        temperature=_number(data.get("temperature"), "temperature", 0.0, 2.0, low_open=False),
        top_p=_number(data.get("top_p"), "top_p", 0.0, 1.0, low_open=True),
        seed=_seed(data.get("seed")),
        stop=_stop(data.get("stop")),
        top_k=None if data.get("top_k") is None else _nonneg_int(data["top_k"], "top_k"),
        repetition_penalty=_number(data.get("repetition_penalty"), "repetition_penalty", 0.0, 10.0, low_open=True),
        min_tokens=None if data.get("min_tokens") is None else _nonneg_int(data["min_tokens"], "min_tokens"),
        stream=bool(stream),
        include_usage=_include_usage(data.get("stream_options")),
        extra={k: v for k, v in data.items() if k not in known},
    )


def _messages(raw: Any) -> tuple[list[ChatMessage], list[tuple[int, ImageRef]]]:
    if raw is None:
        raise bad_request("messages is required: a list of chat messages, the last one from the user", "messages",
                          "missing_messages")
    if not isinstance(raw, list) or not raw:
        raise bad_request("messages must be a non-empty list of chat messages", "messages")
    messages: list[ChatMessage] = []
    images: list[tuple[int, ImageRef]] = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object with role and content, not {_kind(m)}", where)
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(f"{where}.role is {role!r}; give one of {', '.join(ROLES)}", f"{where}.role")
        texts, refs = _content(m.get("content"), f"{where}.content")
        if refs and role != "user":
            raise bad_request(f"{where} is a {role} message with an image; only user messages may carry images",
                              f"{where}.content")
        images.extend((i, r) for r in refs)
        messages.append(ChatMessage(role=role, text="\n".join(texts), has_image=bool(refs)))
    if not any(m.role == "user" for m in messages):
        raise bad_request("no user message in messages", "messages", "missing_user_message")
    return messages, images


def _content(content: Any, where: str) -> tuple[list[str], list[ImageRef]]:
    if content is None:
        return [], []
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or a list of content parts, not {_kind(content)}", where)
    texts: list[str] = []
    refs: list[ImageRef] = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request(f"{at}.text must be a string, not {_kind(text)}", f"{at}.text")
            texts.append(text)
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str) or not url:
                raise bad_request(f"{at}.image_url.url must be a non-empty string", f"{at}.image_url")
            refs.append(image_ref(url, f"{at}.image_url"))
        else:
            raise bad_request(f"{at} has type {kind!r}; this server reads 'text' and 'image_url' parts", at)
    return texts, refs


def image_ref(url: str, param: str = "image_url") -> ImageRef:
    """An image URL -> `ImageRef`: `data:image/...;base64,...`, `file:///abs/path`, or a plain local path."""
    if url.startswith("data:"):
        header, comma, payload = url[5:].partition(",")
        media_type, *opts = header.split(";")
        if not comma or "base64" not in opts:
            raise bad_request("the image data URL must be base64: data:image/png;base64,...", param, "invalid_image_url")
        if media_type and not media_type.lower().startswith("image/"):
            raise bad_request(f"the data URL's media type is {media_type!r}, not an image/... type", param,
                              "invalid_image_url")
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as err:
            raise bad_request(f"the image data URL is not valid base64: {err}", param, "invalid_image_url") from err
        if not data:
            raise bad_request("the image data URL is empty", param, "invalid_image_url")
        return ImageRef("data", data=data, media_type=media_type.lower(), param=param)
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise bad_request(f"file URL {url!r} names host {parts.netloc!r}; only local files are read", param,
                              "invalid_image_url")
        return ImageRef("file", path=url2pathname(unquote(parts.path)), param=param)
    if scheme in ("http", "https", "ftp"):
        raise bad_request(f"remote image URLs ({scheme}://) are not fetched; send the image as a "
                          "data:image/...;base64 URL", param, "invalid_image_url")
    return ImageRef("file", path=url, param=param)


def _max_tokens(data: dict[str, Any]) -> tuple[int | None, str]:
    given = {k: _int(data[k], k) for k in ("max_completion_tokens", "max_tokens") if data.get(k) is not None}
    if len(set(given.values())) > 1:
        raise bad_request(f"max_tokens={given['max_tokens']} and max_completion_tokens={given['max_completion_tokens']} "
                          "disagree; give one of them", "max_tokens")
    if not given:
        return None, "max_tokens"
    key, value = next(iter(given.items()))
    if value < 1:
        raise bad_request(f"{key} must be at least 1 (got {value})", key)
    return value, key


def _nonneg_int(value: Any, param: str) -> int:
    v = _int(value, param)
    if v < 0:
        raise bad_request(f"{param} must be >= 0 (got {v})", param)
    return v


def _int(value: Any, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{param} must be an integer, not {_kind(value)}", param)
    return value


def _number(value: Any, param: str, lo: float, hi: float, *, low_open: bool) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"{param} must be a finite number, not {value!r}", param)
    if value > hi or value < lo or (low_open and value == lo):
        interval = f"{'(' if low_open else '['}{lo:g}, {hi:g}]"
        raise bad_request(f"{param}={value} is outside {interval}", param)
    return float(value)


def _seed(value: Any) -> int | None:
    if value is None:
        return None
    seed = _int(value, "seed")
    if not -(1 << 63) <= seed < (1 << 63):
        raise bad_request(f"seed={seed} is not a signed 64-bit integer", "seed")
    return seed


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise bad_request("stop must be a non-empty string or a list of non-empty strings", "stop")
    if len(items) > MAX_STOP:
        raise bad_request(f"stop has {len(items)} sequences; give at most {MAX_STOP}", "stop")
    return tuple(items)


def _include_usage(value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, dict):
        raise bad_request(f"stream_options must be an object, not {_kind(value)}", "stream_options")
    flag = value.get("include_usage", False)
    if not isinstance(flag, bool):
        raise bad_request("stream_options.include_usage must be true or false", "stream_options.include_usage")
    return flag


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# -- responses -------------------------------------------------------------------------------------------------


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(cid: str, created: int, model: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    """A `chat.completion` object with one choice."""
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_body(cid: str, created: int, model: str, delta: dict[str, Any] | None,
               finish_reason: str | None = None, usage_: dict[str, int] | None = None) -> dict[str, Any]:
    """A `chat.completion.chunk`; `delta=None` makes the usage-only chunk (no choices)."""
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
    body["choices"] = [] if delta is None else [
        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    ]
    if usage_ is not None:
        body["usage"] = usage_
    return body


def model_object(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "ficoco-export"}


def models_body(model_id: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(model_id, created)]}


def sse(obj: dict[str, Any] | str) -> bytes:
    """One server-sent event carrying `obj` as JSON (or a literal string such as [DONE])."""
    payload = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


SSE_DONE = sse("[DONE]")


def now() -> int:
    return int(time.time())
