"""Shared fixtures: the two built-in models, each built once per test session.

`tiny` builds in well under a second. `smol` is built once per machine into its cache
(`$FICOCO_CACHE` or ~/.cache/ficoco-export; ≈ 30 s the first time) and loads from there in a few seconds.
Treat both as read-only: tests that need a different attention implementation or dtype build their own.
"""

from __future__ import annotations

import pytest

from ficoco.models import LoadedModel, build_smol, build_tiny


@pytest.fixture(scope="session")
def tiny() -> LoadedModel:
    return build_tiny(seed=0)


@pytest.fixture(scope="session")
def smol() -> LoadedModel:
    return build_smol(seed=0)


# The session's one exported bundle: tiny, FiCoCo-VL keeping 144 of 576 visual tokens, with the decoder
# steps in blocks 4..7 (4 steps instead of 27: 11 graphs, so the export stays quick while every graph kind, FiCoCo-L
# included, is in the graphs). Shared by the export, runtime and engine tests; treat it as read-only.
TEST_BUNDLE_REQUEST = {"variant": "VL", "ratio": 0.25, "layers": {"l_end": 7}}


@pytest.fixture(scope="session")
def tiny_bundle(tiny: LoadedModel, tmp_path_factory: pytest.TempPathFactory):
    from exporter.export import ExportOptions
    from exporter.pipeline import export_bundle
    from ficoco.planner import ScheduleRequest

    out = tmp_path_factory.mktemp("bundles") / "tiny-vl25"
    opts = ExportOptions(max_batch_size=2, max_text_len=128, max_new_tokens=32)
    return export_bundle(tiny, ScheduleRequest(**TEST_BUNDLE_REQUEST), out, opts)
