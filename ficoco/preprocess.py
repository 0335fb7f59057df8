"""Image preprocessing with PIL + numpy, matching transformers' CLIPImageProcessor (PIL backend) exactly.

Steps, in CLIPImageProcessor's order: convert to RGB (alpha composited onto white), resize the shortest
edge to ``size.shortest_edge`` with PIL (the other side ``int(short * long / short_in)``, truncated), center
crop to ``crop_size`` (zero padding if the image is smaller), rescale (float64 multiply, then float32),
normalize with the mean/std in float32.

Memory and time are bounded by the output, not by the file: an image is refused before it is decoded
when it has more than `MAX_PIXELS` pixels (a decompression bomb: a few hundred bytes of PNG can declare
gigapixels) or an aspect ratio beyond `MAX_ASPECT` (resizing the short side of a 1 x 4000 strip to 336 px
would make a 336 x 1,344,000 image only to crop 336 x 336 out of it). Both limits name the file and
the fix.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

ImageLike = Image.Image | str | os.PathLike[str]


class ImageError(ValueError):
    """An image file that cannot be used (missing, unreadable, not an image); the message names the file."""


#: Largest image accepted, in pixels (width x height): 50 megapixels, ~150 MB decoded as RGB.
MAX_PIXELS = 50_000_000
#: Largest accepted ratio of the long side to the short side.
MAX_ASPECT = 32.0


def check_image_size(width: int, height: int, name: str = "image") -> None:
    """ImageError unless the image is non-empty, at most MAX_PIXELS and at most MAX_ASPECT : 1."""
    if width < 1 or height < 1:
        raise ImageError(f"{name}: the image is empty ({width} x {height} pixels); give an image with pixels")
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"{name}: {width} x {height} = {width * height:,} pixels is more than the {MAX_PIXELS:,} accepted "
            f"(a decompression bomb, or a photo far larger than the model's input); downscale it first"
        )
    aspect = max(width, height) / min(width, height)
    if aspect > MAX_ASPECT:
        raise ImageError(
            f"{name}: aspect ratio {aspect:.0f}:1 ({width} x {height} pixels) is beyond the {MAX_ASPECT:.0f}:1 "
            "accepted; only a central square is seen by the model, so crop or pad the image to a sensible shape"
        )


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image file fully and return it as RGB (transparency composited onto white)."""
    p = Path(path)
    if not p.exists():
        raise ImageError(f"{p}: no such file")
    if not p.is_file():
        raise ImageError(f"{p}: not a file")
    return _open_checked(p, str(p))


def image_from_bytes(data: bytes, name: str = "image") -> Image.Image:
    """`load_image` for an encoded image held in memory (a request's data URL); `name` goes in the errors."""
    return _open_checked(io.BytesIO(data), name)


def _open_checked(source: Path | io.BytesIO, name: str) -> Image.Image:
    try:
        with Image.open(source) as im:  # reads the header only: the size is known before any pixel is decoded
            check_image_size(im.width, im.height, name)
            im.load()
            return to_rgb(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError(f"{name}: refused as a decompression bomb ({err}); downscale it first") from err
    except UnidentifiedImageError as err:
        raise ImageError(f"{name}: not an image file PIL can read ({err})") from err
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ImageError(f"{name}: cannot read image: {err}") from err


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of `image`; transparency is composited onto white (as transformers' convert_to_rgb does)."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _resize_size(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
    """(new_width, new_height): transformers' get_resize_output_image_size(default_to_square=False)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _center_crop(arr: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """Center crop an (H, W, C) array; pads with zeros (centered) where the image is smaller."""
    h, w = arr.shape[:2]
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    if top >= 0 and left >= 0:
        return arr[top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, h), max(crop_w, w)
    canvas = np.zeros((new_h, new_w, arr.shape[2]), dtype=arr.dtype)
    top_pad, left_pad = -(-(new_h - h) // 2), -(-(new_w - w) // 2)
    canvas[top_pad : top_pad + h, left_pad : left_pad + w] = arr
    top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
    return canvas[top : top + crop_h, left : left + crop_w]


def _size_pair(d: dict[str, Any]) -> tuple[int, int]:
    if "height" in d and "width" in d:
        return int(d["height"]), int(d["width"])
    if "shortest_edge" in d:
        s = int(d["shortest_edge"])
        return s, s
    raise ValueError(f"size {d!r} has neither height/width nor shortest_edge")


def pixel_array(image: ImageLike, processor_config: dict[str, Any]) -> np.ndarray:
    """`pixel_values` [1, 3, H, W] (float32 numpy) for one image, per a CLIP `preprocessor_config.json` dict."""
    cfg = processor_config
    img = load_image(image) if isinstance(image, (str, os.PathLike)) else image
    if not isinstance(img, Image.Image):
        raise ImageError(f"expected a PIL image or a path, got {type(img).__name__}")
    check_image_size(img.width, img.height, getattr(img, "filename", "") or "image")
    if cfg.get("do_convert_rgb", True):
        img = to_rgb(img)
    if cfg.get("do_resize", True):
        size = cfg.get("size", {"shortest_edge": 336})
        if "shortest_edge" in size:
            new_w, new_h = _resize_size(img.width, img.height, int(size["shortest_edge"]))
        else:
            new_h, new_w = _size_pair(size)
        img = img.resize((new_w, new_h), resample=Image.Resampling(int(cfg.get("resample", 3))))
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[..., None]
    if cfg.get("do_center_crop", True):
        crop_h, crop_w = _size_pair(cfg.get("crop_size", {"height": 336, "width": 336}))
        arr = _center_crop(arr, crop_h, crop_w)
    out = arr
    if cfg.get("do_rescale", True):
        out = (out.astype(np.float64) * float(cfg.get("rescale_factor", 1 / 255))).astype(np.float32)
    if cfg.get("do_normalize", True):
        if not np.issubdtype(out.dtype, np.floating):
            out = out.astype(np.float32)
        mean = np.asarray(cfg["image_mean"], dtype=out.dtype)
        std = np.asarray(cfg["image_std"], dtype=out.dtype)
        out = (out - mean) / std
    return np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32)[None]


def pixel_batch(images: Sequence[ImageLike], processor_config: dict[str, Any]) -> np.ndarray:
    """`pixel_values` [B, 3, H, W] (float32 numpy) for several images (all cropped to the same size)."""
    if not images:
        raise ImageError("no images given")
    return np.concatenate([pixel_array(im, processor_config) for im in images], axis=0)


def preprocess_image(image: ImageLike, processor_config: dict[str, Any]) -> Any:
    """`pixel_array` as a torch tensor [1, 3, H, W] (for the PyTorch side)."""
    import torch

    return torch.from_numpy(pixel_array(image, processor_config))


def preprocess_batch(images: Sequence[ImageLike], processor_config: dict[str, Any]) -> Any:
    """`pixel_batch` as a torch tensor [B, 3, H, W] (for the PyTorch side)."""
    import torch

    return torch.from_numpy(pixel_batch(images, processor_config))
