"""Turn (variant, method, budget, model geometry) into a static per-block reduction `Schedule`.

docs/method-spec.md A6/A7. The budget is the number of visual tokens that remain at the end of reduction,
given as a ratio of the model's visual tokens (576 for LLaVA-1.5), as a token count, or as a prefill
TFLOPs target. Removal is spread evenly over a tower's reduction blocks (earlier blocks take the
remainder); VL splits the budget geometrically: the vision tower keeps n_mid = round(sqrt(576 · n_final)).

Every invalid request raises `PlanError` (a `ValueError`) whose message says what is allowed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from ficoco.flops import flops_report
from ficoco.geometry import LlavaGeometry
from ficoco.params import (
    METHOD_STAGES,
    METHODS,
    POSITIONS,
    PRESETS,
    VARIANTS,
    EViTParams,
    FastVParams,
    PoolParams,
    RandomParams,
    ToMeParams,
    ficoco_params,
)
from ficoco.schedule import Schedule
from ficoco.tower_steps import PlanError, TowerRequest, build_tower, round_half_up, tokens_text

log = logging.getLogger(__name__)

_VARIANT_TOWERS: dict[str, tuple[str, ...]] = {
    "none": (),
    "V": ("vision",),
    "L": ("decoder",),
    "VL": ("vision", "decoder"),
}


def _canonical(value: str, allowed: tuple[str, ...], what: str) -> str:
    if not isinstance(value, str):
        raise PlanError(f"{what} must be one of {', '.join(allowed)}; got {value!r}")
    for a in allowed:
        if value.strip().lower() == a.lower():
            return a
    raise PlanError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")


def _check_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(f"{what} must be an integer block index, got {value!r}")
    return value


def _check_range(
    start: int, end: int, lo: int, hi: int, what: str, flags: tuple[str, str], model_note: str
) -> None:
    for name, v in zip(flags, (start, end), strict=True):
        if not lo <= v <= hi:
            raise PlanError(f"{name}={v} is outside the model: {what} blocks {lo}..{hi} can reduce ({model_note}).")
    if start > end:
        raise PlanError(f"{flags[0]}={start} is past {flags[1]}={end}; the first reducing block must not follow the last.")


# --------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class _Resolved:
    """The validated, budget-independent part of a request."""

    geometry: LlavaGeometry
    variant: str
    method: str
    preset: str
    positions: str
    text_tokens: int
    vision: tuple[int, int] | None  # (start, end) when the vision tower reduces
    decoder: tuple[int, int] | None  # (start, end) when the decoder reduces
    vl_split: int | None
    epsilon: float


#: Decoder depth the presets' FiCoCo-L start blocks were chosen for (LLaVA-1.5-7B's Vicuna/Llama).
PAPER_DECODER_BLOCKS = 32


def default_l_start(preset_start: int, num_layers: int) -> int:
    """The default first FiCoCo-L block: the preset's (chosen for 32 blocks) for decoders of 32 blocks or more;
    at the same relative depth, round(start · num_layers / 32), for shallower ones (e.g. the 8-block `shapes`
    decoder: block 1), so that the steps span the same share of the decoder."""
    if num_layers >= PAPER_DECODER_BLOCKS:
        return preset_start
    return max(0, min(num_layers - 2, round(preset_start * num_layers / PAPER_DECODER_BLOCKS)))


def _resolve(
    geometry: LlavaGeometry,
    variant: str,
    method: str,
    preset: str,
    positions: str,
    v_start: int | None,
    v_end: int | None,
    l_start: int | None,
    l_end: int | None,
    vl_split: int | None,
    text_tokens: int,
) -> _Resolved:
    variant = _canonical(variant, VARIANTS, "variant")
    method = _canonical(method, METHODS, "method")
    preset = _canonical(preset, PRESETS, "preset")
    positions = _canonical(positions, POSITIONS, "positions")
    if isinstance(text_tokens, bool) or not isinstance(text_tokens, int) or text_tokens < 0:
        raise PlanError(f"text_tokens (M, the text length assumed for FLOPs) must be an integer >= 0, got {text_tokens!r}")
    towers = _VARIANT_TOWERS[variant]
    supported = METHOD_STAGES[method]
    missing = [s for s in towers if s not in supported]
    if missing:
        ok = [v for v, st in _VARIANT_TOWERS.items() if st and all(s in supported for s in st)]
        raise PlanError(
            f"method {method!r} cannot reduce the {' and '.join(missing)} tower (variant {variant}); it reduces "
            f"only the {' and '.join(supported)} tower, so it supports variant {' or '.join(ok)}. "
            f"Variant VL needs method ficoco."
        )
    params = ficoco_params(preset)
    vis, dec = geometry.vision, geometry.decoder

    v_range: tuple[int, int] | None = None
    if "vision" in towers:
        default_start = {
            "ficoco": params.v_start,
            "tome": ToMeParams().start,
            "evit": EViTParams().start,
            "random": RandomParams().start,
            "pool": PoolParams().start,
        }[method]
        vs = _check_int(default_start if v_start is None else v_start, "v_start")
        ve = _check_int(vis.select_block if v_end is None else v_end, "v_end")
        _check_range(
            vs, ve, 0, vis.select_block, "vision", ("v_start", "v_end"),
            f"block {vis.select_block} feeds the projector; later blocks are never run",
        )
        v_range = (vs, ve)
    elif v_start is not None or v_end is not None:
        raise PlanError(f"v_start/v_end set the vision reduction blocks; variant {variant} does not reduce the vision tower (use V or VL).")

    l_range: tuple[int, int] | None = None
    if "decoder" in towers:
        last = dec.num_layers - 1
        if method == "fastv":
            block = _check_int(FastVParams().full_blocks - 1 if l_start is None else l_start, "l_start")
            if l_end is not None and l_end != block:
                raise PlanError(
                    f"fastv prunes once, in block {block}; l_end={l_end} does not apply (set l_start to move the step)."
                )
            _check_range(block, block, 0, last, "decoder", ("l_start", "l_end"), f"{dec.num_layers} decoder blocks")
            l_range = (block, block)
        else:
            ls = _check_int(default_l_start(params.l_start, dec.num_layers) if l_start is None else l_start, "l_start")
            le = _check_int(dec.num_layers - 2 if l_end is None else l_end, "l_end")
            _check_range(ls, le, 0, last, "decoder", ("l_start", "l_end"), f"{dec.num_layers} decoder blocks")
            l_range = (ls, le)
    elif l_start is not None or l_end is not None:
        raise PlanError(f"l_start/l_end set the decoder reduction blocks; variant {variant} does not reduce the decoder (use L or VL).")

    if vl_split is not None:
        if variant != "VL":
            raise PlanError(f"vl_split (visual tokens after the vision tower) applies only to variant VL, not {variant}.")
        if isinstance(vl_split, bool) or not isinstance(vl_split, int) or not 1 <= vl_split <= geometry.visual_tokens:
            raise PlanError(f"vl_split must be an integer in [1, {geometry.visual_tokens}] (visual tokens after the vision tower), got {vl_split!r}")

    return _Resolved(
        geometry=geometry,
        variant=variant,
        method=method,
        preset=preset,
        positions=positions,
        text_tokens=text_tokens,
        vision=v_range,
        decoder=l_range,
        vl_split=vl_split,
        epsilon=params.epsilon,
    )


def _schedule_for(res: _Resolved, n_final: int) -> Schedule:
    """Build the schedule that leaves `n_final` visual tokens (PlanError if infeasible)."""
    g = res.geometry
    vis, dec = g.vision, g.decoder
    n_total = g.visual_tokens
    if res.vision is not None and res.decoder is not None:  # VL
        n_mid = res.vl_split if res.vl_split is not None else round_half_up(math.sqrt(n_total * n_final))
        if not n_final <= n_mid <= n_total:
            raise PlanError(
                f"VL split: the vision tower must keep between the final {tokens_text(n_final)} and all {n_total}, "
                f"but vl_split={n_mid}."
            )
    elif res.vision is not None:
        n_mid = n_final
    else:
        n_mid = n_total

    # Vision span = [CLS] + patches; the decoder's visual tokens = patches (+ [CLS] with strategy "full").
    cls_offset = int(vis.has_cls) - int(vis.has_cls and vis.feature_strategy == "full")
    v_start, v_end = res.vision if res.vision is not None else (0, 0)
    vision = build_tower(
        TowerRequest(
            tower="vision",
            method=res.method if res.vision is not None else "none",
            num_layers=vis.blocks_run,
            span_in=vis.seq_len,
            span_out=n_mid + cls_offset,
            start=v_start,
            end=v_end,
            has_cls=vis.has_cls,
            epsilon=res.epsilon,
        )
    )
    l_start, l_end = res.decoder if res.decoder is not None else (0, 0)
    decoder = build_tower(
        TowerRequest(
            tower="decoder",
            method=res.method if res.decoder is not None else "none",
            num_layers=dec.num_layers,
            span_in=n_mid,
            span_out=n_final,
            start=l_start,
            end=l_end,
            epsilon=res.epsilon,
        )
    )
    return Schedule(
        variant=res.variant,  # type: ignore[arg-type]
        method=res.method if res.variant != "none" else "none",
        preset=res.preset,
        positions=res.positions,  # type: ignore[arg-type]
        visual_tokens_in=n_total,
        vision=vision,
        decoder=decoder,
        text_tokens=res.text_tokens,
        flops=flops_report(g, vision, decoder, res.text_tokens),
    )


def plan(
    geometry: LlavaGeometry,
    variant: str,
    method: str = "ficoco",
    *,
    ratio: float | None = None,
    keep_tokens: int | None = None,
    target_tflops: float | None = None,
    preset: str = "paper",
    positions: str = "compact",
    v_start: int | None = None,
    v_end: int | None = None,
    l_start: int | None = None,
    l_end: int | None = None,
    vl_split: int | None = None,
    text_tokens: int = 60,
) -> Schedule:
    """Plan the static reduction schedule of one model.

    Args:
        geometry: the model's shapes (`LlavaGeometry.from_config`).
        variant: "none", "V" (vision tower), "L" (decoder) or "VL" (both; FiCoCo only), any case.
        method: "ficoco", "tome" / "evit" / "random" / "pool" (vision only) or "fastv" (decoder only).
            random and pool are the baselines of `ficoco.methods.random_prune` / `ficoco.methods.pool`: the same
            default blocks as ToMe / EViT (12 .. select_block), K = 0 (random) / K = 1 (pool).
        ratio: fraction of the model's visual tokens (576) that remain at the end, in (0, 1];
            n_final = round(ratio · 576), halves up.
        keep_tokens: the same budget in tokens, in [1, 576].
        target_tflops: choose the largest n_final whose decoder prefill TFLOPs (M = text_tokens) fit.
        preset: "paper" or "official" (docs/method-spec.md A1): sets ε and FiCoCo's default start blocks.
        positions: "compact" or "original" decode RoPE positions (A8); stored in the schedule.
        v_start, v_end: first/last 0-based CLIP block with a step (default 12 .. select_block).
        l_start, l_end: first/last decoder block with a step (default preset l_start .. num_layers − 2;
            fastv: the single step block, default FastVParams.full_blocks − 1).
        vl_split: VL only, visual tokens after the vision tower (default round(sqrt(576 · n_final))).
        text_tokens: M, the text tokens assumed by the FLOPs figures.

    Exactly one budget is required for V/L/VL; variant "none" takes none (or ratio 1.0). A budget that
    keeps every token yields a schedule with no steps. `Schedule.flops` holds `ficoco.flops.flops_report`.
    """
    res = _resolve(geometry, variant, method, preset, positions, v_start, v_end, l_start, l_end, vl_split, text_tokens)
    n_total = geometry.visual_tokens
    budgets = {name: v for name, v in (("ratio", ratio), ("keep_tokens", keep_tokens), ("target_tflops", target_tflops)) if v is not None}

    if res.variant == "none":
        extra = [name for name, v in budgets.items() if not (name == "ratio" and _is_one(v))]
        if extra:
            raise PlanError(
                f"variant none reduces nothing, so {' and '.join(extra)} contradicts it; "
                "drop the budget or choose variant V, L or VL."
            )
        return _schedule_for(res, n_total)

    if len(budgets) != 1:
        if not budgets:
            raise PlanError(
                f"variant {res.variant} needs a budget: pass exactly one of ratio (fraction of the {n_total} visual "
                "tokens kept, e.g. 0.25), keep_tokens (e.g. 144) or target_tflops (prefill TFLOPs)."
            )
        raise PlanError(f"pass exactly one budget, not {' and '.join(budgets)}.")

    if ratio is not None:
        n_final = _n_from_ratio(ratio, n_total)
    elif keep_tokens is not None:
        if isinstance(keep_tokens, bool) or not isinstance(keep_tokens, int) or not 1 <= keep_tokens <= n_total:
            raise PlanError(f"keep_tokens must be an integer in [1, {n_total}] (visual tokens kept), got {keep_tokens!r}")
        n_final = keep_tokens
    else:
        return _plan_for_target(res, target_tflops)

    sched = _schedule_for(res, n_final)
    log.debug("planned %s/%s: %d -> %d visual tokens, %s", res.variant, res.method, n_total, n_final, sched.flops)
    return sched


def _is_one(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and float(v) == 1.0


def _n_from_ratio(ratio: float, n_total: int) -> int:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise PlanError(f"ratio must be a number in (0, 1], got {ratio!r}")
    if not math.isfinite(ratio) or not 0 < ratio <= 1:
        raise PlanError(
            f"ratio must be a finite fraction in (0, 1] of the {n_total} visual tokens kept (0.25 keeps "
            f"{round_half_up(0.25 * n_total)}), got {ratio!r}"
        )
    n = round_half_up(ratio * n_total)
    if n < 1:
        raise PlanError(
            f"ratio {ratio} keeps round({ratio} · {n_total}) = 0 visual tokens; the smallest ratio is "
            f"1/{n_total} ≈ {1 / n_total:.5f} (or pass keep_tokens)."
        )
    return n


def _plan_for_target(res: _Resolved, target: float | None) -> Schedule:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target) or target <= 0:
        raise PlanError(f"target_tflops must be a finite positive number of prefill TFLOPs, got {target!r}")
    cheapest: Schedule | None = None
    last_error: PlanError | None = None
    for n_final in range(res.geometry.visual_tokens, 0, -1):
        try:
            sched = _schedule_for(res, n_final)
        except PlanError as e:  # infeasible at this budget; smaller budgets may still be feasible
            last_error = e
            continue
        if sched.flops["prefill"] <= target:
            log.debug("target %.3f TFLOPs -> %d visual tokens (%.3f)", target, n_final, sched.flops["prefill"])
            return sched
        if cheapest is None or sched.flops["prefill"] < cheapest.flops["prefill"]:
            cheapest = sched
    if cheapest is None:
        raise PlanError(f"no feasible budget for variant {res.variant} with {res.method}: {last_error}")
    raise PlanError(
        f"target {target:g} TFLOPs is below the minimum reachable prefill cost {cheapest.flops['prefill']:.3f} "
        f"TFLOPs (variant {res.variant}, {res.method}, {cheapest.visual_tokens_final} visual token(s) left, "
        f"M = {res.text_tokens}); raise the target or reduce earlier (smaller start block)."
    )


# ------------------------------------------------------------------------------------------ request
@dataclass(frozen=True)
class ScheduleRequest:
    """What to reduce and by how much: the arguments of `plan`, as data (recorded in the manifest).

    `schedule`, when given, is a schedule planned before (what `ficoco-plan -o` writes, as a dict); `make`
    then returns it as it is instead of planning.
    """

    variant: str = "VL"
    method: str = "ficoco"
    ratio: float | None = None
    keep_tokens: int | None = None
    target_tflops: float | None = None
    preset: str = "paper"
    positions: str = "compact"
    layers: dict[str, int | None] = field(default_factory=dict)  # v_start, v_end, l_start, l_end, vl_split
    text_tokens: int = 60  # prompt length the FLOPs (and a target_tflops budget) are computed at
    schedule: dict[str, Any] | None = None

    def make(self, geometry: LlavaGeometry) -> Schedule:
        """The schedule: `plan(geometry, ...)`, or the given `schedule` read back."""
        if self.schedule is not None:
            try:
                return Schedule.from_dict(self.schedule)
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"the schedule file is not a schedule written by ficoco-plan -o ({err}); re-plan it") from err
        return plan(
            geometry,
            self.variant,
            self.method,
            ratio=self.ratio,
            keep_tokens=self.keep_tokens,
            target_tflops=self.target_tflops,
            preset=self.preset,
            positions=self.positions,
            text_tokens=self.text_tokens,
            **{name: v for name, v in self.layers.items() if v is not None},
        )
