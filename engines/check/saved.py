"""Saved references: judge a bundle on a device that has no PyTorch (`ficoco-check --save-reference` /
`--reference`, Polygraphy's `--save-outputs` / `--load-outputs` idea).

On a machine with PyTorch, `save_reference` runs the ordinary check (`run_check`) and records, per sample,
what the reference computed: every stage output, the inputs each stage of a backend is fed (the pixel
values, text ids, image offset, visual tokens, embeddings, the prefill's K/V, the greedy token's embedding
and position), the reference's greedy tokens with the logits each was chosen from, the reduction's cost
(level 3) and the kept-token flips. On the device, `check_with_reference` loads the bundle's backend and
judges it against those arrays with the same code and the same gates as a live check
(`engines.check.runner.judge_sample`): stages, free-running and teacher-forced greedy tokens. Nothing
there imports torch or transformers.

The file is one `.npz` (numpy's zip of arrays, read with `allow_pickle=False`) with a JSON header
(`meta`): the format and version, the bundle it was saved for (the manifest's integrity digest, which
covers every file of the bundle), the samples (image name, prompt, the reference's tokens) and the check's
settings. A reference saved for another bundle (any file changed), another format version, or other
inputs than the ones asked for is refused with a message that says so and how to make the right one.
Level 4 (easy-vqa answer accuracy) needs the dataset and is not saved; the device report says so.

The stage reference follows the kept-token choices the bundle's ONNX graphs made on the saving machine
(ONNX Runtime on CPU), as the live check's does; a device backend whose choices differ (a reduced-precision
TensorRT engine breaking a near-tie) shows it as stage error, and the token levels judge it end to end.
Size: the K/V of every layer in fp32, e.g. ~0.2 GB per sample for LLaVA-1.5-7B at 64 text tokens.
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from bundle.compare import StageRun, token_agreement
from bundle.flips import SelectionCheck
from bundle.names import EMBED, PREFILL, VISION
from engines.check.inputs import Sample
from engines.check.levels import ReductionCost
from engines.check.options import (
    CheckInputError,
    CheckOptions,
    ProgressCallback,
    bundle_kind,
    resolve_thresholds,
)
from engines.check.report import CheckReport, SampleResult
from ficoco.atomic import atomic_path

FORMAT = "ficoco-check-reference"
VERSION = 1


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = x.float() if str(x.dtype) in ("torch.bfloat16", "torch.float16") else x
        return x.numpy()
    return np.asarray(x)


def bundle_integrity(bundle: str | os.PathLike[str]) -> str:
    """The bundle's manifest integrity digest (it covers every file of the bundle through their hashes)."""
    path = Path(bundle) / "manifest.json"
    try:
        return str(json.loads(path.read_text()).get("integrity", ""))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckInputError(f"cannot read {path}: {err}") from err


class ReferenceWriter:
    """Collects what `run_check(record=...)` hands over, then writes the file atomically."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.samples: list[dict[str, Any]] = []

    def __call__(self, sample: Sample, run: StageRun, ref_tokens: list[int], rows: np.ndarray,
                 cost: ReductionCost, flips: SelectionCheck | None) -> None:
        i = len(self.samples)
        k = f"s{i}"
        for name, value in run.outputs.items():
            self.arrays[f"{k}/out/{name}"] = _np(value)
        for name, value in (("pixel_values", run.pixel_values), ("input_ids", run.input_ids),
                            ("image_offset", run.image_offset), ("step_embeds", run.step_embeds),
                            ("step_position", run.step_position), ("rows", rows)):
            self.arrays[f"{k}/{name}"] = _np(value)
        self.samples.append({
            "image": sample.image_name, "prompt": sample.prompt, "tokens": [int(t) for t in ref_tokens],
            "outputs": list(run.outputs), "kv": len(run.past),
            "cost": {"kl": cost.kl, "top1_agree": cost.top1_agree, "unreduced_tokens": cost.tokens.reference_tokens},
            "flips": None if flips is None else flips.to_dict(),
        })

    def write(self, path: Path, bundle: str | os.PathLike[str], report: CheckReport) -> None:
        meta = {
            "format": FORMAT, "version": VERSION,
            "bundle": {"path": str(bundle), "integrity": bundle_integrity(bundle), "kind": report.bundle_kind},
            "max_new_tokens": report.max_new_tokens,
            "reference": report.reference, "selection_note": report.selection_note,
            "tool_versions": report.tool_versions, "samples": self.samples,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        arrays = dict(self.arrays)
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
        with atomic_path(path, make_parents=True) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)


def save_reference(bundle: str | os.PathLike[str], path: str | os.PathLike[str], options: CheckOptions | None = None,
                   progress: ProgressCallback | None = None) -> CheckReport:
    """Run the check against PyTorch (its report is returned) and save the reference's results to `path`."""
    from engines.check.runner import run_check

    writer = ReferenceWriter()
    report = run_check(bundle, options, progress, record=writer)
    writer.write(Path(path), bundle, report)
    return report


class SavedReference:
    """A reference file, read and checked for its format."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckInputError(f"{self.path}: no such reference file (write one with ficoco-check BUNDLE --save-reference FILE "
                                  "on a machine with PyTorch)")
        try:
            self.data = np.load(self.path, allow_pickle=False)
            self.meta: dict[str, Any] = json.loads(self.data["meta"].tobytes().decode("utf-8"))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckInputError(f"{self.path} is not a ficoco-check reference ({type(err).__name__}: {err})") from err
        if self.meta.get("format") != FORMAT:
            raise CheckInputError(f"{self.path} is not a ficoco-check reference (format {self.meta.get('format')!r})")
        if self.meta.get("version") != VERSION:
            raise CheckInputError(f"{self.path} is a version {self.meta.get('version')} reference; this ficoco-check reads "
                                  f"version {VERSION}: save it again with this version")

    def check_fits(self, bundle: str | os.PathLike[str], options: CheckOptions) -> None:
        """CheckInputError unless the file was saved for this bundle and these inputs."""
        saved = self.meta["bundle"]
        here = bundle_integrity(bundle)
        if saved.get("integrity") != here:
            raise CheckInputError(
                f"{self.path} was saved for the bundle {saved.get('path')} (integrity {str(saved.get('integrity'))[:12]}…), "
                f"not for {bundle} (integrity {here[:12]}…): a reference judges exactly the bundle it was saved "
                "with; save one for this bundle (ficoco-check BUNDLE --save-reference FILE, on a machine with PyTorch)"
            )
        if options.images is not None or options.prompts is not None or options.num_samples is not None:
            raise CheckInputError(
                "--images, --prompts and --num-samples choose the inputs of a reference when it is saved; with "
                f"--reference the inputs are the ones saved in {self.path}: leave them out, or save another reference"
            )
        n = self.meta["max_new_tokens"]
        if options.max_new_tokens is not None and int(options.max_new_tokens) != int(n):
            raise CheckInputError(f"{self.path} holds {n} greedy tokens per sample, not {options.max_new_tokens}: leave "
                                  "--max-new-tokens out, or save another reference")

    def run(self, i: int) -> StageRun:
        k = f"s{i}"
        s = self.meta["samples"][i]
        out = {name: self.data[f"{k}/out/{name}"] for name in s["outputs"]}
        past = [out[f"{PREFILL}:present.{j // 2}.{'key' if j % 2 == 0 else 'value'}"] for j in range(int(s["kv"]))]
        return StageRun(
            out, self.data[f"{k}/pixel_values"], self.data[f"{k}/input_ids"], self.data[f"{k}/image_offset"],
            out[f"{VISION}:visual_tokens"], out[f"{EMBED}:inputs_embeds"], out[f"{PREFILL}:logits"], past,
            self.data[f"{k}/step_embeds"], self.data[f"{k}/step_position"],
        )


def check_with_reference(bundle: str | os.PathLike[str], reference: str | os.PathLike[str],
                         options: CheckOptions | None = None, progress: ProgressCallback | None = None) -> CheckReport:
    """Judge the bundle's backend against a saved reference, with the gates of a live check and no PyTorch."""
    from bundle.frontend import Frontend
    from engines.check.report import tool_versions
    from engines.check.runner import judge_sample
    from engines.runtime import Pipeline

    options = options or CheckOptions()
    options.validate()
    t_start = time.perf_counter()
    front = Frontend.from_bundle(bundle, verify=options.verify)
    saved = SavedReference(reference)
    saved.check_fits(bundle, options)
    thresholds = resolve_thresholds(front.manifest, options)
    n_new = int(saved.meta["max_new_tokens"])
    pipe = Pipeline.from_bundle(front, backend=options.backend, verify=options.verify, device=options.device,
                                ort_provider=options.ort_provider, threads=options.threads)
    report = CheckReport(
        bundle=str(Path(bundle)), backend=pipe.backend, device=str(pipe.stages.device),
        bundle_kind=bundle_kind(front.manifest), thresholds=thresholds, max_new_tokens=n_new,
        reference={**saved.meta["reference"], "saved_reference": str(saved.path), "saved_at": saved.meta.get("saved_at")},
        samples=[], tool_versions=tool_versions(),
        selection_note="; ".join(n for n in (saved.meta.get("selection_note") or "",
                                             "the flips were measured when the reference was saved") if n),
    )
    samples = saved.meta["samples"]
    for i, s in enumerate(samples):
        t0 = time.perf_counter()
        run = saved.run(i)
        ids, _ = front.tokenize([s["prompt"]])
        if not np.array_equal(ids, run.input_ids):
            raise CheckInputError(f"sample {i}: this runtime tokenizes {s['prompt']!r} differently from the machine that "
                                  "saved the reference, although the bundle is the same: the tokenizers installs differ")
        result = judge_sample(pipe, run, list(s["tokens"]), saved.data[f"s{i}/rows"], n_new, thresholds)
        c = s["cost"]
        cost = ReductionCost(float(c["kl"]), bool(c["top1_agree"]), token_agreement(s["tokens"], c["unreduced_tokens"]))
        flips = None if s.get("flips") is None else SelectionCheck.from_dict(s["flips"])
        report.samples.append(SampleResult(s["image"], s["prompt"], result.stages, result.greedy, cost,
                                           time.perf_counter() - t0, flips, result.forced))
        if progress is not None:
            progress(i + 1, len(samples), f"{s['image']} / {s['prompt']}")
    report.seconds = time.perf_counter() - t_start
    report.judge()
    return report
