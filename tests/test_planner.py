"""The schedule planner (docs/method-spec.md A6/A7)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from transformers import LlavaConfig

from commands.plan import format_table
from ficoco.geometry import LlavaGeometry
from ficoco.paradigm import adaptive_targets
from ficoco.planner import PlanError, plan
from ficoco.schedule import Schedule
from ficoco.tower_steps import even_split


@pytest.fixture(scope="module")
def geo() -> LlavaGeometry:
    return LlavaGeometry.from_config(LlavaConfig())  # the defaults are the LLaVA-1.5-7B geometry


# ------------------------------------------------------------------------------------------ helpers
def test_even_split() -> None:
    assert even_split(288, 11) == [27, 27] + [26] * 9
    assert even_split(3, 5) == [1, 1, 1, 0, 0]
    assert sum(even_split(575, 27)) == 575


@pytest.mark.parametrize("n, k", [(577, 2), (550, 2), (502, 2), (501, 1), (497, 1), (2, 1), (1, 0)])
def test_adaptive_targets_exact(n: int, k: int) -> None:
    assert adaptive_targets(n, 0.998) == k


# ------------------------------------------------------------------------------- ratio 0.25 schedules
def test_v_quarter(geo: LlavaGeometry) -> None:
    s = plan(geo, "V", ratio=0.25)
    assert s.variant == "V" and s.method == "ficoco"
    assert s.vision.method == "ficoco" and s.vision.span_in == 577 and s.vision.num_layers == 23
    assert [st.layer for st in s.vision.steps] == list(range(12, 23))
    assert [st.r for st in s.vision.steps] == [40, 40, 40] + [39] * 8
    assert s.vision.span_out == 145  # 144 patches + [CLS]
    assert s.decoder.method == "none" and s.decoder.steps == () and s.decoder.span_in == 144
    assert s.visual_tokens_final == 144
    assert [st.targets_per_source for st in s.vision.steps] == [2, 2] + [1] * 9  # 577, 537 -> 2; 497 and below -> 1


def test_l_quarter(geo: LlavaGeometry) -> None:
    s = plan(geo, "L", ratio=0.25)
    assert s.vision.steps == () and s.vision.method == "none"
    assert s.decoder.span_in == 576 and s.decoder.num_layers == 32
    assert [st.layer for st in s.decoder.steps] == list(range(4, 31))
    assert all(st.r == 16 for st in s.decoder.steps)
    assert s.visual_tokens_final == 144
    for st in s.decoder.steps:
        assert st.targets_per_source == math.ceil(0.002 * (st.n - 1) - 1e-12)


def test_vl_quarter(geo: LlavaGeometry) -> None:
    s = plan(geo, "vl", ratio=0.25)
    assert s.variant == "VL" and s.visual_tokens_in == 576
    assert s.visual_tokens_final == 144
    assert s.visual_tokens_to_decoder == 288 == round(math.sqrt(576 * 144))
    v = s.vision.steps
    assert [st.layer for st in v] == list(range(12, 23))
    assert sum(st.r for st in v) == 288
    assert [st.r for st in v] == [27, 27] + [26] * 9
    assert [(st.n, st.targets_per_source) for st in v[:4]] == [(577, 2), (550, 2), (523, 2), (497, 1)]
    assert all(st.targets_per_source == 1 for st in v[3:])
    d = s.decoder.steps
    assert [st.layer for st in d] == list(range(4, 31))
    assert [st.r for st in d] == [6] * 9 + [5] * 18
    assert all(st.targets_per_source == 1 for st in d)
    assert s.flops["prefill"] < 8.45 and s.flops["vision"] < 0.39


def test_official_preset_starts_l_at_5(geo: LlavaGeometry) -> None:
    s = plan(geo, "L", keep_tokens=144, preset="official")
    assert s.decoder.steps[0].layer == 5 and s.decoder.steps[-1].layer == 30 and s.preset == "official"


def test_explicit_blocks_and_split(geo: LlavaGeometry) -> None:
    s = plan(geo, "VL", keep_tokens=64, vl_split=200, v_start=10, v_end=20, l_start=2, l_end=10)
    assert [st.layer for st in s.vision.steps] == list(range(10, 21))
    assert s.visual_tokens_to_decoder == 200
    assert [st.layer for st in s.decoder.steps] == list(range(2, 11))
    assert s.visual_tokens_final == 64


def test_small_removal_omits_zero_blocks(geo: LlavaGeometry) -> None:
    s = plan(geo, "L", keep_tokens=571)
    assert [(st.layer, st.r) for st in s.decoder.steps] == [(4, 1), (5, 1), (6, 1), (7, 1), (8, 1)]


def test_json_round_trip(geo: LlavaGeometry) -> None:
    for variant in ("none", "V", "L", "VL"):
        s = plan(geo, variant, ratio=None if variant == "none" else 0.25)
        d = json.loads(s.to_json())
        assert Schedule.from_dict(d) == s


def test_other_methods(geo: LlavaGeometry) -> None:
    tome = plan(geo, "V", "tome", keep_tokens=192)
    assert [st.r for st in tome.vision.steps] == [35] * 10 + [34]
    assert all(st.targets_per_source == 1 for st in tome.vision.steps) and tome.method == "tome"
    evit = plan(geo, "V", "EViT", ratio=0.25)
    assert evit.vision.method == "evit" and evit.visual_tokens_final == 144
    fastv = plan(geo, "L", "fastv", keep_tokens=288)
    assert fastv.decoder.steps == (fastv.decoder.steps[0],)
    st = fastv.decoder.steps[0]
    assert (st.layer, st.n, st.r, st.targets_per_source) == (1, 576, 288, 0)
    assert plan(geo, "L", "fastv", keep_tokens=288, l_start=3).decoder.steps[0].layer == 3


@pytest.mark.parametrize("method, k", [("random", 0), ("pool", 1)])
def test_baseline_methods(geo: LlavaGeometry, method: str, k: int) -> None:
    """random / pool: vision only, ToMe's and EViT's blocks (12 .. 22), the even split, K = 0 / 1, and the
    same FLOPs as any other vision method with the same per-block token counts."""
    quarter = plan(geo, "V", method.upper(), ratio=0.25)
    assert quarter.method == quarter.vision.method == method and quarter.decoder.method == "none"
    assert [st.layer for st in quarter.vision.steps] == list(range(12, 23))
    assert [st.r for st in quarter.vision.steps] == [40, 40, 40] + [39] * 8
    assert all(st.targets_per_source == k for st in quarter.vision.steps)
    assert quarter.vision.span_out == 145 and quarter.visual_tokens_to_decoder == quarter.visual_tokens_final == 144
    assert quarter.flops == plan(geo, "V", "tome", ratio=0.25).flops  # same token counts at every block
    s64 = plan(geo, "V", method, keep_tokens=64)
    assert [st.r for st in s64.vision.steps] == [47] * 6 + [46] * 5
    assert s64.vision.span_out == 65 and s64.visual_tokens_final == 64
    assert s64.flops["prefill"] == pytest.approx(1.61, rel=0.01)
    one = plan(geo, "V", method, keep_tokens=64, v_start=22)
    assert [(st.layer, st.n, st.r, st.targets_per_source) for st in one.vision.steps] == [(22, 577, 512, k)]
    assert plan(geo, "V", method, keep_tokens=1, v_start=22).vision.span_out == 2  # [CLS] + one patch
    assert Schedule.from_dict(json.loads(quarter.to_json())) == quarter


def test_no_reduction_cases(geo: LlavaGeometry) -> None:
    for s in (plan(geo, "none"), plan(geo, "NONE", ratio=1.0), plan(geo, "VL", ratio=1.0), plan(geo, "V", keep_tokens=576)):
        assert s.vision.steps == () and s.decoder.steps == ()
        assert s.vision.method == s.decoder.method == "none"
        assert s.flops["prefill"] == pytest.approx(8.45, rel=0.01)


def test_paper_budgets_v(geo: LlavaGeometry) -> None:
    for keep, tf in ((192, 3.30), (128, 2.45), (64, 1.61)):
        assert plan(geo, "V", keep_tokens=keep).flops["prefill"] == pytest.approx(tf, rel=0.01)


# ------------------------------------------------------------------------------------- target TFLOPs
@pytest.mark.parametrize(
    "variant, method, target",
    [
        ("V", "ficoco", 3.3),
        ("V", "ficoco", 2.4),
        ("V", "tome", 1.5),
        ("VL", "ficoco", 3.3),
        ("VL", "ficoco", 2.4),
        ("L", "fastv", 2.4),
        # FiCoCo-L keeps all 576 tokens up to block 4, so it cannot go below ~4.9 T (docs/method-spec.md §6.2)
        ("L", "ficoco", 6.0),
        ("L", "ficoco", 5.0),
    ],
)
def test_target_tflops_picks_largest_fitting_budget(geo: LlavaGeometry, variant: str, method: str, target: float) -> None:
    s = plan(geo, variant, method, target_tflops=target)
    n = s.visual_tokens_final
    assert s.flops["prefill"] <= target
    assert n < 576
    assert plan(geo, variant, method, keep_tokens=n + 1).flops["prefill"] > target
    assert plan(geo, variant, method, keep_tokens=n) == s


def test_target_above_full_cost_keeps_everything(geo: LlavaGeometry) -> None:
    s = plan(geo, "V", target_tflops=100.0)
    assert s.visual_tokens_final == 576 and s.vision.steps == ()


def test_target_v_paper_points(geo: LlavaGeometry) -> None:
    assert plan(geo, "V", target_tflops=3.30).visual_tokens_final in range(185, 193)
    assert plan(geo, "V", target_tflops=1.61).visual_tokens_final in range(60, 65)


# ------------------------------------------------------------------------------------------ errors
def _err(geo: LlavaGeometry, *args: object, **kw: object) -> str:
    with pytest.raises(PlanError) as ei:
        plan(geo, *args, **kw)  # type: ignore[arg-type]
    return str(ei.value)


def test_plan_error_is_value_error() -> None:
    assert issubclass(PlanError, ValueError)


@pytest.mark.parametrize(
    "args, kw, needle",
    [
        (("X",), {"ratio": 0.5}, "choose one of none, V, L, VL"),
        (("V", "sparsevlm"), {"ratio": 0.5}, "choose one of ficoco, tome, evit, random, pool, fastv"),
        (("L", "tome"), {"ratio": 0.5}, "only the vision tower"),
        (("VL", "evit"), {"ratio": 0.5}, "VL needs method ficoco"),
        (("V", "fastv"), {"ratio": 0.5}, "only the decoder tower"),
        (("VL", "random"), {"ratio": 0.25}, "VL needs method ficoco"),
        (("VL", "pool"), {"keep_tokens": 64}, "VL needs method ficoco"),
        (("L", "pool"), {"ratio": 0.5}, "only the vision tower"),
        (("V",), {}, "needs a budget"),
        (("VL",), {"ratio": 0.5, "keep_tokens": 10}, "exactly one budget"),
        (("V",), {"ratio": 0.0}, "(0, 1]"),
        (("V",), {"ratio": -0.2}, "(0, 1]"),
        (("V",), {"ratio": 1.5}, "(0, 1]"),
        (("V",), {"ratio": float("nan")}, "(0, 1]"),
        (("V",), {"ratio": float("inf")}, "(0, 1]"),
        (("V",), {"ratio": 0.0005}, "smallest ratio"),
        (("V",), {"keep_tokens": 0}, "[1, 576]"),
        (("V",), {"keep_tokens": 577}, "[1, 576]"),
        (("none",), {"ratio": 0.5}, "contradicts"),
        (("none",), {"keep_tokens": 576}, "contradicts"),
        (("none",), {"target_tflops": 3.0}, "contradicts"),
        (("V",), {"ratio": 0.5, "preset": "fast"}, "choose one of paper, official"),
        (("V",), {"ratio": 0.5, "positions": "gappy"}, "choose one of compact, original"),
        (("V",), {"ratio": 0.5, "v_start": 20, "v_end": 15}, "past"),
        (("V",), {"ratio": 0.5, "v_end": 23}, "outside the model"),
        (("V",), {"ratio": 0.5, "v_start": -1}, "outside the model"),
        (("L",), {"ratio": 0.5, "l_end": 32}, "outside the model"),
        (("L",), {"ratio": 0.5, "l_start": 10, "l_end": 9}, "past"),
        (("L",), {"ratio": 0.5, "v_start": 3}, "does not reduce the vision"),
        (("V",), {"ratio": 0.5, "l_start": 3}, "does not reduce the decoder"),
        (("V",), {"ratio": 0.5, "vl_split": 300}, "only to variant VL"),
        (("VL",), {"ratio": 0.25, "vl_split": 100}, "vl_split=100"),
        (("VL",), {"ratio": 0.25, "vl_split": 600}, "[1, 576]"),
        (("L", "fastv"), {"ratio": 0.5, "l_end": 5}, "prunes once"),
        (("V",), {"target_tflops": -1.0}, "positive"),
        (("V",), {"target_tflops": 0.5}, "minimum reachable"),
        (("V",), {"ratio": 0.5, "text_tokens": -1}, "text_tokens"),
    ],
)
def test_invalid_requests(geo: LlavaGeometry, args: tuple, kw: dict, needle: str) -> None:
    assert needle in _err(geo, *args, **kw)


def test_infeasible_schedules_explain_limit(geo: LlavaGeometry) -> None:
    msg = _err(geo, "V", "tome", keep_tokens=1)
    assert "ceil(n/2) - 1" in msg and "more blocks" in msg
    assert plan(geo, "V", "evit", keep_tokens=1, v_start=22).vision.span_out == 2  # [CLS] + the fused token
    msg = _err(geo, "V", keep_tokens=1, v_start=22)
    assert "K = 2" in msg and "more blocks" in msg
    msg = _err(geo, "V", "tome", target_tflops=0.9)
    assert "minimum reachable" in msg


def test_unreachable_l_target_reports_minimum(geo: LlavaGeometry) -> None:
    msg = _err(geo, "L", target_tflops=3.3)
    floor = plan(geo, "L", keep_tokens=1).flops["prefill"]
    assert f"{floor:.3f}" in msg


# --------------------------------------------------------------------------------------- full strategy
def test_full_feature_strategy_counts_cls(geo: LlavaGeometry) -> None:
    full = dataclasses.replace(geo, vision=dataclasses.replace(geo.vision, feature_strategy="full"))
    assert full.visual_tokens == 577
    s = plan(full, "V", keep_tokens=145)
    assert s.vision.span_out == 145 and s.decoder.span_in == 145


# -------------------------------------------------------------------------------------------- table
def test_format_table(geo: LlavaGeometry) -> None:
    import io

    from rich.console import Console

    s = plan(geo, "VL", ratio=0.25)
    buf = io.StringIO()
    Console(width=200, file=buf).print(format_table(s, geo))
    out = buf.getvalue()
    assert "288" in out and "144" in out and "prefill" in out and "vision" in out and "decoder" in out
