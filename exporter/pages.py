"""Hand a memory-mapped model's weight pages back to the kernel while something else needs the memory.

The export loads a checkpoint memory-mapped from its safetensors files: every weight is a page of a private,
file-backed mapping, read in when a forward pass first touches it and counted in the process's RSS from then
on. Validation alternates between that PyTorch reference and ONNX Runtime, whose CPU provider holds a graph's
fp16 and fp32 weights while it is open; at LLaVA-1.5-7B size the two together made the export's peak
(13.1 GiB of mapped weights + one segment opening, docs/export-notes.md §16).

`release_mapped_pages(module)` unmaps the resident pages of `module`'s tensors with
``madvise(MADV_DONTNEED)``, so ONNX Runtime opens its graph beside an almost empty reference. For a private
file mapping that is safe only while no page of it has been written (a written page is an anonymous copy,
and DONTNEED would throw the write away and restore the file's bytes): a mapping is released only when
/proc/self/smaps reports 0 kB of anonymous pages in it. The data stays in the page cache, so the
reference's next forward pass maps the pages back from memory (not disk) while the kernel is free to reclaim
them under pressure. Nothing else is touched: anonymous tensors (a model that was copied or cast) are left
alone, and on a system without /proc or madvise the call does nothing and says so once in the log.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

log = logging.getLogger(__name__)

_MADV_DONTNEED = 4  # Linux <sys/mman.h>


@dataclass(frozen=True)
class FileMapping:
    """One line of /proc/self/maps with its smaps counters (bytes)."""

    start: int
    end: int
    perms: str
    path: str
    anonymous: int  # pages of this mapping that were written (copy-on-write), in bytes

    @property
    def clean_private_file(self) -> bool:
        return self.perms.endswith("p") and self.path.startswith("/") and self.anonymous == 0


def file_mappings(smaps: Path = Path("/proc/self/smaps")) -> list[FileMapping]:
    """This process's mappings of files (a path, not [heap] or [anon]) with their anonymous bytes."""
    out: list[FileMapping] = []
    current: dict[str, object] | None = None
    for line in smaps.read_text().splitlines():
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            if current is not None and str(current["path"]).startswith("/"):
                out.append(FileMapping(**current))  # type: ignore[arg-type]
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            current = {"start": lo, "end": hi, "perms": head[1], "path": head[5] if len(head) > 5 else "", "anonymous": 0}
        elif current is not None and line.startswith("Anonymous:"):
            current["anonymous"] = int(line.split()[1]) * 1024
    if current is not None and str(current["path"]).startswith("/"):
        out.append(FileMapping(**current))  # type: ignore[arg-type]
    return out


def _madvise() -> ctypes._CFuncPtr | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def clean_mappings(smaps: Path = Path("/proc/self/smaps")) -> list[FileMapping] | None:
    """This process's clean private file mappings, by address (None where there is no /proc)."""
    if not smaps.is_file():
        return None
    return sorted((m for m in file_mappings(smaps) if m.clean_private_file), key=lambda m: m.start)


def release_mapped_pages(module: nn.Module, maps: list[FileMapping] | None = None) -> int:
    """Unmap the resident pages of `module`'s parameters and buffers that lie in clean private file mappings
    (see the module docstring); returns the bytes of address range advised (0 when nothing qualifies).

    `maps`: `clean_mappings()` read earlier, for callers that release often between writes to nothing (the
    validation's reference, module by module); None reads /proc/self/smaps now."""
    madvise = _madvise()
    if maps is None:
        maps = clean_mappings()
    if madvise is None or maps is None:
        log.debug("release_mapped_pages: no /proc/self/smaps or madvise here; nothing released")
        return 0
    storages: dict[int, int] = {}
    for t in (*module.parameters(), *module.buffers()):
        s = t.untyped_storage()
        if s.device.type == "cpu" and s.nbytes():
            storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
    if not storages:
        return 0
    page = mmap.PAGESIZE
    advised = 0
    for ptr, n in storages.items():
        m = next((m for m in maps if m.start <= ptr and ptr + n <= m.end), None)
        if m is None:
            continue
        # whole pages inside the tensor only: a page shared with a neighbouring tensor of another mapping
        # region is left as it is
        lo = (ptr + page - 1) // page * page
        hi = (ptr + n) // page * page
        if hi <= lo:
            continue
        if madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED) != 0:
            err = ctypes.get_errno()
            log.debug("release_mapped_pages: madvise failed (%s); stopping", os.strerror(err))
            return advised
        advised += hi - lo
    return advised
