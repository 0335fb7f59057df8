"""ficoco-build and the TensorRT backend.

The option checks, profiles and Q/DQ scan need no TensorRT and run everywhere. So do the builder and the
runtime against a fake `tensorrt` module (`FakeTrt`, below): its builder records the optimization profiles
it is given and serializes them, its engines run the bundle's ONNX graphs in ONNX Runtime on the CPU,
reading and writing the tensors at the addresses TensorRT would be handed, and refuse what TensorRT would
(shapes outside the context's profile, a null address, no scratch memory). That checks, without a GPU,
that every graph gets one engine, every segment engine both profiles, that each run picks the right
profile, and that the KV cache alternates between the two preallocated buffer sets. Building real engines
and running them needs `tensorrt` and a CUDA GPU: those tests skip elsewhere, saying the TensorRT path was
not verified on that machine.
"""

from __future__ import annotations

import ctypes
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper
from test_runtime import QUESTION, linked_copy

from bundle.frontend import Frontend
from bundle.manifest import load_manifest
from bundle.names import EMBED, SPLICE, VISION, reduce_graph, segment_graph
from bundle.ort import ort_stages
from bundle.session import SessionError
from commands.build import main as build_main
from commands.run import main as run_main
from engines.builder import (
    BuildConfigError,
    BuildOptions,
    parse_shape_args,
    plan_build,
    qdq_types,
    resolve_profiles,
)
from engines.engine_store import (
    ENGINE_MANIFEST,
    ENGINE_SCHEMA_VERSION,
    GpuTarget,
    read_engine_manifest,
)
from engines.trt_backend import (
    TrtStages,
    trt_stages,
)
from ficoco.generation import generate_tokens
from ficoco.images import test_image

NO_TRT = "TensorRT/CUDA absent: the TensorRT path was not verified here"


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Path:
    return tiny_bundle


# -------------------------------------------------------------------------------------------------------------
# no TensorRT needed
# -------------------------------------------------------------------------------------------------------------


def test_parse_shape_args_polygraphy_syntax() -> None:
    got = parse_shape_args(["input_ids:[1,64]", "pixel_values:[2,3,336,336] decoder_splice/inputs_embeds:[2, 1, 64]"])
    assert got == {"input_ids": [1, 64], "pixel_values": [2, 3, 336, 336], "decoder_splice/inputs_embeds": [2, 1, 64]}
    assert parse_shape_args(["past_key_values.3.key:[1,4,300,16]"]) == {"past_key_values.3.key": [1, 4, 300, 16]}
    got = parse_shape_args(["decoder_segment_0:decode/past_key_values.0.key:[2,4,600,16] *:decode/hidden_states:[2,1,64]"])
    assert got == {"decoder_segment_0:decode/past_key_values.0.key": [2, 4, 600, 16], "*:decode/hidden_states": [2, 1, 64]}
    assert parse_shape_args(["decoder_segment_0:prefill/past_key_values.0.key:[1,4,0,16]"])  # an empty past axis
    for bad in ("input_ids", "input_ids:[1,x]", "input_ids:(1,2)", "input_ids:[-1,2]"):
        with pytest.raises(BuildConfigError, match="--trt-max-shapes"):
            parse_shape_args([bad])


def test_profiles_from_the_manifest_with_overrides(bundle: Path) -> None:
    m = load_manifest(bundle, verify=False)
    graphs = m.graph_names()
    segments = m.decoder_segments()
    base = resolve_profiles(m, BuildOptions())
    assert list(base) == list(graphs) and set(graphs) == set(m.trt_profiles)
    for g in graphs:
        assert base[g] == m.trt_profiles[g]  # nothing to add: every dynamic input of every profile has a range
        assert list(base[g]) == (["prefill", "decode"] if g.startswith("decoder_segment_") else ["all"])
    seg0, last = segment_graph(0), segment_graph(segments[-1].index)
    k0 = f"past_key_values.{segments[0].attention_blocks[0]}.key"
    assert set(base[SPLICE]["all"]) == {"inputs_embeds", "visual_tokens", "image_offset"}
    assert set(base[seg0]["decode"]) == {"hidden_states", "position_ids", *(
        f"past_key_values.{i}.{kv}" for i in segments[0].attention_blocks for kv in ("key", "value"))}
    assert base[seg0]["prefill"][k0]["max"][2] == 0 and base[seg0]["decode"]["hidden_states"]["max"][1] == 1
    d = m.geometry["decoder"]["hidden_size"]
    kv = base[seg0]["decode"][k0]["max"]
    over = resolve_profiles(m, BuildOptions(
        max_shapes={f"{seg0}:decode/{k0}": [kv[0], kv[1], kv[2] + 100, kv[3]], "input_ids": [2, 100],
                    f"{SPLICE}/inputs_embeds": [2, 100, d], "*:decode/hidden_states": [2, 1, d]},
        opt_shapes={"input_ids": [1, 50]}))
    assert over[seg0]["decode"][k0]["max"][2] == kv[2] + 100
    assert over[seg0]["prefill"][k0] == base[seg0]["prefill"][k0]  # graph:profile -> that profile only
    assert over[SPLICE]["all"]["inputs_embeds"]["max"] == [2, 100, d]
    assert over[EMBED]["all"]["input_ids"] == {"min": [1, 1], "opt": [1, 50], "max": [2, 100]}
    assert all(over[segment_graph(s.index)]["decode"]["hidden_states"]["max"] == [2, 1, d] for s in segments)
    assert over[last]["prefill"]["hidden_states"] == base[last]["prefill"]["hidden_states"]
    # graph/name applies to every profile of the graph; the most specific key wins
    both = resolve_profiles(m, BuildOptions(max_shapes={f"{seg0}/position_ids": [2, 500], f"{seg0}:decode/position_ids": [1, 1]}))
    assert both[seg0]["prefill"]["position_ids"]["max"] == [2, 500] and both[seg0]["decode"]["position_ids"]["max"] == [1, 1]
    with pytest.raises(BuildConfigError, match="no graph has such an input"):
        resolve_profiles(m, BuildOptions(max_shapes={"attention_mask": [1, 2]}))
    with pytest.raises(BuildConfigError, match="no graph decoder_step; its graphs are vision_encoder"):
        resolve_profiles(m, BuildOptions(max_shapes={"decoder_step/inputs_embeds": [1, 1, d]}))
    with pytest.raises(BuildConfigError, match=f"no profile step; {seg0} has the profiles prefill, decode"):
        resolve_profiles(m, BuildOptions(max_shapes={f"{seg0}:step/hidden_states": [1, 1, d]}))
    with pytest.raises(BuildConfigError, match=f"{VISION} has no input input_ids; the inputs are pixel_values"):
        resolve_profiles(m, BuildOptions(max_shapes={f"{VISION}/input_ids": [1, 2]}))
    with pytest.raises(BuildConfigError, match="no graph with a decode profile has an input pixel_values"):
        resolve_profiles(m, BuildOptions(max_shapes={"*:decode/pixel_values": [1, 3, 336, 336]}))
    with pytest.raises(BuildConfigError, match="write name, graph/name, graph:profile/name"):
        resolve_profiles(m, BuildOptions(max_shapes={f"{seg0}:/hidden_states": [1, 1, d]}))
    with pytest.raises(BuildConfigError, match="rank 2"):
        resolve_profiles(m, BuildOptions(max_shapes={"pixel_values": [2, 3]}))
    with pytest.raises(BuildConfigError, match="axis 1 is fixed at 3"):
        resolve_profiles(m, BuildOptions(max_shapes={"pixel_values": [2, 4, 336, 336]}))
    with pytest.raises(BuildConfigError, match="min <= opt <= max"):
        resolve_profiles(m, BuildOptions(min_shapes={"input_ids": [1, 100]}))
    with pytest.raises(BuildConfigError, match=r"decoder_segment_0 \(profile prefill\).*min <= opt <= max"):
        resolve_profiles(m, BuildOptions(max_shapes={"hidden_states": [2, 1, d]}))  # unqualified: prefill too


def test_plan_build_typing_and_precision_rules(bundle: Path) -> None:
    plain = plan_build(bundle, BuildOptions(verify=False))
    graphs = plain.manifest.graph_names()
    assert plain.strongly_typed and plain.flags == () and list(plain.onnx) == list(graphs)
    assert list(plain.profiles) == list(graphs)
    assert all(v == set() for v in plain.qdq.values())
    fp16 = plan_build(bundle, BuildOptions(precisions=("fp16",), verify=False))
    assert not fp16.strongly_typed and fp16.flags == ("FP16",)
    with pytest.raises(BuildConfigError, match="strongly typed build of an fp32 export"):
        plan_build(bundle, BuildOptions(precisions=("fp16",), strongly_typed=True, verify=False))
    with pytest.raises(BuildConfigError, match="one of --fp16 / --bf16"):
        plan_build(bundle, BuildOptions(precisions=("fp16", "bf16"), verify=False))
    for p in ("int8", "fp8"):
        with pytest.raises(BuildConfigError, match=r"explicit Q/DQ.*never uses TensorRT's implicit INT8 calibration.*TensorRT 11"):
            plan_build(bundle, BuildOptions(precisions=(p,), verify=False))
    with pytest.raises(BuildConfigError, match="--workspace"):
        plan_build(bundle, BuildOptions(workspace_mib=0, verify=False))
    with pytest.raises(BuildConfigError, match="0..5"):
        plan_build(bundle, BuildOptions(builder_optimization_level=7, verify=False))


def _qdq_model(path: Path, zp_type: int) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [0.1])
    zp = helper.make_tensor("zp", zp_type, [], [0])
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"]), helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [x], [y], [scale, zp])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    return path


def test_qdq_scan(tmp_path: Path, bundle: Path) -> None:
    assert qdq_types(_qdq_model(tmp_path / "int8.onnx", TensorProto.INT8)) == {"int8"}
    assert qdq_types(_qdq_model(tmp_path / "fp8.onnx", TensorProto.FLOAT8E4M3FN)) == {"fp8"}
    assert qdq_types(bundle / "onnx" / f"{VISION}.onnx") == set()


def test_build_cli_checks_options_before_needing_tensorrt(bundle: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(build_main, [str(bundle), "--int8"])
    assert res.exit_code == 2 and "explicit Q/DQ" in res.stderr and "Traceback" not in res.output
    res = runner.invoke(build_main, [str(bundle), "--trt-max-shapes", "input_ids:[1,x]"])
    assert res.exit_code == 2 and "cannot read 'input_ids:[1,x]'" in res.stderr
    res = runner.invoke(build_main, [str(bundle) + "-missing"])
    assert res.exit_code == 2 and "no bundle at" in res.stderr
    res = runner.invoke(build_main, [str(bundle), "--trt-max-shapes", "decoder_segment_0:step/hidden_states:[1,1,64]"])
    assert res.exit_code == 2 and "no profile step" in res.stderr and "Traceback" not in res.output
    res = runner.invoke(build_main, ["--help"])
    assert res.exit_code == 0 and "MiB" in res.output and "KEY:[d0,d1,...]" in res.output
    assert "graph:profile/name" in res.output and "'prefill'" in res.output and "'decode'" in res.output


def test_build_cli_without_tensorrt(bundle: Path) -> None:
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here; this test covers machines without it")
    except ImportError:
        pass
    res = CliRunner().invoke(build_main, [str(bundle), "--fp16", "--workspace", "1024"])
    assert res.exit_code == 2
    assert res.stderr.startswith("error: TensorRT is not installed (pip install tensorrt / JetPack)")
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.output


# -------------------------------------------------------------------------------------------------------------
# a fake `tensorrt`: the builder and the runtime without TensorRT or a GPU
# -------------------------------------------------------------------------------------------------------------

_ORT_TYPES = {"tensor(float)": "FLOAT", "tensor(float16)": "HALF", "tensor(bfloat16)": "BF16",
              "tensor(int64)": "INT64", "tensor(int32)": "INT32", "tensor(bool)": "BOOL"}
_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
          "INT32": torch.int32, "BOOL": torch.bool}


def _read(addr: int, shape: tuple[int, ...], dtype: torch.dtype) -> np.ndarray:
    n = math.prod(shape)
    t = torch.empty(shape, dtype=dtype)
    if n:
        ctypes.memmove(t.data_ptr(), addr, n * t.element_size())
    return t.numpy()


def _write(addr: int, a: np.ndarray) -> None:
    t = torch.from_numpy(np.ascontiguousarray(a))
    if t.numel():
        ctypes.memmove(addr, t.data_ptr(), t.numel() * t.element_size())


class _FakeTensor(SimpleNamespace):
    pass


class _FakeNetwork:
    def __init__(self) -> None:
        self.inputs: list[_FakeTensor] = []
        self.onnx = ""

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> _FakeTensor:
        return self.inputs[i]


class _FakeParser:
    num_errors = 0

    def __init__(self, network: _FakeNetwork, logger: object) -> None:
        self.network = network

    def parse_from_file(self, path: str) -> bool:
        g = onnx.load(path, load_external_data=False).graph
        inits = {t.name for t in g.initializer}
        self.network.onnx = path
        for vi in g.input:
            if vi.name not in inits:
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim)
                self.network.inputs.append(_FakeTensor(name=vi.name, shape=dims, is_shape_tensor=False))
        return True


class _FakeProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, list[list[int]]] = {}

    def set_shape(self, name: str, lo: list[int], opt: list[int], hi: list[int]) -> None:
        self.shapes[name] = [list(lo), list(opt), list(hi)]


class _FakeConfig:
    def __init__(self) -> None:
        self.profiles: list[_FakeProfile] = []
        self.network: _FakeNetwork | None = None

    def set_memory_pool_limit(self, pool: object, size: int) -> None:
        pass

    def set_flag(self, flag: object) -> None:
        pass

    def clear_flag(self, flag: object) -> None:
        pass

    def create_timing_cache(self, data: bytes) -> SimpleNamespace:
        return SimpleNamespace(serialize=lambda: b"fake timing cache")

    def set_timing_cache(self, cache: object, ignore_mismatch: bool) -> bool:
        self.cache = cache
        return True

    def get_timing_cache(self) -> Any:
        return self.cache

    def add_optimization_profile(self, profile: _FakeProfile) -> int:
        """-1 (as TensorRT) unless every dynamic input has min <= opt <= max that fits the input's rank."""
        assert self.network is not None
        for t in self.network.inputs:
            r = profile.shapes.get(t.name)
            if any(d < 0 for d in t.shape) and r is None:
                return -1
            if r is not None and not all(len(x) == len(t.shape) for x in r):
                return -1
            if r is not None and any(not a <= b <= c for a, b, c in zip(*r, strict=True)):
                return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1


class _FakeBuilder:
    built: list[dict[str, Any]] = []

    def __init__(self, logger: object) -> None:
        self.config = _FakeConfig()

    def create_network(self, flags: int) -> _FakeNetwork:
        self.network = _FakeNetwork()
        self.config.network = self.network
        return self.network

    def create_builder_config(self) -> _FakeConfig:
        return self.config

    def create_optimization_profile(self) -> _FakeProfile:
        return _FakeProfile()

    def build_serialized_network(self, network: _FakeNetwork, config: _FakeConfig) -> bytes:
        record = {"onnx": network.onnx, "profiles": [p.shapes for p in config.profiles]}
        _FakeBuilder.built.append(record)
        return json.dumps(record).encode()


class _FakeContext:
    """An execution context that runs the engine's ONNX graph in ONNX Runtime at the bound addresses."""

    def __init__(self, engine: _FakeEngine, user_managed: bool) -> None:
        self.engine, self.user_managed = engine, user_managed
        self.profile: int | None = None
        self.memory: tuple[int, int] | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.profile = index
        return 0 <= index < self.engine.num_optimization_profiles

    def set_device_memory(self, ptr: int, size: int) -> None:
        self.memory = (ptr, size)

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        assert self.profile is not None
        r = self.engine.profiles[self.profile].get(name)
        if r is not None and (len(shape) != len(r[0]) or any(not a <= d <= c for d, a, c in zip(shape, r[0], r[2], strict=True))):
            return False  # TensorRT: the shape is outside the context's optimization profile
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, addr: int) -> bool:
        assert addr, f"{name}: TensorRT needs a non-null address, also for an empty tensor"
        self.addresses[name] = addr
        return True

    def _symbols(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for i in self.engine.session.get_inputs():
            for d, v in zip(i.shape, self.shapes[i.name], strict=True):
                if isinstance(d, str) and d.isidentifier():
                    out[d] = v
        return out

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.shapes:
            return self.shapes[name]
        sym = self._symbols()
        o = next(o for o in self.engine.session.get_outputs() if o.name == name)
        return tuple(d if isinstance(d, int) else int(eval(d, {"__builtins__": {}}, sym)) for d in o.shape)

    def execute_async_v3(self, stream: int) -> bool:
        if self.user_managed and self.memory is None:
            return False
        sess = self.engine.session
        feeds = {i.name: _read(self.addresses[i.name], self.shapes[i.name], _TORCH[_ORT_TYPES[i.type]]) for i in sess.get_inputs()}
        for o, a in zip(sess.get_outputs(), sess.run(None, feeds), strict=True):
            assert tuple(a.shape) == self.get_tensor_shape(o.name), o.name
            _write(self.addresses[o.name], a)
        self.engine.runs.append(self.engine.profile_names[self.profile or 0])
        return True


class _FakeEngine:
    def __init__(self, record: dict[str, Any]) -> None:
        self.session = ort.InferenceSession(record["onnx"], providers=["CPUExecutionProvider"])
        self.io = [(i, "INPUT") for i in self.session.get_inputs()] + [(o, "OUTPUT") for o in self.session.get_outputs()]
        self.profiles = [{n: r for n, r in p.items()} for p in record["profiles"]]
        self.profile_names = [str(k) for k in range(len(self.profiles))]
        self.contexts: list[_FakeContext] = []
        self.runs: list[str] = []

    num_io_tensors = property(lambda self: len(self.io))
    num_optimization_profiles = property(lambda self: len(self.profiles))

    def get_tensor_name(self, i: int) -> str:
        return self.io[i][0].name

    def _io(self, name: str) -> tuple[Any, str]:
        return next(x for x in self.io if x[0].name == name)

    def get_tensor_dtype(self, name: str) -> str:
        return _ORT_TYPES[self._io(name)[0].type]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else -1 for d in self._io(name)[0].shape)

    def get_tensor_mode(self, name: str) -> str:
        return self._io(name)[1]

    def get_tensor_location(self, name: str) -> str:
        return "DEVICE"

    def get_tensor_profile_shape(self, name: str, k: int) -> list[list[int]]:
        return self.profiles[k][name]

    def get_device_memory_size_for_profile_v2(self, k: int) -> int:
        return 4096 * (k + 1)

    def create_execution_context(self, strategy: str = "STATIC") -> _FakeContext:
        ctx = _FakeContext(self, strategy == "USER_MANAGED")
        self.contexts.append(ctx)
        return ctx


class _FakeRuntime:
    engines: dict[str, _FakeEngine] = {}

    def __init__(self, logger: object) -> None:
        pass

    def deserialize_cuda_engine(self, data: bytes) -> _FakeEngine | None:
        try:
            record = json.loads(data)
        except ValueError:
            return None
        engine = _FakeEngine(record)
        _FakeRuntime.engines[Path(record["onnx"]).stem] = engine
        return engine


def fake_tensorrt() -> SimpleNamespace:
    """The part of the TensorRT 10 Python API that engines.builder and engines.trt_backend use."""
    _FakeBuilder.built = []
    _FakeRuntime.engines = {}
    logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=0: None})
    return SimpleNamespace(
        __version__="10.99.0",
        Logger=logger,
        Builder=_FakeBuilder,
        OnnxParser=_FakeParser,
        Runtime=_FakeRuntime,
        NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1),
        BuilderFlag=SimpleNamespace(FP16="FP16", BF16="BF16", INT8="INT8", FP8="FP8", TF32="TF32"),
        MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"),
        DataType=SimpleNamespace(**{k: k for k in _TORCH}),
        TensorIOMode=SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"),
        TensorLocation=SimpleNamespace(DEVICE="DEVICE", HOST="HOST"),
        ExecutionContextAllocationStrategy=SimpleNamespace(STATIC="STATIC", USER_MANAGED="USER_MANAGED"),
        ICudaEngine=_FakeEngine,
        IExecutionContext=_FakeContext,
    )


FAKE_TARGET = GpuTarget("10.99.0", 90, "NVIDIA Fake")


@pytest.fixture(scope="module")
def fake_built(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SimpleNamespace, list[dict[str, Any]]]:
    """A symlinked copy of the bundle with engines from the fake builder, through ficoco-build."""
    trt = fake_tensorrt()
    b = linked_copy(bundle, tmp_path_factory.mktemp("fake-trt") / "bundle")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("engines.trt_backend.import_tensorrt", lambda: trt)
        mp.setattr("engines.builder.import_tensorrt", lambda: trt)
        mp.setattr("engines.trt_backend.local_target", lambda device=0: FAKE_TARGET)
        res = CliRunner().invoke(build_main, [str(b), "--timing-cache", str(b.parent / "timing.cache"), "--no-verify"])
    assert res.exit_code == 0, res.output
    return b, trt, list(_FakeBuilder.built)


def test_fake_build_one_engine_per_graph_with_every_profile(fake_built: tuple[Path, SimpleNamespace, list[dict[str, Any]]]) -> None:
    b, _, built = fake_built
    m = load_manifest(b, verify=False)
    graphs = m.graph_names()
    em = read_engine_manifest(b / "engines" / FAKE_TARGET.dirname)
    assert em.schema_version == ENGINE_SCHEMA_VERSION == 2
    assert list(em.engines) == list(graphs) and [Path(r["onnx"]).stem for r in built] == list(graphs)
    for g, record in zip(graphs, built, strict=True):
        names = list(m.trt_profiles[g])
        assert em.engines[g]["profiles"] == names == em.profile_names(g)
        assert em.profiles[g] == m.trt_profiles[g]
        # the builder config got every profile, in order, each with every dynamic input's range
        assert len(record["profiles"]) == len(names) == (2 if g.startswith("decoder_segment_") else 1)
        for pname, shapes in zip(names, record["profiles"], strict=True):
            assert shapes == {n: [r["min"], r["opt"], r["max"]] for n, r in m.trt_profiles[g][pname].items()}
    seg0 = built[list(graphs).index(segment_graph(0))]["profiles"]
    assert seg0[0]["past_key_values.0.key"][2][2] == 0 and seg0[1]["hidden_states"][2][1] == 1  # prefill, decode
    assert (b.parent / "timing.cache").read_bytes() == b"fake timing cache"


def test_fake_build_refuses_a_profile_tensorrt_rejects(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engines.builder import BuildError, _build_one

    trt = fake_tensorrt()
    plan = plan_build(bundle, BuildOptions(verify=False))
    seg0 = segment_graph(0)
    del plan.profiles[seg0]["decode"]["hidden_states"]  # a dynamic input without a range in one profile
    with pytest.raises(BuildConfigError, match=f"{seg0}: TensorRT sees input hidden_states .* profile decode has no range"):
        _build_one(trt, None, plan, seg0, b"")
    monkeypatch.setattr(_FakeConfig, "add_optimization_profile", lambda self, p: -1)
    with pytest.raises(BuildError, match=f"{seg0}: TensorRT refused optimization profile prefill"):
        _build_one(trt, None, plan, seg0, b"")


def _fake_stages(b: Path, trt: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> TrtStages:
    monkeypatch.setattr("engines.trt_backend.import_tensorrt", lambda: trt)
    stages, engine_dir, _ = trt_stages(b, load_manifest(b, verify=False), target=FAKE_TARGET, torch_device=torch.device("cpu"))
    assert engine_dir.name == FAKE_TARGET.dirname
    return stages


def test_fake_engines_generate_the_onnxruntime_tokens(fake_built: tuple[Path, SimpleNamespace, list[dict[str, Any]]],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    b, trt, _ = fake_built
    st = _fake_stages(b, trt, monkeypatch)
    engines = _FakeRuntime.engines
    m = load_manifest(b, verify=False)
    segments = st.segments
    seg0, last = segment_graph(0), segment_graph(segments[-1].index)
    # two contexts per segment engine, one elsewhere, all on one shared scratch buffer of the largest profile
    for g in m.graph_names():
        n = 2 if g.startswith("decoder_segment_") else 1
        assert len(engines[g].contexts) == n and [c.profile for c in engines[g].contexts] == list(range(n))
        assert st.sessions[g].profile_names == tuple(m.trt_profiles[g])
    assert st.scratch is not None and st.scratch.nbytes == 4096 * 2
    assert {c.memory for e in engines.values() for c in e.contexts} == {(st.scratch.buffer.data_ptr(), 4096 * 2)}
    # capacity: the decode profile's longest past + 1
    k0 = f"past_key_values.{segments[0].attention_blocks[0]}.key"
    assert st.kv_capacity["present.0.key"] == m.trt_profiles[seg0]["decode"][k0]["max"][2] + 1

    front = Frontend.from_bundle(b, verify=False)
    images = [test_image("chelsea"), test_image("astronaut")]
    px = front.preprocess(images)
    ids, offsets = front.tokenize([QUESTION, QUESTION])
    ref_stages = ort_stages(b / "onnx", provider="cpu", segments=segments)
    with torch.inference_mode():
        got = generate_tokens(st, px, ids, offsets, 6)
        ref = generate_tokens(ref_stages, px, ids, offsets, 6)
        assert got.tolist() == ref.tolist()
        for e in engines.values():
            e.runs.clear()
        # prefill: every segment on its prefill profile, presents in set 0; steps alternate 1, 0, ...
        visual = st.encode_image(px[:1])
        logits, past = st.prefill(st.embed(ids[:1]), visual, offsets[:1])
        assert engines[seg0].runs == ["0"] and engines[reduce_graph(1)].runs == ["0"] and engines[last].runs == ["0"]
        assert all(p.data_ptr() == st._sets[0][n].data_ptr() for p, n in zip(past, st.present_names, strict=True))
        ref_logits, ref_past = ref_stages.prefill(ref_stages.embed(ids[:1]), ref_stages.encode_image(px[:1]), offsets[:1])
        np.testing.assert_allclose(logits, ref_logits, rtol=1.3e-6, atol=1e-5)
        np.testing.assert_allclose(past[-1].numpy(), ref_past[-1], rtol=1.3e-6, atol=1e-5)
        position = torch.tensor([ids.shape[1] + segments[0].span])
        token = logits.argmax(-1)[:, None]
        _, past1 = st.step(st.embed(token), position, past)
        _, past2 = st.step(st.embed(token), position + 1, past1)
        assert engines[seg0].runs == ["0", "1", "1"] and engines[last].runs == ["0", "1", "1"]
        assert engines[reduce_graph(1)].runs == ["0"]  # decode skips the reductions
        assert past1[0].data_ptr() == st._sets[1]["present.0.key"].data_ptr() and past1[0].shape[2] == past[0].shape[2] + 1
        assert past2[0].data_ptr() == st._sets[0]["present.0.key"].data_ptr() and past2[0].shape[2] == past[0].shape[2] + 2
        _, ref_past1 = ref_stages.step(ref_stages.embed(token), position, ref_past)
        np.testing.assert_allclose(past1[-1].numpy(), ref_past1[-1], rtol=1.3e-6, atol=1e-5)
        # several tokens on a cache fit neither profile: refused before TensorRT sees them
        feeds = st.segment_feeds(segments[0], torch.zeros(1, 2, m.geometry["decoder"]["hidden_size"]),
                                 torch.zeros(1, 2, dtype=torch.long), past[: 2 * len(segments[0].attention_blocks)])
        with pytest.raises(SessionError, match=f"{seg0}: no optimization profile of the engine takes these inputs "
                                               r"\(prefill: .*; decode: hidden_states \[1, 2, "):
            st.sessions[seg0].run(feeds)


def test_fake_engines_without_shared_context_memory(fake_built: tuple[Path, SimpleNamespace, list[dict[str, Any]]],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorRT 10.0 (no user-managed context memory): each context allocates its own."""
    b, trt, _ = fake_built
    older = SimpleNamespace(**{k: v for k, v in vars(trt).items() if k != "ExecutionContextAllocationStrategy"})
    st = _fake_stages(b, older, monkeypatch)
    assert st.scratch is None
    assert all(not c.user_managed and c.memory is None for e in _FakeRuntime.engines.values() for c in e.contexts)
    front = Frontend.from_bundle(b, verify=False)
    px = front.preprocess([test_image("chelsea")])
    ids, offsets = front.tokenize([QUESTION])
    with torch.inference_mode():
        assert generate_tokens(st, px, ids, offsets, 2).shape == (1, 2)


# -------------------------------------------------------------------------------------------------------------
# TensorRT and a GPU
# -------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trt_env() -> object:
    trt = pytest.importorskip("tensorrt", reason=NO_TRT)
    if not torch.cuda.is_available():
        pytest.skip(NO_TRT)
    return trt


@pytest.fixture(scope="module")
def built(trt_env: object, bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A symlinked copy of the bundle with fp32 engines (no TF32) and its timing cache."""
    b = linked_copy(bundle, tmp_path_factory.mktemp("trt") / "bundle")
    cache = b.parent / "timing.cache"
    res = CliRunner().invoke(build_main, [str(b), "--no-tf32", "--timing-cache", str(cache), "--builder-optimization-level", "1", "-v"])
    assert res.exit_code == 0, res.output
    return b, cache


@pytest.mark.gpu
def test_build_writes_engines_and_manifest(built: tuple[Path, Path], trt_env: object) -> None:
    from engines.engine_store import local_target

    b, cache = built
    target = local_target()
    m = load_manifest(b, verify=False)
    d = b / "engines" / target.dirname
    em = json.loads((d / ENGINE_MANIFEST).read_text())
    assert em["tensorrt_version"] == target.tensorrt_version and em["sm"] == target.sm and em["gpu_name"]
    assert em["schema_version"] == ENGINE_SCHEMA_VERSION
    assert list(em["engines"]) == list(m.graph_names()) and all((d / e["file"]).stat().st_size > 0 for e in em["engines"].values())
    assert all(em["engines"][g]["profiles"] == list(m.trt_profiles[g]) for g in m.graph_names())
    assert cache.stat().st_size > 0 and em["build"]["timing_cache"] == str(cache)
    res = CliRunner().invoke(build_main, [str(b), "--timing-cache", str(cache)])
    assert res.exit_code == 2 and "--force" in res.stderr  # never overwrites silently


@pytest.mark.gpu
def test_tensorrt_greedy_tokens_match_onnxruntime(built: tuple[Path, Path], trt_env: object, tmp_path: Path) -> None:
    from engines.runtime import Pipeline
    from engines.trt_backend import TrtSession

    b, _ = built
    trt_pipe = Pipeline.from_bundle(b, backend="tensorrt")
    ort_pipe = Pipeline.from_bundle(b, backend="onnxruntime", verify=False)
    assert trt_pipe.backend == "tensorrt" and isinstance(trt_pipe.stages, TrtStages)
    st = trt_pipe.stages
    seg0 = st.sessions[segment_graph(0)]
    assert isinstance(seg0, TrtSession) and seg0.profile_names == ("prefill", "decode") and len(seg0.contexts) == 2
    images = [test_image("chelsea"), test_image("astronaut")]
    got = trt_pipe.generate_batch(images, QUESTION, max_new_tokens=16, stop_token_ids=[])
    ref = ort_pipe.generate_batch(images, QUESTION, max_new_tokens=16, stop_token_ids=[])
    assert [a.token_ids for a in got] == [a.token_ids for a in ref]
    # the KV cache lives in the two preallocated buffer sets and stays on the GPU
    px = trt_pipe.preprocess(images[:1])
    ids, off = trt_pipe.tokenize([QUESTION])
    with torch.inference_mode():
        logits, past = st.prefill(st.embed(ids), st.encode_image(px), off)
        assert past[0].is_cuda and past[0].data_ptr() == st._sets[0]["present.0.key"].data_ptr()
        position = torch.tensor([ids.shape[1] + st.segments[0].span])
        _, past2 = st.step(st.embed(logits.argmax(-1)[:, None]), position, past)
        assert past2[0].data_ptr() == st._sets[1]["present.0.key"].data_ptr() and past2[0].shape[2] == past[0].shape[2] + 1
    t: dict = {}
    trt_pipe.generate(images[0], QUESTION, max_new_tokens=8, stop_token_ids=[], timings=t)
    assert t["prefill_ms"] > 0 and t["decode_tokens_per_s"] > 0


@pytest.mark.gpu
def test_run_cli_on_tensorrt_and_refusal_of_foreign_engines(built: tuple[Path, Path], trt_env: object, tmp_path: Path) -> None:
    from engines.engine_store import local_target

    b, _ = built
    img = tmp_path / "cat.png"
    test_image("chelsea").save(img)
    res = CliRunner().invoke(run_main, [str(b), "--image", str(img), "--prompt", QUESTION, "--backend", "tensorrt", "--max-new-tokens", "8"])
    assert res.exit_code == 0, res.output
    other = linked_copy(b, tmp_path / "foreign")
    target = local_target()
    mpath = other / "engines" / target.dirname / ENGINE_MANIFEST
    em = json.loads(mpath.read_text())
    em["sm"] = target.sm + 1
    mpath.unlink()
    mpath.write_text(json.dumps(em))
    res = CliRunner().invoke(run_main, [str(other), "--image", str(img), "--prompt", QUESTION, "--backend", "tensorrt"])
    assert res.exit_code == 2 and f"sm{target.sm + 1}" in res.stderr and "ficoco-build" in res.stderr
