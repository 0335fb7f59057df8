"""The runtime install (no PyTorch, no transformers) runs a bundle and gets the full install's tokens."""

from __future__ import annotations

import re

import pytest

from engines.bench.runtime_install import InstallError, make_runtime_env, reference_answers, run_probe
from ficoco.images import test_image

#: pip's words when it cannot reach a package index: then the test cannot run here, which is not a failure
_OFFLINE = re.compile(r"No matching distribution|Could not find a version|NewConnectionError|Temporary failure in name resolution|"
                      r"Network is unreachable|ConnectTimeout")


def test_runtime_env_without_torch_runs_a_bundle_with_the_same_tokens(tiny_bundle, tmp_path) -> None:
    venv = tmp_path / "runtime-venv"
    try:
        make_runtime_env(venv)
    except InstallError as err:
        if _OFFLINE.search(str(err)):
            pytest.skip(f"no package index reachable to build the runtime environment: {str(err)[-300:]}")
        raise
    image = tmp_path / "rocket.png"
    test_image("rocket").save(image)
    questions = ["what is in the picture?", "describe it"]
    got = run_probe(venv, tiny_bundle, image, questions, 8)
    assert got["torch_installed"] is False and got["transformers_installed"] is False and got["torch_imported"] is False
    ref = reference_answers(tiny_bundle, image, questions, 8)
    assert [a["token_ids"] for a in got["answers"]] == [a["token_ids"] for a in ref["answers"]]
    assert all(len(a["token_ids"]) == 8 for a in got["answers"])
    assert got["sampled"] == ref["sampled"]  # the numpy sampler: one seed, one stream, in both installs
