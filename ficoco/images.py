"""Test photos bundled with scikit-image (no network): the same few real RGB images everywhere."""

from __future__ import annotations

import numpy as np
from PIL import Image

#: scikit-image's bundled colour photos (each ships inside the skimage package; none is fetched).
TEST_IMAGES: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "colorwheel",
)


def test_image(name: str) -> Image.Image:
    """One of `TEST_IMAGES` as an RGB PIL image."""
    if name not in TEST_IMAGES:
        raise KeyError(f"unknown test image {name!r}; choose one of {', '.join(TEST_IMAGES)}")
    import skimage.data

    arr = np.asarray(getattr(skimage.data, name)())
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return Image.fromarray(arr[..., :3].astype(np.uint8), mode="RGB")


def test_images() -> list[tuple[str, Image.Image]]:
    """All test images as (name, RGB image) pairs, in `TEST_IMAGES` order."""
    return [(n, test_image(n)) for n in TEST_IMAGES]


# pytest would otherwise try to collect these when a test module imports them by name.
test_image.__test__ = False  # type: ignore[attr-defined]
test_images.__test__ = False  # type: ignore[attr-defined]
