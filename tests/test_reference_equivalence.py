"""Static (exportable) reduction == reference mode (docs/method-spec.md A11).

For every method and both presets, on random inputs (and inputs full of exact ties, fp16 inputs, r = 0
and r at its maximum), the static implementation (`ficoco.methods`) and the data-dependent reference
(`tests/reference.py`) must choose the same sources, keep the same tokens in the same order, send every
source to the same targets with the same weights, and produce the same tokens.
"""

from __future__ import annotations

import math

import pytest
import torch
from reference import (
    EVIT_FUSED,
    RefPlan,
    reference_decoder_apply,
    reference_decoder_plan,
    reference_decoder_step,
    reference_tome_steps,
    reference_vision_apply,
    reference_vision_plan,
    reference_vision_step,
)

from ficoco.methods import (
    VISION_METHODS,
    MethodParams,
    VisionTokens,
    decoder_compress,
    decoder_plan,
    vision_step,
)
from ficoco.paradigm import MergePlan, adaptive_targets, quantile_from_top
from ficoco.params import PRESETS
from ficoco.schedule import ReductionStep

EPS = 0.998
ALPHA_ATOL = 1e-6
OUT_ATOL = 1e-5

# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------


def _quantise(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x * 4) / 4


def _positions(g: torch.Generator, batch: int, n: int, grid_side: int) -> torch.Tensor:
    """[CLS] = -1 at slot 0, then a random ascending subset of the grid's patch indices."""
    rows = []
    for _ in range(batch):
        subset = torch.sort(torch.randperm(grid_side * grid_side, generator=g)[: n - 1]).values
        rows.append(torch.cat([torch.tensor([-1]), subset]))
    return torch.stack(rows)


def _palette_qk(g: torch.Generator, batch: int, heads: int, n: int, d: int, colours: int):
    """q, k built from a few dyadic per-token patterns: many tokens are exact copies of each other, so
    scores, correlations, attention and quantiles are full of exact (bitwise) ties."""
    pq = _quantise(torch.randn(batch, heads, colours, d, generator=g))
    pk = _quantise(torch.randn(batch, heads, colours, d, generator=g))
    label = torch.randint(0, colours, (batch, n), generator=g)
    index = label[:, None, :, None].expand(batch, heads, n, d)
    return torch.gather(pq, 2, index), torch.gather(pk, 2, index)


def _tome_palette_k(g: torch.Generator, batch: int, heads: int, n: int, d: int, colours: int):
    """Keys whose head mean has entries in {0, +-1} with exactly 4 non-zeros: after normalisation every
    cosine is an exact multiple of 1/4, so ToMe's matching is full of exact ties."""
    pal = torch.zeros(batch, colours, d)
    for b in range(batch):
        for c in range(colours):
            nz = torch.randperm(d, generator=g)[:4]
            pal[b, c, nz] = torch.randint(0, 2, (4,), generator=g).float() * 2 - 1
    label = torch.randint(0, colours, (batch, n), generator=g)
    kbar = torch.gather(pal, 1, label[:, :, None].expand(batch, n, d))
    return kbar[:, None].expand(batch, heads, n, d).contiguous()


def vision_inputs(
    seed: int, batch: int, n: int, *, mode: str = "random", dtype=torch.float32, grid_side: int = 24
):
    """hidden [B, n, D], pos [B, n], size [B, n, 1], q, k [B, H, n, d] and the logit scale."""
    g = torch.Generator().manual_seed(seed)
    heads, d, dim = 4, 16, 12
    q = torch.randn(batch, heads, n, d, generator=g)
    k = torch.randn(batch, heads, n, d, generator=g)
    if mode == "quantised":
        q, k = _quantise(q), _quantise(k)
    elif mode == "palette":
        q, k = _palette_qk(g, batch, heads, n, d, colours=5)
    elif mode == "tome_palette":
        k = _tome_palette_k(g, batch, heads, n, d, colours=6)
    hidden = torch.randn(batch, n, dim, generator=g)
    pos = _positions(g, batch, n, grid_side)
    size = 1.0 + torch.randint(0, 4, (batch, n, 1), generator=g).float()  # ToMe sizes from earlier steps
    return hidden.to(dtype), pos, size, q.to(dtype), k.to(dtype), d**-0.5  # d = 16: scale 1/4, exact


def decoder_inputs(
    seed: int, batch: int, n: int, *, mode: str = "random", dtype=torch.float32, text: int = 20
):
    """x_visual [B, n, D], q, k [B, H, L, d], image offsets [B] (a > 0, differing per sample, text after the
    image in every sample) and the logit scale."""
    g = torch.Generator().manual_seed(seed)
    heads, d, dim = 4, 16, 12
    offsets = torch.randint(1, 40, (batch,), generator=g)
    length = int(offsets.max()) + n + text
    q = torch.randn(batch, heads, length, d, generator=g)
    k = torch.randn(batch, heads, length, d, generator=g)
    if mode == "quantised":
        q, k = _quantise(q), _quantise(k)
    elif mode == "palette":
        q, k = _palette_qk(g, batch, heads, length, d, colours=5)
    x = torch.randn(batch, n, dim, generator=g)
    return x.to(dtype), q.to(dtype), k.to(dtype), offsets, d**-0.5


# ----------------------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------------------


def static_target_maps(method: str, plan: MergePlan) -> list[dict[int, dict[int, float]]]:
    """The plan as {source span index: {target span index: alpha}}, zero weights left out.

    A target may appear at most once with a positive weight (W_ij = sum_t alpha_it [target_it = j]).
    """
    maps = []
    for b in range(plan.sources.shape[0]):
        kept = plan.kept[b].tolist()
        per_source: dict[int, dict[int, float]] = {}
        for t, src in enumerate(plan.sources[b].tolist()):
            flows: dict[int, float] = {}
            for slot, w in zip(plan.targets[b, t].tolist(), plan.weights[b, t].tolist(), strict=True):
                if method == "evit":
                    flows[EVIT_FUSED] = w
                elif w > 0:
                    assert kept[slot] not in flows, f"source {src} lists target {kept[slot]} twice"
                    flows[kept[slot]] = w
            per_source[src] = flows
        maps.append(per_source)
    return maps


def assert_same_plan(method: str, plan: MergePlan, ref: RefPlan, n: int, where: str) -> None:
    for b, (ref_sources, ref_kept) in enumerate(zip(ref.sources, ref.kept, strict=True)):
        sources = plan.sources[b].tolist()
        assert len(set(sources)) == len(sources), f"{where}: duplicate sources {sources}"
        assert sorted(sources) == ref_sources, (
            f"{where} b={b}: sources differ by {set(sources) ^ set(ref_sources)}"
        )
        assert plan.kept[b].tolist() == ref_kept, f"{where} b={b}: kept lists differ"
        assert sorted(ref_sources + ref_kept) == list(range(n))
    for b, (mine, theirs) in enumerate(zip(static_target_maps(method, plan), ref.targets, strict=True)):
        assert mine.keys() == theirs.keys()
        for src, flows in theirs.items():
            assert mine[src].keys() == flows.keys(), (
                f"{where} b={b} source {src}: targets {mine[src]} vs {flows}"
            )
            for tgt, alpha in flows.items():
                assert abs(mine[src][tgt] - alpha) <= ALPHA_ATOL, f"{where} b={b} source {src} -> {tgt}"


def check_vision(method, preset, hidden, pos, size, q, k, step, grid_side, scale, *, atol=OUT_ATOL, rtol=0.0):
    params = MethodParams.for_preset(preset)
    where = f"{method}/{preset} n={step.n} r={step.r} B={hidden.shape[0]}"
    out, plan = vision_step(
        method, params, VisionTokens(hidden, pos, size), q, k, step, grid_side=grid_side, scale=scale
    )
    ref = reference_vision_plan(method, params, pos, q, k, step, grid_side, scale)
    assert_same_plan(method, plan, ref, step.n, where)
    rx, rpos, rsize = reference_vision_apply(method, ref, hidden, pos, size)
    assert out.hidden.shape == rx.shape == (hidden.shape[0], step.n - step.r, hidden.shape[2])
    assert out.hidden.dtype == rx.dtype == hidden.dtype
    torch.testing.assert_close(out.hidden, rx, atol=atol, rtol=rtol, msg=lambda m: f"{where}: {m}")
    assert torch.equal(out.pos, rpos), where
    torch.testing.assert_close(out.size, rsize, atol=OUT_ATOL, rtol=0.0)
    return ref


def check_decoder(method, preset, x, q, k, offsets, step, scale, *, atol=OUT_ATOL, rtol=0.0):
    params = MethodParams.for_preset(preset)
    where = f"{method}/{preset} n={step.n} r={step.r} B={x.shape[0]}"
    plan = decoder_plan(method, params, q, k, offsets, step, scale=scale)
    out = decoder_compress(method, params, x, plan)
    ref = reference_decoder_plan(method, params, q, k, offsets, step, scale)
    assert_same_plan(method, plan, ref, step.n, where)
    rx = reference_decoder_apply(method, params, ref, x)
    assert out.shape == rx.shape == (x.shape[0], step.n - step.r, x.shape[2])
    assert out.dtype == rx.dtype == x.dtype
    torch.testing.assert_close(out, rx, atol=atol, rtol=rtol, msg=lambda m: f"{where}: {m}")
    return ref


def max_r(method: str, n: int) -> int:
    """The largest r a step may take: [CLS] is never a source (ToMe: only the even slots are; EViT
    removes r + 1 patches; random and pool keep at least one patch, as the planner requires)."""
    return {
        "ficoco": n - 1,
        "tome": (n + 1) // 2 - 1,
        "evit": n - 2,
        "random": n - 2,
        "pool": n - 2,
        "fastv": n - 1,
        "ficoco_l": n - 1,
    }[method]


def r_values(method: str, n: int, lo: int = 0, *, full: bool = True) -> list[int]:
    """r = lo (0: the identity), 1, about a third of the maximum, and (if `full`, or n is small) the
    maximum; at large n the maximum is the expensive case for the reference, so only some tests run it."""
    top = max_r(method, n)
    picks = (lo, 1, top // 3, top) if full or n <= 64 else (lo, 1, top // 3, top // 2 + 7)
    return sorted({r for r in picks if lo <= r <= top})


def step_for(n: int, r: int) -> ReductionStep:
    return ReductionStep(layer=12, n=n, r=r, targets_per_source=adaptive_targets(n, EPS))


# ----------------------------------------------------------------------------------------------------
# Vision: FiCoCo-V, ToMe, EViT
# ----------------------------------------------------------------------------------------------------

# ToMe, EViT, FastV and the random / pool baselines read no FiCoCo hyperparameter, so only FiCoCo runs
# under both presets (test_presets_only_change_ficoco checks that premise).
VISION = [("ficoco", "paper"), ("ficoco", "official"), *((m, "paper") for m in VISION_METHODS if m != "ficoco")]
# The baselines' scores depend only on the patch positions and never tie (a hash; distinct lattice keys),
# so the tests built around score ties do not apply to them.
ATTENTION_VISION = [m for m in VISION if m[0] not in ("random", "pool")]
DECODER = [("ficoco", "paper"), ("ficoco", "official"), ("fastv", "paper")]

# (n, seed, batch): 577 = LLaVA-1.5's first step; K = 2 for n >= 502, K = 1 for n <= 501
VISION_CASES = [
    (577, 0, 1),
    (577, 1, 3),
    (535, 2, 1),
    (501, 3, 1),
    (40, 4, 1),
    (40, 5, 3),
    (9, 6, 3),
    (3, 7, 3),
    (2, 8, 1),
]
DECODER_CASES = [
    (576, 0, 1),
    (576, 1, 3),
    (502, 2, 1),
    (501, 3, 1),
    (40, 4, 1),
    (40, 5, 3),
    (7, 6, 3),
    (2, 7, 3),
]


def test_presets_only_change_ficoco() -> None:
    paper, official = MethodParams.for_preset("paper"), MethodParams.for_preset("official")
    assert paper.tome == official.tome and paper.random == official.random and paper.ficoco != official.ficoco


# ----------------------------------------------------------------------------------------------------
# Vision: FiCoCo-V, ToMe, EViT
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, preset", VISION)
@pytest.mark.parametrize("n, seed, batch", VISION_CASES)
def test_vision_random(method: str, preset: str, n: int, seed: int, batch: int) -> None:
    # EViT at r = 0 still removes one patch and appends the fused token
    for r in r_values(method, n, full=batch == 1):
        hidden, pos, size, q, k, scale = vision_inputs(seed * 101 + r, batch, n)
        check_vision(method, preset, hidden, pos, size, q, k, step_for(n, r), 24, scale)


@pytest.mark.slow
@pytest.mark.parametrize("method, preset", VISION)
@pytest.mark.parametrize("n", [577, 560, 535, 502, 501, 480, 300, 100, 40, 17, 5])
def test_vision_random_sweep(method: str, preset: str, n: int) -> None:
    for seed in range(6):
        for r in r_values(method, n):
            hidden, pos, size, q, k, scale = vision_inputs(10_000 + seed * 101 + r, 1 + 2 * (seed % 2), n)
            check_vision(method, preset, hidden, pos, size, q, k, step_for(n, r), 24, scale)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("grid_side, n", [(7, 50), (7, 20), (5, 13), (3, 10)])
def test_ficoco_v_odd_grid(preset: str, grid_side: int, n: int) -> None:
    """Odd grid sides: the last row/column of 2x2 windows is partial (the static code pads the grid)."""
    for seed in range(2):
        for r in r_values("ficoco", n):
            hidden, pos, size, q, k, scale = vision_inputs(seed * 31 + r, 3, n, grid_side=grid_side)
            check_vision("ficoco", preset, hidden, pos, size, q, k, step_for(n, r), grid_side, scale)


@pytest.mark.parametrize("method, preset", ATTENTION_VISION)
@pytest.mark.parametrize("n", [577, 40, 12])
def test_vision_exact_ties(method: str, preset: str, n: int) -> None:
    """Inputs with many bitwise-equal scores, correlations and cosines: both sides must break every tie
    towards the lower index (local-penalty windows: the first slot in row-major order)."""
    mode = "tome_palette" if method == "tome" else "palette"
    boundary_ties = 0
    for seed in range(2):
        for r in r_values(method, n, lo=1, full=False):
            hidden, pos, size, q, k, scale = vision_inputs(1000 + seed * 7 + r, 3, n, mode=mode)
            ref = check_vision(method, preset, hidden, pos, size, q, k, step_for(n, r), 24, scale)
            removed = r + 1 if method == "evit" else r
            for scores in ref.scores:
                ranked = sorted(scores, reverse=True)
                boundary_ties += removed < len(ranked) and ranked[removed - 1] == ranked[removed]
    assert boundary_ties > 0, "the tie inputs never put a tie on the source boundary"


@pytest.mark.parametrize("method, preset", [m for m in ATTENTION_VISION if m[0] != "tome"])
def test_vision_quantised(method: str, preset: str) -> None:
    """q, k rounded to quarters (many equal logits) with an exact power-of-two scale. (ToMe's cosines
    divide by norms, so equal real values need not be equal floats: its ties come from tome_palette.)"""
    for seed, n, batch in [(0, 577, 1), (1, 535, 1), (2, 40, 3)]:
        for r in r_values(method, n, lo=1, full=False):
            hidden, pos, size, q, k, scale = vision_inputs(2000 + seed * 13 + r, batch, n, mode="quantised")
            check_vision(method, preset, hidden, pos, size, q, k, step_for(n, r), 24, scale)


@pytest.mark.parametrize("method, preset", VISION)
@pytest.mark.parametrize("n", [577, 40])
def test_vision_fp16(method: str, preset: str, n: int) -> None:
    """fp16 hidden states, q and k: statistics in fp32 on the static side, fp64 in the reference, and the
    same decisions; outputs agree to fp16 precision."""
    for r in r_values(method, n, lo=1, full=False):
        hidden, pos, size, q, k, scale = vision_inputs(3000 + n + r, 3, n, dtype=torch.float16)
        check_vision(method, preset, hidden, pos, size, q, k, step_for(n, r), 24, scale, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("method, preset", [m for m in VISION if m[0] != "evit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_vision_r0_identity(method: str, preset: str, dtype: torch.dtype) -> None:
    """r = 0 changes nothing. (EViT is excluded: by its convention r = 0 still fuses one patch.)"""
    params = MethodParams.for_preset(preset)
    for n in (577, 40, 2):
        hidden, pos, size, q, k, scale = vision_inputs(n, 3, n, dtype=dtype)
        if method in ("tome", "pool") and dtype == torch.float32:
            size = torch.ones_like(size)  # (m x) / m is only bit-exact in fp32 for m = 1; see below
        step = step_for(n, 0)
        out, plan = vision_step(
            method, params, VisionTokens(hidden, pos, size), q, k, step, grid_side=24, scale=scale
        )
        rx, rpos, rsize, rsources, rtargets = reference_vision_step(
            method, params, hidden, pos, size, q, k, step, 24, scale
        )
        assert plan.sources.shape == (3, 0) and rsources == [[], [], []] and rtargets == [{}, {}, {}]
        for x2, p2, s2 in ((out.hidden, out.pos, out.size), (rx, rpos, rsize)):
            assert torch.equal(x2, hidden) and torch.equal(p2, pos) and torch.equal(s2, size)


def test_tome_r0_with_sizes_is_identity_to_rounding() -> None:
    """ToMe's static compress forms (m x) / m in fp32, which can differ from x in the last bit when m > 1."""
    params = MethodParams.for_preset("paper")
    hidden, pos, size, q, k, scale = vision_inputs(1, 3, 577)
    out, _ = vision_step(
        "tome", params, VisionTokens(hidden, pos, size), q, k, step_for(577, 0), grid_side=24, scale=scale
    )
    torch.testing.assert_close(out.hidden, hidden, atol=0.0, rtol=2.5e-7)
    assert torch.equal(out.size, size) and torch.equal(out.pos, pos)


# ToMe over consecutive steps: the A/B split follows ToMe's own sequence order (docs/method-spec.md A10).
# (n, removals per step, key mode, whether the ascending split must give other groups): LLaVA-1.5's first
# blocks, exact ties, r = 0 first, and maximal first steps (every A token but [CLS] merged: ToMe's order is
# then [CLS], B..., ascending again, so both splits agree).
TOME_CHAINS = [
    (577, (41, 41, 41), "random", True),
    (577, (288, 100), "random", False),
    (40, (7, 5, 3), "random", True),
    (40, (19, 10, 5), "random", False),
    (13, (6, 3, 1), "random", False),
    (40, (6, 6, 6), "tome_palette", True),
    (9, (0, 2, 2), "random", True),
]


def _static_tome_chain(hidden, pos, size, keys, steps):
    """Consecutive static ToMe steps: (tokens after the last step, merge groups per sample)."""
    params = MethodParams.for_preset("paper")
    tokens = VisionTokens(hidden, pos, size)
    groups = [[frozenset([j]) for j in range(hidden.shape[1])] for _ in range(hidden.shape[0])]
    for k, step in zip(keys, steps, strict=True):
        tokens, plan = vision_step("tome", params, tokens, k, k, step, grid_side=24, scale=0.25)
        for b in range(hidden.shape[0]):
            kept = plan.kept[b].tolist()
            new = [set(groups[b][j]) for j in kept]
            for src, (slot,), w in zip(plan.sources[b].tolist(), plan.targets[b].tolist(), plan.weights[b].tolist(), strict=True):
                assert w == [1.0]
                new[slot] |= groups[b][src]
            groups[b] = [frozenset(g) for g in new]
    return tokens, groups


@pytest.mark.parametrize("n, removals, mode, orders_differ", TOME_CHAINS)
def test_tome_consecutive_steps_follow_tome_order(n: int, removals: tuple[int, ...], mode: str, orders_differ: bool) -> None:
    """Two or three ToMe steps in a row: the static code (ascending output, ToMe's order carried as a key)
    merges exactly the groups of the reference, which re-splits A/B over ToMe's own output order
    (unmerged A, then B), and gives the same tokens and sizes. The ascending-order split (the earlier
    variant) would give other groups: the cases below tell the two apart."""
    batch = 3
    differ = 0
    for seed in range(2):
        hidden, pos, size, _, _, _ = vision_inputs(7000 + seed, batch, n)
        steps, keys, m = [], [], n
        for t, r in enumerate(removals):
            keys.append(vision_inputs(7100 + 10 * seed + t, batch, m, mode=mode)[4])
            steps.append(ReductionStep(layer=12 + t, n=m, r=r, targets_per_source=1))
            m -= r
        tokens, groups = _static_tome_chain(hidden, pos, size, keys, steps)
        rx, rsize, rgroups = reference_tome_steps(hidden, size, keys, steps)
        assert groups == rgroups, f"n={n} {removals} seed={seed}: merge groups differ from ToMe's order"
        torch.testing.assert_close(tokens.hidden, rx, atol=OUT_ATOL, rtol=0.0)
        torch.testing.assert_close(tokens.size, rsize, atol=OUT_ATOL, rtol=0.0)
        for b in range(batch):  # outputs stay ascending; each token's pos is one of its group's
            out_pos = tokens.pos[b].tolist()
            assert out_pos[0] == -1 and all(p < q for p, q in zip(out_pos[1:], out_pos[2:], strict=False))
            assert all(p in {int(pos[b, i]) for i in g} for p, g in zip(out_pos, groups[b], strict=True))
        _, _, ascending = reference_tome_steps(hidden, size, keys, steps, follow_order=False)
        differ += sum(a != g for a, g in zip(ascending, rgroups, strict=True))
    if orders_differ:
        assert differ > 0, "the ascending-order split never differed: the test would not see the order"


# ----------------------------------------------------------------------------------------------------
# Decoder: FiCoCo-L, FastV
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, preset", DECODER)
@pytest.mark.parametrize("n, seed, batch", DECODER_CASES)
def test_decoder_random(method: str, preset: str, n: int, seed: int, batch: int) -> None:
    kind = "ficoco_l" if method == "ficoco" else method
    for r in r_values(kind, n, full=batch == 1):
        x, q, k, offsets, scale = decoder_inputs(seed * 101 + r, batch, n)
        check_decoder(method, preset, x, q, k, offsets, step_for(n, r), scale)


@pytest.mark.slow
@pytest.mark.parametrize("method, preset", DECODER)
@pytest.mark.parametrize("n", [576, 540, 502, 501, 300, 100, 17, 3])
def test_decoder_random_sweep(method: str, preset: str, n: int) -> None:
    kind = "ficoco_l" if method == "ficoco" else method
    for seed in range(6):
        for r in r_values(kind, n):
            x, q, k, offsets, scale = decoder_inputs(
                20_000 + seed * 101 + r, 1 + 2 * (seed % 2), n, text=5 + 10 * seed
            )
            check_decoder(method, preset, x, q, k, offsets, step_for(n, r), scale)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("text", [0, 1])
def test_ficoco_l_short_text(preset: str, text: int) -> None:
    """Very short (or no) text after the image: the 1/M means and the indirect term (M clamps to 1)."""
    for seed, n in ((0, 60), (1, 200)):
        for r in r_values("ficoco_l", n, full=False):
            x, q, k, offsets, scale = decoder_inputs(500 + seed + r, 3, n, text=text)
            check_decoder("ficoco", preset, x, q, k, offsets, step_for(n, r), scale)


@pytest.mark.parametrize("method, preset", DECODER)
@pytest.mark.parametrize("n", [576, 40, 9])
def test_decoder_exact_ties(method: str, preset: str, n: int) -> None:
    kind = "ficoco_l" if method == "ficoco" else method
    boundary_ties = 0
    for seed in range(2):
        for r in r_values(kind, n, lo=1, full=False):
            x, q, k, offsets, scale = decoder_inputs(4000 + seed * 7 + r, 3, n, mode="palette")
            ref = check_decoder(method, preset, x, q, k, offsets, step_for(n, r), scale)
            for scores in ref.scores:
                ranked = sorted(scores, reverse=True)
                boundary_ties += r < len(ranked) and ranked[r - 1] == ranked[r]
    assert boundary_ties > 0, "the tie inputs never put a tie on the source boundary"


@pytest.mark.parametrize("method, preset", DECODER)
def test_decoder_quantised(method: str, preset: str) -> None:
    for seed, n, batch in [(0, 576, 1), (1, 40, 3)]:
        for r in r_values("ficoco_l" if method == "ficoco" else method, n, lo=1, full=False):
            x, q, k, offsets, scale = decoder_inputs(6000 + seed * 13 + r, batch, n, mode="quantised")
            check_decoder(method, preset, x, q, k, offsets, step_for(n, r), scale)


@pytest.mark.parametrize("method, preset", DECODER)
@pytest.mark.parametrize("n", [576, 40])
def test_decoder_fp16(method: str, preset: str, n: int) -> None:
    kind = "ficoco_l" if method == "ficoco" else method
    for r in r_values(kind, n, lo=1, full=False):
        x, q, k, offsets, scale = decoder_inputs(5000 + n + r, 3, n, dtype=torch.float16)
        check_decoder(method, preset, x, q, k, offsets, step_for(n, r), scale, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("method, preset", DECODER)
def test_decoder_r0_identity(method: str, preset: str) -> None:
    params = MethodParams.for_preset(preset)
    for n in (576, 40, 2):
        x, q, k, offsets, scale = decoder_inputs(n, 3, n)
        step = step_for(n, 0)
        plan = decoder_plan(method, params, q, k, offsets, step, scale=scale)
        out = decoder_compress(method, params, x, plan)
        rx, rsources, rtargets = reference_decoder_step(method, params, x, q, k, offsets, step, scale)
        assert plan.sources.shape == (3, 0) and rsources == [[], [], []] and rtargets == [{}, {}, {}]
        assert torch.equal(out, x) and torch.equal(rx, x)


# ----------------------------------------------------------------------------------------------------
# The reference itself, on hand-checked examples
# ----------------------------------------------------------------------------------------------------


def test_reference_ficoco_v_hand_example() -> None:
    """A 4-patch image on a 2x2 grid (one window): hand-computed scores, penalty, sources and Eq. 2."""
    # q = k = one-hot-ish rows so that the head-mean logits are a chosen matrix: l = Q K^T * scale with
    # H = 1, scale = 1. Use K = I and Q = l so that l_ij = Q_ij.
    ell = torch.tensor(
        [
            [0.0, 1.0, 0.0, 2.0, 0.5],  # [CLS] row: a^CLS = (1, 0, 2, 0.5)
            [0.0, 0.0, 4.0, 0.0, 0.0],  # VR_1 = 1
            [0.0, 0.0, 0.0, 0.0, 0.0],  # VR_2 = 0
            [0.0, 8.0, 0.0, 0.0, 0.0],  # VR_3 = 2
            [0.0, 0.0, 0.0, 0.0, -4.0],  # VR_4 = -1
        ]
    )
    q = ell[None, None]
    k = torch.eye(5)[None, None]
    pos = torch.tensor([[-1, 0, 1, 2, 3]])
    hidden = torch.arange(5.0).reshape(1, 5, 1)
    size = torch.ones(1, 5, 1)
    params = MethodParams.for_preset("paper")
    # s = 0.35 VR - 0.65 a^CLS = (0.35 - 0.65, 0, 0.7 - 1.3, -0.35 - 0.325) = (-0.3, 0, -0.6, -0.675);
    # the window max is patch 2 (s = 0) -> 0 / 2 = 0 (non-positive: halved). Top-1 source: slot 2.
    step = ReductionStep(layer=12, n=5, r=1, targets_per_source=1)
    x2, pos2, _, sources, targets = reference_vision_step(
        "ficoco", params, hidden, pos, size, q, k, step, 2, 1.0
    )
    assert sources == [[2]]
    # row 2 is all zeros: tau = 0, the top-1 kept non-CLS column is slot 1 (tie -> lowest), value 0 >= 0
    assert targets == [{2: {1: 1.0}}]
    assert pos2.tolist() == [[-1, 0, 2, 3]]
    assert x2[0, :, 0].tolist() == [0.0, (1.0 + 2.0) / 2.0, 3.0, 4.0]


def test_reference_local_penalty_literal() -> None:
    from reference import _local_penalty_literal

    # 4x4 grid, patches 0..15 present except 5; window (0, 0) holds patches 0, 1, 4 (5 missing).
    pos = [-1] + [p for p in range(16) if p != 5]
    s = [-math.inf] + [1.0] * 15
    s[pos.index(4)] = 3.0  # window (0,0): max is patch 4 -> 6
    s[pos.index(2)] = -1.0  # window (0,1) = {2, 3, 6, 7}: 3, 6, 7 tie at 1.0 -> first row-major: patch 3
    s[pos.index(2)] = -1.0
    for p in (10, 11, 14, 15):  # window (1,1): all -2 -> first (patch 10) halved to -1
        s[pos.index(p)] = -2.0
    out = _local_penalty_literal(s, pos, 4, 2.0)
    changed = {pos[i]: out[i] for i in range(1, len(s)) if out[i] != s[i]}
    # window (1, 0) = {8, 9, 12, 13}, all 1.0 -> patch 8 doubled
    assert changed == {4: 6.0, 3: 2.0, 10: -1.0, 8: 2.0}


def test_reference_eq2_by_hand() -> None:
    """Two sources flowing into one kept token: (X_j + a X_1 + b X_2) / (1 + a + b)."""
    from reference import _merge_normalized

    x = torch.tensor([[1.0], [10.0], [100.0], [1000.0]])
    targets = {1: {0: 0.25, 3: 0.75}, 2: {0: 1.0}}
    out = _merge_normalized(x, [0, 3], targets, denominator=True)
    assert out[:, 0].tolist() == pytest.approx([(1 + 2.5 + 100) / 2.25, (1000 + 7.5) / 1.75])
    out = _merge_normalized(x, [0, 3], targets, denominator=False)
    assert out[:, 0].tolist() == pytest.approx([1 + 2.5 + 100, 1000 + 7.5])


# ----------------------------------------------------------------------------------------------------
# tau from the top K + 1 values == torch.quantile
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [0.998, 0.99, 0.9, 0.5, 0.75, 0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_quantile_from_top_matches_torch_quantile(epsilon: float, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(7)
    ulp = torch.finfo(dtype).eps
    for n in range(2, 1201):
        k = adaptive_targets(n, epsilon)
        rows = torch.randn(6, n, generator=g, dtype=torch.float64)
        rows[3] = torch.round(rows[3] * 2) / 2  # many exact ties
        rows[4] = rows[4].abs().sort().values  # already ascending
        rows[5] = 0.0  # all equal
        rows = rows.to(dtype)
        top = torch.sort(rows, dim=-1, descending=True).values[:, : k + 1]  # exactly K + 1 values suffice
        tau = quantile_from_top(top, n, epsilon)
        assert tau.dtype == dtype
        # torch.quantile forms its rank as eps * (n - 1) in the input dtype (eps itself rounded to it), so
        # its interpolation weight can be off by ~n ulps of that dtype; quantile_from_top uses the exact
        # decimal eps. Beyond that both are the same two-sided lerp, so they agree to a few ulps.
        scale = rows.abs().amax(dim=-1).double()
        spread = top[:, 0].double() - top[:, -1].double()  # >= a_hi - a_lo
        for ref_dtype in {torch.float64, dtype}:
            expected = torch.quantile(rows.to(ref_dtype), epsilon, dim=-1).double()
            rank_ulp = torch.finfo(ref_dtype).eps
            bound = 4 * ulp * scale + 2 * n * rank_ulp * spread
            err = (tau.double() - expected).abs()
            assert bool((err <= bound).all()), f"n={n} vs {ref_dtype}: |tau - quantile| = {err.max():.3g}"
        # at least K values of the row are >= tau (J_i can hold K targets), and tau is not above the max
        assert bool((rows >= tau[:, None]).sum(dim=-1).ge(k).all()), f"n={n}"
        assert bool((tau <= rows.amax(dim=-1)).all()) and bool((tau >= rows.amin(dim=-1)).all())


def test_adaptive_targets_values() -> None:
    assert [adaptive_targets(n, EPS) for n in (2, 501, 502, 577, 1001, 1002)] == [1, 1, 2, 2, 2, 3]
    assert adaptive_targets(1, EPS) == 0
