"""The bundle on disk: its layout, `manifest.json`, file hashes, and the atomic write.

    <out>/manifest.json
    <out>/onnx/{vision_encoder,embed_tokens,decoder_prefill,decoder_step}.onnx (+ .onnx.data weights)
    <out>/tokenizer/                    tokenizer files (absent in a --graph-only bundle)
    <out>/preprocessor_config.json      image preprocessing (resize / crop / normalise)

A bundle is built in a hidden sibling directory and renamed into place only when complete, so a failed
or interrupted export never leaves a half bundle at the output path. Every file's sha256 is in the
manifest; `load_manifest(verify=True)` refuses a bundle whose files no longer match.
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

#: 2: the manifest carries its own digest ("integrity"); bundles of version 1 are refused (re-export).
SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
ONNX_DIR = "onnx"
TOKENIZER_DIR = "tokenizer"
PREPROCESSOR = "preprocessor_config.json"


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
        if p.is_file() and rel not in skip and not rel.startswith("reports/") and not rel.startswith("engines/"):
            out[rel] = sha256_file(p)
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    """`data` as indented JSON, written atomically (`ficoco.atomic`)."""
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


INTEGRITY = "integrity"


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no whitespace) without its "integrity" key.

    Through `files` (the sha256 of every other file) it covers the whole bundle: an edited value, a
    deleted `files` entry or an edited chat template all change it. It guards against accidents and
    naive edits, not against someone who recomputes it: it is not a signature."""
    body = {k: v for k, v in manifest.items() if k != INTEGRITY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Write `root`/manifest.json with its digest (the one writer of manifests; atomic like write_json)."""
    body = {k: v for k, v in manifest.items() if k != INTEGRITY}
    body[INTEGRITY] = {"sha256": manifest_digest(body), "covers": "canonical JSON of every other key; files by their sha256"}
    write_json(Path(root) / MANIFEST, body)


def load_manifest(bundle: str | os.PathLike[str], verify: bool = True) -> dict[str, Any]:
    """Read `<bundle>/manifest.json`, check its own digest; with `verify`, also every listed file's sha256."""
    root = Path(bundle)
    mpath = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"no bundle at {root}: the directory does not exist. Create one with `ficoco-export -o {root}`.")
    if not mpath.is_file():
        raise BundleError(f"{root} is not a ficoco-export bundle: {MANIFEST} is missing. Re-run `ficoco-export -o {root}`.")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{mpath} is not valid JSON ({e}); the bundle is damaged, re-export it.") from e
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath} cannot be read ({e}); the bundle is damaged, re-export it.") from e
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath} holds a JSON {type(manifest).__name__}, not an object; the bundle is damaged, re-export it.")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(
            f"{mpath} has schema version {manifest.get('schema_version')!r}; this ficoco-export reads version "
            f"{SCHEMA_VERSION}. Re-export the bundle with this version."
        )
    recorded = manifest.get(INTEGRITY)
    if not isinstance(recorded, dict) or recorded.get("sha256") != manifest_digest(manifest):
        raise BundleError(
            f"{mpath} was changed after export (its integrity digest does not match its content); the runtime "
            "would trust edited values, so re-export the bundle or restore the original manifest."
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{mpath} lists no files; the bundle is damaged, re-export it.")
    if verify:
        for rel, digest in files.items():
            f = root / rel
            if not f.is_file():
                raise BundleError(f"bundle file {rel} is missing from {root}; re-export the bundle.")
            if sha256_file(f) != digest:
                raise BundleError(
                    f"bundle file {rel} was modified after export (sha256 mismatch); re-export the bundle "
                    "or restore the original file."
                )
    return manifest


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
