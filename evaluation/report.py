"""`ficoco-eval`'s report: reports/eval.json (everything), eval.md (the tables), eval.png (accuracy vs TFLOPs)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evaluation.grid import EvalResult
from ficoco import vqa
from ficoco.atomic import atomic_path, write_atomic

log = logging.getLogger(__name__)


def _pct(x: float | None) -> str:
    return "–" if x is None or x != x else f"{100 * x:.1f}"


def _budget_key(r: EvalResult) -> int:
    return r.visual_tokens if r.visual_tokens is not None else -1


def to_markdown(results: Sequence[EvalResult], meta: dict[str, Any]) -> str:
    lines = [f"# ficoco-eval: {meta.get('model', '?')}", ""]
    lines.append(f"Command: `{meta.get('command', '')}`  ")
    lines.append(f"Questions: {', '.join(f'{k} {v}' for k, v in meta.get('questions', {}).items())}; "
                 f"exact match of the first answer word; greedy decoding. Machine: {meta.get('machine', '')}.")
    lines.append("")
    splits = list(dict.fromkeys(r.split for r in results))
    budgets = sorted({r.visual_tokens for r in results if r.visual_tokens}, reverse=True)
    labels = list(dict.fromkeys(r.label for r in results))
    by = {(r.label, r.split, r.visual_tokens): r for r in results}
    lines.append("## Accuracy (%) by visual tokens kept")
    lines.append("")
    head = "| method | " + " | ".join(f"{s} @{b}" for s in splits for b in budgets) + " |"
    lines += [head, "|" + "---|" * (1 + len(splits) * len(budgets))]
    for lab in labels:
        cells = []
        for s in splits:
            for b in budgets:
                r = by.get((lab, s, b))
                if r is None and lab.startswith("question only"):
                    r = next((x for x in results if x.label == lab and x.split == s), None)
                cells.append(_pct(r.score["accuracy"]) if r is not None else "")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("## Accuracy (%) by question type")
    lines.append("")
    types = [t for t in vqa.QTYPES if any(t in r.score["by_type"] for r in results)]
    lines += ["| method | tokens | TFLOPs | split | all | " + " | ".join(types) + " |",
              "|" + "---|" * (5 + len(types))]
    for r in sorted(results, key=lambda r: (labels.index(r.label), -_budget_key(r), splits.index(r.split))):
        bt = r.score["by_type"]
        tfl = "–" if r.tflops is None else f"{r.tflops:.4f}"
        lines.append(f"| {r.label} | {r.visual_tokens if r.visual_tokens is not None else '–'} | {tfl} | {r.split} | "
                     f"{_pct(r.score['accuracy'])} | " + " | ".join(_pct(bt.get(t)) for t in types) + " |")
    agreements = meta.get("agreement")
    if agreements:
        lines += ["", "## Bundles against the reduced PyTorch model", "",
                  "| bundle | split | same answers | bundle accuracy | PyTorch accuracy |", "|---|---|---|---|---|"]
        for a in agreements:
            lines.append(f"| {a['bundle']} | {a['split']} | {a['same']}/{a['n']} ({_pct(a['same'] / a['n'])} %) | "
                         f"{_pct(a['bundle_accuracy'])} | {_pct(a['reference_accuracy'])} |")
    return "\n".join(lines) + "\n"


def plot(results: Sequence[EvalResult], path: Path) -> bool:
    """Accuracy vs TFLOPs per method, one panel per split. False (and a log line) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install matplotlib)", path.name)
        return False
    splits = list(dict.fromkeys(r.split for r in results))
    fig, axes = plt.subplots(1, len(splits), figsize=(6.5 * len(splits), 4.6), squeeze=False)
    for ax, s in zip(axes[0], splits, strict=True):
        rs = [r for r in results if r.split == s]
        base = next((r for r in rs if r.label == "unreduced"), None)
        blind = next((r for r in rs if r.label.startswith("question only")), None)
        for lab in dict.fromkeys(r.label for r in rs):
            pts = sorted((r.tflops, r.score["accuracy"]) for r in rs if r.label == lab and r.tflops is not None)
            if not pts or lab == "unreduced":
                continue
            if base is not None and base.tflops is not None:
                pts = pts + [(base.tflops, base.score["accuracy"])]
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", ms=3, lw=1.2, label=lab)
        if base is not None and base.tflops is not None:
            ax.scatter([base.tflops], [100 * base.score["accuracy"]], color="k", zorder=5, label="unreduced")
        if blind is not None:
            ax.axhline(100 * blind.score["accuracy"], color="gray", ls="--", lw=1, label="question only")
        ax.set_title(f"{s} test split")
        ax.set_xlabel("TFLOPs (vision + prefill)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path, make_parents=True) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True


def write(results: Sequence[EvalResult], meta: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    data = {"meta": meta, "results": [r.to_dict() for r in results]}
    paths = {"json": out_dir / "eval.json", "md": out_dir / "eval.md", "png": out_dir / "eval.png"}
    write_atomic(paths["json"], (json.dumps(data, indent=1) + "\n").encode(), make_parents=True)
    write_atomic(paths["md"], to_markdown(results, meta).encode(), make_parents=True)
    if not plot(results, paths["png"]):
        paths.pop("png")
    return paths
