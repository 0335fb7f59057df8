"""How much memory a bundle needs, per graph, and whether it fits a device (`ficoco-plan --memory`).

Pure arithmetic over `LlavaGeometry`, `Schedule` and the export's shape limits (no weights, no torch): the
same numbers for a 7B config as for a built-in. The layout is the bundle's (docs/export-notes.md §14):
`vision_encoder`, `embed_tokens`, the weightless `decoder_splice`, the segments `decoder_segment_{s}` that
hold every decoder weight once (serving prefill and decode) and the weightless `decoder_reduce_{s}`.

Notation: B = max batch, T = max text length (tokens, without the visual ones), N = max new tokens,
e = bytes per float element of the precision (fp32 4, fp16 / bf16 2), D / I / H / Hkv / hd / V the decoder's
hidden, FFN width, heads, KV heads, head size and vocabulary, Dv / Iv / Hv / p the vision tower's.

* **Weights** (exact for float bundles: the initializers the exporter writes, tests/test_memory.py checks
  it). Vision: patch conv Dv·3·p², [CLS] Dv, position table (Np + 1)·Dv, the int64 position ids (Np + 1)·8 B,
  pre-norm 2·Dv, per run block (0..select_block) 2 LayerNorms 4·Dv + q/k/v/o 4·(Dv² + Dv) + fc1/fc2
  2·Dv·Iv + Iv + Dv, projector Dv·D + D + D² + D. Embed: V·D. Decoder segment s: per attention half
  (a block whose attention lives in s) D + D·H·hd + 2·D·Hkv·hd + H·hd·D, per MLP half D + 3·D·I, the RoPE
  inv_freq hd/2, and in the last segment the final norm D and the LM head D·V. A model with tied
  embeddings (SmolLM2) still carries V·D twice: once in embed_tokens, once in the last segment.
* **INT8 vision** (`ficoco-quantize --vision int8`: per-channel, symmetric, biases in float): each Conv /
  MatMul weight K·N becomes K·N int8 bytes + N·(4 + 1) bytes (fp32 scale and int8 zero point per output
  channel); embeddings, norms and biases stay float.
* **INT4 weight-only decoder** (`--decoder int4-weight`, calibration/quantize.py): every MatMul weight [K, N]
  with K a multiple of the block size b and N even becomes ceil(K·N / 2) packed bytes + (K / b)·N·e bytes of
  scales (symmetric: no zero points); b is, per graph, the largest of `calibration.quantize.BLOCK_SIZES`
  (<= 128) that quantizes the most weights. The embedding table, the norms and the other weights stay float.
* **KV cache** at the bundle's maximum lengths: decoder block l keeps L_l = T + span_at(l) + N positions
  (span_at(l): the visual tokens its attention sees under the schedule, FiCoCo-L shortens it block by
  block; the decode profile's largest past is L_l - 1, plus the token being decoded), so
  KV = Σ_l 2·B·Hkv·L_l·hd·e.
* **Activations** (an estimate, not a measurement): the largest live tensors of one graph at prefill, taken
  per graph and the largest over graphs counted once (the graphs run one after another; TensorRT contexts
  can share one scratch buffer). With S = T + n_s the sequence a segment sees (n_s its visual span)::

      segment s     B·e·(2·S·D + max(2·H·S² + S² + 3·H·hd·S, 3·S·I)) [+ B·V·e logits in the last]
                    (residual + normed stream; scores and probabilities, mask, q and k/v repeated to H heads;
                    or the gated FFN's three [S, I] tensors)
      reduce s      B·e·(H·S² + 2·n² + 2·S·D)          (S, n of the segment before it)
      vision        B·e·(2·n·Dv + max(2·Hv·n² + 3·n·Dv, 2·n·Iv)), n = Np + 1 (block 0, the longest)
      splice        B·e·D·(2·T + 2·n_0);  embed B·e·T·D

  ONNX Runtime's CPU arena is per session and keeps each graph's peak, so on ORT the sum over graphs is
  the upper bound; the figure is reported per graph for that reason.
* **Workspace**: an allowance for TensorRT's tactic scratch and runtime (cuBLAS / cuDNN handles, the
  engines' own scratch beyond the tensors above): `DEFAULT_WORKSPACE_MIB`, overridable; build the engines
  with `ficoco-build --workspace` no larger than it.
* **Total** = weights + KV + the largest graph's activations + workspace; a target fits when the total is at
  most its memory minus its reserve (`Target`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from ficoco.geometry import LlavaGeometry
from ficoco.schedule import Schedule
from ficoco.segments import DecoderSegment, decoder_segments

Precision = Literal["fp32", "fp16", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
ELEMENT_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2}
VISION_QUANT: tuple[str, ...] = ("none", "int8")
DECODER_QUANT: tuple[str, ...] = ("none", "int4-weight")
INT4_BLOCK_UPPER = 128  # calibration.quantize.GraphQuantOptions.block_size, the --block-size default
#: TensorRT scratch + runtime allowance (MiB): cuBLAS/cuDNN workspaces and the engines' tactic scratch.
#: 1 GiB is what a 7B-class engine's tactics commonly fit in; pass --workspace to change it.
DEFAULT_WORKSPACE_MIB = 1024
GiB = 1 << 30
MiB = 1 << 20

# the graph names of bundle.names (ficoco stays below the bundle package, so they are spelled here;
# tests/test_memory.py checks them against bundle.names.graph_names)
VISION, EMBED, SPLICE = "vision_encoder", "embed_tokens", "decoder_splice"


def _segment(i: int) -> str:
    return f"decoder_segment_{i}"


def _reduce(i: int) -> str:
    return f"decoder_reduce_{i}"


# ------------------------------------------------------------------------------------------------ limits
@dataclass(frozen=True)
class ShapeLimits:
    """The export's shape limits (`exporter.export.ExportOptions` / a manifest's `shape_ranges`)."""

    max_batch_size: int
    max_text_len: int
    max_new_tokens: int

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_text_len < 1 or self.max_new_tokens < 0:
            raise ValueError("max batch size >= 1, max text length >= 1 and max new tokens >= 0 are required")

    @classmethod
    def from_export_options(cls, opts: Any) -> ShapeLimits:
        return cls(int(opts.max_batch_size), int(opts.max_text_len), int(opts.max_new_tokens))

    @classmethod
    def from_shape_ranges(cls, ranges: dict[str, Any]) -> ShapeLimits:
        """A manifest's `shape_ranges` ({"batch": [lo, hi], "text_len": [lo, hi], "max_new_tokens": n})."""
        return cls(int(ranges["batch"][1]), int(ranges["text_len"][1]), int(ranges["max_new_tokens"]))


# ----------------------------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Target:
    """A device the bundle should fit: its memory, what is reserved before the bundle gets any, and why.

    Jetson modules share one LPDDR5 memory between the CPU (the OS, L4T's desktop or not) and the GPU, so the
    OS, the CUDA context and the TensorRT libraries come off the same pool: `JETSON_RESERVE_GIB` = 2 GiB
    (the top of the 1.5–2 GB an idle L4T + CUDA context takes; also covers the carve-outs that make an
    "8 GB" module show ~7.4 GiB). A discrete GPU keeps the OS in host RAM; its reserve is the CUDA context
    and driver (`DISCRETE_RESERVE_GIB` = 0.5 GiB).
    """

    name: str
    memory_bytes: int
    reserve_bytes: int
    unified: bool  # memory shared with the CPU / OS (Jetson)

    @property
    def usable_bytes(self) -> int:
        return self.memory_bytes - self.reserve_bytes


JETSON_RESERVE_GIB = 2.0
DISCRETE_RESERVE_GIB = 0.5


def _target(name: str, gib: float, unified: bool) -> Target:
    reserve = JETSON_RESERVE_GIB if unified else DISCRETE_RESERVE_GIB
    return Target(name, int(gib * GiB), int(reserve * GiB), unified)


TARGETS: tuple[Target, ...] = (
    _target("Jetson Orin Nano 8GB", 8, True),
    _target("Jetson Orin NX 16GB", 16, True),
    _target("Jetson AGX Orin 32GB", 32, True),
    _target("Jetson AGX Orin 64GB", 64, True),
    _target("24GB GPU", 24, False),
)


@dataclass(frozen=True)
class FitVerdict:
    target: str
    usable_bytes: int
    needed_bytes: int

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.usable_bytes

    @property
    def headroom_bytes(self) -> int:
        """usable - needed (negative: short by that much)."""
        return self.usable_bytes - self.needed_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fits": self.fits, "headroom_bytes": self.headroom_bytes}


def fit(needed_bytes: int, target: Target) -> FitVerdict:
    """Whether `needed_bytes` fit the target's memory minus its reserve."""
    return FitVerdict(target.name, target.usable_bytes, int(needed_bytes))


# ---------------------------------------------------------------------------------------------- weights
@dataclass(frozen=True)
class Initializer:
    """One initializer: `kind` "linear" (a MatMul weight [K, N]), "conv" (N output channels, K = the rest),
    "float" (embeddings, norms, biases, buffers: never quantized) or "int64"."""

    name: str
    numel: int
    kind: Literal["linear", "conv", "float", "int64"] = "float"
    k: int = 0
    n: int = 0


def _linear(name: str, k: int, n: int) -> Initializer:
    return Initializer(name, k * n, "linear", k, n)


def vision_tensors(g: LlavaGeometry) -> list[Initializer]:
    """The vision graph's initializers: CLIP embeddings, blocks 0..select_block, the projector."""
    v, d = g.vision, g.decoder.hidden_size
    dv, iv, seq = v.hidden_size, v.intermediate_size, v.seq_len
    out = [Initializer("patch_embedding", dv * 3 * v.patch_size**2, "conv", 3 * v.patch_size**2, dv),
           Initializer("position_embedding", seq * dv), Initializer("position_ids", seq, "int64"),
           Initializer("pre_layrnorm", 2 * dv)]
    if v.has_cls:
        out.append(Initializer("class_embedding", dv))
    for b in range(v.blocks_run):
        out += [Initializer(f"{b}.layer_norms", 4 * dv)]
        out += [_linear(f"{b}.{p}_proj", dv, dv) for p in ("q", "k", "v", "out")]
        out += [Initializer(f"{b}.attn_biases", 4 * dv), _linear(f"{b}.fc1", dv, iv), _linear(f"{b}.fc2", iv, dv),
                Initializer(f"{b}.mlp_biases", iv + dv)]
    out += [_linear("projector.linear_1", dv, d), _linear("projector.linear_2", d, d), Initializer("projector.biases", 2 * d)]
    return out


def _attention_half(g: LlavaGeometry, layer: int) -> list[Initializer]:
    c = g.decoder
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return [Initializer(f"{layer}.input_layernorm", c.hidden_size), _linear(f"{layer}.q_proj", c.hidden_size, q),
            _linear(f"{layer}.k_proj", c.hidden_size, kv), _linear(f"{layer}.v_proj", c.hidden_size, kv),
            _linear(f"{layer}.o_proj", q, c.hidden_size)]


def _mlp_half(g: LlavaGeometry, layer: int) -> list[Initializer]:
    c = g.decoder
    d, i = c.hidden_size, c.intermediate_size
    return [Initializer(f"{layer}.post_attention_layernorm", d), _linear(f"{layer}.gate_proj", d, i),
            _linear(f"{layer}.up_proj", d, i), _linear(f"{layer}.down_proj", i, d)]


def segment_tensors(g: LlavaGeometry, seg: DecoderSegment) -> list[Initializer]:
    """Segment s's initializers: the MLP halves and attention halves of its blocks (`ficoco.segments`), the
    RoPE inv_freq buffer, and in the last segment the final norm and the LM head."""
    c = g.decoder
    out: list[Initializer] = []
    mlps, atts = set(seg.mlp_blocks), set(seg.attention_blocks)
    for layer in sorted(mlps | atts):
        if layer in atts:
            out += _attention_half(g, layer)
        if layer in mlps:
            out += _mlp_half(g, layer)
    if atts:
        out.append(Initializer("rotary_emb.inv_freq", c.head_dim // 2))
    if seg.is_last:
        out += [Initializer("norm", c.hidden_size), _linear("lm_head", c.hidden_size, c.vocab_size)]
    return out


def graph_tensors(g: LlavaGeometry, schedule: Schedule) -> dict[str, list[Initializer]]:
    """Every graph of the bundle (running order) with its initializers (weightless graphs: none)."""
    segs = decoder_segments(schedule.decoder, schedule.positions)
    out: dict[str, list[Initializer]] = {VISION: vision_tensors(g), EMBED: [Initializer("embed_tokens", g.decoder.vocab_size * g.decoder.hidden_size)],
                                    SPLICE: []}
    for seg in segs:
        if seg.index:
            out[_reduce(seg.index)] = []
        out[_segment(seg.index)] = segment_tensors(g, seg)
    return out


def _int4_block(tensors: Iterable[Initializer], upper: int) -> int:
    """calibration.quantize._pick_block_size on shapes: the block size (<= upper) quantizing the most weights."""
    from calibration.quantize import BLOCK_SIZES

    lin = [t for t in tensors if t.kind == "linear"]
    best, count = upper, -1
    for bs in [b for b in BLOCK_SIZES if b <= upper] or [upper]:
        ok = sum(1 for t in lin if t.k % bs == 0 and t.n % 2 == 0)
        if ok > count:
            best, count = bs, ok
    return best


def weight_bytes(tensors: list[Initializer], precision: str, quant: str = "none", int4_block_upper: int = INT4_BLOCK_UPPER) -> int:
    """Bytes of a graph's initializers at `precision` ("fp32" | "fp16" | "bf16"), optionally quantized:
    "int8" (Conv / MatMul weights per channel) or "int4-weight" (MatMul weights, blocked). See the module."""
    e = ELEMENT_BYTES[precision]
    bs = _int4_block(tensors, int4_block_upper) if quant == "int4-weight" else 0
    total = 0
    for t in tensors:
        if t.kind == "int64":
            total += 8 * t.numel
        elif quant == "int8" and t.kind in ("linear", "conv"):
            total += t.numel + t.n * (4 + 1)
        elif quant == "int4-weight" and t.kind == "linear" and t.k % bs == 0 and t.n % 2 == 0:
            total += math.ceil(t.numel / 2) + (t.k // bs) * t.n * e
        else:
            total += e * t.numel
    return total


# ------------------------------------------------------------------------------------------------- KV
def kv_lengths(schedule: Schedule, text_len: int, new_tokens: int) -> tuple[int, ...]:
    """Per decoder block l: L_l = text_len + span_at(l) + new_tokens (the positions its cache holds)."""
    dec = schedule.decoder
    return tuple(text_len + dec.span_at(layer) + new_tokens for layer in range(dec.num_layers))


def kv_bytes(g: LlavaGeometry, schedule: Schedule, batch: int, text_len: int, new_tokens: int, precision: str,
             layers: Iterable[int] | None = None) -> int:
    """Σ_l 2·batch·Hkv·L_l·hd·e over `layers` (None: every decoder block), L_l from `kv_lengths`."""
    c = g.decoder
    lengths = kv_lengths(schedule, text_len, new_tokens)
    chosen = range(c.num_layers) if layers is None else layers
    return sum(2 * batch * c.num_kv_heads * lengths[layer] * c.head_dim * ELEMENT_BYTES[precision] for layer in chosen)


# ----------------------------------------------------------------------------------------- activations
def _activation_bytes(g: LlavaGeometry, schedule: Schedule, graph: str, limits: ShapeLimits, e: int) -> int:
    """The prefill estimate of the module docstring for one graph."""
    c, v = g.decoder, g.vision
    b, t = limits.max_batch_size, limits.max_text_len
    d, i, h, hd = c.hidden_size, c.intermediate_size, c.num_heads, c.head_dim
    segs = decoder_segments(schedule.decoder, schedule.positions)
    if graph == VISION:
        n = v.seq_len
        return b * e * (2 * n * v.hidden_size + max(2 * v.num_heads * n * n + 3 * n * v.hidden_size, 2 * n * v.intermediate_size))
    if graph == EMBED:
        return b * e * t * d
    if graph == SPLICE:
        return b * e * d * (2 * t + 2 * schedule.decoder.span_in)
    if graph.startswith("decoder_segment_"):
        seg = segs[int(graph.rsplit("_", 1)[1])]
        s = t + seg.span
        out = b * e * (2 * s * d + max(2 * h * s * s + s * s + 3 * h * hd * s, 3 * s * i))
        return out + (b * e * c.vocab_size if seg.is_last else 0)
    if graph.startswith("decoder_reduce_"):
        seg = segs[int(graph.rsplit("_", 1)[1]) - 1]
        s, n = t + seg.span, seg.span
        return b * e * (h * s * s + 2 * n * n + 2 * s * d)
    raise ValueError(f"unknown graph {graph!r}")


# --------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class GraphMemory:
    graph: str
    stage: str  # vision | embed | decoder
    parameters: int  # elements of its initializers
    weight_bytes: int  # at the plan's precision and quantization
    weight_bytes_by_precision: dict[str, int]  # float (unquantized) weights at fp32 / fp16 / bf16
    kv_bytes: int  # the cache of its attention blocks at the maximum lengths (segments only)
    kv_layers: tuple[int, ...]
    activation_bytes: int  # prefill estimate


@dataclass(frozen=True)
class MemoryPlan:
    precision: str
    vision_quant: str
    decoder_quant: str
    limits: ShapeLimits
    graphs: tuple[GraphMemory, ...]
    kv_lengths: tuple[int, ...]  # per decoder block, at the maximum lengths
    workspace_bytes: int
    verdicts: tuple[FitVerdict, ...] = field(default=())

    @property
    def weight_bytes(self) -> int:
        return sum(x.weight_bytes for x in self.graphs)

    @property
    def kv_bytes(self) -> int:
        return sum(x.kv_bytes for x in self.graphs)

    @property
    def activation_bytes(self) -> int:
        """The largest graph's prefill activations (graphs run one at a time)."""
        return max((x.activation_bytes for x in self.graphs), default=0)

    @property
    def activation_sum_bytes(self) -> int:
        """Every graph's activations added up: ONNX Runtime's per-session arenas, the upper bound."""
        return sum(x.activation_bytes for x in self.graphs)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.activation_bytes + self.workspace_bytes

    def stage_totals(self) -> dict[str, dict[str, int]]:
        """Weights, KV and the largest activations per stage (vision, embed, decoder)."""
        out: dict[str, dict[str, int]] = {}
        for x in self.graphs:
            s = out.setdefault(x.stage, {"weight_bytes": 0, "kv_bytes": 0, "activation_bytes": 0})
            s["weight_bytes"] += x.weight_bytes
            s["kv_bytes"] += x.kv_bytes
            s["activation_bytes"] = max(s["activation_bytes"], x.activation_bytes)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision, "vision_quant": self.vision_quant, "decoder_quant": self.decoder_quant,
            "limits": asdict(self.limits),
            "graphs": [{**asdict(x), "kv_layers": list(x.kv_layers)} for x in self.graphs],
            "stages": self.stage_totals(),
            "kv_lengths": list(self.kv_lengths),
            "weight_bytes": self.weight_bytes,
            "weight_bytes_by_precision": {p: sum(x.weight_bytes_by_precision[p] for x in self.graphs) for p in PRECISIONS},
            "kv_bytes": self.kv_bytes,
            "activation_bytes": self.activation_bytes,
            "activation_sum_bytes": self.activation_sum_bytes,
            "workspace_bytes": self.workspace_bytes,
            "total_bytes": self.total_bytes,
            "targets": [v.to_dict() for v in self.verdicts],
            "notes": [
                "activation_bytes is an estimate (the largest live tensors of one graph at prefill), not a measurement",
                "ONNX Runtime CPU upcasts fp16 weights to fp32 at load (docs/export-notes.md §7)",
                f"Jetson targets reserve {JETSON_RESERVE_GIB} GiB for the OS, CUDA and TensorRT (shared memory); "
                f"a discrete GPU {DISCRETE_RESERVE_GIB} GiB for the CUDA context",
            ],
        }


def _stage(graph: str) -> str:
    return {VISION: "vision", EMBED: "embed"}.get(graph, "decoder")


def plan_memory(
    geometry: LlavaGeometry,
    schedule: Schedule,
    limits: ShapeLimits,
    precision: str = "fp32",
    *,
    vision_quant: str = "none",
    decoder_quant: str = "none",
    workspace_bytes: int = DEFAULT_WORKSPACE_MIB * MiB,
    targets: Iterable[Target] = TARGETS,
    int4_block_upper: int = INT4_BLOCK_UPPER,
) -> MemoryPlan:
    """The memory plan of the bundle that `geometry`, `schedule` and `limits` describe (see the module)."""
    if precision not in ELEMENT_BYTES:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if vision_quant not in VISION_QUANT:
        raise ValueError(f"vision quantization must be one of {', '.join(VISION_QUANT)}, not {vision_quant!r}")
    if decoder_quant not in DECODER_QUANT:
        raise ValueError(f"decoder quantization must be one of {', '.join(DECODER_QUANT)}, not {decoder_quant!r}")
    if workspace_bytes < 0:
        raise ValueError(f"the workspace must be >= 0 bytes, not {workspace_bytes}")
    e = ELEMENT_BYTES[precision]
    segs = decoder_segments(schedule.decoder, schedule.positions)
    b, t, n = limits.max_batch_size, limits.max_text_len, limits.max_new_tokens
    rows = []
    for graph, tensors in graph_tensors(geometry, schedule).items():
        stage = _stage(graph)
        quant = vision_quant if stage == "vision" else decoder_quant if graph.startswith("decoder_segment_") else "none"
        layers: tuple[int, ...] = ()
        if graph.startswith("decoder_segment_"):
            layers = segs[int(graph.rsplit("_", 1)[1])].attention_blocks
        rows.append(GraphMemory(
            graph=graph, stage=stage, parameters=sum(x.numel for x in tensors),
            weight_bytes=weight_bytes(tensors, precision, quant, int4_block_upper),
            weight_bytes_by_precision={p: weight_bytes(tensors, p) for p in PRECISIONS},
            kv_bytes=kv_bytes(geometry, schedule, b, t, n, precision, layers) if layers else 0,
            kv_layers=layers,
            activation_bytes=_activation_bytes(geometry, schedule, graph, limits, e),
        ))
    plan = MemoryPlan(precision, vision_quant, decoder_quant, limits, tuple(rows), kv_lengths(schedule, t, n), int(workspace_bytes))
    return replace(plan, verdicts=tuple(fit(plan.total_bytes, tg) for tg in targets))
