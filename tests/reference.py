"""Reference mode (docs/method-spec.md A11): the reduction equations written the data-dependent way, for tests.

Everything here is deliberately the *opposite* of the static implementation in `ficoco.paradigm` and
`ficoco.methods`: per-sample Python loops, explicit sets J_i (targets of source i) and I_j (sources of
target j), `torch.quantile` over the row for tau_i, Python `sorted(...)` for every top-k, a literal loop
over the 2x2 windows of the patch grid for the local penalty, and explicit per-target accumulation for
the compress equations. Statistics are computed independently (einsum over the heads) in float64.
Nothing from the static code path is called, so a test that compares the two compares two independent
readings of the spec.

Conventions (the same ones the static code documents):

* top-k ties go to the lower index: a top-k is `sorted(candidates, key=lambda j: (-score[j], j))[:k]`
  (ToMe: the earlier place in ToMe's own sequence order, which it carries from step to step).
* local-penalty window ties: the first token in row-major order inside the 2x2 window.
* vision spans have [CLS] at slot 0, never a source; kept tokens stay in ascending original order.
* EViT removes r + 1 patches and appends one fused token (key `EVIT_FUSED` in the target maps).
* random / pool order patches by a fixed function of their original index (a hash; a lattice order)
  and are written here from those definitions, with sorted(...) and min(...) over Python lists.
* targets are reported as span indices of the input span (not slots of the kept list).

Results are returned in the input dtype; the accumulation is done in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ficoco.methods import MethodParams
from ficoco.params import FiCoCoParams
from ficoco.schedule import ReductionStep

EVIT_FUSED = -1  # target key of EViT's new fused token

TargetMap = dict[int, dict[int, float]]  # source span index -> {target span index: alpha}


@dataclass
class RefPlan:
    """Filter + correlate outcome for a batch, one Python structure per sample."""

    sources: list[list[int]]  # ascending span indices of the tokens that leave
    kept: list[list[int]]  # ascending span indices of the tokens that stay
    targets: list[TargetMap]  # per source: its valid targets J_i with alpha_ij (> 0 only); {} = pruned
    scores: list[list[float]]  # the filter's redundancy score of every span slot (higher = leaves first)


# ----------------------------------------------------------------------------------------------------
# Small independent building blocks
# ----------------------------------------------------------------------------------------------------


def _logits64(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """Head-mean scaled pre-softmax logits in float64: (1/H) sum_h q_h k_h^T * scale -> [B, n_q, n_k]."""
    per_head = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * scale
    return per_head.mean(dim=1)


def _attention_row64(q_row: Tensor, k: Tensor, scale: float, bias: Tensor | None = None) -> Tensor:
    """Head-mean softmax attention of one query per sample, float64: q_row [B, H, d] -> [B, n_k]."""
    logits = torch.einsum("bhd,bhjd->bhj", q_row.double(), k.double()) * scale
    if bias is not None:
        logits = logits + bias.double()[:, None, :]
    return torch.softmax(logits, dim=-1).mean(dim=1)


def _top(candidates: list[int], score: list[float], k: int) -> list[int]:
    """The k candidates with the largest score, ties to the lower index, in rank order."""
    return sorted(candidates, key=lambda j: (-score[j], j))[:k]


def _quantile(row: list[float], epsilon: float) -> float:
    """tau = the eps-quantile of a row (linear interpolation), straight from torch.quantile in float64."""
    return float(torch.quantile(torch.tensor(row, dtype=torch.float64), epsilon))


def _softmax(values: list[float]) -> list[float]:
    m = max(values)
    e = [math.exp(v - m) for v in values]
    total = sum(e)
    return [x / total for x in e]


def _complement(sources: list[int], n: int) -> list[int]:
    s = set(sources)
    return [j for j in range(n) if j not in s]


def _correlate(
    row: list[float], candidates: list[int], k: int, epsilon: float, strict: bool, drop: set[int]
) -> dict[int, float]:
    """J_i and alpha_ij for one source (docs/method-spec.md A3).

    tau_i is the eps-quantile of the source's whole row; the top-k `candidates` by C_ij are the
    potential targets; a target is valid iff C_ij >= tau_i (> for strict) and finite; alpha is the
    softmax of C_ij over the valid targets. Valid targets in `drop` keep their share of the softmax
    but receive nothing (the official FiCoCo-L code's source-target behaviour).
    """
    if k == 0 or not candidates:
        return {}
    tau = _quantile(row, epsilon)
    chosen = _top(candidates, row, k)
    valid = [j for j in chosen if math.isfinite(row[j]) and (row[j] > tau if strict else row[j] >= tau)]
    if not valid:
        return {}
    alpha = _softmax([row[j] for j in valid])
    return {j: a for j, a in zip(valid, alpha, strict=True) if j not in drop}


def _merge_normalized(x: Tensor, kept: list[int], targets: TargetMap, denominator: bool) -> Tensor:
    """Eq. 2 by explicit accumulation over I_j: (X_j + sum_i alpha_ij X_i) / (1 + sum_i alpha_ij).

    Without the denominator: the official FiCoCo-L plain sum X_j + sum_i alpha_ij X_i. x: [n, D].
    """
    incoming: dict[int, list[tuple[int, float]]] = {j: [] for j in kept}  # I_j
    for i, flows in targets.items():
        for j, a in flows.items():
            incoming[j].append((i, a))
    x64 = x.double()
    rows = []
    for j in kept:
        acc = x64[j].clone()
        mass = 1.0
        for i, a in incoming[j]:
            acc = acc + a * x64[i]
            mass += a
        rows.append(acc / mass if denominator else acc)
    return torch.stack(rows) if rows else x64[:0]


def _batch(plans: list[tuple]) -> RefPlan:
    return RefPlan(
        sources=[p[0] for p in plans],
        kept=[p[1] for p in plans],
        targets=[p[2] for p in plans],
        scores=[p[3] for p in plans],
    )


# ----------------------------------------------------------------------------------------------------
# FiCoCo-V
# ----------------------------------------------------------------------------------------------------


def _ficoco_v_scores(ell: list[list[float]], params: FiCoCoParams) -> list[float]:
    """s^v for every slot (slot 0 = [CLS] gets -inf), by Eq. 1 (optionally L2-normalised terms)."""
    n = len(ell)
    patches = range(1, n)
    cls_term = {i: ell[0][i] for i in patches}
    vr = {i: sum(ell[i][1:]) / (n - 1) for i in patches}  # mean over the patch columns j >= 1
    if params.v_l2_normalize:
        vr_norm = max(math.sqrt(sum(v * v for v in vr.values())), 1e-12)
        cls_norm = max(math.sqrt(sum(v * v for v in cls_term.values())), 1e-12)
        vr = {i: v / vr_norm for i, v in vr.items()}
        cls_term = {i: v / cls_norm for i, v in cls_term.items()}
    return [-math.inf] + [params.v_lambda * vr[i] - params.v_cls_weight * cls_term[i] for i in patches]


def _local_penalty_literal(s: list[float], pos: list[int], grid_side: int, coef: float) -> list[float]:
    """A5 literally: for every 2x2 window of the patch grid, penalise its most redundant present token."""
    if coef == 1.0:
        return list(s)
    windows: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for slot in range(1, len(s)):
        row, col = divmod(pos[slot], grid_side)
        windows.setdefault((row // 2, col // 2), []).append((row, col, slot))
    out = list(s)
    for members in windows.values():
        best = None
        for _, _, slot in sorted(members):  # row-major inside the window: the first wins a tie
            if best is None or s[slot] > s[best]:
                best = slot
        v = s[best]
        out[best] = v * coef if v > 0 else v / coef
    return out


def _ficoco_v_plan(
    ell: list[list[float]], pos: list[int], step: ReductionStep, params: FiCoCoParams, grid_side: int
):
    n = step.n
    s = _local_penalty_literal(_ficoco_v_scores(ell, params), pos, grid_side, params.v_penalty)
    sources = sorted(_top(list(range(1, n)), s, step.r))
    kept = _complement(sources, n)
    if params.v_targets == "kept":  # paper: the kept patches are the only candidates
        candidates, drop = [j for j in kept if params.v_cls_is_target or j != 0], set()
    else:  # official: every column of the row competes (self, [CLS], other sources); non-receivers get nothing
        candidates = list(range(n))
        drop = set(sources) | (set() if params.v_cls_is_target else {0})
    targets = {
        i: _correlate(ell[i], candidates, step.targets_per_source, params.epsilon, params.strict_threshold, drop)
        for i in sources
    }
    return sources, kept, targets, s


# ----------------------------------------------------------------------------------------------------
# ToMe and EViT
# ----------------------------------------------------------------------------------------------------


def _tome_plan(k_heads: Tensor, step: ReductionStep, sequence: list[int] | None = None):
    """Bipartite soft matching over ToMe's own sequence order, K = 1.

    `sequence` lists the current span indices in the order facebookresearch/ToMe would hold them (None: the
    ascending order, as before any ToMe step); A = its even places ([CLS] first, protected), B = its odd
    places. Ties go to the earlier place of that order (B for the match, A for the top-r). Also returns the
    sequence after the step, as indices into `kept`: the unmerged A tokens in their A order, then all of B
    (ToMe concatenates them so; a step without merges leaves the order alone).
    """
    n = step.n
    seq = list(range(n)) if sequence is None else list(sequence)
    assert sorted(seq) == list(range(n)) and seq[0] == 0, "ToMe's order: a permutation with [CLS] first"
    kbar = k_heads.double().mean(dim=0)  # [n, d]
    kbar = kbar / kbar.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = (kbar @ kbar.T).tolist()
    a_places, b_places = seq[0::2], seq[1::2]
    best: dict[int, int] = {}
    score = [-math.inf] * n
    for i in a_places[1:]:  # the first A place is [CLS]: never a source
        j_best = b_places[0]
        for j in b_places[1:]:  # first maximum in B order
            if cos[i][j] > cos[i][j_best]:
                j_best = j
        best[i], score[i] = j_best, cos[i][j_best]
    ranked = sorted(range(1, len(a_places)), key=lambda p: (-score[a_places[p]], p))[: step.r]
    sources = sorted(a_places[p] for p in ranked)
    kept = _complement(sources, n)
    slot_of = {j: t for t, j in enumerate(kept)}
    if step.r == 0:
        after = [slot_of[j] for j in seq]
    else:
        leaving = set(sources)
        after = [slot_of[j] for j in a_places if j not in leaving] + [slot_of[j] for j in b_places]
    return sources, kept, {i: {best[i]: 1.0} for i in sources}, score, after


def reference_tome_steps(
    hidden: Tensor, size: Tensor, keys: list[Tensor], steps: list[ReductionStep], *, follow_order: bool = True
) -> tuple[Tensor, Tensor, list[list[frozenset[int]]]]:
    """Consecutive ToMe steps on one batch, per sample: (hidden', size', groups).

    keys[t]: [B, H, n_t, d] keys of step t, rows in ascending span order (the order the static code keeps).
    groups[b][j]: the input span indices merged into output token j (ascending output order). With
    `follow_order=False` every step splits A/B over the ascending order instead (the earlier variant).
    """
    out_x, out_m, out_groups = [], [], []
    for b in range(hidden.shape[0]):
        x, m = hidden[b].double(), size[b].double()
        groups = [frozenset([j]) for j in range(x.shape[0])]
        sequence = None
        for k, step in zip(keys, steps, strict=True):
            sources, kept, targets, _, after = _tome_plan(k[b], step, sequence)
            sequence = after if follow_order else None
            into: dict[int, list[int]] = {j: [] for j in kept}  # I_j
            for i, flows in targets.items():
                for j in flows:
                    into[j].append(i)
            rows, masses, new_groups = [], [], []
            for j in kept:
                mass, acc, members = m[j, 0].clone(), m[j, 0] * x[j], set(groups[j])
                for i in into[j]:
                    mass, acc = mass + m[i, 0], acc + m[i, 0] * x[i]
                    members |= groups[i]
                rows.append(acc / mass)
                masses.append(mass)
                new_groups.append(frozenset(members))
            x, m, groups = torch.stack(rows), torch.stack(masses).reshape(-1, 1), new_groups
        out_x.append(x)
        out_m.append(m)
        out_groups.append(groups)
    return torch.stack(out_x).to(hidden.dtype), torch.stack(out_m).to(size.dtype), out_groups


def _evit_plan(attn: list[float], step: ReductionStep):
    """The r + 1 patches with the lowest [CLS] attention fuse into one token with weights a^CLS_i."""
    n = step.n
    redundancy = [-math.inf] + [-attn[i] for i in range(1, n)]
    sources = sorted(_top(list(range(1, n)), redundancy, step.r + 1))
    kept = _complement(sources, n)
    return sources, kept, {i: {EVIT_FUSED: attn[i]} for i in sources}, redundancy


# ----------------------------------------------------------------------------------------------------
# The baselines: random pruning and spatial pooling
# ----------------------------------------------------------------------------------------------------


def _splitmix64(x: int) -> int:
    """SplitMix64 from its definition, with Python integers reduced mod 2^64 after every step."""
    m = 2**64
    z = (x + 0x9E3779B97F4A7C15) % m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % m
    return z ^ (z >> 31)


def _random_plan(pos: list[int], step: ReductionStep, seed: int):
    """The r present patches with the largest SplitMix64(seed · 2^32 + patch) leave; nothing is recycled."""
    n = step.n
    score: list[float] = [-math.inf] + [_splitmix64(seed * 2**32 + pos[i]) for i in range(1, n)]
    sources = sorted(_top(list(range(1, n)), score, step.r))
    return sources, _complement(sources, n), {i: {} for i in sources}, score


def _lattice_rank(row: int, col: int, grid_side: int) -> tuple[int, ...]:
    """The pooling order of a patch as a tuple compared lexicographically: for bit b = 0 (finest) upwards of
    the grid centred in the next power-of-two grid, the class of (row bit, col bit): 00 < 11 < 01 < 10."""
    levels = 1
    while 2**levels < grid_side:
        levels += 1
    offset = (2**levels - grid_side) // 2
    r, c = row + offset, col + offset
    rank = {"00": 0, "11": 1, "01": 2, "10": 3}
    return tuple(rank[f"{(r >> b) & 1}{(c >> b) & 1}"] for b in range(levels))


def _pool_plan(pos: list[int], step: ReductionStep, grid_side: int):
    """Keep the patches first in the lattice order; each source flows (alpha = 1) into the kept patch
    nearest to it on the grid (squared distance, ties to the lowest span index, [CLS] excluded)."""
    n = step.n
    coords = {i: divmod(pos[i], grid_side) for i in range(1, n)}
    order = sorted(range(1, n), key=lambda i: _lattice_rank(*coords[i], grid_side))
    score: list[float] = [-math.inf] * n
    for place, i in enumerate(order):
        score[i] = float(place)
    sources = sorted(_top(list(range(1, n)), score, step.r))
    kept = _complement(sources, n)
    targets: TargetMap = {}
    for i in sources:
        (ri, ci) = coords[i]
        best = min((j for j in kept if j != 0), key=lambda j: ((coords[j][0] - ri) ** 2 + (coords[j][1] - ci) ** 2, j))
        targets[i] = {best: 1.0}
    return sources, kept, targets, score


# ----------------------------------------------------------------------------------------------------
# Vision entry points
# ----------------------------------------------------------------------------------------------------


def reference_vision_plan(
    method: str,
    params: MethodParams,
    pos: Tensor,
    q: Tensor,
    k: Tensor,
    step: ReductionStep,
    grid_side: int,
    scale: float,
    size_bias: Tensor | None = None,
) -> RefPlan:
    """Filter + correlate of one vision step, per sample. q, k: [B, H, n, d]; pos: [B, n] ([CLS] = -1)."""
    batch = q.shape[0]
    plans = []
    if method == "ficoco":
        ell = _logits64(q, k, scale)
        for b in range(batch):
            plans.append(_ficoco_v_plan(ell[b].tolist(), pos[b].tolist(), step, params.ficoco, grid_side))
    elif method == "tome":
        for b in range(batch):
            plans.append(_tome_plan(k[b], step)[:4])
    elif method == "evit":
        attn = _attention_row64(q[:, :, 0], k, scale, size_bias)
        for b in range(batch):
            plans.append(_evit_plan(attn[b].tolist(), step))
    elif method == "random":
        for b in range(batch):
            plans.append(_random_plan(pos[b].tolist(), step, params.random.seed))
    elif method == "pool":
        for b in range(batch):
            plans.append(_pool_plan(pos[b].tolist(), step, grid_side))
    else:
        raise ValueError(f"{method!r} is not a vision reduction method")
    return _batch(plans)


def reference_vision_step(
    method: str,
    params: MethodParams,
    hidden: Tensor,
    pos: Tensor,
    size: Tensor,
    q: Tensor,
    k: Tensor,
    step: ReductionStep,
    grid_side: int,
    scale: float,
    size_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, list[list[int]], list[TargetMap]]:
    """One vision step: (hidden', pos', size', sources, targets) with the same meaning as `vision_step`.

    hidden [B, n, D], pos [B, n], size [B, n, 1]; sources per sample ascending; targets per sample
    {source: {target span index (EVIT_FUSED for EViT's new token): alpha}}.
    """
    plan = reference_vision_plan(method, params, pos, q, k, step, grid_side, scale, size_bias)
    hidden2, pos2, size2 = reference_vision_apply(method, plan, hidden, pos, size)
    return hidden2, pos2, size2, plan.sources, plan.targets


def reference_vision_apply(
    method: str, plan: RefPlan, hidden: Tensor, pos: Tensor, size: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Compress of a vision step: apply a reference plan to hidden [B, n, D], pos [B, n], size [B, n, 1]."""
    out_x, out_pos, out_size = [], [], []
    for b in range(hidden.shape[0]):
        kept, targets = plan.kept[b], plan.targets[b]
        x64, m64 = hidden[b].double(), size[b].double()
        new_pos = [int(pos[b, j]) for j in kept]
        if method == "ficoco":
            xb = _merge_normalized(hidden[b], kept, targets, denominator=True)
            mb = m64[kept]
        elif method == "random":  # pruned: the kept rows as they are
            xb, mb = x64[kept], m64[kept]
        elif method in ("tome", "pool"):
            incoming: dict[int, list[int]] = {j: [] for j in kept}  # I_j
            for i, flows in targets.items():
                for j in flows:
                    incoming[j].append(i)
            rows, masses = [], []
            for j in kept:  # size-weighted mean (m_j X_j + sum_i m_i X_i) / (m_j + sum_i m_i)
                mass = m64[j, 0].clone()
                acc = m64[j, 0] * x64[j]
                for i in incoming[j]:
                    mass = mass + m64[i, 0]
                    acc = acc + m64[i, 0] * x64[i]
                rows.append(acc / mass)
                masses.append(mass)
            xb = torch.stack(rows)
            mb = torch.stack(masses).reshape(-1, 1)
        else:  # evit
            fused = torch.zeros_like(x64[0])
            for i, flows in targets.items():
                fused = fused + flows[EVIT_FUSED] * x64[i]
            xb = torch.cat([x64[kept], fused[None]], dim=0)
            mb = torch.cat([m64[kept], torch.ones_like(m64[:1])], dim=0)
            new_pos.append(-1)
        out_x.append(xb)
        out_size.append(mb)
        out_pos.append(new_pos)
    return (
        torch.stack(out_x).to(hidden.dtype),
        torch.tensor(out_pos, dtype=pos.dtype),
        torch.stack(out_size).to(size.dtype),
    )


# ----------------------------------------------------------------------------------------------------
# Decoder (FiCoCo-L, FastV)
# ----------------------------------------------------------------------------------------------------


def _ficoco_l_plan(ell: Tensor, a: int, step: ReductionStep, params: FiCoCoParams):
    """ell: [L, L] float64 head-mean logits of one sample; the visual span is [a, a + n)."""
    n, length = step.n, ell.shape[0]
    vis = list(range(a, a + n))
    text = list(range(a + n, length))  # X: the text after the image
    m = max(len(text), 1)
    lg = ell.tolist()
    l_vv = [[lg[p][c] for c in vis] for p in vis]
    l_xv = [[lg[t][c] for c in vis] for t in text]  # text queries -> visual keys
    l_vx = [[lg[p][t] for t in text] for p in vis]  # visual queries -> text keys (pre-mask)
    xv64 = torch.tensor(l_xv, dtype=torch.float64).reshape(len(text), n)

    scores = []
    for i in range(n):
        vis_term = sum(l_vv[i]) if params.l_filter_reduce == "sum" else sum(l_vv[i]) / n
        if params.l_task_term == "text_to_vision":
            task = sum(l_xv[t][i] for t in range(len(text))) / m
        else:
            task = sum(l_vx[i][t] for t in range(len(text))) / m
        scores.append(params.l_beta * vis_term - (1.0 - params.l_beta) * task)
    sources = sorted(_top(list(range(n)), scores, step.r))
    kept = _complement(sources, n)

    targets: TargetMap = {}
    for i in sources:
        # indirect_ij = sum_{k in X} l_VX[i, k] l_XV[k, j], for every column j at once (float64)
        indirect = (torch.tensor(l_vx[i], dtype=torch.float64) @ xv64).tolist()
        row = []
        for j in range(n):
            ind = indirect[j] / m if params.l_indirect_scale == "mean" else indirect[j]
            row.append(-math.inf if j == i else params.l_gamma * l_vv[i][j] + (1.0 - params.l_gamma) * ind)
        if params.l_targets == "kept":
            targets[i] = _correlate(row, kept, step.targets_per_source, params.epsilon, params.strict_threshold, set())
        else:  # all columns but self; shares of source targets are dropped, not renormalised
            others = [j for j in range(n) if j != i]
            targets[i] = _correlate(
                row, others, step.targets_per_source, params.epsilon, params.strict_threshold, set(sources)
            )
    return sources, kept, targets, scores


def _fastv_plan(attn: list[float], a: int, step: ReductionStep):
    a_vis = [attn[a + i] for i in range(step.n)]
    redundancy = [-v for v in a_vis]
    sources = sorted(_top(list(range(step.n)), redundancy, step.r))
    return sources, _complement(sources, step.n), {i: {} for i in sources}, redundancy


def reference_decoder_plan(
    method: str,
    params: MethodParams,
    q: Tensor,
    k: Tensor,
    image_offset: Tensor,
    step: ReductionStep,
    scale: float,
) -> RefPlan:
    """Filter + correlate of one decoder step. q, k: [B, H, L, d]; image_offset: [B] (a per sample)."""
    plans = []
    offsets = [int(a) for a in image_offset.reshape(-1).tolist()]
    if method == "ficoco":
        ell = _logits64(q, k, scale)
        for b, a in enumerate(offsets):
            plans.append(_ficoco_l_plan(ell[b], a, step, params.ficoco))
    elif method == "fastv":
        attn = _attention_row64(q[:, :, -1], k, scale)
        for b, a in enumerate(offsets):
            plans.append(_fastv_plan(attn[b].tolist(), a, step))
    else:
        raise ValueError(f"{method!r} is not a decoder reduction method")
    return _batch(plans)


def reference_decoder_step(
    method: str,
    params: MethodParams,
    x_visual: Tensor,
    q: Tensor,
    k: Tensor,
    image_offset: Tensor,
    step: ReductionStep,
    scale: float,
) -> tuple[Tensor, list[list[int]], list[TargetMap]]:
    """One decoder step on the visual span x_visual [B, n, D]: (x_visual', sources, targets)."""
    plan = reference_decoder_plan(method, params, q, k, image_offset, step, scale)
    return reference_decoder_apply(method, params, plan, x_visual), plan.sources, plan.targets


def reference_decoder_apply(method: str, params: MethodParams, plan: RefPlan, x_visual: Tensor) -> Tensor:
    """Compress of a decoder step: apply a reference plan to the visual span x_visual [B, n, D]."""
    out = []
    for b in range(x_visual.shape[0]):
        if method == "fastv":
            out.append(x_visual[b].double()[plan.kept[b]])
        else:
            denominator = params.ficoco.l_compress != "sum"
            out.append(_merge_normalized(x_visual[b], plan.kept[b], plan.targets[b], denominator))
    return torch.stack(out).to(x_visual.dtype)
