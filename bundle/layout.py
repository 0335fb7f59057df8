"""The bundle on disk: its layout, file hashes, and the atomic write of a whole bundle.

    <out>/manifest.json
    <out>/onnx/<graph>.onnx (+ .onnx.data weights) for every graph of bundle.names.graph_names
    <out>/tokenizer/                    tokenizer files (absent in a --graph-only bundle)
    <out>/preprocessor_config.json      image preprocessing (resize / crop / normalise)

A bundle is built in a hidden sibling directory and renamed into place only when complete, so a failed
or interrupted export never leaves a half bundle at the output path (`staging_dir`). Every file's sha256
is in the manifest (`bundle.manifest`), which refuses a bundle whose files no longer match.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ficoco.atomic import write_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ONNX_DIR = "onnx"
TOKENIZER_DIR = "tokenizer"
PREPROCESSOR = "preprocessor_config.json"
GENERATION_CONFIG = "generation_config.json"  # the checkpoint's generation defaults (optional)
REPORTS_DIR = "reports"  # what ficoco-check / -bench / -quantize write; not hashed
ENGINES_DIR = "engines"  # TensorRT engines and caches built on the target; not hashed


class BundleError(RuntimeError):
    """A bundle is missing, malformed or was modified after export (the message says which and what to do)."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_files(root: Path, skip: tuple[str, ...] = (MANIFEST,)) -> dict[str, str]:
    """sha256 of every file under `root` (relative POSIX paths), except the manifest itself."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in skip and rel.split("/")[0] not in (REPORTS_DIR, ENGINES_DIR):
            out[rel] = sha256_file(p)
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    """`data` as indented JSON, written atomically (`ficoco.atomic`)."""
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while building, so cleanup runs (SIGKILL leaves only a hidden temp dir)."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class OutputLocked(BundleError):
    """Another process is writing the same output path."""


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `out` (the file `.NAME.lock` beside it) for the block.

    Non-blocking: a second writer of the same path fails at once with OutputLocked instead of racing the
    first to the final rename. The lock file is removed on exit; a lock file whose inode changed while we
    waited (removed by the previous holder) is re-opened, so two holders can never coexist."""
    import fcntl

    path = out.with_name(f".{out.name}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = f" (pid {int(os.pread(fd, 32, 0).decode().strip())})"
            os.close(fd)
            raise OutputLocked(
                f"another ficoco process is writing {out}{holder}; wait for it to finish, or choose another -o."
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _remove_stale(out: Path) -> None:
    """Remove what an export to `out` killed with SIGKILL left behind (called with the output lock held)."""
    for p in sorted(out.parent.glob(f".{out.name}.partial-*")) + sorted(out.parent.glob(f".{out.name}.old-*")):
        log.warning("removing %s, left behind by an interrupted run", p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


def _refuse_existing(out: Path, force: bool, when: str) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise BundleError(f"output {out} {when} and is not empty; pass --force to replace it, or choose another -o.")


@contextlib.contextmanager
def staging_dir(out: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory beside `out`; on success rename it to `out`, on any error remove it.

    Holds the output lock throughout (`output_lock`), removes stale partials of earlier killed runs, and
    refuses a non-empty `out` unless `force`, both at the start and again at the rename (a directory
    that appeared meanwhile is never replaced without --force). With `force` the old content (a
    directory or a file) is replaced only after success.
    """
    out = Path(out).resolve()
    _refuse_existing(out, force, "exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        _remove_stale(out)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        os.chmod(stage, 0o755)  # mkdtemp's 0700 would become the bundle's mode
        try:
            with _terminate_as_interrupt():
                yield stage
                _refuse_existing(out, force, "appeared during the run")
                old = None
                if out.exists() or out.is_symlink():
                    old = out.with_name(f".{out.name}.old-{os.getpid()}")
                    os.replace(out, old)
                os.replace(stage, out)
                if old is not None:
                    if old.is_dir() and not old.is_symlink():
                        shutil.rmtree(old, ignore_errors=True)
                    else:
                        old.unlink()
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
