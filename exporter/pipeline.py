"""`export_bundle`: model + budget -> a complete, validated bundle directory (what `ficoco-export` runs)."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bundle import layout as B
from bundle.manifest import GraphRecord, Manifest, tool_versions, write_manifest
from bundle.names import graph_names
from exporter.export import ExportOptions, check_graph, example_inputs, export_graph, graph_io, trt_profiles
from exporter.reuse import GraphReuse, graph_key
from exporter.validate import ReducedPrecisionGates, validate_bundle_graphs
from ficoco.geometry import LlavaGeometry
from ficoco.models import LoadedModel, load_config, load_model
from ficoco.planner import ScheduleRequest
from ficoco.reduced_llava import ReducedLlava

log = logging.getLogger(__name__)

class LintFailed(RuntimeError):
    """A graph uses an op or attribute TensorRT would reject (the message lists node, op and reason)."""


Progress = Callable[[str, str], None]  # (stage, event) with event in {"start", "done"}


@dataclass(frozen=True)
class ValidationOptions:
    enabled: bool = True
    atol: float = 1e-4
    rtol: float = 1e-3
    decode_steps: int = 16
    image: str = "astronaut"
    question: str = "What is in the picture?"
    #: open each graph in ONNX Runtime only while it runs (for bundles larger than RAM once ONNX Runtime's
    #: CPU provider has upcast their fp16 weights); slower
    low_memory: bool = False
    #: the gates of an fp16 / bf16 bundle (cosine, norm ratio, greedy match; `exporter.validate`)
    reduced_precision: ReducedPrecisionGates = ReducedPrecisionGates()

    def __post_init__(self) -> None:
        import math

        for name, v in (("--atol", self.atol), ("--rtol", self.rtol)):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 (got {v})")
        if self.decode_steps < 1:
            raise ValueError(f"--decode-steps must be at least 1 (got {self.decode_steps}); use --no-validate to skip validation")


def check_context(config: Any, opts: ExportOptions) -> None:
    """ValueError when the longest sequence the shape ranges allow (text + unreduced visual tokens + new
    tokens) exceeds the decoder's context (`max_position_embeddings`): checked from the config, before any
    weight is loaded."""
    geometry = LlavaGeometry.from_config(config)
    text = getattr(config, "text_config", config)
    limit = int(getattr(text, "max_position_embeddings", 0) or 0)
    need = opts.max_text_len + geometry.visual_tokens + opts.max_new_tokens
    if limit and need > limit:
        raise ValueError(
            f"--max-text-len {opts.max_text_len} + {geometry.visual_tokens} visual tokens + --max-new-tokens "
            f"{opts.max_new_tokens} = {need} positions, more than the decoder's context of {limit} "
            "(max_position_embeddings); lower --max-text-len or --max-new-tokens"
        )


#: The packages whose versions a manifest records (the export stack).
EXPORT_PACKAGES = ("ficoco-export", "torch", "transformers", "onnx", "onnxruntime", "onnxscript")


def _meta_model(name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The model's architecture without weights (meta device) in the export precision, for --graph-only.

    The dtype is set explicitly: a checkpoint config's own `dtype` (float16 for llava-1.5) must not decide.
    """
    from transformers import LlavaForConditionalGeneration

    config = load_config(name)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        return LlavaForConditionalGeneration(config).to(dtype).eval()


def _sample_inputs(loaded: LoadedModel, opts: ExportOptions, v: ValidationOptions) -> tuple[torch.Tensor, torch.Tensor, int]:
    from ficoco.images import test_image
    from ficoco.inputs import encode_prompt, format_prompt
    from ficoco.preprocess import preprocess_image

    batch = 2 if opts.max_batch_size > 1 else 1
    names = [v.image, "chelsea"][:batch]
    px = torch.cat([preprocess_image(test_image(n), loaded.processor_config) for n in names]).to(opts.dtype)
    prompt = encode_prompt(loaded.tokenizer, format_prompt(loaded.chat_template, v.question), loaded.image_token_id)
    return px, prompt.text_ids.repeat(batch, 1), prompt.image_offset


def export_bundle(
    model: str | LoadedModel,
    request: ScheduleRequest,
    out: str | Path,
    opts: ExportOptions | None = None,
    validation: ValidationOptions | None = None,
    *,
    force: bool = False,
    lint: bool = True,
    lint_target: str = "trt10",
    progress: Progress | None = None,
    reuse: GraphReuse | None = None,
) -> Path:
    """Export `model` reduced per `request` into the bundle directory `out`; returns its path.

    `reuse`: graphs already exported from the same loaded model in this process (a sweep's earlier
    bundles, `exporter.reuse`) are linked instead of exported again; this bundle's graphs join it.

    Raises ModelNotFoundError / PlanError / ExportError / ValidationError / LintFailed / BundleError;
    on any error or interrupt nothing is left at `out`.
    """
    opts = opts or ExportOptions()
    validation = validation or ValidationOptions(enabled=not opts.graph_only)
    notify = progress or (lambda stage, event: None)
    t0 = time.perf_counter()

    check_context(model.model.config if isinstance(model, LoadedModel) else load_config(model), opts)
    notify("load", "start")
    if opts.graph_only:
        name = model if isinstance(model, str) else model.name
        hf = _meta_model(name, opts.dtype)
        loaded = None
        source = {"name": name, "source": f"config of {name} (graph only, no weights)", "revision": None}
    else:
        # loaded once, in the export precision: a 7B fp16 checkpoint is never held in fp32 (28 GB); the
        # validation's fp32 reference computes these weights in fp32 one layer at a time (ficoco.upcast)
        loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype=opts.dtype)
        hf = loaded.model
        if next(hf.parameters()).dtype != opts.dtype:  # a model passed in at another precision: keep it as it is
            hf = copy.deepcopy(loaded.model).to(opts.dtype)
        source = {"name": loaded.name, "source": loaded.source, "revision": loaded.revision}
    geometry = LlavaGeometry.from_config(hf.config)
    schedule = request.make(geometry)
    reduced = ReducedLlava(hf, schedule).eval()
    notify("load", "done")

    device = "meta" if opts.graph_only else "cpu"
    with B.staging_dir(out, force=force) as stage_dir:
        onnx_dir = stage_dir / B.ONNX_DIR
        examples = example_inputs(reduced, opts, device=device)
        graphs: dict[str, Any] = {}
        keys: dict[str, str | None] = {}
        for name in graph_names(len(reduced.segments)):
            notify(name, "start")
            path = onnx_dir / f"{name}.onnx"
            ts = time.perf_counter()
            keys[name] = None if reuse is None or loaded is None else graph_key(name, reduced, opts.to_dict(), source)
            if reuse is None or not reuse.take(keys[name], path, Path(out).name):
                export_graph(reduced, name, path, opts, examples)
                check_graph(path, full=not opts.graph_only)
            graphs[name] = GraphRecord(file=f"{B.ONNX_DIR}/{path.name}", **graph_io(path),
                                       export_seconds=round(time.perf_counter() - ts, 2))
            notify(name, "done")
        lint_report: dict[str, Any] = {"ran": False}
        if lint:
            notify("lint", "start")
            from exporter.lint import format_findings, has_errors, lint_files

            runtime = {name: g.input_names for name, g in graphs.items()}
            findings = lint_files(sorted(onnx_dir.glob("*.onnx")), target=lint_target, runtime_inputs=runtime)
            lint_report = {"ran": True, "target": lint_target, "findings": [f.__dict__ for f in findings]}
            if has_errors(findings):
                raise LintFailed("TensorRT lint failed:\n" + format_findings(findings))
            notify("lint", "done")
        report: dict[str, Any] = {"ran": False}
        if validation.enabled and loaded is not None:
            notify("validate", "start")
            px, ids, offset = _sample_inputs(loaded, opts, validation)
            report = {"ran": True, **validate_bundle_graphs(
                reduced, onnx_dir, px, ids, offset, atol=validation.atol, rtol=validation.rtol,
                decode_steps=validation.decode_steps, keep_loaded=not validation.low_memory,
                reduced_precision=None if opts.precision == "fp32" else validation.reduced_precision,
            )}
            notify("validate", "done")
        if loaded is not None:
            loaded.tokenizer.save_pretrained(str(stage_dir / B.TOKENIZER_DIR))
            B.write_json(stage_dir / B.PREPROCESSOR, dict(loaded.processor_config))
            gen = getattr(loaded.model, "generation_config", None)
            if gen is not None:  # the checkpoint's generation defaults (the runtime's, unless a request overrides them)
                B.write_json(stage_dir / B.GENERATION_CONFIG, gen.to_diff_dict())
        tok = loaded.tokenizer if loaded is not None else None
        manifest = Manifest(
            source_model=source,
            graph_only=opts.graph_only,
            geometry=geometry.to_dict(),
            variant=schedule.variant,
            method=schedule.method,
            preset=schedule.preset,
            positions=schedule.positions,
            schedule_request=asdict(request),  # what was asked for; `schedule` is what the planner made of it
            schedule=schedule.to_dict(),
            flops_tflops=schedule.flops,
            visual_tokens={"in": schedule.visual_tokens_in, "to_decoder": schedule.visual_tokens_to_decoder, "final": schedule.visual_tokens_final},
            export=opts.to_dict(),
            precision=opts.precision,
            opset=opts.opset,
            graphs=graphs,
            shape_ranges={
                "batch": [1, opts.max_batch_size],
                "text_len": [2, opts.max_text_len],
                "max_new_tokens": opts.max_new_tokens,
            },
            trt_profiles=trt_profiles(reduced, opts),
            decoder={
                "num_layers": geometry.decoder.num_layers,
                "segments": [
                    {"graph": f"decoder_segment_{seg.index}", "attention_blocks": list(seg.attention_blocks),
                     "mlp_blocks": list(seg.mlp_blocks), "span": seg.span, "position_offset": seg.position_offset,
                     "then_reduce_at_block": None if seg.closing_step is None else seg.closing_step.layer}
                    for seg in reduced.segments
                ],
                "position_offsets": reduced.position_offsets,
                "kv_lengths_rule": "layer l holds text_len + schedule.decoder.span_at(l) + generated tokens",
            },
            prompt={
                "chat_template": loaded.chat_template if loaded is not None else None,
                "image_token": "<image>",
                "image_token_id": geometry.image_token_id,
                "image_offset_rule": "index of the single <image> placeholder in the tokenized chat prompt; "
                "the placeholder is removed and the visual tokens are spliced in there",
                "eos_token_id": None if tok is None else tok.eos_token_id,
                "bos_token_id": None if tok is None else tok.bos_token_id,
            },
            validation=report,
            lint=lint_report,
            tool_versions=tool_versions(EXPORT_PACKAGES),
            export_seconds=round(time.perf_counter() - t0, 2),
        )
        write_manifest(stage_dir, manifest, files=B.hash_files(stage_dir))
    if reuse is not None:
        reuse.remember(keys, Path(out).resolve(), B.ONNX_DIR)
    return Path(out).resolve()
