"""`exporter.pages.release_mapped_pages`: a memory-mapped checkpoint's weight pages leave RSS and come back
unchanged; a mapping with a written page, or a model in anonymous memory, is left alone."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from exporter.pages import file_mappings, release_mapped_pages
from ficoco.models import load_model, save_model_dir

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps (Linux only)")


def _resident_in(paths: set[str]) -> int:
    """Bytes of this process's resident pages (Rss) in mappings of `paths`."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and ":" not in head[0] and len(head) >= 5:
            inside = len(head) > 5 and head[5] in paths
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def _touch(model: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def test_release_drops_mapped_pages_and_keeps_the_weights(tiny, tmp_path: Path) -> None:
    d = save_model_dir(tiny, tmp_path / "tiny-dir")
    loaded = load_model(str(d))
    shards = {str(p.resolve()) for p in d.glob("*.safetensors")}
    if not any(m.path in shards for m in file_mappings()):
        pytest.skip("this transformers / safetensors loads the weights into anonymous memory, not a file mapping")
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    checksum = _touch(loaded.model)
    resident = _resident_in(shards)
    assert resident > 1 << 20  # the tiny model's weights (~ several MB) were read in
    advised = release_mapped_pages(loaded.model)
    assert advised > 0
    assert _resident_in(shards) < resident // 4  # only pages shared with a tensor's neighbours remain
    assert _touch(loaded.model) == checksum
    for n, p in loaded.model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_a_written_mapping_and_anonymous_tensors_are_left_alone(tiny, tmp_path: Path) -> None:
    assert release_mapped_pages(tiny.model) == 0  # built in memory: no file mapping to release
    d = save_model_dir(tiny, tmp_path / "tiny-dir")
    loaded = load_model(str(d))
    shards = {str(p.resolve()) for p in d.glob("*.safetensors")}
    if not any(m.path in shards for m in file_mappings()):
        pytest.skip("this transformers / safetensors loads the weights into anonymous memory, not a file mapping")
    p = next(iter(loaded.model.parameters()))
    with torch.no_grad():
        p.add_(1.0)  # a copy-on-write page: the mapping now holds data the file does not
    written = p.detach().clone()
    assert release_mapped_pages(loaded.model) == 0
    assert torch.equal(p, written)
