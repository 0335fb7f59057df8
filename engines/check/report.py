"""The check's report: per-sample results, the aggregates and the verdict (`CheckReport`), and its
check.json / check.md files (`write_report`)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bundle.compare import ForcedAgreement, OutputComparison, TokenAgreement, pool_forced
from bundle.flips import SelectionCheck
from engines.check.levels import ReductionCost, TaskResult
from engines.check.options import Thresholds
from ficoco.atomic import write_atomic

REPORT_JSON = "check.json"
REPORT_MD = "check.md"


@dataclass
class SampleResult:
    """Levels 1-3 and the selection flips of one (image, prompt) sample."""

    image: str
    prompt: str
    stages: list[OutputComparison]
    greedy: TokenAgreement
    reduction: ReductionCost
    seconds: float
    selection: SelectionCheck | None = None  # kept-set flips per reduction step (None: not measured)
    forced: ForcedAgreement | None = None  # the bundle along the reference's greedy tokens (None: not measured)

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "prompt": self.prompt,
            "stages_passed": all(c.passed for c in self.stages),
            "stages": {c.name: c.to_dict() for c in self.stages},
            "greedy": self.greedy.to_dict(),
            "forced": None if self.forced is None else self.forced.to_dict(),
            "reduction": self.reduction.to_dict(),
            "selection": None if self.selection is None else self.selection.to_dict(),
            "seconds": round(self.seconds, 3),
        }


def _stage_group(name: str) -> str:
    graph, _, out = name.partition(":")
    return f"{graph}:present" if out.startswith("present.") else name


def _nanmax(xs: Sequence[float]) -> float:
    vals = [x for x in xs if not math.isnan(x)]
    return max(vals) if len(vals) == len(xs) and vals else float("nan")


def _nanmin(xs: Sequence[float]) -> float:
    vals = [x for x in xs if not math.isnan(x)]
    return min(vals) if len(vals) == len(xs) and vals else float("nan")


def _verdict(summary: dict[str, Any]) -> str:
    return ("yes" if summary["passed"] else "**NO**") if summary["gated"] else "info"


def _worst_ratio(xs: Sequence[float]) -> float:
    """The ratio farthest from 1; NaN if any is NaN (an output that was not finite)."""
    if not xs or any(math.isnan(x) for x in xs):
        return float("nan")
    return max(xs, key=lambda x: abs(x - 1.0))


@dataclass
class CheckReport:
    """Everything `ficoco-check` found; `passed` is the verdict, `failures` says which gates failed."""

    bundle: str
    backend: str
    device: str
    bundle_kind: str
    thresholds: Thresholds
    max_new_tokens: int
    reference: dict[str, Any]
    samples: list[SampleResult]
    tool_versions: dict[str, str]
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    task: list[TaskResult] = field(default_factory=list)
    selection_note: str = ""  # why kept-set flips were not (fully) measured

    # -- aggregates --------------------------------------------------------------------------------------------
    def stage_summary(self) -> dict[str, dict[str, Any]]:
        """Per stage group (the K/V presents of a graph form one group): worst numbers over every sample."""
        groups: dict[str, list[OutputComparison]] = {}
        for s in self.samples:
            for c in s.stages:
                groups.setdefault(_stage_group(c.name), []).append(c)
        out: dict[str, dict[str, Any]] = {}
        for g, cs in groups.items():
            failed = sorted({c.name for c in cs if not c.passed})
            out[g] = {
                "outputs": len({c.name for c in cs}),
                "max_abs_err": _nanmax([c.max_abs_err for c in cs]),
                "mean_abs_err": float(np.mean([c.mean_abs_err for c in cs])),
                "max_rel_err": _nanmax([c.max_rel_err for c in cs]),
                "min_cosine": _nanmin([c.cosine for c in cs]),
                # the norm ratio farthest from 1 (NaN when an output was not finite)
                "worst_norm_ratio": _worst_ratio([c.norm_ratio for c in cs]),
                "within_tolerance": all(c.within_tolerance for c in cs),
                "passed": not failed,
                "failed_outputs": failed,
            }
        return out

    def greedy_summary(self) -> dict[str, Any]:
        rates = [s.greedy.match_rate for s in self.samples]
        lengths = [max(len(s.greedy.tokens), len(s.greedy.reference_tokens)) for s in self.samples]
        matched = sum(r * n for r, n in zip(rates, lengths, strict=True))
        divs = [s.greedy.first_divergence for s in self.samples if s.greedy.first_divergence is not None]
        rate = matched / sum(lengths) if sum(lengths) else 1.0
        return {
            "match_rate": rate,
            "min_sample_match_rate": min(rates) if rates else 1.0,
            "identical_samples": sum(1 for s in self.samples if s.greedy.first_divergence is None),
            "first_divergence": min(divs) if divs else None,
            "gated": self.thresholds.min_token_match is not None,
            "passed": self.thresholds.min_token_match is None or rate >= self.thresholds.min_token_match,
        }

    def forced_summary(self) -> dict[str, Any] | None:
        """Teacher-forced agreement over every position of every sample (None when no sample measured it)."""
        fs = [s.forced for s in self.samples if s.forced is not None]
        if not fs:
            return None
        t = self.thresholds
        pooled = pool_forced(fs)
        return {
            **pooled, "tie_margin": t.tie_margin,
            "gated": t.min_forced_match is not None,
            "passed": t.min_forced_match is None or pooled["rate"] >= t.min_forced_match - 1e-12,
        }

    def reduction_summary(self) -> dict[str, Any]:
        kls = [s.reduction.kl for s in self.samples]
        t = self.thresholds
        lengths = [max(len(s.reduction.tokens.tokens), len(s.reduction.tokens.reference_tokens)) for s in self.samples]
        matched = sum(s.reduction.tokens.match_rate * n for s, n in zip(self.samples, lengths, strict=True))
        agreement = matched / sum(lengths) if sum(lengths) else 1.0
        kl_mean = float(np.mean(kls)) if kls else 0.0
        passed = (t.max_kl is None or kl_mean <= t.max_kl) and (
            t.min_reduction_agreement is None or agreement >= t.min_reduction_agreement
        )
        divs = [s.reduction.tokens.first_divergence for s in self.samples if s.reduction.tokens.first_divergence is not None]
        return {
            "kl_mean": kl_mean,
            "kl_max": float(max(kls)) if kls else 0.0,
            "top1_agreement": float(np.mean([s.reduction.top1_agree for s in self.samples])) if self.samples else 1.0,
            "token_agreement": agreement,
            "first_divergence": min(divs) if divs else None,
            "gated": t.max_kl is not None or t.min_reduction_agreement is not None,
            "passed": passed,
        }

    def selection_summary(self) -> list[dict[str, Any]]:
        """Per reduction step (in order): kept tokens, flips summed and worst over samples, tie flips summed."""
        rows: dict[tuple[str, int], dict[str, Any]] = {}
        for s in self.samples:
            for st in (s.selection.steps if s.selection else []):
                r = rows.setdefault((st.tower, st.block), {"tower": st.tower, "block": st.block, "kept": st.kept,
                                                           "samples": 0, "flips": 0, "max_flips": 0, "tie_flips": 0})
                r["samples"] += 1
                r["flips"] += st.flips
                r["max_flips"] = max(r["max_flips"], st.flips)
                r["tie_flips"] += st.tie_flips
        return list(rows.values())

    def judge(self) -> None:
        """Fill `failures` (one line per failed gate, naming the stage / level and the numbers)."""
        t = self.thresholds
        fails: list[str] = []
        stat = {"mean": "mean_abs_err", "median": "median_abs_err"}.get(t.check_error_stat, "max_abs_err")
        for g, s in self.stage_summary().items():
            if s["passed"]:
                continue
            why = []
            if t.gate_tolerance and not s["within_tolerance"]:
                worst = _nanmax([getattr(c, stat) for smp in self.samples for c in smp.stages
                                 if _stage_group(c.name) == g and not c.within_tolerance])
                label = "max" if t.check_error_stat == "elemwise" else t.check_error_stat
                why.append(f"{label} |err| {worst:.3g} (atol {t.atol:g}, rtol {t.rtol:g}, check-error-stat {t.check_error_stat})")
            if t.min_cosine is not None and not s["min_cosine"] >= t.min_cosine:
                why.append(f"cosine {s['min_cosine']:.6f} < {t.min_cosine:g}")
            if t.max_norm_deviation is not None and not abs(s["worst_norm_ratio"] - 1.0) <= t.max_norm_deviation:
                why.append(f"norm ratio {s['worst_norm_ratio']:.4f} (|ratio - 1| > {t.max_norm_deviation:g})")
            if not why:
                why.append("non-finite output or shape mismatch")
            outs = s["failed_outputs"]
            which = "" if outs == [g] else f" ({', '.join(outs[:4])}{', ...' if len(outs) > 4 else ''})"
            fails.append(f"stage {g} failed{which}: {'; '.join(why)}")
        gs = self.greedy_summary()
        if not gs["passed"]:
            fails.append(
                f"greedy tokens: match rate {gs['match_rate']:.3f} < {t.min_token_match:g} "
                f"(first divergence at step {gs['first_divergence']})"
            )
        fs = self.forced_summary()
        if fs is not None and not fs["passed"]:
            fails.append(
                f"teacher-forced tokens: {fs['matches']} matches + {fs['near_ties']} near-ties of {fs['positions']} "
                f"= {fs['rate']:.3f} < --min-forced-match {t.min_forced_match:g} (first real disagreement at step "
                f"{fs['first_disagreement']}, reference margin up to {fs['worst_margin']:.3g} logit std > --tie-margin {t.tie_margin:g})"
            )
        rs = self.reduction_summary()
        if t.max_kl is not None and rs["kl_mean"] > t.max_kl:
            fails.append(f"reduction: mean first-token KL {rs['kl_mean']:.4g} > --max-kl {t.max_kl:g}")
        if t.min_reduction_agreement is not None and rs["token_agreement"] < t.min_reduction_agreement:
            fails.append(
                f"reduction: greedy agreement with the unreduced model {rs['token_agreement']:.3f} < "
                f"--min-reduction-agreement {t.min_reduction_agreement:g}"
            )
        for tr in self.task:
            if tr.bundle_accuracy < tr.reference_accuracy - t.max_accuracy_drop - 1e-12:
                fails.append(
                    f"answers ({tr.split}, {tr.n} questions): bundle accuracy {100 * tr.bundle_accuracy:.1f} % is more than "
                    f"{100 * t.max_accuracy_drop:g} points below PyTorch's {100 * tr.reference_accuracy:.1f} % (--max-accuracy-drop)"
                )
        self.failures = fails

    @property
    def passed(self) -> bool:
        return not self.failures

    # -- output ----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "tool": "ficoco-check",
            "passed": self.passed,
            "failures": list(self.failures),
            "bundle": self.bundle,
            "backend": self.backend,
            "device": self.device,
            "bundle_kind": self.bundle_kind,
            "thresholds": self.thresholds.to_dict(),
            "num_samples": len(self.samples),
            "max_new_tokens": self.max_new_tokens,
            "reference": dict(self.reference),
            "aggregate": {
                "stages": self.stage_summary(),
                "greedy": self.greedy_summary(),
                "forced": self.forced_summary(),
                "reduction": self.reduction_summary(),
                "task": [asdict(tr) for tr in self.task],
                "selection": self.selection_summary(),
            },
            "selection_note": self.selection_note,
            "samples": [s.to_dict() for s in self.samples],
            "tool_versions": dict(self.tool_versions),
            "seconds": round(self.seconds, 2),
        }

    def to_markdown(self) -> str:
        t = self.thresholds
        gates = []
        if t.gate_tolerance:
            gates.append(f"atol {t.atol:g}, rtol {t.rtol:g}, {t.check_error_stat}")
        if t.min_cosine is not None:
            gates.append(f"cosine >= {t.min_cosine:g}")
        if t.max_norm_deviation is not None:
            gates.append(f"|norm ratio - 1| <= {t.max_norm_deviation:g}")
        tokens = []
        if t.min_token_match is not None:
            tokens.append(f"free-running match >= {t.min_token_match:g}")
        if t.min_forced_match is not None:
            tokens.append(f"teacher-forced match or near-tie (<= {t.tie_margin:g} logit std) >= {t.min_forced_match:g}")
        lines = [
            f"# ficoco-check: {'PASS' if self.passed else 'FAIL'}",
            "",
            f"{self.bundle} ({self.bundle_kind}) on {self.backend} ({self.device}), {len(self.samples)} samples, "
            f"{self.max_new_tokens} new tokens; stages: {'; '.join(gates)}; tokens: {'; '.join(tokens) or 'reported only'}",
            "",
            "Stages are compared with the fp32 reference making the bundle's kept-token choices (where its "
            "graphs could be probed), so their errors are the arithmetic's; the choices that differ are the "
            "selection flips below.",
            "",
            "| stage | max abs err | mean abs err | min cosine | worst norm ratio | pass |",
            "|---|---:|---:|---:|---:|:---:|",
        ]
        for g, s in self.stage_summary().items():
            name = f"{g} ({s['outputs']})" if g.endswith(":present") else g
            lines.append(
                f"| {name} | {s['max_abs_err']:.3g} | {s['mean_abs_err']:.3g} | {s['min_cosine']:.6f} | "
                f"{s['worst_norm_ratio']:.4f} | {'yes' if s['passed'] else '**NO**'} |"
            )
        gs = self.greedy_summary()
        rs = self.reduction_summary()
        fd = "-" if gs["first_divergence"] is None else str(gs["first_divergence"])
        lines += [
            "",
            "| greedy tokens (backend vs reduced PyTorch) | match rate | identical samples | first divergence | pass |",
            "|---|---:|---:|---:|:---:|",
            f"| all samples | {gs['match_rate']:.3f} | {gs['identical_samples']}/{len(self.samples)} | {fd} | "
            f"{_verdict(gs)} |",
            "",
            "| reduction (reduced vs unreduced PyTorch) | KL mean | KL max | top-1 agreement | token agreement | pass |",
            "|---|---:|---:|---:|---:|:---:|",
            f"| all samples | {rs['kl_mean']:.4g} | {rs['kl_max']:.4g} | {rs['top1_agreement']:.3f} | "
            f"{rs['token_agreement']:.3f} | {_verdict(rs)} |",
            "",
            "| sample | image | prompt | token match | first divergence | KL | top-1 | reduction agreement |",
            "|---:|---|---|---:|---:|---:|:---:|---:|",
        ]
        for i, s in enumerate(self.samples):
            prompt = s.prompt if len(s.prompt) <= 40 else s.prompt[:37] + "..."
            prompt = prompt.replace("|", "\\|")
            d = "-" if s.greedy.first_divergence is None else str(s.greedy.first_divergence)
            lines.append(
                f"| {i} | {s.image} | {prompt} | {s.greedy.match_rate:.3f} | {d} | {s.reduction.kl:.4g} | "
                f"{'yes' if s.reduction.top1_agree else 'no'} | {s.reduction.tokens.match_rate:.3f} |"
            )
        fs = self.forced_summary()
        if fs is not None:
            fdis = "-" if fs["first_disagreement"] is None else str(fs["first_disagreement"])
            wm = "-" if fs["worst_margin"] is None else f"{fs['worst_margin']:.3g}"
            lines += [
                "",
                "| teacher-forced tokens (backend on the reference's greedy prefix) | positions | matches | near-ties "
                f"(<= {fs['tie_margin']:g} logit std) | rate | worst mismatch margin | first real disagreement | pass |",
                "|---|---:|---:|---:|---:|---:|---:|:---:|",
                f"| all samples | {fs['positions']} | {fs['matches']} | {fs['near_ties']} | {fs['rate']:.3f} | {wm} | {fdis} | "
                f"{_verdict(fs)} |",
            ]
        if self.task:
            lines += [
                "",
                f"| answers (easy-vqa test, exact match) | questions | bundle accuracy | PyTorch accuracy | same answers | pass (drop <= {100 * t.max_accuracy_drop:g} pt) |",
                "|---|---:|---:|---:|---:|:---:|",
            ]
            for tr in self.task:
                ok = tr.bundle_accuracy >= tr.reference_accuracy - t.max_accuracy_drop - 1e-12
                lines.append(f"| {tr.split} | {tr.n} | {100 * tr.bundle_accuracy:.1f} % | {100 * tr.reference_accuracy:.1f} % | "
                             f"{tr.same_answers}/{tr.n} | {'yes' if ok else '**NO**'} |")
        sel = self.selection_summary()
        if sel:
            lines += [
                "",
                "| selection (kept tokens vs fp32 PyTorch, info) | block | kept | flips (all samples) | worst sample | of them ties |",
                "|---|---:|---:|---:|---:|---:|",
                *[f"| {r['tower']} step {i} | {r['block']} | {r['kept']} | {r['flips']} | {r['max_flips']} | {r['tie_flips']} |"
                  for i, r in enumerate(sel)],
            ]
        if self.selection_note:
            lines += ["", f"Selection: {self.selection_note}"]
        if self.failures:
            lines += ["", "Failed:", *[f"- {f}" for f in self.failures]]
        return "\n".join(lines) + "\n"


def write_report(report: CheckReport, report_dir: Path) -> tuple[Path, Path]:
    """check.json and check.md in `report_dir`, each written to a temp file and renamed into place."""
    d = Path(report_dir)
    j, m = d / REPORT_JSON, d / REPORT_MD
    write_atomic(j, json.dumps(_json_safe(report.to_dict()), indent=2) + "\n", make_parents=True)
    write_atomic(m, report.to_markdown(), make_parents=True)
    return j, m


def _json_safe(x: Any) -> Any:
    """NaN/inf (a broken output) as strings, so check.json stays strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


#: The packages a check report records: the export stack and the backends.
CHECK_PACKAGES = ("ficoco-export", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt")


def tool_versions() -> dict[str, str]:
    """The versions of CHECK_PACKAGES that are installed (`bundle.manifest.tool_versions`)."""
    from bundle.manifest import tool_versions as versions

    return {k: v for k, v in versions(CHECK_PACKAGES).items() if v != "not installed"}
