"""The decoder segments: each weight in exactly one segment, and the segments are prefill and decode alike."""

from __future__ import annotations

import pytest
import torch

from ficoco.models import LoadedModel
from ficoco.planner import plan
from ficoco.reduced_llava import ReducedLlava
from ficoco.schedule import ReductionStep, TowerSchedule
from ficoco.segments import decoder_segments


def _tower(steps: tuple[ReductionStep, ...], num_layers: int = 8, span_in: int = 20) -> TowerSchedule:
    return TowerSchedule(tower="decoder", method="ficoco", num_layers=num_layers, span_in=span_in, steps=steps)


def test_no_step_is_one_segment() -> None:
    (seg,) = decoder_segments(_tower(()), "compact")
    assert seg.attention_blocks == seg.mlp_blocks == tuple(range(8))
    assert seg.is_last and seg.opening_mlp is None and (seg.span, seg.position_offset) == (20, 0)


@pytest.mark.parametrize("layers", [(2,), (2, 3), (0, 5, 7), (7,)])
@pytest.mark.parametrize("positions", ["compact", "original"])
def test_every_half_block_once(layers: tuple[int, ...], positions: str) -> None:
    steps, n = [], 20
    for layer in layers:
        steps.append(ReductionStep(layer=layer, n=n, r=3, targets_per_source=1))
        n -= 3
    tower = _tower(tuple(steps))
    segs = decoder_segments(tower, positions)
    assert len(segs) == len(layers) + 1 and [s.index for s in segs] == list(range(len(segs)))
    attention = [b for s in segs for b in s.attention_blocks]
    mlp = [b for s in segs for b in s.mlp_blocks]
    assert attention == mlp == list(range(8))  # each weight once, in running order
    assert [s.closing_step.layer for s in segs[:-1]] == list(layers) and segs[-1].is_last
    for s in segs:  # every attention block of a segment sees the span the schedule gives it
        assert all(tower.span_at(b) == s.span for b in s.attention_blocks)
        assert s.position_offset == (0 if positions == "original" else 20 - s.span)
    assert [s.opening_mlp for s in segs[1:]] == list(layers)  # the MLP of a step block opens the next


@pytest.mark.parametrize("variant,kw", [("L", {"ratio": 0.25}), ("VL", {"ratio": 0.25, "positions": "original"}),
                                        ("none", {})])
def test_extend_by_several_tokens_equals_decode_steps(tiny: LoadedModel, variant: str, kw: dict) -> None:
    """A cache extension by T tokens (a follow-up turn) gives the logits and cache of T decode steps."""
    model = ReducedLlava(tiny.model, plan(tiny.geometry, variant, **kw)).eval()
    g = torch.Generator().manual_seed(0)
    size = tiny.geometry.vision.image_size
    px = torch.randn(1, 3, size, size, generator=g)
    ids = torch.randint(3, 200, (1, 7), generator=g)
    new = torch.randint(3, 200, (1, 4), generator=g)
    with torch.no_grad():
        pre = model.prefill(model.embed_text(ids), model.encode_image(px).visual, torch.tensor([2]))
        start = torch.tensor([ids.shape[1] + tiny.geometry.visual_tokens])
        logits, cache = model.extend(model.embed_text(new), start, pre.cache)
        step_cache = pre.cache
        for t in range(new.shape[1]):
            step_logits, step_cache = model.decode_step(model.embed_text(new[:, t:t + 1]), start + t, step_cache)
    torch.testing.assert_close(logits, step_logits, atol=1e-5, rtol=1e-5)
    for (k, v), (k2, v2) in zip(cache, step_cache, strict=True):
        torch.testing.assert_close(k, k2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, v2, atol=1e-5, rtol=1e-5)
    lengths = [k.shape[2] for k, _ in cache]
    assert lengths == [ids.shape[1] + model.schedule.decoder.span_at(i) + new.shape[1] for i in range(len(cache))]
