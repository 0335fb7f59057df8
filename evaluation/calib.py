"""A calibration set for quantizing the `shapes` model, drawn from easy-vqa's *training* part only.

`ficoco-quantize --calib-images DIR --calib-prompts FILE` calibrates each graph on its real inputs; for
a model trained on easy-vqa those inputs should look like the task (64x64 tiles upscaled to 336 px,
2x2 mosaics, short questions), not like the bundled photos. The test images stay unseen, so the
accuracy measured afterwards on the test splits is not fitted to.

    python -m commands.calib_set out/calib-easy-vqa --images 16
    ficoco-quantize out/shapes-vl25 -o out/shapes-vl25-w4a8 \
        --calib-images out/calib-easy-vqa/images --calib-prompts out/calib-easy-vqa/prompts.txt
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def write_calibration_set(out: Path, n_images: int = 16) -> Path:
    """`out`/images (n_images: half tiles, half mosaics of the train part) and `out`/prompts.txt (their
    questions, one per line, deduplicated in order). Written to a temporary sibling, then renamed."""
    from ficoco import vqa

    if n_images < 1:
        raise ValueError(f"--images must be at least 1 (got {n_images})")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        n_mosaics = n_images // 2
        n_tiles = n_images - n_mosaics
        prompts: list[str] = []
        train_questions = vqa.questions_by_image("train")
        for tile in vqa.tiles("train")[:n_tiles]:
            vqa.load_tile_image("train", tile.image_id).save(tmp / "images" / f"tile-{tile.image_id:04d}.png")
            prompts += train_questions.get(tile.image_id, [])[:2]
        for m in vqa.mosaics("train", max(n_mosaics, 1))[:n_mosaics]:
            vqa.mosaic_image([vqa.load_tile_image("train", t.image_id) for t in m.tiles]).save(tmp / "images" / f"mosaic-{m.key}.png")
            prompts += [q for q, _a, _t in m.questions[:2]]
        unique = list(dict.fromkeys(p.strip() for p in prompts if p.strip()))
        (tmp / "prompts.txt").write_text("\n".join(unique) + "\n", encoding="utf-8")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
