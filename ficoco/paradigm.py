"""Filter -> correlate -> compress, as fixed-budget tensor functions.

One reduction step at one layer turns a span of n tokens into n - r tokens:

* **filter** scores every token (higher s_i = more redundant) and takes the source set
  S = TopK(s, r); protected tokens get s = -inf and are never chosen. The kept set T is the complement,
  in ascending (original) order.
* **correlate** builds, for each source i, the target set J_i within T (at most K targets, static) and
  the flow weights alpha_ij (0 = no flow; a row of zeros = pure pruning).
* **compress** folds the sources into their targets and drops them.

The filter and correlate results are a :class:`MergePlan` of index and weight tensors, computed once
and then applied to any tensor (hidden states, patch positions, token sizes) by the short pure
functions below, in the spirit of ToMe's ``merge.py``. Every shape is a Python integer taken from the
schedule: no ``.item()``, no ``nonzero``, no boolean-mask indexing, no branch on tensor values, no
randomness. Ties are broken towards the lower index everywhere (as ONNX ``TopK`` specifies), so the
result is deterministic and identical in PyTorch, ONNX Runtime and TensorRT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor


@dataclass(frozen=True)
class MergePlan:
    """The outcome of filter + correlate for a batch, indices relative to the reduced span.

    kept:    [B, n - r] int64, ascending span indices of the tokens that stay.
    sources: [B, r'] int64, span indices of the tokens that leave (r' = r, or r + 1 for EViT's fusion).
    targets: [B, r', K] int64, for each source its targets as indices *into kept* (0..n-r-1).
    weights: [B, r', K] float32, alpha_ij; 0 means no flow.
    """

    kept: Tensor
    sources: Tensor
    targets: Tensor
    weights: Tensor


# ----------------------------------------------------------------------------------------------------
# Index helpers
# ----------------------------------------------------------------------------------------------------


def stable_rank(scores: Tensor, largest: bool = True) -> Tensor:
    """Rank of every entry along the last dim (0 = best), ties broken towards the lower index.

    rank_i = #{j : s_j beats s_i} + #{j < i : s_j = s_i}. Built from pairwise comparisons, so the
    result is exact and identical in every backend (no reliance on a sort's tie order). O(n^2) memory
    per row, which is small for the spans reduced here (n <= ~600).
    """
    n = scores.shape[-1]
    si, sj = scores.unsqueeze(-1), scores.unsqueeze(-2)
    better = sj > si if largest else sj < si
    idx = torch.arange(n, device=scores.device)
    earlier = idx.unsqueeze(0) < idx.unsqueeze(1)  # [i, j]: j < i
    beats = better | ((sj == si) & earlier)
    return beats.sum(dim=-1)


def stable_topk(scores: Tensor, count: int, largest: bool = True) -> Tensor:
    """Indices of the `count` largest (or smallest) entries of the last dim, in rank order, ties -> lower index.

    The rank is a permutation, so scattering the indices by rank gives the full order (order[rank_i] = i);
    this exports as comparisons + ReduceSum + ScatterElements (no Sort op, no data-dependent shape).
    """
    if count == 0:
        return torch.zeros(scores.shape[:-1] + (0,), dtype=torch.long, device=scores.device)
    rank = stable_rank(scores, largest)
    idx = torch.arange(scores.shape[-1], device=scores.device).expand_as(rank)
    order = torch.zeros_like(rank).scatter(-1, rank, idx)
    return order[..., :count]


def choose_sources(scores: Tensor, count: int, n: int, kept: Tensor | None = None) -> Tensor:
    """The filter's source set S = TopK(s, count) (`stable_topk`), or, when `kept` [B, n - count] is given,
    the complement of that kept set (ascending): the selection *followed* from elsewhere.

    Following is how a checker separates arithmetic error from discrete choices: the fp32 reference makes
    the bundle's choices (read from its graphs) and computes everything else itself, so a stage output's
    error is the arithmetic's, and the choices' disagreement is counted apart (selection flips).
    """
    if kept is None:
        return stable_topk(scores, count)
    if kept.shape[-1] != n - count:
        raise ValueError(f"a followed kept set has {kept.shape[-1]} tokens, the step keeps {n - count}")
    return complement_sorted(kept, n)


def topk_small(scores: Tensor, count: int) -> Tensor:
    """Indices of the `count` largest entries of the last dim for a small static count, ties -> lower index.

    `count` rounds of argmax (first index on ties, in PyTorch and ONNX ArgMax alike), each masking its pick.
    If a row has fewer than `count` finite entries the extra picks point at -inf entries; callers give
    those zero weight.
    """
    picks = []
    s = scores
    cols = torch.arange(scores.shape[-1], device=scores.device)
    for _ in range(count):
        i = torch.argmax(s, dim=-1, keepdim=True)
        picks.append(i)
        s = torch.where(cols == i, torch.full_like(s, -math.inf), s)  # mask the pick (no scatter)
    if not picks:
        return torch.zeros(scores.shape[:-1] + (0,), dtype=torch.long, device=scores.device)
    return torch.cat(picks, dim=-1)


def source_mask(sources: Tensor, n: int) -> Tensor:
    """[B, n] float32: 1 where the span index is a source, else 0 (a ScatterElements without reduction)."""
    zeros = torch.zeros(sources.shape[0], n, dtype=torch.float32, device=sources.device)
    return zeros.scatter(1, sources, torch.ones_like(sources, dtype=torch.float32))


def complement_sorted(sources: Tensor, n: int) -> Tensor:
    """The kept set T = {0..n-1} minus S, ascending: [B, n - r] int64.

    Key_j = n * [j in S] + j is distinct per j, so the n - r smallest keys are exactly T in order.
    """
    r = sources.shape[-1]
    key = source_mask(sources, n) * n + torch.arange(n, dtype=torch.float32, device=sources.device)
    return torch.topk(key, n - r, dim=-1, largest=False, sorted=True).indices


def kept_rank(sources: Tensor, n: int) -> Tensor:
    """[B, n] int64: for each span index j, its slot in `kept` if j is kept (= #kept indices below j)."""
    keep = 1.0 - source_mask(sources, n)
    return (torch.cumsum(keep, dim=-1) - 1.0).clamp_min(0.0).to(torch.long)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x[b, index[b, i], ...] for x of shape [B, n, ...] and index [B, m] -> [B, m, ...]."""
    if x.dim() == 2:
        return torch.gather(x, 1, index)
    expand = index.reshape(index.shape + (1,) * (x.dim() - 2)).expand(index.shape + x.shape[2:])
    return torch.gather(x, 1, expand)


# ----------------------------------------------------------------------------------------------------
# Correlate: the token-adaptive K (docs/method-spec.md A3)
# ----------------------------------------------------------------------------------------------------


def adaptive_targets(n: int, epsilon: float) -> int:
    """K = ceil((1 − ε)(n − 1)), the targets per source; exact: ε is read as the decimal it prints as
    (0.998 -> 499/500). 577 -> 2, 502 -> 2, 501 -> 1 (the paper's K for LLaVA-1.5's spans). Never negative."""
    return max(0, math.ceil((1 - Fraction(str(epsilon))) * (n - 1)))


def quantile_from_top(top_desc: Tensor, n: int, epsilon: float) -> Tensor:
    """tau = the eps-quantile of a row of n values (linear interpolation, as torch.quantile), exactly.

    Only the top K + 1 values matter: with p = eps(n - 1), lo = floor(p), f = p - lo, the ascending
    order statistics a_lo and a_{lo+1} are the (n-1-lo)-th and (n-2-lo)-th largest values
    (0-based), and n - 1 - lo = K. `top_desc` is [..., >= K + 1] sorted descending; returns [...].
    """
    p = Fraction(str(epsilon)) * (n - 1)
    lo = math.floor(p)
    f = float(p - lo)
    a_lo = top_desc[..., n - 1 - lo]
    if f == 0.0:
        return a_lo
    a_hi = top_desc[..., n - 2 - lo]
    # torch.lerp's two-sided form, so that tau agrees with torch.quantile to the last bit.
    if f < 0.5:
        return a_lo + f * (a_hi - a_lo)
    return a_hi - (a_hi - a_lo) * (1.0 - f)


def above_quantile(values: Tensor, top_desc: Tensor, n: int, epsilon: float, strict: bool) -> Tensor:
    """values >= tau (strict: values > tau) for entries of the row, decided exactly, without rounding tau.

    tau interpolates between the adjacent order statistics a_lo <= a_hi (see quantile_from_top), and every
    entry of the row is either >= a_hi or <= a_lo. So if f > 0 and a_lo < a_hi (then a_lo < tau < a_hi),
    v >= tau and v > tau both mean v >= a_hi; otherwise tau = a_lo exactly. Comparing with a float32 tau
    instead goes wrong when (1 - f)(a_hi - a_lo) or f (a_hi - a_lo) is below half an ulp: tau rounds onto
    a_hi or a_lo (e.g. n = 502, f = 0.998) and flips the decision for that order statistic.
    values: [..., m] entries of the rows; top_desc: [..., >= K + 1] as for quantile_from_top.
    """
    p = Fraction(str(epsilon)) * (n - 1)
    lo = math.floor(p)
    a_lo = top_desc[..., n - 1 - lo].unsqueeze(-1)
    at_lo = values > a_lo if strict else values >= a_lo
    if p == lo:
        return at_lo
    a_hi = top_desc[..., n - 2 - lo].unsqueeze(-1)
    gap = a_hi > a_lo
    # boolean algebra, not torch.where: ONNX Runtime has no Where kernel for bool tensors
    return (gap & (values >= a_hi)) | (~gap & at_lo)


def masked_softmax(values: Tensor, valid: Tensor) -> Tensor:
    """Softmax over the valid entries of the last dim; rows without a valid entry give all zeros.

    `values` must be sorted descending along the last dim, so a row has a valid entry iff its first
    entry is valid (thresholds are monotone); the row max is then values[..., 0].
    """
    safe = torch.where(valid, values, torch.zeros_like(values))
    e = torch.where(valid, torch.exp(safe - safe[..., :1]), torch.zeros_like(values))
    return e / e.sum(dim=-1, keepdim=True).clamp_min(1.0)


def select_targets(
    corr: Tensor,
    sources: Tensor,
    kept: Tensor,
    n_targets: int,
    epsilon: float,
    *,
    strict: bool = False,
    over: str = "kept",
    column_ok: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Correlate with a token-adaptive K = `n_targets` (docs/method-spec.md A3 / Eq. 2's J_i and alpha_ij).

    corr:  [B, r, n] correlation C_ij of each source row i to every current span column j (may hold
           -inf, e.g. C_ii = -inf in FiCoCo-L).
    tau_i = eps-quantile of row i over all n columns (from its top K + 1 values).
    over="kept": targets = the top-K kept columns (columns where `column_ok` [B, n] is False are
      excluded); a target with C_ij < tau_i (or <= for strict) gets weight 0, so each source flows into
      0..K targets.
    over="all": targets = the top-K columns of the whole row; after the softmax, weights of targets
      that are themselves sources, or columns where `column_ok` is False, are set to 0 (the official
      FiCoCo-L and FiCoCo-V codes' choice of targets; their shares of the softmax are lost).
    alpha_ij = softmax over the source's valid targets of C_ij.
    Returns targets [B, r, K] (indices into kept) and weights [B, r, K] float32.
    """
    n = corr.shape[-1]
    corr = corr.float()
    if n_targets == 0:
        empty = corr[..., :0]
        return empty.to(torch.long), empty
    top = torch.topk(corr, n_targets + 1, dim=-1, largest=True, sorted=True).values  # values only: tie order irrelevant
    if over == "kept":
        cols = kept.unsqueeze(1).expand(-1, corr.shape[1], -1)
        cand = torch.gather(corr, -1, cols)  # [B, r, n - r]
        if column_ok is not None:
            ok = torch.gather(column_ok, 1, kept).unsqueeze(1)
            cand = torch.where(ok, cand, torch.full_like(cand, -math.inf))
        order = topk_small(cand, n_targets)
        values = torch.gather(cand, -1, order)
        targets = order
        is_kept_target = torch.ones_like(values, dtype=torch.bool)
    elif over == "all":
        order = topk_small(corr, n_targets)  # span indices
        values = torch.gather(corr, -1, order)
        smask = source_mask(sources, n)  # [B, n]
        flat = order.reshape(order.shape[0], -1)
        is_kept_target = (torch.gather(smask, 1, flat) == 0).reshape(order.shape)
        if column_ok is not None:  # e.g. [CLS] in FiCoCo-V: may be picked, receives nothing
            is_kept_target = is_kept_target & torch.gather(column_ok, 1, flat).reshape(order.shape)
        targets = torch.gather(kept_rank(sources, n), 1, flat).reshape(order.shape)
    else:
        raise ValueError(f"over must be 'kept' or 'all', not {over!r}")
    # With fewer than K columns (n - r < K) topk_small repeats an index (argmax of an all -inf row is 0),
    # and the repeat would gather a finite value again: a repeated pick gets no flow.
    slot = torch.arange(n_targets, device=order.device)
    earlier = slot.unsqueeze(0) < slot.unsqueeze(1)  # [t, u]: u < t
    repeat = ((order.unsqueeze(-1) == order.unsqueeze(-2)) & earlier).to(values.dtype).sum(dim=-1) > 0
    values = torch.where(repeat, torch.full_like(values, -math.inf), values)
    above = above_quantile(values, top, n, epsilon, strict)  # C_ij >= tau_i (strict: >), exactly
    valid = above & (values > -math.inf)  # a -inf candidate (excluded column) never receives flow
    alpha = masked_softmax(values, valid)
    alpha = torch.where(is_kept_target, alpha, torch.zeros_like(alpha))
    return targets, alpha


# ----------------------------------------------------------------------------------------------------
# Compress: apply a plan to any tensor
# ----------------------------------------------------------------------------------------------------


def flow_matrix(plan: MergePlan, n_kept: int) -> Tensor:
    """W [B, r, n - r] float32 with W_ij = sum_t alpha_it [target_it = j] (one-hot times alpha)."""
    slots = torch.arange(n_kept, device=plan.targets.device)
    onehot = (plan.targets.unsqueeze(-1) == slots).to(torch.float32)  # [B, r, K, n - r]
    return (plan.weights.float().unsqueeze(-1) * onehot).sum(dim=-2)


def compress_prune(x: Tensor, plan: MergePlan) -> Tensor:
    """X' = X_T: the sources are dropped (FastV; K = 0)."""
    return gather_tokens(x, plan.kept)


def compress_self_preserving(x: Tensor, plan: MergePlan) -> Tensor:
    """Eq. 2: X_j <- (X_j + sum_{i in I_j} alpha_ij X_i) / (1 + sum_{i in I_j} alpha_ij) for j in T.

    As a GEMM: X_T' = (X_T + W^T X_S) / (1 + W^T 1). Computed in fp32, returned in x's dtype.
    """
    x_kept = gather_tokens(x, plan.kept).float()
    x_src = gather_tokens(x, plan.sources).float()
    w_t = flow_matrix(plan, x_kept.shape[1]).transpose(1, 2)  # [B, n - r, r]
    out = (x_kept + w_t @ x_src) / (1.0 + w_t.sum(dim=-1, keepdim=True))
    return out.to(x.dtype)


def compress_sum(x: Tensor, plan: MergePlan) -> Tensor:
    """X_j <- X_j + sum_i alpha_ij X_i (the official FiCoCo-L code: no (1 + sum alpha) denominator)."""
    x_kept = gather_tokens(x, plan.kept).float()
    x_src = gather_tokens(x, plan.sources).float()
    w_t = flow_matrix(plan, x_kept.shape[1]).transpose(1, 2)
    return (x_kept + w_t @ x_src).to(x.dtype)


def compress_size_weighted(x: Tensor, size: Tensor, plan: MergePlan) -> tuple[Tensor, Tensor]:
    """ToMe: X_j <- (m_j X_j + sum_i alpha_ij m_i X_i) / (m_j + sum_i alpha_ij m_i), sizes add.

    size: [B, n, 1] token sizes m (1 for an unmerged token). Returns (x', size').
    """
    x_kept = gather_tokens(x, plan.kept).float()
    x_src = gather_tokens(x, plan.sources).float()
    m_kept = gather_tokens(size, plan.kept).float()
    m_src = gather_tokens(size, plan.sources).float()
    w_t = flow_matrix(plan, x_kept.shape[1]).transpose(1, 2)
    m_new = m_kept + w_t @ m_src
    out = (m_kept * x_kept + w_t @ (m_src * x_src)) / m_new
    return out.to(x.dtype), m_new.to(size.dtype)


def compress_fuse(x: Tensor, plan: MergePlan) -> Tensor:
    """EViT: X' = [X_T ; sum_{i in S} a_i X_i] — all sources fuse into one new token appended last.

    plan.weights[:, :, 0] holds the unnormalised fusion weights a_i (the [CLS] attention).
    """
    x_kept = gather_tokens(x, plan.kept)
    x_src = gather_tokens(x, plan.sources).float()
    fused = (plan.weights[:, :, :1].float() * x_src).sum(dim=1, keepdim=True)
    return torch.cat([x_kept, fused.to(x.dtype)], dim=1)
