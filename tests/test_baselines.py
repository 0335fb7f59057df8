"""The random-pruning and spatial-pooling baselines (`ficoco.methods.random_prune`, `ficoco.methods.pool`):
planned token counts in the reduced model on `tiny`, determinism and image independence of `random`, the
uniform lattice `pool` keeps, and its merge equal to a direct size-weighted mean over each kept patch's cell."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ficoco.images import test_image
from ficoco.methods import MethodParams, VisionTokens, vision_step
from ficoco.methods.pool import lattice_keys
from ficoco.methods.random_prune import patch_order, splitmix64
from ficoco.models import LoadedModel
from ficoco.params import RandomParams
from ficoco.planner import plan
from ficoco.preprocess import preprocess_image
from ficoco.reduced_llava import ReducedLlava, VisionOutput
from ficoco.schedule import ReductionStep

GRID = 24  # tiny has LLaVA-1.5's vision geometry: 24 x 24 patches


def _pixels(loaded: LoadedModel, *images: str) -> torch.Tensor:
    return torch.cat([preprocess_image(test_image(name), loaded.processor_config) for name in images])


def _encode(
    loaded: LoadedModel, method: str, px: torch.Tensor, params: MethodParams | None = None, **budget: object
) -> tuple[ReducedLlava, VisionOutput]:
    reduced = ReducedLlava(loaded.model, plan(loaded.geometry, "V", method, **budget), params).eval()
    with torch.no_grad():
        return reduced, reduced.encode_image(px)


def _blocks_hold_one(pos: list[int], side: int) -> bool:
    """Every side x side block of the grid holds exactly one of the patches `pos`."""
    counts: dict[tuple[int, int], int] = {}
    for p in pos:
        r, c = divmod(p, GRID)
        counts[r // side, c // side] = counts.get((r // side, c // side), 0) + 1
    return len(counts) == (GRID // side) ** 2 and set(counts.values()) == {1}


# ------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("method", ["random", "pool"])
@pytest.mark.parametrize("budget, kept", [({"ratio": 0.25}, 144), ({"keep_tokens": 64}, 64)])
def test_reduced_model_keeps_planned_tokens(tiny: LoadedModel, method: str, budget: dict, kept: int) -> None:
    reduced, out = _encode(tiny, method, _pixels(tiny, "astronaut"), **budget)
    s = reduced.schedule
    assert s.visual_tokens_final == kept and out.visual.shape == (1, kept, tiny.geometry.decoder.hidden_size)
    assert set(out.plans) == {st.layer for st in s.vision.steps} == set(range(12, 23))
    for st in s.vision.steps:
        p = out.plans[st.layer]
        assert p.kept.shape == (1, st.n_out) and p.sources.shape == (1, st.r)
        assert p.targets.shape == (1, st.r, st.targets_per_source) and int(p.kept[0, 0]) == 0  # [CLS] stays
    assert torch.all(out.pos[:, 1:] > out.pos[:, :-1]) and int(out.pos.min()) >= 0  # raster order, patches only
    assert torch.isfinite(out.visual).all()


def test_random_is_deterministic_and_ignores_the_image(tiny: LoadedModel) -> None:
    px = _pixels(tiny, "astronaut", "chelsea")
    _, a = _encode(tiny, "random", px, ratio=0.25)
    _, b = _encode(tiny, "random", px, ratio=0.25)
    assert torch.equal(a.visual, b.visual) and torch.equal(a.pos, b.pos)
    assert torch.equal(a.pos[0], a.pos[1])  # two images, one kept set
    rank = patch_order(0, GRID * GRID)
    assert a.pos[0].tolist() == [p for p in range(GRID * GRID) if rank[p] < 144]  # the first 144 of the order
    _, single = _encode(tiny, "random", px[:1], ratio=0.25, v_start=22)  # one step: the same kept set
    assert torch.equal(single.pos[0], a.pos[0])
    _, other = _encode(tiny, "random", px[:1], MethodParams(random=RandomParams(seed=1)), ratio=0.25)
    assert not torch.equal(other.pos[0], a.pos[0])


def test_random_order_is_seeded_splitmix() -> None:
    assert splitmix64(0) == 0xE220A8397B1DCDAF  # the reference SplitMix64 stream from state 0
    rank = patch_order(3, 576)
    assert sorted(rank) == list(range(576)) and rank == patch_order(3, 576) != patch_order(4, 576)
    with pytest.raises(ValueError, match="seed"):
        RandomParams(seed=-1)


@pytest.mark.parametrize("budget, side", [({"ratio": 0.25}, 2), ({"keep_tokens": 36}, 4)])
def test_pool_keeps_a_uniform_lattice(tiny: LoadedModel, budget: dict, side: int) -> None:
    """144 kept patches: one in every 2 x 2 block (even row and column); 36: one in every 4 x 4 block."""
    _, out = _encode(tiny, "pool", _pixels(tiny, "astronaut", "chelsea"), **budget)
    for row in out.pos.tolist():
        assert _blocks_hold_one(row, side)
        assert all(divmod(p, GRID)[0] % side == 0 and p % GRID % side == 0 for p in row)
    assert torch.equal(out.pos[0], out.pos[1])


def test_pool_order_nests_lattices() -> None:
    keys = lattice_keys(GRID)
    assert len(set(keys)) == GRID * GRID
    order = sorted(range(GRID * GRID), key=keys.__getitem__)
    assert _blocks_hold_one(order[:144], 2) and _blocks_hold_one(order[:36], 4)
    assert _blocks_hold_one(order[:9], 8)
    # 72: the 4-lattice plus the centres of its cells (a quincunx)
    assert sorted(order[:72]) == sorted(
        p for p in range(GRID * GRID) if (p // GRID) % 2 == 0 and (p % GRID) % 2 == 0 and (p // GRID) % 4 == (p % GRID) % 4
    )


# ------------------------------------------------------------------------------------ the pooling step
def _step(method: str, hidden: torch.Tensor, pos: torch.Tensor, size: torch.Tensor, r: int) -> VisionTokens:
    b, n, _ = hidden.shape
    q = k = torch.zeros(b, 2, n, 4)  # the baselines read no attention
    out, _ = vision_step(
        method, MethodParams(), VisionTokens(hidden, pos, size), q, k, ReductionStep(layer=12, n=n, r=r, targets_per_source=1),
        grid_side=GRID, scale=0.5,
    )
    return out


def test_pool_step_is_2x2_average_pooling() -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 577, 8, generator=g)
    pos = torch.arange(-1, 576).expand(2, -1)
    out = _step("pool", hidden, pos, torch.ones(2, 577, 1), 432)
    grid = hidden[:, 1:].reshape(2, GRID, GRID, 8).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(grid, 2).permute(0, 2, 3, 1).reshape(2, 144, 8)
    torch.testing.assert_close(out.hidden[:, 1:], pooled, atol=1e-6, rtol=1e-6)
    assert torch.equal(out.hidden[:, 0], hidden[:, 0])  # [CLS] untouched
    assert torch.equal(out.size[:, 1:], torch.full((2, 144, 1), 4.0)) and float(out.size[0, 0]) == 1.0


@pytest.mark.parametrize("present, r", [(576, 512), (300, 200), (140, 3)])
def test_pool_step_is_the_cell_mean(present: int, r: int) -> None:
    """Any present subset and sizes: kept token j = sum_{p in cell(j)} m_p x_p / sum m_p, cell(j) = the
    patches whose nearest kept patch (squared grid distance, ties to the lowest index) is j."""
    g = torch.Generator().manual_seed(present + r)
    patches = torch.sort(torch.randperm(GRID * GRID, generator=g)[:present]).values
    pos = torch.cat([torch.tensor([-1]), patches]).unsqueeze(0)
    hidden = torch.randn(1, present + 1, 6, generator=g)
    size = 1.0 + torch.randint(0, 3, (1, present + 1, 1), generator=g).float()
    out = _step("pool", hidden, pos, size, r)

    keys = lattice_keys(GRID)
    kept = sorted(sorted(patches.tolist(), key=keys.__getitem__)[: present - r])
    assert out.pos[0, 1:].tolist() == kept
    acc = {j: torch.zeros(6, dtype=torch.float64) for j in kept}
    mass = dict.fromkeys(kept, 0.0)
    for slot, p in enumerate(patches.tolist(), start=1):
        owner = min(kept, key=lambda j: ((j // GRID - p // GRID) ** 2 + (j % GRID - p % GRID) ** 2, j))
        acc[owner] += float(size[0, slot]) * hidden[0, slot].double()
        mass[owner] += float(size[0, slot])
    expected = torch.stack([acc[j] / mass[j] for j in kept]).float()
    torch.testing.assert_close(out.hidden[0, 1:], expected, atol=1e-5, rtol=1e-5)
    assert out.size[0, 1:, 0].tolist() == [mass[j] for j in kept]


def test_random_step_prunes() -> None:
    g = torch.Generator().manual_seed(1)
    hidden, pos = torch.randn(1, 577, 5, generator=g), torch.arange(-1, 576).unsqueeze(0)
    out = _step("random", hidden, pos, torch.ones(1, 577, 1), 500)
    assert torch.equal(out.hidden, hidden[:, out.pos[0] + 1])  # the kept rows, unchanged
    assert torch.equal(out.size, torch.ones(1, 77, 1)) and int(out.pos[0, 0]) == -1


# ------------------------------------------------------------------------------------------------ ONNX
class _Step(torch.nn.Module):
    """One baseline step as a graph: (hidden, pos, size) -> (hidden', pos', size', kept)."""

    def __init__(self, method: str, step: ReductionStep) -> None:
        super().__init__()
        self.method, self.step = method, step

    def forward(self, hidden: torch.Tensor, pos: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q = k = torch.zeros(hidden.shape[0], 2, hidden.shape[1], 4)
        out, merge = vision_step(
            self.method, MethodParams(), VisionTokens(hidden, pos, size), q, k, self.step, grid_side=GRID, scale=0.5
        )
        return out.hidden, out.pos, out.size, merge.kept


@pytest.mark.parametrize("method", ["random", "pool"])
def test_baseline_step_exports_and_matches(method: str, tmp_path) -> None:
    """The step alone through the dynamo exporter (the full vision graph: the slow test in test_export.py):
    no random op in the graph, and ONNX Runtime keeps exactly PyTorch's tokens, at another batch size and
    other positions than the trace's."""
    import onnx
    import onnxruntime as ort
    from torch.export import Dim

    from exporter.export import ExportOptions, _export
    from exporter.lint import has_errors, lint_files

    step = ReductionStep(layer=12, n=301, r=180, targets_per_source=1)
    module = _Step(method, step).eval()
    g = torch.Generator().manual_seed(2)

    def inputs(batch: int) -> tuple[torch.Tensor, ...]:
        pos = torch.stack([torch.sort(torch.randperm(576, generator=g)[:300]).values for _ in range(batch)])
        pos = torch.cat([torch.full((batch, 1), -1), pos], dim=1)
        size = 1.0 + torch.randint(0, 3, (batch, 301, 1), generator=g).float()
        return torch.randn(batch, 301, 8, generator=g), pos, size

    path = tmp_path / f"{method}.onnx"
    batch = Dim("batch", min=1, max=4)
    _export(module, inputs(2), ({0: batch}, {0: batch}, {0: batch}), ["hidden", "pos", "size"],
            ["hidden_out", "pos_out", "size_out", "kept"], path, ExportOptions(max_batch_size=4))
    graph = onnx.load(str(path))
    assert not {n.op_type for n in graph.graph.node} & {"RandomUniform", "RandomNormal", "RandomUniformLike", "Multinomial"}
    assert not has_errors(lint_files([path]))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = inputs(3)
    got = sess.run(None, dict(zip(["hidden", "pos", "size"], (t.numpy() for t in feeds), strict=True)))
    with torch.no_grad():
        ref = module(*feeds)
    for i in (1, 3):  # positions and kept slots: identical
        assert torch.equal(torch.from_numpy(got[i]), ref[i])
    torch.testing.assert_close(torch.from_numpy(got[0]), ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(got[2]), ref[2], atol=0.0, rtol=0.0)
