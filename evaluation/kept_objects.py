"""Which patches a vision-side reduction keeps: object (shape) patches vs background, per method.

FiCoCo-V and EViT keep what [CLS] attends to; on a model whose [CLS] looks at the background they drop
the object. This measures it on easy-vqa test images: a patch is an *object patch* when its pixels
differ from the image's background (the top-left pixel's colour), and a method keeps it when the patch
index is among the positions of the tokens that leave the vision tower (a merged token is named by the
patch it kept).

    python -m commands.kept_objects --images 8 --ratio 0.25
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: (label, method, preset) of the vision-side methods compared
VISION_METHODS = (("FiCoCo-V (paper)", "ficoco", "paper"), ("FiCoCo-V (official)", "ficoco", "official"),
                  ("EViT", "evit", "paper"), ("ToMe", "tome", "paper"), ("pooling", "pool", "paper"),
                  ("random", "random", "paper"))


@dataclass(frozen=True)
class KeptObjects:
    label: str
    image: str
    object_patches: int
    kept_object: int
    kept: int  # patch tokens leaving the vision tower


def object_mask(pixel_values: torch.Tensor, grid: int, patch: int) -> torch.Tensor:
    """[N] bool: patches whose pixels differ anywhere from the top-left pixel (the flat background)."""
    from exporter.selection import patch_pixels

    p = patch_pixels(pixel_values, grid)[0]
    bg = pixel_values[0, :, 0, 0].repeat_interleave(patch * patch)
    return (p - bg).abs().amax(dim=1) > 1e-3


def measure(n_images: int = 8, ratio: float = 0.25, model: str = "shapes") -> list[KeptObjects]:
    from ficoco import vqa
    from ficoco.models import load_model
    from ficoco.planner import ScheduleRequest
    from ficoco.preprocess import preprocess_image
    from ficoco.reduced_llava import ReducedLlava

    loaded = load_model(model)
    g = loaded.geometry.vision
    split = vqa.test_split("easy-vqa").limit(n_images)
    pixels = {k: preprocess_image(split.image(k), loaded.processor_config) for k in split.image_keys()}
    out = []
    for label, method, preset in VISION_METHODS:
        reduced = ReducedLlava(loaded.model, ScheduleRequest(variant="V", method=method, ratio=ratio, preset=preset)
                               .make(loaded.geometry)).eval()
        for key, px in pixels.items():
            obj = object_mask(px, g.grid_side, g.patch_size)
            with torch.inference_mode():
                pos = reduced.encode_image(px).pos[0]
            pos = pos[pos >= 0]
            out.append(KeptObjects(label, key, int(obj.sum()), int(obj[pos].sum()), int(pos.numel())))
    return out


def markdown_table(rows: list[KeptObjects]) -> list[str]:
    """The table `python -m commands.kept_objects` prints: per method, kept object patches per image."""
    lines = ["| method | kept tokens | object patches kept | of all object patches |", "|---|---:|---|---:|"]
    for label, _, _ in VISION_METHODS:
        rs = [r for r in rows if r.label == label]
        share = sum(r.kept_object for r in rs) / max(1, sum(r.object_patches for r in rs))
        per = ", ".join(f"{r.kept_object}/{r.object_patches}" for r in rs)
        lines.append(f"| {label} | {rs[0].kept} | {per} | {100 * share:.0f} % |")
    return lines
