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
