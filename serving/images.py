"""A request's `ImageRef` -> an RGB PIL image, under the runtime's image rules; a bad image is a 400.

Decoded in the HTTP thread that received the request, before it is queued, so a broken image is refused
at once and never occupies the worker. Data URLs get the same checks as files (`ficoco.preprocess`):
the size is read from the header and checked (pixel count, aspect ratio) before any pixel is decoded.
"""

from __future__ import annotations

import io
from typing import Any

from serving.protocol import ImageRef, RequestError


def open_image(ref: ImageRef) -> Any:
    """The image `ref` points at, fully decoded, as RGB; RequestError(400, code invalid_image) otherwise."""
    from ficoco.preprocess import ImageError, load_image

    try:
        if ref.source == "file":
            return load_image(ref.path)
        return _decode(ref.data, ref.describe())
    except ImageError as err:
        raise RequestError(400, f"unreadable image: {err}", param=ref.param, code="invalid_image") from err


def _decode(data: bytes, name: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    from ficoco.preprocess import ImageError, check_image_size, to_rgb

    try:
        with Image.open(io.BytesIO(data)) as im:  # the header only: the size is checked before decoding
            check_image_size(im.width, im.height, name)
            im.load()
            return to_rgb(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError(f"{name}: refused as a decompression bomb ({err}); downscale it first") from err
    except UnidentifiedImageError as err:
        raise ImageError(f"{name}: not an image PIL can read") from err
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ImageError(f"{name}: cannot decode the image: {err}") from err
