"""Selection flips: kept sets of a graph vs the reference's plans, ties between identical patches."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from exporter.selection import compare_steps, patch_pixels


def _plan(kept: list[int]) -> SimpleNamespace:
    return SimpleNamespace(kept=torch.tensor([kept]))


def test_flips_count_what_only_one_side_kept_and_ties_need_identical_pixels() -> None:
    # 4 patches of a 2x2 grid, 1x1 pixels each: patches 0 and 2 are white, 1 and 3 differ
    px = torch.tensor([[[[1.0, 0.2], [1.0, 0.7]]] * 3])  # [1, 3, 2, 2]
    patches = patch_pixels(px, 2)
    assert patches.shape == (1, 4, 3) and torch.equal(patches[0, 0], patches[0, 2])
    pos = np.array([[-1, 0, 1, 2, 3]])  # [CLS] + 4 patches
    plans = {3: _plan([0, 1, 2, 4]), 5: _plan([0, 1, 2])}
    # step 1: the graph kept span slot 3 (patch 2) instead of 1 (patch 0): identical pixels, a tie
    # step 2 (span of 4 slots after the reference's step 1): slot 2 (patch 1) swapped for slot 3 (patch 3): not a tie
    got = [np.array([[0, 2, 3, 4]]), np.array([[0, 1, 3]])]
    steps = compare_steps("vision", plans, got, pos, patches)
    assert [(s.block, s.kept, s.flips, s.tie_flips) for s in steps] == [(3, 4, 1, 1), (5, 3, 1, 0)]
    same = compare_steps("vision", plans, [p.kept.numpy() for p in plans.values()], pos, patches)
    assert all(s.flips == 0 for s in same)


def test_a_graph_with_other_steps_is_refused() -> None:
    with pytest.raises(ValueError, match="reduces at 1 blocks, the graph has 2"):
        compare_steps("decoder", {2: _plan([0, 1])}, [np.array([[0, 1]])] * 2, np.array([[0, 1, 2]]))
    with pytest.raises(ValueError, match="kept set of shape"):
        compare_steps("decoder", {2: _plan([0, 1])}, [np.array([[0, 1, 2]])], np.array([[0, 1, 2]]))
