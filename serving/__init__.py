"""`ficoco-serve`'s library: an OpenAI-compatible HTTP server over one bundle (docs/serving.md).

- `serving.protocol`: the wire format — `parse_chat_request` (request JSON -> `ChatRequest`), the response
  and error bodies, server-sent events. Standard library only.
- `serving.images`: an `ImageRef` (data URL or local file) -> a PIL image, bad images as 400s.
- `serving.worker`: the one thread that owns the `Pipeline`, and the bounded queue in front of it.
- `serving.server`: the HTTP side (`http.server.ThreadingHTTPServer`), routing, limits, shutdown.

None of these modules imports torch at module level; the runtime's modules are imported where they are used.
"""

from __future__ import annotations

from serving.protocol import ChatRequest, RequestError, parse_chat_request
from serving.server import ChatServer, ServeOptions

__all__ = ["ChatRequest", "ChatServer", "RequestError", "ServeOptions", "parse_chat_request"]
