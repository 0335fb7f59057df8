"""The reduced PyTorch LLaVA: equal to transformers without reduction, and the schedule's shapes with it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ficoco.images import test_image
from ficoco.inputs import encode_prompt, format_prompt, hf_input_ids
from ficoco.models import LoadedModel
from ficoco.planner import plan
from ficoco.preprocess import preprocess_image
from ficoco.reduced_llava import ReducedLlava
from ficoco.sampling import SamplingConfig


def _inputs(loaded: LoadedModel, image: str = "astronaut", question: str = "What is in this photo?"):
    px = preprocess_image(test_image(image), loaded.processor_config)
    prompt = encode_prompt(loaded.tokenizer, format_prompt(loaded.chat_template, question), loaded.image_token_id)
    return px, prompt


def _reduced(loaded: LoadedModel, variant: str, **kw) -> ReducedLlava:
    return ReducedLlava(loaded.model, plan(loaded.geometry, variant, **kw))


def _assert_equals_transformers(loaded: LoadedModel, reduced: ReducedLlava, new_tokens: int) -> None:
    px, prompt = _inputs(loaded)
    ids = hf_input_ids(prompt, loaded.image_token_id, loaded.geometry.visual_tokens)
    with torch.no_grad():
        ref = loaded.model(input_ids=ids, pixel_values=px).logits[:, -1]
        visual = reduced.encode_image(px).visual
        ours = reduced.prefill(reduced.embed_text(prompt.text_ids), visual, torch.tensor([prompt.image_offset]))
    torch.testing.assert_close(ours.logits, ref, atol=1e-5, rtol=1e-5)
    hf_tokens = loaded.model.generate(
        input_ids=ids, pixel_values=px, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
        do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=new_tokens,
    )[:, ids.shape[1]:]
    our_tokens = reduced.generate(px, prompt.text_ids, prompt.image_offset, max_new_tokens=new_tokens)
    assert our_tokens.tolist() == hf_tokens.tolist()


@pytest.mark.parametrize("variant,ratio", [("none", None), ("VL", 1.0), ("V", 1.0), ("L", 1.0)])
def test_unreduced_equals_transformers_tiny(tiny: LoadedModel, variant: str, ratio: float | None) -> None:
    reduced = _reduced(tiny, variant, ratio=ratio)
    assert not reduced.schedule.vision.steps and not reduced.schedule.decoder.steps
    _assert_equals_transformers(tiny, reduced, new_tokens=16)


def test_unreduced_equals_transformers_smol(smol: LoadedModel) -> None:
    _assert_equals_transformers(smol, _reduced(smol, "VL", ratio=1.0), new_tokens=8)


def test_shares_weights_with_transformers(tiny: LoadedModel) -> None:
    reduced = _reduced(tiny, "VL", ratio=0.25)
    ours = {p.data_ptr() for p in reduced.parameters()}
    theirs = {p.data_ptr() for p in tiny.model.parameters()}
    assert ours <= theirs


def test_vl_quarter_budget_shapes(tiny: LoadedModel) -> None:
    reduced = _reduced(tiny, "VL", ratio=0.25)
    s = reduced.schedule
    assert s.visual_tokens_final == 144
    px, prompt = _inputs(tiny)
    with torch.no_grad():
        vision = reduced.encode_image(px)
        out = reduced.prefill(reduced.embed_text(prompt.text_ids), vision.visual, torch.tensor([prompt.image_offset]))
    # the vision tower hands exactly the planned count to the decoder, in original raster order
    assert vision.visual.shape[1] == s.decoder.span_in == s.vision.span_out - 1
    assert torch.all(vision.pos[:, 1:] > vision.pos[:, :-1])
    assert set(vision.plans) == {st.layer for st in s.vision.steps}
    # every decoder layer's cache holds text + that layer's visual tokens
    t = prompt.num_text_tokens
    assert [k.shape[2] for k, _ in out.cache] == [t + s.decoder.span_at(i) for i in range(s.decoder.num_layers)]
    assert out.cache[-1][0].shape[2] == t + 144
    assert torch.isfinite(out.logits).all()
    tokens = reduced.generate(px, prompt.text_ids, prompt.image_offset, max_new_tokens=8)
    assert tokens.shape == (1, 8)


@pytest.mark.parametrize("variant", ["V", "L", "VL"])
def test_presets_run_and_differ(tiny: LoadedModel, variant: str) -> None:
    px, prompt = _inputs(tiny)
    logits, kept = {}, {}
    for preset in ("paper", "official"):
        reduced = _reduced(tiny, variant, ratio=0.25, preset=preset)
        with torch.no_grad():
            vision = reduced.encode_image(px)
            out = reduced.prefill(reduced.embed_text(prompt.text_ids), vision.visual, torch.tensor([prompt.image_offset]))
        assert torch.isfinite(out.logits).all()
        logits[preset] = out.logits
        plans = vision.plans if variant == "V" else out.plans
        kept[preset] = [p.kept for _, p in sorted(plans.items())]
    assert not torch.equal(logits["paper"], logits["official"])
    # the two presets choose different tokens somewhere (different scores / layers)
    assert any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(kept["paper"], kept["official"], strict=False))


@pytest.mark.parametrize(
    "variant,method", [("V", "ficoco"), ("V", "tome"), ("V", "evit"), ("L", "ficoco"), ("L", "fastv"), ("VL", "ficoco")]
)
def test_batch_rows_are_independent(tiny: LoadedModel, variant: str, method: str) -> None:
    """Statistics are per sample: a batch of two gives each row what it gives alone."""
    reduced = _reduced(tiny, variant, method=method, ratio=0.25)
    px1, prompt = _inputs(tiny, "astronaut")
    px2, _ = _inputs(tiny, "chelsea")
    ids = prompt.text_ids
    together = reduced.generate(torch.cat([px1, px2]), ids.repeat(2, 1), prompt.image_offset, max_new_tokens=6)
    alone = [reduced.generate(px, ids, prompt.image_offset, max_new_tokens=6) for px in (px1, px2)]
    assert together.tolist() == [alone[0][0].tolist(), alone[1][0].tolist()]


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_positions_modes_generate(tiny: LoadedModel, positions: str) -> None:
    reduced = _reduced(tiny, "L", ratio=0.25, positions=positions)
    offsets = reduced.position_offsets
    if positions == "original":
        assert set(offsets) == {0}
    else:
        s = reduced.schedule.decoder
        assert offsets == [s.span_in - s.span_at(i) for i in range(s.num_layers)] and offsets[-1] == 576 - 144
    px, prompt = _inputs(tiny)
    assert reduced.generate(px, prompt.text_ids, prompt.image_offset, max_new_tokens=4).shape == (1, 4)


def test_sampling_is_seeded(tiny: LoadedModel) -> None:
    reduced = _reduced(tiny, "VL", ratio=0.25)
    px, prompt = _inputs(tiny)
    cfg = SamplingConfig(do_sample=True, temperature=1.5, top_p=0.9, seed=7)
    a = reduced.generate(px, prompt.text_ids, prompt.image_offset, max_new_tokens=12, sampling=cfg)
    b = reduced.generate(px, prompt.text_ids, prompt.image_offset, max_new_tokens=12, sampling=cfg)
    c = reduced.generate(
        px, prompt.text_ids, prompt.image_offset, max_new_tokens=12, sampling=SamplingConfig(True, 1.5, 0.9, seed=8)
    )
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()


def test_schedule_must_fit_model(tiny: LoadedModel) -> None:
    schedule = plan(tiny.geometry, "VL", ratio=0.25)
    wrong_depth = replace(schedule, decoder=replace(schedule.decoder, num_layers=31))
    with pytest.raises(ValueError, match="decoder tower has 31 blocks, the model 32"):
        ReducedLlava(tiny.model, wrong_depth)
    wrong_vision = replace(schedule, vision=replace(schedule.vision, num_layers=24))
    with pytest.raises(ValueError, match="does not fit the model"):
        ReducedLlava(tiny.model, wrong_vision)
