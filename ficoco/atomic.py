"""The one atomic writer: a temporary file beside the target, renamed onto it only when complete.

A reader never sees a half-written file, and an error or interrupt leaves the old file (or nothing)
in place, with no temporary file behind. Whole directories (bundles) are staged the same way by
`bundle.layout.staging_dir`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], make_parents: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; on success it is synced and renamed onto `path`
    (mode 0644), on any error removed. A missing parent directory is an error unless `make_parents`."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if make_parents:
        parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike[str], data: str | bytes, make_parents: bool = False) -> None:
    """Write `data` (text as UTF-8, or bytes) to `path` atomically."""
    with atomic_path(path, make_parents) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
