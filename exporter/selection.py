"""Which visual tokens a bundle keeps, step by step, against the fp32 PyTorch reference ("selection flips").

`exporter.probe.SelectionProbe` runs a bundle graph with the kept set T of every reduction step as an
extra output (ONNX Runtime, CPU): the vision encoder (every vision step) and each decoder reduction graph
`decoder_reduce_{s}` (decoder step s), run in the bundle's prefill by `calibration.selection.ProbeStages`;
`ReducedLlava`'s `VisionOutput.plans` / `PrefillOutput.plans` hold the reference's T per block. Both run on
the same inputs: the vision graph on the same pixels, the prefill (splice, segments and reductions) on the
reference's text embeddings and visual tokens, so the decoder's flips are its own.

A *flip* is a span index kept by one side and not by the other: flips = |T_ref \\ T_bundle| (both sets
have n - r members, so this equals |T_bundle \\ T_ref|). Steps are compared position by position: once
an earlier step flipped, a later step's span holds different tokens on the two sides, so its flips
include the consequence of the earlier ones. The report also says how many flips are *ties*: the two
swapped tokens stand for image patches with identical pixels (two patches of one flat background), so
the flip changes which of two identical-looking patches is kept (their positions differ, their content
does not). A merged token is named by the patch it kept.

TensorRT engines do not expose their selection; the flips of a TensorRT bundle are measured on its ONNX
graphs, which is what its engines were built from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bundle.arrays import numpy_dtype
from bundle.flips import SelectionCheck, StepFlips
from exporter.probe import SelectionProbe, set_differences


def _numpy_feeds(probe: SelectionProbe, feeds: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    """Torch inputs as numpy arrays of the graph's input types (fp32 inputs of an fp16 graph are cast)."""
    out = {}
    for name, dtype_name in probe.input_types.items():
        dtype = numpy_dtype(dtype_name)
        t = feeds[name]
        if isinstance(t, Tensor):
            t = t.detach().cpu()
            t = (t.float() if t.is_floating_point() else t).numpy()
        out[name] = np.asarray(t).astype(dtype)
    return out


def _flips(ref: np.ndarray, got: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Per batch row: (flips, indices only the reference kept, indices only the bundle kept)."""
    counts = set_differences(ref, got)
    return [(c, np.setdiff1d(r, g), np.setdiff1d(g, r)) for c, r, g in zip(counts, ref, got, strict=True)]


def patch_pixels(pixel_values: Tensor, grid_side: int) -> Tensor:
    """[B, 3, H, W] -> [B, grid_side**2, 3 * p * p]: the pixels of every patch, row-major like CLIP's."""
    b, c, h, _ = pixel_values.shape
    p = h // grid_side
    x = pixel_values.reshape(b, c, grid_side, p, grid_side, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, grid_side * grid_side, c * p * p)


def _ties(pos: np.ndarray, patches: Tensor | None, only_ref: np.ndarray, only_got: np.ndarray) -> int:
    """How many swapped indices pair up with a token whose original patch has identical pixels.

    pos: [n] the reference's original patch index of each span slot (-1: [CLS] or a fused token)."""
    if patches is None or only_ref.size == 0:
        return 0
    pool = [int(pos[j]) for j in only_got if pos[j] >= 0]
    ties = 0
    for i in only_ref:
        a = int(pos[i])
        if a < 0:
            continue
        hit = next((k for k, b in enumerate(pool) if torch.equal(patches[a], patches[b])), None)
        if hit is not None:
            ties += 1
            pool.pop(hit)
    return ties


def compare_steps(
    tower: str, ref_plans: Mapping[int, Any], got: Sequence[np.ndarray], pos: np.ndarray,
    patches: Tensor | None = None, fused: bool = False,
) -> list[StepFlips]:
    """Pair the reference's plans (block -> MergePlan, in block order) with the bundle's kept sets (graph order).

    pos: [B, n] the original patch index of each slot of the first step's span (-1 for [CLS]); it follows
    the reference's kept sets from step to step (a merged token is named by the patch it kept), and with
    `patches` ([B, N, 3 p p] pixels) a flip between two patches of identical pixels counts as a tie.
    `fused`: the method appends one fused token (-1) after every step (EViT).
    """
    blocks = sorted(ref_plans)
    if len(blocks) != len(got):
        raise ValueError(f"{tower}: the reference reduces at {len(blocks)} blocks, the graph has {len(got)} kept sets")
    out = []
    for block, g in zip(blocks, got, strict=True):
        ref = ref_plans[block].kept.detach().cpu().numpy()
        if ref.shape != g.shape:
            raise ValueError(f"{tower} block {block}: kept set of shape {list(g.shape)}, the reference's is {list(ref.shape)}")
        rows = _flips(ref, g)
        worst = max(range(len(rows)), key=lambda b: rows[b][0])
        count, only_ref, only_got = rows[worst]
        ties = _ties(pos[worst], None if patches is None else patches[worst], only_ref, only_got)
        out.append(StepFlips(tower, block, int(ref.shape[1]), count, ties))
        pos = np.take_along_axis(pos, ref, axis=1)
        if fused:
            pos = np.concatenate([pos, np.full((pos.shape[0], 1), -1, dtype=pos.dtype)], axis=1)
    return out


class SelectionChecker:
    """Probes over a bundle's vision graph and decoder reduction graphs, reused for every sample.

    `stages` runs the bundle's graphs in ONNX Runtime (CPU) with the probes in place
    (`calibration.selection.ProbeStages`); `vision` is the vision encoder's probe.
    """

    def __init__(self, onnx_dir: str | Path, threads: int | None = None, *, segments: Any = None,
                 keep_loaded: bool = True, before_open: Callable[[], object] | None = None) -> None:
        from exporter.probe import ProbeStages

        self.stages = ProbeStages(Path(onnx_dir), threads=threads, segments=segments, keep_loaded=keep_loaded,
                                  before_open=before_open)
        self.vision = self.stages.vision

    def check(self, reduced: Any, pixel_values: Tensor, text_embeds: Tensor, image_offset: Tensor) -> SelectionCheck:
        """Kept sets of the bundle's graphs vs `reduced` (a fp32 `ReducedLlava`) on the same inputs.

        Vision: the graph and the reference on the same pixels. Decoder: both on the reference's visual tokens
        computed with the *bundle's* vision kept sets (so the decoder's flips are its own, and these are
        the visual tokens `compare_stages` hands the prefill when the reference follows the bundle).
        `follow` holds the bundle's kept sets of both towers (None if either could not be probed).
        """
        from ficoco.reduced_llava import FollowedSelection

        notes = []
        steps: list[StepFlips] = []
        followed = True
        with torch.inference_mode():
            vis = reduced.encode_image(pixel_values)
        follow_vision: dict[int, Tensor] = {}
        g = reduced.geometry.vision
        patches = patch_pixels(pixel_values.float(), g.grid_side)
        b = int(pixel_values.shape[0])
        first = -1 if g.has_cls else 0
        pos0 = np.broadcast_to(np.arange(first, g.num_patches, dtype=np.int64), (b, g.num_patches - first)).copy()
        sched = reduced.schedule
        if vis.plans:
            if not self.vision.usable or not self.vision.steps:
                notes.append("vision: the graph's reduction nodes cannot be found (no node metadata); not measured")
            else:
                _, kept = self.vision.run(_numpy_feeds(self.vision, {"pixel_values": pixel_values}))
                steps += compare_steps("vision", vis.plans, kept, pos0, patches, sched.vision.method == "evit")
                follow_vision = {blk: torch.as_tensor(np.asarray(k), dtype=torch.long) for blk, k in zip(sorted(vis.plans), kept, strict=True)}
        followed = not vis.plans or bool(follow_vision)
        follow_decoder: dict[int, Tensor] = {}
        with torch.inference_mode():
            vis = reduced.encode_image(pixel_values, FollowedSelection(vision=follow_vision))
            pre = reduced.prefill(text_embeds, vis.visual, image_offset)
        if pre.plans:
            if not self.stages.usable or not self.stages.prefill_steps:
                notes.append("decoder: the reduction graphs' nodes cannot be found (no node metadata); not measured")
            else:
                with torch.inference_mode():
                    self.stages.prefill(text_embeds, vis.visual, image_offset)
                kept = self.stages.prefill_selection
                steps += compare_steps("decoder", pre.plans, kept, vis.pos.cpu().numpy().astype(np.int64), patches)
                follow_decoder = {blk: torch.as_tensor(np.asarray(k), dtype=torch.long) for blk, k in zip(sorted(pre.plans), kept, strict=True)}
        followed = followed and (not pre.plans or bool(follow_decoder))
        follow = FollowedSelection(follow_vision, follow_decoder) if followed else None
        return SelectionCheck(steps, "; ".join(notes), follow)
