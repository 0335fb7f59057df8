"""The memory planner (`ficoco.memory`, `ficoco-plan --memory`) against a real bundle and on its own.

(a) the planned weight bytes are the bytes of the initializers the exporter wrote, graph by graph;
(b) the planned KV bytes are the bytes of the present tensors ONNX Runtime returns after a prefill and N
decode steps, block by block (FiCoCo-L: every block its own length);
(c) the fit verdicts and the formulas on their own (no bundle).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from bundle.arrays import to_numpy
from bundle.manifest import load_manifest
from bundle.names import graph_names, present_names
from ficoco.flops import kv_cache_bytes
from ficoco.geometry import LlavaGeometry
from ficoco.memory import (
    DEFAULT_WORKSPACE_MIB,
    TARGETS,
    GiB,
    MiB,
    ShapeLimits,
    Target,
    fit,
    graph_tensors,
    kv_bytes,
    kv_lengths,
    plan_memory,
)
from ficoco.models import load_config
from ficoco.schedule import Schedule


def _bundle_plan(bundle: Path):  # type: ignore[no-untyped-def]
    m = load_manifest(bundle, verify=False)
    geometry, schedule = m.geometry_object(), Schedule.from_dict(m.schedule)
    limits = ShapeLimits.from_shape_ranges(m.shape_ranges)
    return m, geometry, schedule, plan_memory(geometry, schedule, limits, m.precision)


def _initializer_bytes(path: Path) -> tuple[int, int]:
    """(bytes of the model's parameters and buffers, bytes of every initializer) of one graph, from dims and
    dtype, external data not loaded."""
    model = onnx.load(str(path), load_external_data=False)
    weights = everything = 0
    for t in model.graph.initializer:
        size = int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        everything += size
        if t.name.startswith("model."):
            weights += size
    return weights, everything


# ------------------------------------------------------------------------------------------------ (a)
def test_weight_bytes_are_the_bundle_initializers(tiny_bundle: Path) -> None:
    m, geometry, schedule, plan = _bundle_plan(tiny_bundle)
    assert tuple(g.graph for g in plan.graphs) == graph_names(len(m.decoder_segments()))
    onnx_dir = tiny_bundle / "onnx"
    total_all = 0
    for g in plan.graphs:
        weights, everything = _initializer_bytes(onnx_dir / f"{g.graph}.onnx")
        assert g.weight_bytes == weights, g.graph
        data = onnx_dir / f"{g.graph}.onnx.data"
        if data.is_file():  # the external data file holds the large initializers: never more than planned
            assert data.stat().st_size <= g.weight_bytes, g.graph
        total_all += everything
    # everything else the graphs carry is folded index constants: bytes, not weights
    assert plan.weight_bytes <= total_all <= plan.weight_bytes * 1.001 + 64 * 1024
    # one copy of every decoder weight: the segments add up to the decoder's parameters + one inv_freq each
    dec = geometry.decoder
    d, q, kv = dec.hidden_size, dec.num_heads * dec.head_dim, dec.num_kv_heads * dec.head_dim
    per_block = 2 * d + d * q + 2 * d * kv + q * d + 3 * d * dec.intermediate_size
    segments = [g for g in plan.graphs if g.graph.startswith("decoder_segment_")]
    assert sum(g.parameters for g in segments) == (
        dec.num_layers * per_block + d + d * dec.vocab_size + len(segments) * (dec.head_dim // 2))


# ------------------------------------------------------------------------------------------------ (b)
def test_kv_bytes_are_the_present_tensors(tiny_bundle: Path) -> None:
    from bundle.ort import ort_stages

    m, geometry, schedule, plan = _bundle_plan(tiny_bundle)
    stages = ort_stages(tiny_bundle / "onnx", provider="cpu")
    b, t, steps = 2, 11, 3
    gen = torch.Generator().manual_seed(0)
    side = geometry.vision.image_size
    visual = stages.encode_image(torch.randn(b, 3, side, side, generator=gen))
    embeds = stages.embed(torch.randint(0, 500, (b, t), generator=gen))
    offset = torch.full((b,), 3, dtype=torch.long)
    _, past = stages.prefill(embeds, visual, offset)
    n_layers = geometry.decoder.num_layers

    def check(presents: list[torch.Tensor], new: int) -> None:
        assert len(presents) == len(present_names(n_layers))
        lengths = kv_lengths(schedule, t, new)
        assert [p.shape[2] for p in presents[0::2]] == list(lengths)  # keys, block by block
        assert [p.shape[2] for p in presents[1::2]] == list(lengths)  # values
        assert len(set(lengths)) > 1  # FiCoCo-L: the blocks after a step keep fewer positions
        got = sum(to_numpy(p).nbytes for p in presents)
        assert got == kv_bytes(geometry, schedule, b, t, new, m.precision)

    check(past, 0)
    n_v = schedule.decoder.span_in
    for k in range(steps):
        position = torch.full((b,), t + n_v + k, dtype=torch.long)
        _, past = stages.step(stages.embed(torch.randint(0, 500, (b, 1), generator=gen)), position, past)
    check(past, steps)
    # the plan's figure is the same formula at the bundle's maxima, split over the segments that hold the blocks
    lim = plan.limits
    assert plan.kv_bytes == kv_bytes(geometry, schedule, lim.max_batch_size, lim.max_text_len, lim.max_new_tokens, m.precision)
    assert plan.kv_lengths == kv_lengths(schedule, lim.max_text_len, lim.max_new_tokens)


# ------------------------------------------------------------------------------------------------ (c)
def _llava7b(variant: str = "VL", ratio: float = 0.25) -> tuple[LlavaGeometry, Schedule]:
    from ficoco.planner import ScheduleRequest

    geometry = LlavaGeometry.from_config(load_config("llava-1.5-7b"))
    req = ScheduleRequest(variant="none") if variant == "none" else ScheduleRequest(variant=variant, ratio=ratio)
    return geometry, req.make(geometry)


def test_fit_verdicts() -> None:
    nano = next(t for t in TARGETS if "Nano" in t.name)
    gpu = next(t for t in TARGETS if t.name.startswith("24GB"))
    assert nano.unified and not gpu.unified
    assert nano.usable_bytes == 6 * GiB and gpu.usable_bytes == int(23.5 * GiB)  # 2 GiB / 0.5 GiB reserves
    assert [t.memory_bytes // GiB for t in TARGETS] == [8, 16, 32, 64, 24]
    edge = Target("edge", 10 * GiB, 2 * GiB, True)
    assert fit(8 * GiB, edge).fits and fit(8 * GiB, edge).headroom_bytes == 0  # exactly full still fits
    short = fit(8 * GiB + 1, edge)
    assert not short.fits and short.headroom_bytes == -1
    assert short.to_dict() == {"target": "edge", "usable_bytes": 8 * GiB, "needed_bytes": 8 * GiB + 1,
                               "fits": False, "headroom_bytes": -1}


def test_llava7b_verdicts() -> None:
    g, s = _llava7b()
    limits = ShapeLimits(1, 512, 256)
    fp16 = plan_memory(g, s, limits, "fp16")
    fits = {v.target: v.fits for v in fp16.verdicts}
    # ~13.1 GiB of fp16 weights: no 8 or 16 GB Jetson, but AGX Orin and a 24 GB GPU
    assert 13 * GiB < fp16.weight_bytes < 13.5 * GiB
    assert fits == {"Jetson Orin Nano 8GB": False, "Jetson Orin NX 16GB": False, "Jetson AGX Orin 32GB": True,
                    "Jetson AGX Orin 64GB": True, "24GB GPU": True}
    assert {v.target: v.fits for v in plan_memory(g, s, limits, "fp32").verdicts}["24GB GPU"] is False
    w4a8 = plan_memory(g, s, limits, "fp16", vision_quant="int8", decoder_quant="int4-weight")
    assert w4a8.weight_bytes < 0.35 * fp16.weight_bytes
    assert {v.target: v.fits for v in w4a8.verdicts}["Jetson Orin Nano 8GB"] is True
    assert fp16.total_bytes == fp16.weight_bytes + fp16.kv_bytes + fp16.activation_bytes + DEFAULT_WORKSPACE_MIB * MiB
    assert fp16.to_dict()["total_bytes"] == fp16.total_bytes and len(fp16.to_dict()["targets"]) == len(TARGETS)


def test_int4_formula_on_one_matmul() -> None:
    from ficoco.memory import Initializer, weight_bytes

    w = [Initializer("w", 4096 * 11008, "linear", 4096, 11008), Initializer("norm", 4096)]
    # 128-blocks along K: K·N/2 packed bytes + (K/128)·N fp16 scales; the norm stays fp16
    assert weight_bytes(w, "fp16", "int4-weight") == 4096 * 11008 // 2 + 32 * 11008 * 2 + 4096 * 2
    # per-channel INT8: K·N bytes + N fp32 scales + N int8 zero points
    assert weight_bytes(w, "fp32", "int8") == 4096 * 11008 + 11008 * 5 + 4096 * 4


def test_kv_matches_the_flops_model_and_shrinks_with_ficoco_l() -> None:
    g, none = _llava7b("none")
    for schedule in (none, _llava7b("VL")[1]):
        # batch 1, no new tokens: ficoco.flops.kv_cache_bytes (paper Table 10's formula)
        assert kv_bytes(g, schedule, 1, 60, 0, "fp16") == kv_cache_bytes(g.decoder, schedule.decoder, 60, 2)
        assert kv_bytes(g, schedule, 3, 60, 5, "fp32") == sum(
            2 * 3 * g.decoder.num_kv_heads * n * g.decoder.head_dim * 4 for n in kv_lengths(schedule, 60, 5))
    vl = _llava7b("VL")[1]
    lengths = kv_lengths(vl, 512, 256)
    assert lengths[0] == 512 + vl.decoder.span_in + 256 and lengths[-1] == 512 + vl.decoder.span_out + 256
    assert kv_bytes(g, vl, 1, 512, 256, "fp16") < kv_bytes(g, none, 1, 512, 256, "fp16")
    assert kv_bytes(g, none, 1, 60, 0, "fp16") == pytest.approx(333e6, rel=0.01)  # the paper: 333 MB at 576


def test_graphs_follow_the_bundle_layout() -> None:
    g, s = _llava7b()
    graphs = graph_tensors(g, s)
    assert tuple(graphs) == graph_names(len(s.decoder.steps) + 1)
    assert all(not graphs[n] for n in graphs if n == "decoder_splice" or n.startswith("decoder_reduce_"))


# ----------------------------------------------------------------------------------------------- CLI
def test_plan_cli_memory(tmp_path: Path) -> None:
    from commands.plan import main as plan_main

    out = tmp_path / "plan.json"
    args = ["--model", "tiny", "--variant", "VL", "--ratio", "0.25", "--memory", "--precision", "fp16",
            "--max-batch-size", "2", "--max-text-len", "128", "--max-new-tokens", "32", "--workspace", "256"]
    result = CliRunner().invoke(plan_main, [*args, "--format", "json", "-o", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert json.loads(out.read_text()) == data
    mem = data["memory"]
    assert mem["precision"] == "fp16" and mem["limits"] == {"max_batch_size": 2, "max_text_len": 128, "max_new_tokens": 32}
    assert mem["workspace_bytes"] == 256 * MiB
    assert mem["total_bytes"] == mem["weight_bytes"] + mem["kv_bytes"] + mem["activation_bytes"] + mem["workspace_bytes"]
    assert Schedule.from_dict(data).visual_tokens_final == 144  # the file still feeds ficoco-export --schedule
    table = CliRunner().invoke(plan_main, args)
    assert table.exit_code == 0, table.output
    for word in ("decoder_segment_0", "KV cache", "Jetson Orin Nano 8GB", "24GB GPU", "fits"):
        assert word in table.stdout


def test_plan_cli_uses_the_export_defaults() -> None:
    from commands.plan import export_defaults
    from exporter.export import ExportOptions

    defaults = export_defaults()
    opts = ExportOptions()
    for key in ("precision", "max_batch_size", "max_text_len", "max_new_tokens"):
        assert defaults[key] == getattr(opts, key)
    assert ShapeLimits.from_export_options(opts) == ShapeLimits(opts.max_batch_size, opts.max_text_len, opts.max_new_tokens)
