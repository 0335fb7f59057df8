"""Export the four stage graphs of a reduced LLaVA to ONNX (torch.onnx dynamo exporter, opset 18 default).

Dynamic axes only where they are real: batch, text length (prefill), and the past length of the decode
step, whose per-layer values differ by schedule constants (expressed as derived dims of one base dim).
Every reduction shape is a build-time constant of the schedule.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import onnx
import torch
from torch import Tensor, nn
from torch.export import Dim

from bundle.names import EMBED, GRAPH_INPUTS, PREFILL, STEP, VISION
from exporter.wrappers import DecoderPrefill, DecoderStep, EmbedTokens, VisionEncoder
from ficoco.reduced_llava import ReducedLlava

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16"]
EXAMPLE_TEXT_LEN = 17  # odd, so dynamo never specialises the text axis to another static size
EXAMPLE_OFFSET = 4
EXTERNAL_THRESHOLD = 64 * 1024  # bytes: tensors at least this large are stored as external data


class ExportError(RuntimeError):
    """A graph failed to export or check (the message names the stage)."""


@dataclass(frozen=True)
class ExportOptions:
    opset: int = 18
    precision: Precision = "fp32"
    max_batch_size: int = 4
    max_text_len: int = 512
    max_new_tokens: int = 256
    opt_text_len: int = 64  # the "opt" point of TensorRT profiles
    optimize: bool = False  # onnxscript graph optimisation (constant folding, dead code); slow on big graphs
    graph_only: bool = False  # no weights: graphs of the real geometry built on the meta device

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "fp16"):
            raise ValueError(f"precision must be fp32 or fp16, not {self.precision!r}")
        if self.max_batch_size < 1 or self.max_text_len < 2 or self.max_new_tokens < 1:
            raise ValueError("max batch size >= 1, max text length >= 2 and max new tokens >= 1 are required")
        if not 7 <= self.opset <= 25:
            raise ValueError(f"opset {self.opset} is outside what the dynamo exporter and TensorRT support (7..25)")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.precision == "fp16" else torch.float32

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's warnings and its notes about optional torchvision ops while exporting."""
    noisy = logging.getLogger("torch.onnx")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        noisy.setLevel(level)


def _batch_dim(opts: ExportOptions) -> Dim | None:
    return Dim("batch", min=1, max=opts.max_batch_size) if opts.max_batch_size > 1 else None


def _example_batch(opts: ExportOptions) -> int:
    return 2 if opts.max_batch_size > 1 else 1


def _axes(batch: Dim | None, **more: Any) -> dict[int, Any]:
    axes: dict[int, Any] = {} if batch is None else {0: batch}
    for k, v in more.items():
        axes[int(k.lstrip("_"))] = v
    return axes


def _export(
    module: nn.Module,
    args: tuple[Any, ...],
    dynamic_shapes: tuple[Any, ...],
    input_names: list[str],
    output_names: list[str],
    path: Path,
    opts: ExportOptions,
) -> None:
    with _quiet(), torch.no_grad():
        prog = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=opts.opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            optimize=False,
            verbose=False,
        )
        if prog is None:
            raise ExportError(f"{path.stem}: the exporter returned no program")
        if opts.optimize and not opts.graph_only:
            prog.optimize()
        fold_constants(prog.model)
        path.parent.mkdir(parents=True, exist_ok=True)
        if opts.graph_only:
            _save_without_weights(prog.model, path)
        else:
            # weights go to <name>.onnx.data; small tensors (index constants the optimizer folded) stay
            # inline so that shape inference with data propagation can read them
            import onnx_ir

            onnx_ir.save(prog.model, str(path), external_data=f"{path.name}.data", size_threshold_bytes=EXTERNAL_THRESHOLD)


def _save_without_weights(model: Any, path: Path) -> None:
    """--graph-only: the weights (meta tensors, no data) become graph inputs, so the graph stays valid for
    the checker and the lint; constants with data (folded index constants) stay initializers."""
    import onnx_ir

    graph = model.graph
    for name, value in list(graph.initializers.items()):
        raw = getattr(value.const_value, "raw", None)
        if isinstance(raw, torch.Tensor) and raw.is_meta:
            graph.initializers.pop(name)
            value.const_value = None
            graph.inputs.append(value)
    onnx_ir.save(model, str(path))


def fold_constants(model: Any) -> None:
    """Fold small constant subgraphs (index constants, reduction axes, shapes) into initializers.

    TensorRT's parser wants e.g. Reduce* `axes` as initializers, while the exporter emits them as
    Reshape(Constant). onnxscript's constant folder alone takes well under a second (the full optimizer
    takes minutes on a prefill graph). Weights (initializers) are never touched.
    """
    from onnx_ir.passes.common import RemoveUnusedNodesPass
    from onnxscript.optimizer import fold_constants as fold

    def leave_weights(node: Any) -> bool | None:  # never fold a node that reads an initializer (meta in --graph-only)
        return False if any(v is not None and v.is_initializer() for v in node.inputs) else None

    fold(model, input_size_limit=4096, output_size_limit=1 << 20, should_fold=leave_weights)
    RemoveUnusedNodesPass()(model)


def check_graph(path: Path, full: bool = True) -> None:
    """onnx.checker (full check incl. shape inference) on the file; strict shape inference written back."""
    try:
        onnx.checker.check_model(str(path), full_check=full)
        model = onnx.load(str(path), load_external_data=False)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
        onnx.save(inferred, str(path))  # external-data references are kept as they are
    except Exception as e:  # onnx raises several unrelated types
        raise ExportError(f"{path.name} failed the ONNX checker: {e}") from e


def example_inputs(model: ReducedLlava, opts: ExportOptions, device: str | torch.device = "cpu") -> dict[str, tuple[Tensor, ...]]:
    """Trace inputs for each stage (batch 2 unless the bundle is batch-1 only, text length 17)."""
    g = model.geometry
    b, t = _example_batch(opts), min(EXAMPLE_TEXT_LEN, opts.max_text_len)
    d, n_v = g.decoder.hidden_size, model.schedule.decoder.span_in
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> Tensor:
        x = torch.randn(*shape, generator=gen) if str(device) != "meta" else torch.empty(*shape)
        return x.to(device=device, dtype=opts.dtype)

    embeds = randn(b, t, d)
    visual = randn(b, n_v, d)
    offset = torch.full((b,), min(EXAMPLE_OFFSET, t - 2), dtype=torch.long, device=device)
    with torch.no_grad(), _quiet():
        past = [x for kv in model.prefill(embeds, visual, offset).cache for x in kv]
    return {
        VISION: (randn(b, 3, g.vision.image_size, g.vision.image_size),),
        EMBED: (torch.zeros(b, t, dtype=torch.long, device=device),),
        PREFILL: (embeds, visual, offset),
        STEP: (randn(b, 1, d), torch.full((b,), t + n_v, dtype=torch.long, device=device), *past),
    }


def export_stage(model: ReducedLlava, stage: str, path: Path, opts: ExportOptions, examples: dict[str, tuple[Tensor, ...]]) -> None:
    """Export one of the four stages to `path` (+ `path.data` unless graph-only)."""
    batch = _batch_dim(opts)
    if stage == VISION:
        w: nn.Module = VisionEncoder(model)
        dyn: tuple[Any, ...] = (_axes(batch),)
    elif stage == EMBED:
        w = EmbedTokens(model)
        dyn = (_axes(batch, _1=Dim("tokens", min=1, max=opts.max_text_len)),)
    elif stage == PREFILL:
        w = DecoderPrefill(model)
        text = Dim("text_len", min=2, max=opts.max_text_len)
        dyn = (_axes(batch, _1=text), _axes(batch), _axes(batch))
    elif stage == STEP:
        w = DecoderStep(model)
        s = model.schedule.decoder
        spans = [s.span_at(i) for i in range(s.num_layers)]
        low = min(spans)
        base = Dim("past_len", min=2 + low, max=opts.max_text_len + low + opts.max_new_tokens)
        past_axes = []
        for n in spans:
            length = base if n == low else base + (n - low)
            past_axes += [_axes(batch, _2=length)] * 2
        dyn = (_axes(batch), _axes(batch), tuple(past_axes))
    else:
        raise ValueError(f"unknown stage {stage!r}")
    w.eval()
    try:
        _export(w, examples[stage], dyn, list(w.input_names), list(w.output_names), path, opts)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"exporting {stage} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def trt_profiles(model: ReducedLlava, opts: ExportOptions) -> dict[str, dict[str, dict[str, list[int]]]]:
    """min/opt/max shapes of every dynamic graph input, for one TensorRT optimisation profile per graph."""
    g = model.geometry
    d, n_v = g.decoder.hidden_size, model.schedule.decoder.span_in
    mb, mt, opt_t = opts.max_batch_size, opts.max_text_len, min(opts.opt_text_len, opts.max_text_len)
    side = g.vision.image_size
    kv, hd = g.decoder.num_kv_heads, g.decoder.head_dim

    def rng(fn: Any) -> dict[str, list[int]]:
        return {"min": fn(1, 2, 0), "opt": fn(1, opt_t, opts.max_new_tokens // 2), "max": fn(mb, mt, opts.max_new_tokens - 1)}

    step: dict[str, dict[str, list[int]]] = {
        "inputs_embeds": rng(lambda b, t, n: [b, 1, d]),
        "position": rng(lambda b, t, n: [b]),
    }
    s = model.schedule.decoder
    for i in range(s.num_layers):
        span = s.span_at(i)
        for kvn in ("key", "value"):
            step[f"past_key_values.{i}.{kvn}"] = rng(lambda b, t, n, span=span: [b, kv, t + span + n, hd])
    return {
        VISION: {"pixel_values": rng(lambda b, t, n: [b, 3, side, side])},
        EMBED: {"input_ids": {"min": [1, 1], "opt": [1, opt_t], "max": [mb, mt]}},
        PREFILL: {
            "inputs_embeds": rng(lambda b, t, n: [b, t, d]),
            "visual_tokens": rng(lambda b, t, n: [b, n_v, d]),
            "image_offset": rng(lambda b, t, n: [b]),
        },
        STEP: step,
    }


def graph_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Names, dtypes and shapes (ints or symbolic names) of a graph's inputs and outputs.

    Weights that a --graph-only graph carries as inputs are not listed.
    """
    model = onnx.load(str(path), load_external_data=False)
    declared = GRAPH_INPUTS.get(path.stem)

    def describe(vi: onnx.ValueInfoProto) -> dict[str, Any]:
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        return {"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name, "shape": dims}

    inputs = [v for v in model.graph.input if declared is None or v.name in declared or v.name.startswith("past_key_values.")]
    return {"inputs": [describe(v) for v in inputs], "outputs": [describe(v) for v in model.graph.output]}
