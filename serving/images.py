"""A request's `ImageRef` -> an RGB PIL image, under the runtime's image rules; a bad image is a 400.

Decoded in the HTTP thread that received the request, before it is queued, so a broken image is refused
at once and never occupies the worker. Data URLs get the same checks as files (`ficoco.preprocess`):
the size is read from the header and checked (pixel count, aspect ratio) before any pixel is decoded.
"""

from __future__ import annotations

from typing import Any

from serving.protocol import ImageRef, RequestError


def open_image(ref: ImageRef) -> Any:
    """The image `ref` points at, fully decoded, as RGB; RequestError(400, code invalid_image) otherwise."""
    from ficoco.preprocess import ImageError, image_from_bytes, load_image

    try:
        if ref.source == "file":
            return load_image(ref.path)
        return image_from_bytes(ref.data, ref.describe())
    except ImageError as err:
        raise RequestError(400, f"unreadable image: {err}", param=ref.param, code="invalid_image") from err
