"""Invariants of every static reduction step, on hypothesis-generated shapes and data.

Each example draws (B, H, n, d, r, seed, ...) and checks what must hold whatever the scores are: the
token count, finiteness, kept tokens in original order, [CLS] never removed, r = 0 is the identity, and
the compress weights (read off by compressing one-hot rows, so the outputs *are* the mixing weights):
FiCoCo's Eq. 2 is a convex combination, each source's alphas sum to 1 or 0, kept tokens never mix with
each other, targets are kept tokens, and the official FiCoCo-L code's weights to source targets are 0.

Generation is derandomized (a fixed seed), so the examples are the same on every run.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ficoco.methods import (
    VISION_METHODS,
    MethodParams,
    VisionTokens,
    decoder_compress,
    decoder_plan,
    vision_step,
)
from ficoco.methods.ficoco_v import local_penalty
from ficoco.paradigm import MergePlan, adaptive_targets, select_targets
from ficoco.schedule import ReductionStep

EPS = 0.998


def _settings(max_examples: int):
    return settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# Examples per test (x parametrizations): 6 x (150 + 12) + 3 x (110 + 12) + 150 + 120 = 1608 generated cases.
VISION_EXAMPLES = 150
VISION_LARGE_EXAMPLES = 12
DECODER_EXAMPLES = 110
DECODER_LARGE_EXAMPLES = 12
SELECT_EXAMPLES = 150
PENALTY_EXAMPLES = 120


def max_r(method: str, n: int) -> int:
    return {"ficoco": n - 1, "tome": (n + 1) // 2 - 1, "evit": n - 2, "random": n - 2, "pool": n - 2, "fastv": n - 1}[
        method
    ]


@st.composite
def removal(draw, method: str, n: int) -> int:
    top = max(max_r(method, n), 0)
    pick = draw(st.integers(0, 5))
    if pick == 0:
        return 0
    if pick == 1:
        return top
    return draw(st.integers(0, top))


def _randn(g: torch.Generator, shape, quantised: bool) -> torch.Tensor:
    x = torch.randn(*shape, generator=g)
    return torch.round(x * 2) / 2 if quantised else x


def _flow(plan: MergePlan, b: int) -> dict[int, dict[int, float]]:
    """source span index -> {kept slot: summed alpha} for sample b, by explicit loops over the plan."""
    flows: dict[int, dict[int, float]] = {}
    for t, src in enumerate(plan.sources[b].tolist()):
        row: dict[int, float] = {}
        for slot, w in zip(plan.targets[b, t].tolist(), plan.weights[b, t].tolist(), strict=True):
            row[slot] = row.get(slot, 0.0) + w
        flows[src] = row
    return flows


def _check_partition(plan: MergePlan, n: int, n_sources: int) -> None:
    for b in range(plan.kept.shape[0]):
        kept, sources = plan.kept[b].tolist(), plan.sources[b].tolist()
        assert len(sources) == n_sources and len(set(sources)) == n_sources
        assert all(a < c for a, c in zip(kept, kept[1:], strict=False)), "kept must be strictly increasing"
        assert sorted(kept + sources) == list(range(n))


def _check_weights(plan: MergePlan, *, sums: str) -> None:
    """Each source's alphas are >= 0 and sum to 1 or 0 (`exact`) or to at most 1 (`at_most`)."""
    w = plan.weights.float()
    assert bool((w >= 0).all()) and bool(torch.isfinite(w).all())
    total = w.sum(dim=-1)
    if sums == "exact":
        assert bool(((total - 1).abs() <= 1e-5).logical_or(total == 0).all()), total
    else:
        assert bool((total <= 1 + 1e-5).all()), total
    if plan.targets.numel():
        n_kept = plan.kept.shape[1]
        assert int(plan.targets.min()) >= 0 and int(plan.targets.max()) < n_kept


def _check_no_kept_mixing(mix: torch.Tensor, plan: MergePlan, b: int) -> torch.Tensor:
    """mix [n - r, n] = the outputs of compressing one-hot rows. Kept token j's row has no mass on any
    other kept token; returns its own weight per kept slot."""
    kept = plan.kept[b]
    on_kept = mix[:, kept]  # [n - r, n - r]
    own = torch.diagonal(on_kept)
    off = on_kept - torch.diag(own)
    assert bool((off == 0).all()), "a kept token received mass from another kept token"
    return own


# ----------------------------------------------------------------------------------------------------
# Vision steps
# ----------------------------------------------------------------------------------------------------

VISION = [("ficoco", "paper"), ("ficoco", "official"), *((m, "paper") for m in VISION_METHODS if m != "ficoco")]


@st.composite
def vision_case(draw, method: str, large: bool):
    n = draw(st.sampled_from([577, 560, 535, 502, 501, 400])) if large else draw(st.integers(2, 64))
    r = draw(removal(method, n))
    batch = draw(st.integers(1, 2 if large else 3))
    heads = draw(st.integers(1, 4))
    d = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    quantised = draw(st.booleans())
    unit_sizes = draw(st.booleans())
    half = draw(st.booleans())
    side = max(2, math.ceil(math.sqrt(n - 1)))
    grid_side = draw(st.integers(side, max(side, 24)))
    return n, r, batch, heads, d, seed, quantised, unit_sizes, half, grid_side


@pytest.mark.parametrize("method, preset", VISION)
@_settings(VISION_EXAMPLES)
@given(data=st.data())
def test_vision_step_properties(method: str, preset: str, data) -> None:
    check_vision_step(method, preset, *data.draw(vision_case(method, large=False)))


@pytest.mark.parametrize("method, preset", VISION)
@_settings(VISION_LARGE_EXAMPLES)
@given(data=st.data())
def test_vision_step_properties_large(method: str, preset: str, data) -> None:
    """The real LLaVA span lengths (577 = [CLS] + 24 x 24 patches, K = 2 down to 502, K = 1 below)."""
    check_vision_step(method, preset, *data.draw(vision_case(method, large=True)))


def check_vision_step(
    method, preset, n, r, batch, heads, d, seed, quantised, unit_sizes, half, grid_side
) -> None:
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float16 if half else torch.float32
    q = _randn(g, (batch, heads, n, d), quantised).to(dtype)
    k = _randn(g, (batch, heads, n, d), quantised).to(dtype)
    hidden = torch.randn(batch, n, 5, generator=g).to(dtype)
    pos = torch.stack(
        [
            torch.cat(
                [torch.tensor([-1]), torch.sort(torch.randperm(grid_side**2, generator=g)[: n - 1]).values]
            )
            for _ in range(batch)
        ]
    )
    size = (
        torch.ones(batch, n, 1)
        if unit_sizes
        else 1.0 + torch.randint(0, 5, (batch, n, 1), generator=g).float()
    )
    step = ReductionStep(layer=12, n=n, r=r, targets_per_source=adaptive_targets(n, EPS))
    params = MethodParams.for_preset(preset)
    scale = d**-0.5

    out, plan = vision_step(
        method, params, VisionTokens(hidden, pos, size), q, k, step, grid_side=grid_side, scale=scale
    )

    # counts, dtype, finiteness
    assert out.hidden.shape == (batch, n - r, 5) and out.hidden.dtype == dtype
    assert out.pos.shape == (batch, n - r) and out.size.shape == (batch, n - r, 1)
    assert bool(torch.isfinite(out.hidden).all()) and bool((out.size > 0).all())
    n_sources = r + 1 if method == "evit" else r
    _check_partition(plan, n, n_sources)
    n_kept = n - n_sources

    # [CLS] stays at slot 0, untouched; kept tokens keep their original order (pos ascending in the input)
    inexact = method in ("tome", "pool") and not unit_sizes and dtype == torch.float32  # (m x) / m in fp32
    assert not bool((plan.sources == 0).any())
    assert bool((out.pos[:, 0] == -1).all())
    if inexact:
        torch.testing.assert_close(out.hidden[:, 0], hidden[:, 0], atol=0.0, rtol=2.5e-7)
    else:
        assert torch.equal(out.hidden[:, 0], hidden[:, 0])
    kept_pos = out.pos[:, 1:n_kept]
    assert bool((kept_pos[:, 1:] > kept_pos[:, :-1]).all())
    assert torch.equal(out.pos[:, :n_kept], torch.gather(pos, 1, plan.kept))

    if method == "evit":
        # the first n - r - 1 outputs are the kept tokens verbatim, the last one is the fused token
        assert torch.equal(
            out.hidden[:, :n_kept], torch.gather(hidden, 1, plan.kept[..., None].expand(-1, -1, 5))
        )
        assert bool((out.pos[:, -1] == -1).all()) and bool((out.size[:, -1] == 1).all())
    elif r == 0:
        assert plan.sources.shape == (batch, 0)
        assert torch.equal(out.pos, pos) and torch.equal(out.size, size)
        if inexact:
            torch.testing.assert_close(out.hidden, hidden, atol=0.0, rtol=2.5e-7)
        else:
            assert torch.equal(out.hidden, hidden)

    # mixing weights: compress one-hot rows (float32), the outputs are the weights on the input tokens
    eye = torch.eye(n).expand(batch, n, n).contiguous()
    mix, _ = vision_step(
        method, params, VisionTokens(eye, pos, size), q, k, step, grid_side=grid_side, scale=scale
    )
    mix = mix.hidden
    assert bool((mix >= 0).all())
    for b in range(batch):
        kept = plan.kept[b].tolist()
        sources = plan.sources[b].tolist()
        if method == "evit":
            fused = mix[b, -1]
            assert set(torch.nonzero(fused).flatten().tolist()) <= set(sources)
            assert float(fused.sum()) <= 1 + 1e-5  # a subset of one softmax row
            assert torch.equal(mix[b, :-1], torch.eye(n)[kept])
            continue
        assert torch.allclose(mix[b].sum(dim=-1), torch.ones(n_kept), atol=1e-5), "not a convex combination"
        own = _check_no_kept_mixing(mix[b], plan, b)
        assert bool((own > 0).all())
        if method == "ficoco":
            # own weight 1 / (1 + sum alpha); alpha_ij = mix[j, i] / own_j; per source sum in {0, 1}
            # (official, targets over all columns: in [0, 1], the shares of self / [CLS] / source picks are lost)
            alpha = mix[b][:, sources] / own[:, None]  # [n - r, r]
            incoming = alpha.sum(dim=-1)
            assert torch.allclose(own, 1 / (1 + incoming), atol=1e-5)
            per_source = alpha.sum(dim=0)
            if params.ficoco.v_targets == "kept":
                assert bool(((per_source - 1).abs() <= 1e-4).logical_or(per_source.abs() <= 1e-6).all())
            else:
                assert bool((per_source <= 1 + 1e-4).all())
            # [CLS] (paper and official: v_cls_is_target = False) receives nothing
            assert float(mix[b, 0, 0]) == 1.0
        elif method == "random":  # pruned: the kept tokens verbatim, the sources nowhere
            assert torch.equal(mix[b], torch.eye(n)[kept])
        elif method == "pool":  # every source goes, whole, into exactly one kept patch, never [CLS]
            assert bool(((mix[b][:, sources] > 0).sum(dim=0) == 1).all())
            assert torch.equal(mix[b, 0], torch.eye(n)[0])
        else:  # tome: every source goes, whole, into exactly one odd-slot target
            assert all(s % 2 == 0 for s in sources)
            receivers = (mix[b][:, sources] > 0).sum(dim=0)
            assert bool((receivers == 1).all())
            assert all(
                kept[j] % 2 == 1 for j in torch.nonzero(mix[b][:, sources].sum(dim=-1)).flatten().tolist()
            )
    if method == "ficoco":
        _check_weights(plan, sums="exact" if params.ficoco.v_targets == "kept" else "at_most")
        for b in range(batch):  # targets are kept tokens, never [CLS]
            for flows in _flow(plan, b).values():
                assert all(plan.kept[b, slot] != 0 for slot, w in flows.items() if w > 0)
    if method in ("tome", "pool"):
        assert torch.allclose(out.size.sum(dim=1), size.sum(dim=1)), "ToMe / pool sizes must add up"


# ----------------------------------------------------------------------------------------------------
# Decoder steps
# ----------------------------------------------------------------------------------------------------

DECODER = [("ficoco", "paper"), ("ficoco", "official"), ("fastv", "paper")]


@pytest.mark.parametrize("method, preset", DECODER)
@_settings(DECODER_EXAMPLES)
@given(data=st.data())
def test_decoder_step_properties(method: str, preset: str, data) -> None:
    check_decoder_step(method, preset, data.draw(st.integers(2, 64)), data)


@pytest.mark.parametrize("method, preset", DECODER)
@_settings(DECODER_LARGE_EXAMPLES)
@given(data=st.data())
def test_decoder_step_properties_large(method: str, preset: str, data) -> None:
    check_decoder_step(method, preset, data.draw(st.sampled_from([576, 540, 502, 501, 300])), data)


def check_decoder_step(method: str, preset: str, n: int, data) -> None:
    r = data.draw(removal("fastv", n))
    batch = data.draw(st.integers(1, 3 if n <= 64 else 2))
    heads = data.draw(st.integers(1, 4))
    d = data.draw(st.integers(1, 12))
    text = data.draw(st.integers(0, 12))
    seed = data.draw(st.integers(0, 2**31 - 1))
    quantised = data.draw(st.booleans())
    half = data.draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    offsets = torch.randint(1, 20, (batch,), generator=g)
    length = int(offsets.max()) + n + text
    dtype = torch.float16 if half else torch.float32
    q = _randn(g, (batch, heads, length, d), quantised).to(dtype)
    k = _randn(g, (batch, heads, length, d), quantised).to(dtype)
    x = torch.randn(batch, n, 6, generator=g).to(dtype)
    step = ReductionStep(layer=5, n=n, r=r, targets_per_source=adaptive_targets(n, EPS))
    params = MethodParams.for_preset(preset)

    plan = decoder_plan(method, params, q, k, offsets, step, scale=d**-0.5)
    out = decoder_compress(method, params, x, plan)
    assert out.shape == (batch, n - r, 6) and out.dtype == dtype
    assert bool(torch.isfinite(out).all())
    _check_partition(plan, n, r)
    if r == 0:
        assert torch.equal(out, x)

    mix = decoder_compress(method, params, torch.eye(n).expand(batch, n, n).contiguous(), plan)
    assert bool((mix >= 0).all())
    for b in range(batch):
        kept, sources = plan.kept[b].tolist(), plan.sources[b].tolist()
        if method == "fastv":
            assert torch.equal(mix[b], torch.eye(n)[kept])  # pure pruning
            continue
        own = _check_no_kept_mixing(mix[b], plan, b)
        if params.ficoco.l_compress == "sum":  # official: X_j + sum alpha_ij X_i
            assert bool((own == 1).all())
            per_source = mix[b][:, sources].sum(dim=0)
            assert bool((per_source <= 1 + 1e-5).all())
        else:  # paper: Eq. 2, convex
            assert torch.allclose(mix[b].sum(dim=-1), torch.ones(n - r), atol=1e-5)
            alpha = mix[b][:, sources] / own[:, None]
            assert torch.allclose(own, 1 / (1 + alpha.sum(dim=-1)), atol=1e-5)
            per_source = alpha.sum(dim=0)
            assert bool(((per_source - 1).abs() <= 1e-4).logical_or(per_source.abs() <= 1e-6).all())
    if method == "ficoco":
        _check_weights(plan, sums="exact" if params.ficoco.l_targets == "kept" else "at_most")


# ----------------------------------------------------------------------------------------------------
# Correlate (select_targets) on raw correlation rows
# ----------------------------------------------------------------------------------------------------


def exact_quantile(row: list[float], epsilon: float) -> Fraction | float:
    """tau = the eps-quantile of `row` (linear interpolation between order statistics, as torch.quantile)
    in exact rational arithmetic; -inf when the lower order statistic is -inf."""
    asc = sorted(row)
    p = Fraction(str(epsilon)) * (len(row) - 1)
    lo = math.floor(p)
    f = p - lo
    if asc[lo] == -math.inf:
        return -math.inf  # lerp(-inf, a, f) = -inf
    if f == 0:
        return Fraction(asc[lo])
    return Fraction(asc[lo]) + f * (Fraction(asc[lo + 1]) - Fraction(asc[lo]))


def exact_above(v: float, tau: Fraction | float, strict: bool) -> bool:
    if not math.isfinite(v):
        return False
    if tau == -math.inf:
        return True
    return Fraction(v) > tau if strict else Fraction(v) >= tau


@_settings(SELECT_EXAMPLES)
@given(
    n=st.one_of(st.integers(2, 90), st.sampled_from([500, 501, 502, 535])),
    batch=st.integers(1, 3),
    epsilon=st.sampled_from([0.998, 0.99, 0.9, 0.5]),
    strict=st.booleans(),
    over=st.sampled_from(["kept", "all"]),
    quantised=st.booleans(),
    self_inf=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_select_targets_properties(n, batch, epsilon, strict, over, quantised, self_inf, seed, data) -> None:
    """Targets are the top-K kept columns (`all`: top-K columns, source targets weightless) with
    C_ij >= tau_i (> if strict), decided exactly; alphas are >= 0 and sum to 1 or 0 (`all`: <= 1).
    With column 0 not ok (FiCoCo-V's [CLS]): `kept` never picks it, `all` may pick it but gives it nothing."""
    if n > 90:  # the real span lengths: fewer, cheaper rows (small n covers every r)
        batch, r = 1, data.draw(st.sampled_from([1, 2, 40, n - 250]))
    else:
        r = data.draw(st.integers(1, n - 1))
    k = adaptive_targets(n, epsilon)
    g = torch.Generator().manual_seed(seed)
    sources = torch.stack([torch.randperm(n, generator=g)[:r] for _ in range(batch)])
    kept = torch.stack([torch.tensor(sorted(set(range(n)) - set(s.tolist()))) for s in sources])
    corr = _randn(g, (batch, r, n), quantised)
    if self_inf:  # C_ii = -inf as in FiCoCo-L
        corr = corr.scatter(-1, sources[..., None], -math.inf)
    cls_excluded = data.draw(st.booleans())
    column_ok = (torch.arange(n) > 0).expand(batch, n) if cls_excluded else None
    targets, weights = select_targets(corr, sources, kept, k, epsilon, strict=strict, over=over, column_ok=column_ok)
    assert targets.shape == weights.shape == (batch, r, k)
    plan = MergePlan(kept=kept, sources=sources, targets=targets, weights=weights)
    _check_weights(plan, sums="exact" if over == "kept" else "at_most")

    for b in range(batch):
        src_set = set(sources[b].tolist())
        if cls_excluded:
            src_set.add(0)  # receives nothing, like a source
        kept_b = kept[b].tolist()
        flows_b = _flow(plan, b)
        for t, i in enumerate(sources[b].tolist()):
            row = corr[b, t].tolist()
            cand = kept_b if over == "kept" else list(range(n))
            if over == "kept" and cls_excluded:
                cand = [j for j in cand if j != 0]
            top = sorted(cand, key=lambda j, row=row: (-row[j], j))[:k]  # ties -> lower index
            got = {kept_b[slot]: w for slot, w in flows_b[i].items() if w > 0}
            tau = exact_quantile(row, epsilon)
            valid = [j for j in top if exact_above(row[j], tau, strict)]
            assert set(got) == {j for j in valid if j not in src_set}, (row, top, got)
            if valid:  # softmax over all valid targets (source targets included, then dropped)
                m = max(row[j] for j in valid)
                z = sum(math.exp(row[j] - m) for j in valid)
                for j, w in got.items():
                    assert abs(w - math.exp(row[j] - m) / z) <= 1e-5


# ----------------------------------------------------------------------------------------------------
# Local penalty (FiCoCo-V, A5)
# ----------------------------------------------------------------------------------------------------


@_settings(PENALTY_EXAMPLES)
@given(
    grid_side=st.integers(1, 13),
    batch=st.integers(1, 3),
    quantised=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_local_penalty_properties(grid_side, batch, quantised, seed, data) -> None:
    patches = grid_side * grid_side
    count = data.draw(st.integers(1, patches))
    g = torch.Generator().manual_seed(seed)
    pos = torch.stack(
        [
            torch.cat([torch.tensor([-1]), torch.sort(torch.randperm(patches, generator=g)[:count]).values])
            for _ in range(batch)
        ]
    )
    s = _randn(g, (batch, count + 1), quantised)
    s[:, 0] = -math.inf
    out = local_penalty(s, pos, grid_side, 2.0)
    assert out.shape == s.shape and bool((out[:, 0] == -math.inf).all())
    for b in range(batch):
        windows: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        for slot in range(1, count + 1):
            row, col = divmod(int(pos[b, slot]), grid_side)
            windows.setdefault((row // 2, col // 2), []).append((row, col, slot))
        for members in windows.values():
            members.sort()
            best = max(members, key=lambda m, b=b: (float(s[b, m[2]]), -m[0], -m[1]))[2]
            for _, _, slot in members:
                v, w = float(s[b, slot]), float(out[b, slot])
                if slot == best:
                    assert w == (2 * v if v > 0 else v / 2)
                else:
                    assert w == v
    assert torch.equal(local_penalty(s, pos, grid_side, 1.0), s)  # coefficient 1 = no penalty


# ----------------------------------------------------------------------------------------------------
# Regressions found by the reference comparison
# ----------------------------------------------------------------------------------------------------


def _one_source_row(n: int, values: dict[int, float], source: int = 0):
    """A single source (span index `source`) whose correlation row is small noise plus `values`."""
    row = torch.linspace(-0.5, -0.1, n)
    for j, v in values.items():
        row[j] = v
    sources = torch.tensor([[source]])
    kept = torch.tensor([[j for j in range(n) if j != source]])
    return row.reshape(1, 1, n), sources, kept


def test_threshold_not_rounded_onto_upper_order_statistic() -> None:
    """n = 502 (K = 2, f = 0.998): tau lies 0.002 of a 2-ulp gap below a_hi; a float32 tau rounds onto
    a_hi, and C > tau (official, strict) would wrongly fail for the second target."""
    one = 1.0
    a_hi = float(torch.nextafter(torch.nextafter(torch.tensor(one), torch.tensor(2.0)), torch.tensor(2.0)))
    corr, sources, kept = _one_source_row(502, {3: 2.0, 5: a_hi, 7: one})
    tau = exact_quantile(corr[0, 0].tolist(), EPS)
    assert Fraction(one) < tau < Fraction(a_hi)
    for strict in (True, False):
        targets, weights = select_targets(corr, sources, kept, adaptive_targets(502, EPS), EPS, strict=strict)
        got = {int(kept[0, t]): float(w) for t, w in zip(targets[0, 0], weights[0, 0], strict=True) if w > 0}
        assert set(got) == {3, 5}, got


def test_threshold_not_rounded_onto_lower_order_statistic() -> None:
    """n = 500 (K = 1, f = 0.002): the row's maximum is the source's own column, so the best kept column
    is a_lo, just below tau; a float32 tau rounds onto a_lo and would wrongly accept it (paper, >=)."""
    one = 1.0
    a_hi = float(torch.nextafter(torch.nextafter(torch.tensor(one), torch.tensor(2.0)), torch.tensor(2.0)))
    corr, sources, kept = _one_source_row(500, {0: a_hi, 9: one}, source=0)
    tau = exact_quantile(corr[0, 0].tolist(), EPS)
    assert Fraction(one) < tau < Fraction(a_hi)
    for strict in (True, False):
        _, weights = select_targets(corr, sources, kept, adaptive_targets(500, EPS), EPS, strict=strict)
        assert float(weights.sum()) == 0.0, "a target below tau received flow"


def test_fewer_kept_columns_than_k() -> None:
    """n - r < K: no kept column may be listed twice (topk_small repeats index 0 on an exhausted row)."""
    n, eps = 12, 0.5  # K = 6
    k = adaptive_targets(n, eps)
    g = torch.Generator().manual_seed(3)
    corr = torch.randn(1, 9, n, generator=g)
    sources = torch.arange(3, 12).reshape(1, 9)
    kept = torch.tensor([[0, 1, 2]])
    targets, weights = select_targets(corr, sources, kept, k, eps, over="kept")
    for t in range(9):
        row = corr[0, t].tolist()
        tau = exact_quantile(row, eps)
        valid = [j for j in (0, 1, 2) if exact_above(row[j], tau, False)]
        got: dict[int, float] = {}
        for slot, w in zip(targets[0, t].tolist(), weights[0, t].tolist(), strict=True):
            if w > 0:
                assert slot not in got, "a kept column listed twice"
                got[slot] = w
        assert set(got) == set(valid)
        if valid:
            z = sum(math.exp(row[j]) for j in valid)
            assert all(abs(w - math.exp(row[j]) / z) <= 1e-6 for j, w in got.items())
