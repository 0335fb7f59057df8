"""The theoretical FLOPs model (docs/method-spec.md A9, §6.2)."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import LlavaConfig

from ficoco.flops import (
    TERA,
    decoder_block_prefill_flops,
    decoder_decode_flops,
    decoder_prefill_flops,
    flops_report,
    kv_cache_bytes,
    lm_head_flops,
    unreduced_prefill_tflops,
    vision_flops,
)
from ficoco.geometry import LlavaGeometry
from ficoco.schedule import ReductionStep, TowerSchedule


@pytest.fixture(scope="module")
def geo() -> LlavaGeometry:
    return LlavaGeometry.from_config(LlavaConfig())  # the defaults are the LLaVA-1.5-7B geometry


def _dec(geo: LlavaGeometry, span: int, steps: tuple[ReductionStep, ...] = ()) -> TowerSchedule:
    return TowerSchedule("decoder", "ficoco" if steps else "none", geo.decoder.num_layers, span, steps)


def _vis(geo: LlavaGeometry, steps: tuple[ReductionStep, ...] = ()) -> TowerSchedule:
    return TowerSchedule("vision", "ficoco" if steps else "none", geo.vision.blocks_run, geo.vision.seq_len, steps)


@pytest.mark.parametrize("tokens, paper", [(576, 8.45), (192, 3.30), (128, 2.45), (64, 1.61)])
def test_paper_llava7b_prefill_figures(geo: LlavaGeometry, tokens: int, paper: float) -> None:
    got = unreduced_prefill_tflops(geo.decoder, tokens, text_tokens=60)
    assert got == pytest.approx(paper, rel=0.01)


def test_mha_block_matches_paper_fit(geo: LlavaGeometry) -> None:
    d, i = geo.decoder.hidden_size, geo.decoder.intermediate_size
    for p in (1, 124, 636):
        assert decoder_block_prefill_flops(geo.decoder, p, p) == 8 * p * d * d + 4 * p * p * d + 6 * p * d * i


def test_gqa_counts_narrower_kv(geo: LlavaGeometry) -> None:
    gqa = dataclasses.replace(geo.decoder, num_kv_heads=8)
    p, d, hd = 100, gqa.hidden_size, gqa.head_dim
    saved = decoder_block_prefill_flops(geo.decoder, p, p) - decoder_block_prefill_flops(gqa, p, p)
    assert saved == 4 * p * d * (32 - 8) * hd


def test_step_shrinks_mlp_of_its_own_block_and_later_blocks(geo: LlavaGeometry) -> None:
    m = 60
    sched = _dec(geo, 576, (ReductionStep(layer=4, n=576, r=376, targets_per_source=2),))
    dec = geo.decoder
    expected = (
        4 * decoder_block_prefill_flops(dec, 576 + m, 576 + m)  # blocks 0..3
        + decoder_block_prefill_flops(dec, 576 + m, 200 + m)  # block 4: attention on 576, MLP on 200
        + 27 * decoder_block_prefill_flops(dec, 200 + m, 200 + m)
    )
    assert decoder_prefill_flops(dec, sched, m) == expected


def test_vision_unreduced_clip_l336(geo: LlavaGeometry) -> None:
    v = vision_flops(geo, _vis(geo)) / TERA
    assert 0.38 <= v <= 0.395
    # patch embedding + 23 blocks at 577 tokens + projector on 576 tokens, by hand
    dv, iv, d = 1024, 4096, 4096
    block = 8 * 577 * dv * dv + 4 * 577 * 577 * dv + 4 * 577 * dv * iv
    hand = 2 * 576 * 3 * 14 * 14 * dv + 23 * block + 2 * 576 * (dv * d + d * d)
    assert vision_flops(geo, _vis(geo)) == hand


def test_vision_reduction_lowers_cost(geo: LlavaGeometry) -> None:
    steps = (ReductionStep(layer=12, n=577, r=200, targets_per_source=2), ReductionStep(layer=22, n=377, r=100, targets_per_source=1))
    assert vision_flops(geo, _vis(geo, steps)) < vision_flops(geo, _vis(geo))


def test_decode_per_token(geo: LlavaGeometry) -> None:
    dec, m = geo.decoder, 60
    d, i = dec.hidden_size, dec.intermediate_size
    per_layer = 8 * d * d + 6 * d * i + 4 * (m + 576 + 1) * d
    assert decoder_decode_flops(dec, _dec(geo, 576), m) == 32 * per_layer
    steps = (ReductionStep(layer=4, n=576, r=512, targets_per_source=2),)
    # block 4 still caches 576 visual tokens (its step runs after its attention); blocks 5.. cache 64
    reduced = 5 * per_layer + 27 * (8 * d * d + 6 * d * i + 4 * (m + 64 + 1) * d)
    assert decoder_decode_flops(dec, _dec(geo, 576, steps), m) == reduced


def test_kv_cache_matches_paper_table10(geo: LlavaGeometry) -> None:
    assert kv_cache_bytes(geo.decoder, _dec(geo, 576), 60) / 1e6 == pytest.approx(333, rel=0.01)
    assert kv_cache_bytes(geo.decoder, _dec(geo, 64), 60) / 1e6 == pytest.approx(65.0, rel=0.01)


def test_report_keys_and_total(geo: LlavaGeometry) -> None:
    rep = flops_report(geo, _vis(geo), _dec(geo, 576), 60)
    assert set(rep) >= {"vision", "prefill", "decode_per_token", "total"}
    assert rep["prefill"] == pytest.approx(8.45, rel=0.01)
    assert rep["total"] == pytest.approx(rep["vision"] + rep["prefill"])
    assert rep["lm_head_per_token"] == lm_head_flops(geo.decoder) / TERA
    assert all(isinstance(v, float) for v in rep.values())


def test_report_rejects_mismatched_stages(geo: LlavaGeometry) -> None:
    with pytest.raises(ValueError, match="visual tokens"):
        flops_report(geo, _vis(geo), _dec(geo, 500), 60)
    with pytest.raises(ValueError, match="decoder"):
        flops_report(geo, _vis(geo), _vis(geo), 60)
