"""What every part of `ficoco-bench` shares: its constants, its two errors, the run's options, one
configuration's description, and the image lookup."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPORT_SCHEMA = 1
DEFAULT_RATIOS: tuple[float, ...] = (1.0, 0.5, 0.25, 0.11)
SWEEP_VARIANTS: tuple[str, ...] = ("V", "L", "VL")
#: the issue's target: measured TTFT speedup >= TARGET_EFFICIENCY x the theoretical FLOPs speedup
TARGET_EFFICIENCY = 0.9
PROFILED_STAGES: tuple[str, ...] = ("vision_encoder", "embed_tokens", "decoder_prefill")
TIMED_FIELDS: tuple[str, ...] = ("vision_ms", "embed_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s", "step_ms_mean")
DEFAULT_IMAGE = "astronaut"
DEFAULT_PROMPT = "What is in the picture?"


class BenchInputError(ValueError):
    """A bench request that cannot be served (bad option, unusable bundle); exit status 2."""


class BenchFailed(RuntimeError):
    """A configuration's worker failed while running (the message carries the tail of its log); exit 1."""


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class BenchOptions:
    """Everything one `ficoco-bench` run is asked to do (the CLI flags, parsed and checked)."""

    bundle: Path
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    variants: tuple[str, ...] = ()  # empty: the bundle's own variant
    also: tuple[Path, ...] = ()
    work_dir: Path | None = None  # default: BUNDLE/../.bench-<name>
    report_dir: Path | None = None  # default: BUNDLE/reports
    warmup: int = 1
    repeats: int = 3
    max_new_tokens: int = 16
    threads: int = 0  # 0: every core this process may use
    image: str = DEFAULT_IMAGE
    prompt: str = DEFAULT_PROMPT
    pytorch: bool = True
    profile: bool = True
    verify: bool = True
    layers: dict[str, int | None] = field(default_factory=dict)  # v_start, v_end, l_start, l_end overrides

    def resolved_threads(self) -> int:
        return self.threads if self.threads > 0 else available_cores()

    def resolved_work_dir(self) -> Path:
        return self.work_dir if self.work_dir is not None else self.bundle.resolve().parent / f".bench-{self.bundle.resolve().name}"

    def resolved_report_dir(self) -> Path:
        return self.report_dir if self.report_dir is not None else self.bundle / "reports"


@dataclass
class ConfigSpec:
    """One configuration to time: a bundle (BUNDLE, a sibling, an --also) or transformers' generate."""

    label: str
    kind: str  # "bundle" | "pytorch"
    role: str  # "unreduced" | "sweep" | "also" | "pytorch"
    variant: str
    method: str
    ratio: float
    bundle: str | None = None
    origin: str = ""  # "BUNDLE" | "exported" | "cached" | "--also" | "transformers"
    schedule: dict[str, Any] | None = None
    request: dict[str, Any] | None = None


def layer_ranges(schedule: dict[str, Any]) -> dict[str, int]:
    """The block ranges a schedule's steps span: v_start/v_end (vision) and l_start/l_end (decoder)."""
    out: dict[str, int] = {}
    for stage, (lo, hi) in (("vision", ("v_start", "v_end")), ("decoder", ("l_start", "l_end"))):
        layers = [int(s["layer"]) for s in (schedule.get(stage) or {}).get("steps", [])]
        if layers:
            out[lo], out[hi] = min(layers), max(layers)
    return out


def resolve_image(spec: str) -> Any:
    """An image file path, or the name of a built-in test photo (ficoco.images)."""
    from ficoco.preprocess import load_image

    if Path(spec).expanduser().is_file():
        return load_image(Path(spec).expanduser())
    from ficoco.images import test_image, test_images

    names = [n for n, _ in test_images()]
    if spec in names:
        return test_image(spec)
    raise BenchInputError(f"--image {spec!r} is neither an image file nor a built-in test photo ({', '.join(names)})")
