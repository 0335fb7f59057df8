"""Reduced precision as a first-class bundle kind: the fp32 reference of half-precision weights
(`ficoco.upcast.fp32_compute`), the reference following a bundle's kept-token choices
(`FollowedSelection`), the norm-ratio gate, and the fp16 export validation's gates."""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch
from conftest import TEST_BUNDLE_REQUEST

from bundle.compare import OutputGates, compare_output
from ficoco.models import LoadedModel
from ficoco.planner import ScheduleRequest
from ficoco.reduced_llava import FollowedSelection, ReducedLlava
from ficoco.upcast import fp32_compute


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(1, 3, 336, 336, generator=gen), torch.randint(3, 900, (1, 20), generator=gen), torch.tensor([5])


def _reduced(model: torch.nn.Module, request: dict) -> ReducedLlava:
    from ficoco.geometry import LlavaGeometry

    return ReducedLlava(model, ScheduleRequest(**request).make(LlavaGeometry.from_config(model.config))).eval()


def test_fp32_compute_is_the_fp32_arithmetic_of_half_weights(tiny: LoadedModel) -> None:
    """fp16 weights computed under fp32_compute == the fp32 model holding the same (fp16-rounded) weights,
    and the fp16 weights are bit-identical afterwards."""
    half = copy.deepcopy(tiny.model).half()
    rounded = copy.deepcopy(half).float()
    before = {k: v.clone() for k, v in half.state_dict().items()}
    request = {"variant": "VL", "ratio": 0.25, "layers": {"l_end": 7}}
    r16, r32 = _reduced(half, request), _reduced(rounded, request)
    px, ids, off = _inputs()
    px = px.half().float()  # CLIP's embeddings cast the pixels to the patch weights' dtype
    with torch.inference_mode():
        want_v = r32.encode_image(px)
        want = r32.prefill(r32.embed_text(ids), want_v.visual, off)
        ran: list[torch.nn.Module] = []
        with fp32_compute(r16, after_module=ran.append):
            got_v = r16.encode_image(px)
            got = r16.prefill(r16.embed_text(ids), got_v.visual, off)
    # the hook sees each leaf after it ran, its weights back in fp16 (where a caller releases their pages)
    assert ran and all(p.dtype == torch.float16 for m in ran for p in m.parameters(recurse=False))
    assert any(m is r16.lm_head for m in ran)
    assert got_v.visual.dtype == torch.float32 and got.logits.dtype == torch.float32
    for b in want_v.plans:  # the same arithmetic makes the same choices
        assert torch.equal(got_v.plans[b].kept, want_v.plans[b].kept)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
    after = half.state_dict()
    assert all(after[k].dtype == torch.float16 and torch.equal(after[k], v) for k, v in before.items())


def test_following_a_selection_makes_exactly_those_choices(tiny: LoadedModel) -> None:
    red = _reduced(tiny.model, TEST_BUNDLE_REQUEST)
    px, ids, off = _inputs()
    with torch.inference_mode():
        own_v = red.encode_image(px)
        own = red.prefill(red.embed_text(ids), own_v.visual, off)
        # following its own choices changes nothing but the order the sources are summed in (ascending
        # instead of ranked): the same kept sets, outputs equal to float rounding
        same = FollowedSelection({b: p.kept for b, p in own_v.plans.items()}, {b: p.kept for b, p in own.plans.items()})
        v2 = red.encode_image(px, same)
        p2 = red.prefill(red.embed_text(ids), v2.visual, off, same)
        assert all(torch.equal(v2.plans[b].kept, p.kept) for b, p in own_v.plans.items())
        assert all(torch.equal(p2.plans[b].kept, p.kept) for b, p in own.plans.items())
        torch.testing.assert_close(v2.visual, own_v.visual, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(p2.logits, own.logits, rtol=1e-4, atol=1e-4)
        # following other choices: the first vision step keeps the span without its last r tokens
        first = min(own_v.plans)
        kept = own_v.plans[first].kept
        n = int(red.schedule.vision.step_at(first).n)
        other = torch.arange(kept.shape[1]).unsqueeze(0)
        assert not torch.equal(other, kept)
        forced = red.encode_image(px, FollowedSelection({first: other}))
    assert torch.equal(forced.plans[first].kept, other) and n > kept.shape[1]
    assert not torch.equal(forced.visual, own_v.visual)
    with pytest.raises(ValueError, match="followed kept set has"):
        red.encode_image(px, FollowedSelection({first: other[:, :-1]}))


def test_norm_ratio_gate_catches_a_scaled_output() -> None:
    ref = torch.randn(64)
    gates = OutputGates(atol=0.0, rtol=0.0, check_error_stat="mean", gate_tolerance=False, min_cosine=0.99,
                        max_norm_deviation=0.25)
    scaled = compare_output("g:out", ref * 1.5, ref, gates)
    assert scaled.cosine == pytest.approx(1.0) and scaled.norm_ratio == pytest.approx(1.5)
    assert not scaled.passed  # right direction, wrong scale: cosine alone would pass it
    near = compare_output("g:out", ref * 1.1, ref, gates)
    assert near.passed and near.norm_ratio == pytest.approx(1.1)
    assert compare_output("g:out", torch.zeros(4), torch.zeros(4), gates).norm_ratio == 1.0
    assert not compare_output("g:out", torch.ones(4), torch.zeros(4), gates).passed  # ratio inf


def test_reduced_precision_validation_follows_and_gates(tiny: LoadedModel, tiny_bundle, tmp_path) -> None:
    """The fp16 validation path on the session's bundle (fp32 graphs: no flips, every cosine ~1), low-memory,
    with the reference memory-mapped from a saved copy of the model as an export loads it (its pages are
    released before every graph opens and the results stay exact); a gate it cannot meet (cosine 1.0
    exactly) fails loudly, naming the output and the gate."""
    from bundle.manifest import load_manifest
    from exporter.validate import ReducedPrecisionGates, ValidationError, validate_bundle_graphs
    from ficoco.models import load_model, save_model_dir
    from ficoco.schedule import Schedule

    m = load_manifest(tiny_bundle, verify=False)
    mapped = load_model(str(save_model_dir(tiny, tmp_path / "tiny-dir")))
    red = ReducedLlava(mapped.model, Schedule.from_dict(m.schedule)).eval()
    px, ids, _ = _inputs()
    rep = validate_bundle_graphs(red, tiny_bundle / "onnx", px, ids, 5, atol=1e-4, rtol=1e-3, decode_steps=2,
                                 reduced_precision=ReducedPrecisionGates(), keep_loaded=False)
    assert rep["kind"] == "reduced_precision" and rep["followed"]
    assert rep["released_pages"]["opens"] >= len(m.decoder_segments())  # every segment opened at least once
    if sys.platform.startswith("linux"):  # before every open, and after every reference module ran
        assert rep["released_pages"]["bytes"] > 0 and rep["released_pages"]["after_modules_bytes"] > 0
    assert rep["selection"]["total"] == 0 and len(rep["selection"]["steps"]) == len(red.schedule.vision.steps) + len(red.schedule.decoder.steps)
    assert rep["greedy"]["match_rate"] == 1.0
    assert rep["forced"]["rate"] == 1.0 and rep["forced"]["positions"] == 2 == rep["forced"]["matches"]
    assert rep["forced"]["samples"][0]["candidate"] == rep["greedy"]["tokens"][0]
    assert all(s["passed"] and s["min_cosine"] > 0.9999 for s in rep["stages"].values())
    with pytest.raises(ValidationError, match=r"cosine .*\(>= 1\.0\)"):
        validate_bundle_graphs(red, tiny_bundle / "onnx", px, ids, 5, atol=1e-4, rtol=1e-3, decode_steps=2,
                               reduced_precision=ReducedPrecisionGates(min_cosine=1.0))
    with pytest.raises(ValueError, match="--max-norm-deviation"):
        ReducedPrecisionGates(max_norm_deviation=-1)
    with pytest.raises(ValueError, match="--tie-margin"):
        ReducedPrecisionGates(tie_margin=float("nan"))
    with pytest.raises(ValueError, match="--min-forced-match"):
        ReducedPrecisionGates(min_forced_match=1.5)


def test_forced_agreement_counts_matches_near_ties_and_real_disagreements() -> None:
    """Margins are in standard deviations of the reference row: scaling both logit arrays changes nothing."""
    from bundle.compare import forced_agreement

    ref = torch.tensor([[4.0, 1.0, 0.0, 0.0], [1.0, 2.0, 1.98, 0.0], [0.0, 3.0, 0.0, 2.0]])
    got = torch.tensor([[4.0, 1.0, 0.0, 0.0], [1.0, 1.97, 2.0, 0.0], [0.0, 2.0, 0.0, 3.0]])
    for scale in (1.0, 40.0):
        f = forced_agreement(got * scale, ref * scale, [0, 1, 1], tie_margin=0.05)
        assert (f.matches, f.near_ties, f.first_disagreement, f.candidate) == (1, 1, 2, [0, 2, 3])
        std = float(ref[2].double().std(unbiased=False))
        assert f.worst_margin == pytest.approx(1.0 / std) and f.rate == pytest.approx(2 / 3)
    assert forced_agreement(got, ref, [0, 1, 1], tie_margin=0.0).near_ties == 0  # no excuse at margin 0
    assert forced_agreement(got, ref, [0, 1, 1], tie_margin=10.0).rate == 1.0
    nan = got.clone()
    nan[0, 1] = float("nan")
    assert forced_agreement(nan, ref, [0, 1, 1], 10.0).first_disagreement == 0  # a NaN row is never excused
    with pytest.raises(ValueError, match="reference tokens"):
        forced_agreement(got, ref, [0, 1], 0.05)
    with pytest.raises(ValueError, match="tie margin"):
        forced_agreement(got, ref, [0, 1, 1], -1.0)


def test_forced_logits_follow_the_given_path(tiny: LoadedModel) -> None:
    """Along the model's own greedy tokens, teacher forcing returns the logits it chose from; along another
    path, the first row (the prefill's) is the same and the later rows see the other prefix."""
    from ficoco.generation import decode_tokens, forced_logits

    red = _reduced(tiny.model, TEST_BUNDLE_REQUEST)
    px, ids, off = _inputs()
    st = red.stages()
    with torch.inference_mode():
        visual = st.encode_image(px)
        own = decode_tokens(st, visual, ids, off, 4)
        rows = forced_logits(st, visual, ids, off, own)
        other = (own + 1) % rows.shape[-1]
        rows_other = forced_logits(st, visual, ids, off, other)
    assert rows.shape == (1, 4, tiny.model.config.text_config.vocab_size)
    assert np.array_equal(rows.argmax(-1), own)
    assert np.array_equal(rows_other[:, 0], rows[:, 0]) and not np.allclose(rows_other[:, 1:], rows[:, 1:])
