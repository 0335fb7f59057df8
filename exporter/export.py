"""Export the graphs of a reduced LLaVA to ONNX (torch.onnx dynamo exporter, opset 18 default).

The graphs are `bundle.names.graph_names`: vision, embed, the decoder splice, its segments and the
reductions between them (docs/export-notes.md §14). Dynamic axes only where they are real: batch, text
length, a segment's new tokens and past length (prefill: many tokens, no past; decode: one token).
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

from bundle.names import (
    EMBED,
    SPLICE,
    VISION,
    past_names,
    reduce_graph,
    reduce_index,
    runtime_inputs,
    segment_graph,
    segment_index,
)
from exporter.wrappers import (
    DecoderReduceGraph,
    DecoderSegmentGraph,
    DecoderSplice,
    EmbedTokens,
    VisionEncoder,
)
from ficoco.reduced_llava import ReducedLlava, splice

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


#: The graph metadata key under which torch.export's ONNX exporter writes the dynamic axes' value ranges.
RANGE_CONSTRAINTS = "pkg.torch.export.ExportedProgram.range_constraints"


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
        # torch.export records the dynamic axes' bounds as graph metadata; they are the manifest's
        # `trt_profiles`, and in the file they would make a decoder segment's bytes depend on the ratio
        # (its token axis ends at text + visual tokens), so a sweep could not share it (`exporter.reuse`)
        prog.model.graph.metadata_props.pop(RANGE_CONSTRAINTS, None)
        path.parent.mkdir(parents=True, exist_ok=True)
        if opts.graph_only:
            _save_without_weights(prog.model, path)
        else:
            # weights go to <name>.onnx.data; small tensors (index constants the optimizer folded) stay
            # inline so that shape inference with data propagation can read them
            import onnx_ir

            onnx_ir.save(prog.model, str(path), external_data=f"{path.name}.data", size_threshold_bytes=EXTERNAL_THRESHOLD)
            data = path.with_name(f"{path.name}.data")
            if data.is_file() and data.stat().st_size == 0:  # nothing was large enough (a weightless graph)
                data.unlink()


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
    """Trace inputs for every graph (batch 2 unless the bundle is batch-1 only, text length 17).

    The decoder graphs get what a prefill hands them, segment by segment; a segment also gets a past of
    two tokens (a traced length of 0 or 1 would be specialised into the graph), as a decode step would.
    """
    g = model.geometry
    b, t = _example_batch(opts), min(EXAMPLE_TEXT_LEN, opts.max_text_len)
    d, n_v = g.decoder.hidden_size, model.schedule.decoder.span_in
    kv, hd = g.decoder.num_kv_heads, g.decoder.head_dim
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> Tensor:
        x = torch.randn(*shape, generator=gen) if str(device) != "meta" else torch.empty(*shape)
        return x.to(device=device, dtype=opts.dtype)

    embeds = randn(b, t, d)
    visual = randn(b, n_v, d)
    offset = torch.full((b,), min(EXAMPLE_OFFSET, t - 2), dtype=torch.long, device=device)
    out: dict[str, tuple[Tensor, ...]] = {
        VISION: (randn(b, 3, g.vision.image_size, g.vision.image_size),),
        EMBED: (torch.zeros(b, t, dtype=torch.long, device=device),),
        SPLICE: (embeds, visual, offset),
    }
    with torch.no_grad(), _quiet():
        h = splice(embeds, visual, offset)
        pos = torch.arange(h.shape[1], device=device).unsqueeze(0).expand(b, -1)
        for seg in model.segments:
            past = [randn(b, kv, 2, hd) for _ in range(2 * len(seg.attention_blocks))]
            out[segment_graph(seg.index)] = (h, pos, *past)
            if seg.is_last:
                break
            res = model.run_segment(seg, h, pos, None)
            assert res.q is not None and res.k is not None
            out[reduce_graph(seg.index + 1)] = (res.hidden, res.q, res.k, offset, pos)
            h, pos, _ = model.reduce_between(seg, res.hidden, res.q, res.k, offset, pos)
    return out


def export_graph(model: ReducedLlava, graph: str, path: Path, opts: ExportOptions, examples: dict[str, tuple[Tensor, ...]]) -> None:
    """Export one graph of the bundle (`bundle.names.graph_names`) to `path` (+ `path.data` unless graph-only)."""
    batch = _batch_dim(opts)
    text_max = opts.max_text_len
    segment, reduction = segment_index(graph), reduce_index(graph)
    if graph == VISION:
        w: nn.Module = VisionEncoder(model)
        dyn: tuple[Any, ...] = (_axes(batch),)
    elif graph == EMBED:
        w = EmbedTokens(model)
        dyn = (_axes(batch, _1=Dim("tokens", min=1, max=text_max)),)
    elif graph == SPLICE:
        w = DecoderSplice()
        dyn = (_axes(batch, _1=Dim("text_len", min=2, max=text_max)), _axes(batch), _axes(batch))
    elif segment is not None:
        seg = model.segments[segment]
        w = DecoderSegmentGraph(model, seg)
        tokens = Dim("tokens", min=1, max=text_max + model.schedule.decoder.span_in)
        past = Dim("past_len", min=0, max=text_max + seg.span + opts.max_new_tokens)
        dyn = (_axes(batch, _1=tokens), _axes(batch, _1=tokens), tuple(_axes(batch, _2=past) for _ in range(2 * len(seg.attention_blocks))))
    elif reduction is not None:
        seg = model.segments[reduction - 1]
        w = DecoderReduceGraph(model, seg)
        seq = Dim("seq_len", min=seg.span + 2, max=text_max + seg.span)
        dyn = (_axes(batch, _1=seq), _axes(batch, _2=seq), _axes(batch, _2=seq), _axes(batch), _axes(batch, _1=seq))
    else:
        raise ValueError(f"unknown graph {graph!r}")
    w.eval()
    try:
        _export(w, examples[graph], dyn, list(w.input_names), list(w.output_names), path, opts)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"exporting {graph} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


Profiles = dict[str, dict[str, dict[str, list[int]]]]  # profile name -> input -> {"min", "opt", "max"} shape


def trt_profiles(model: ReducedLlava, opts: ExportOptions) -> dict[str, Profiles]:
    """The TensorRT optimisation profiles of every graph: min/opt/max shapes of each input.

    One profile ("all") per graph, except the decoder segments: "prefill" (T prompt tokens, an empty past)
    and "decode" (one token, a past up to the longest generation) over the same weights in one engine.
    """
    g = model.geometry
    d, n_v = g.decoder.hidden_size, model.schedule.decoder.span_in
    mb, mt, opt_t = opts.max_batch_size, opts.max_text_len, min(opts.opt_text_len, opts.max_text_len)
    side = g.vision.image_size
    kv, hd, heads = g.decoder.num_kv_heads, g.decoder.head_dim, g.decoder.num_heads
    new = opts.max_new_tokens

    def rng(fn: Any) -> dict[str, list[int]]:
        """fn(batch, text_len, generated) -> shape, at the low, typical and high ends."""
        return {"min": fn(1, 2, 0), "opt": fn(1, opt_t, new // 2), "max": fn(mb, mt, new - 1)}

    out: dict[str, Profiles] = {
        VISION: {"all": {"pixel_values": rng(lambda b, t, n: [b, 3, side, side])}},
        EMBED: {"all": {"input_ids": {"min": [1, 1], "opt": [1, opt_t], "max": [mb, mt]}}},
        SPLICE: {"all": {
            "inputs_embeds": rng(lambda b, t, n: [b, t, d]),
            "visual_tokens": rng(lambda b, t, n: [b, n_v, d]),
            "image_offset": rng(lambda b, t, n: [b]),
        }},
    }
    for seg in model.segments:
        span = seg.span
        prefill = {"hidden_states": rng(lambda b, t, n, s=span: [b, t + s, d]),
                   "position_ids": rng(lambda b, t, n, s=span: [b, t + s])}
        decode = {"hidden_states": rng(lambda b, t, n: [b, 1, d]), "position_ids": rng(lambda b, t, n: [b, 1])}
        for name in past_names(seg.attention_blocks):
            prefill[name] = rng(lambda b, t, n: [b, kv, 0, hd])
            decode[name] = rng(lambda b, t, n, s=span: [b, kv, t + s + n, hd])
        out[segment_graph(seg.index)] = {"prefill": prefill, "decode": decode}
        if not seg.is_last:
            seq = {"min": [1, 2 + span], "opt": [1, opt_t + span], "max": [mb, mt + span]}
            out[reduce_graph(seg.index + 1)] = {"all": {
                "hidden_states": {k: [v[0], v[1], d] for k, v in seq.items()},
                "query_states": {k: [v[0], heads, v[1], hd] for k, v in seq.items()},
                "key_states": {k: [v[0], kv, v[1], hd] for k, v in seq.items()},
                "image_offset": rng(lambda b, t, n: [b]),
                "position_ids": seq,
            }}
    return out


def graph_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Names, dtypes and shapes (ints or symbolic names) of a graph's inputs and outputs.

    Weights that a --graph-only graph carries as inputs are not listed.
    """
    model = onnx.load(str(path), load_external_data=False)
    declared = runtime_inputs(path.stem)

    def describe(vi: onnx.ValueInfoProto) -> dict[str, Any]:
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        return {"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name, "shape": dims}

    inputs = [v for v in model.graph.input if declared is None or v.name in declared or v.name.startswith("past_key_values.")]
    return {"inputs": [describe(v) for v in inputs], "outputs": [describe(v) for v in model.graph.output]}
