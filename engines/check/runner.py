"""`run_check`: the accuracy gate of a bundle against PyTorch, at four levels.

For a handful of (image, prompt) pairs, the bundle's backend (`Pipeline.from_bundle`, ONNX Runtime or
TensorRT) is compared with the reduced PyTorch model rebuilt from the manifest (`reference_for_bundle`):

1. **stages** (`bundle.compare.compare_stages`): every stage on the PyTorch inputs of that stage, so each
   stage's error is its own (vision_encoder visual tokens; embed_tokens; decoder_prefill logits and every
   present K/V; one decoder_step's logits and presents). Each output is judged with `--atol/--rtol/
   --check-error-stat` (Polygraphy's semantics), its cosine similarity and its norm ratio ||got|| / ||ref||.
   The reference here makes the bundle's kept-token choices (read from the bundle's ONNX graphs,
   `ficoco.reduced_llava.FollowedSelection`), so a stage's error is its arithmetic's; how many choices
   differ is counted apart (the selection flips below) and judged end to end by levels 2 and 4.
2. **greedy tokens**: greedy generation through the runtime vs the reduced PyTorch model (the same loop,
   `ficoco.generation`, no stop token): exact-match rate over positions, first divergence
   (`bundle.compare.token_agreement`); and teacher-forced, the backend's choice at every position of the
   reference's own greedy path (`ficoco.generation.forced_logits`, `bundle.compare.forced_agreement`): a
   match, a near-tie (the reference's own margin <= `--tie-margin` logit std) or a real disagreement.
   fp32 bundles gate the first (identical), fp16 bundles the second (no real disagreement).
3. **what the reduction costs** (informational unless `--max-kl` / `--min-reduction-agreement`): the
   reduced PyTorch model vs the unreduced transformers model on the same inputs: KL(p_unreduced ||
   p_reduced) of the first generated token, its top-1 agreement, and greedy token agreement
   (`LlavaForConditionalGeneration.generate`).
4. **answers** (the `shapes` model): accuracy of the bundle vs the reduced PyTorch model on easy-vqa test
   questions (`--task-images`, `--max-accuracy-drop`).

Beside the gates, for information: the **selection flips** of every reduction step, i.e. how many kept
tokens of the bundle's ONNX graphs differ from the fp32 reference's (`exporter.selection`), and how many
of those are ties between patches of identical pixels.

Default thresholds depend on the bundle (`DEFAULT_THRESHOLDS`: fp32, fp16, quantized); every one can be
overridden. The report goes to BUNDLE/reports/check.json and check.md (atomic writes; reports/ is not
part of the bundle's hashes).

    report = run_check("out/tiny-vl25", CheckOptions(num_samples=2, max_new_tokens=8))
    print(report.to_markdown()); assert report.passed
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bundle.compare import (
    ForcedAgreement,
    OutputComparison,
    StageRun,
    TokenAgreement,
    backend_stages,
    compare_outputs,
    forced_agreement,
    reference_stages,
    token_agreement,
)
from bundle.flips import SelectionCheck
from engines.check.inputs import Sample, load_images, load_prompts, make_samples, reference_for_bundle
from engines.check.levels import (
    TASK_IMAGES,
    TASK_MODELS,
    ReductionCost,
    check_task,
    reduction_cost,
    selection_checker,
)
from engines.check.options import (
    DEFAULT_MAX_NEW_TOKENS,
    CheckOptions,
    ProgressCallback,
    Thresholds,
    bundle_kind,
    resolve_thresholds,
)
from engines.check.report import CheckReport, SampleResult, tool_versions


@dataclass
class SampleJudgement:
    """Levels 1 and 2 of one sample: the bundle against a reference run (live or saved)."""

    stages: list[OutputComparison]
    greedy: TokenAgreement
    forced: ForcedAgreement


def judge_sample(pipe: Any, run: StageRun, ref_tokens: list[int], ref_rows: np.ndarray, n_new: int,
                 thresholds: Thresholds) -> SampleJudgement:
    """The bundle's stages on the reference's inputs of each stage (`run`), its free-running greedy tokens,
    and teacher-forced along the reference's tokens (`ref_rows`: the logits [n, V] each was chosen from).
    Torch-free: the same code judges against a live reference and against a saved one."""
    from ficoco.generation import forced_logits

    comparisons = compare_outputs(backend_stages(pipe.stages, run), run.outputs, thresholds.output_gates())
    got_tokens = pipe.generate_ids(run.pixel_values, run.input_ids, run.image_offset, n_new, stop_token_ids=[])[0].tolist()
    # teacher forcing: the bundle along the reference's own tokens, so every position has one prefix
    path = np.asarray([ref_tokens], dtype=np.int64)
    got_rows = forced_logits(pipe.stages, pipe.stages.encode_image(run.pixel_values), run.input_ids, run.image_offset, path)
    forced = forced_agreement(got_rows[0], ref_rows, ref_tokens, thresholds.tie_margin)
    return SampleJudgement(comparisons, token_agreement(got_tokens, ref_tokens), forced)


#: what `run_check(record=...)` hands over per sample: the sample, the stage run, the reference's greedy
#: tokens and the logits each was chosen from, the reduction's cost and the selection flips
Recorder = Callable[[Sample, StageRun, list[int], np.ndarray, ReductionCost, "SelectionCheck | None"], None]


def run_check(bundle: str | os.PathLike[str], options: CheckOptions | None = None, progress: ProgressCallback | None = None,
              record: Recorder | None = None) -> CheckReport:
    """Check a bundle's backend against PyTorch at the four levels; returns the judged report.

    Raises BundleError (missing / modified / graph-only bundle), CheckInputError / ImageError /
    InputError (bad images, prompts, options, reference model) before any sample runs. `record`, when
    given, receives each sample's reference results (`engines.check.saved` writes them to a file).
    """
    import torch

    from bundle.frontend import Frontend
    from engines.runtime import Pipeline
    from ficoco.generation import decode_tokens, host_logits

    options = options or CheckOptions()
    options.validate()
    t_start = time.perf_counter()
    front = Frontend.from_bundle(bundle, verify=options.verify)  # BundleError: missing, modified, graph-only
    samples = make_samples(load_images(options.images), load_prompts(options.prompts), options.num_samples)
    n_new = min(DEFAULT_MAX_NEW_TOKENS, front.max_new_tokens_limit) if options.max_new_tokens is None else int(options.max_new_tokens)
    for s in samples:  # every prompt within the bundle's limits, before anything heavy is loaded
        front.prepare_text([s.prompt], n_new, [])
    thresholds = resolve_thresholds(front.manifest, options)
    loaded, reduced = reference_for_bundle(front.manifest, options.model)
    pipe = Pipeline.from_bundle(
        front, backend=options.backend, verify=options.verify, device=options.device,
        ort_provider=options.ort_provider, threads=options.threads,
    )
    source = front.manifest.source_model
    report = CheckReport(
        bundle=str(Path(bundle)),
        backend=pipe.backend,
        device=str(pipe.stages.device),
        bundle_kind=bundle_kind(front.manifest),
        thresholds=thresholds,
        max_new_tokens=n_new,
        reference={
            "model": loaded.name,
            "revision": loaded.revision,
            "bundle_source_model": source.get("name"),
            "bundle_revision": source.get("revision"),
            "revision_matches": source.get("revision") in (None, loaded.revision),
            "dtype": "float32",
        },
        samples=[],
        tool_versions=tool_versions(),
    )
    ref_stages = reduced.stages()
    selection, report.selection_note = selection_checker(front.bundle, options.threads)
    for i, s in enumerate(samples):
        t0 = time.perf_counter()
        px = torch.from_numpy(pipe.preprocess([s.image]))
        ids, offsets = (torch.from_numpy(a) for a in pipe.tokenize([s.prompt]))
        flips = None
        if selection is not None:
            with torch.inference_mode():
                flips = selection.check(reduced, px, reduced.embed_text(ids), offsets)
            report.selection_note = report.selection_note or flips.note
        follow = None if flips is None else flips.follow
        # the stages against the reference making the bundle's kept-token choices: arithmetic error only
        run = reference_stages(reduced.stages(follow), px, ids, offsets)
        with torch.inference_mode():  # greedy tokens and level 3: the reference making its own choices
            if follow is None:  # its vision and prefill on these inputs already ran above
                ref_visual, ref_logits, ref_past = run.visual, run.logits, run.past
            else:
                ref_visual = ref_stages.encode_image(px)
                ref_logits, ref_past = ref_stages.prefill(ref_stages.embed(ids), ref_visual, offsets)
            ref_rows: list[np.ndarray] = []  # the logits each reference token was chosen from
            ref_ids = decode_tokens(ref_stages, ref_visual, ids, offsets, n_new, prefilled=(ref_logits, ref_past),
                                    on_logits=ref_rows.append)
        rows = np.stack(ref_rows, axis=1)[0]
        cost = reduction_cost(loaded, px, ids, int(offsets[0]), torch.from_numpy(host_logits(ref_logits)[0]),
                              ref_ids[0].tolist(), n_new)
        if record is not None:
            record(s, run, ref_ids[0].tolist(), rows, cost, flips)
        result = judge_sample(pipe, run, ref_ids[0].tolist(), rows, n_new, thresholds)
        report.samples.append(SampleResult(s.image_name, s.prompt, result.stages, result.greedy, cost,
                                           time.perf_counter() - t0, flips, result.forced))
        if progress is not None:
            progress(i + 1, len(samples), f"{s.image_name} / {s.prompt}")
    task_images = options.task_images
    if task_images is None:
        task_images = TASK_IMAGES if loaded.name in TASK_MODELS else 0
    if task_images:
        report.task = check_task(pipe, ref_stages, loaded, task_images)
    report.seconds = time.perf_counter() - t_start
    report.judge()
    return report
