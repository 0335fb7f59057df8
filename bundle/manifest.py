"""`manifest.json`: the typed record of a bundle, written by one function and read by all.

A `Manifest` says what the bundle is (source model, geometry, the schedule and the request it was planned
from, precision), how to run it (its graphs and their I/O, shape ranges, TensorRT profiles, the decoder's
per-layer KV rule, the prompt format) and how it was checked (validation, lint, tool versions), and lists
the sha256 of every other file. `write_manifest` adds an integrity digest over all of it;
`load_manifest` refuses a manifest whose digest does not match, from another schema version, or (with
`verify`) whose files changed. docs/architecture.md describes the bundle as a whole.

Schema 3 (this version) types the record and names the planning request `schedule_request`; schema-2
bundles are refused with the advice to re-export.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from bundle.layout import MANIFEST, BundleError, sha256_file, write_json

SCHEMA_VERSION = 5  # 5: the decoder as shared segments (docs/export-notes.md §14)
INTEGRITY = "integrity"


@dataclass(frozen=True)
class GraphRecord:
    """One ONNX graph of the bundle: its file (relative to the bundle) and declared inputs/outputs.

    Each input/output is {"name", "dtype", "shape"} with ints or symbolic dimension names."""

    file: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    export_seconds: float | None = None
    opset: int | None = None  # set by the quantizer when a graph needs a newer opset than the export's

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.inputs]

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k == "export_seconds"}


@dataclass(frozen=True)
class Manifest:
    """The bundle's manifest; field order is the order of the keys in manifest.json."""

    source_model: dict[str, Any]  # name, source (where it was loaded from), revision
    graph_only: bool
    geometry: dict[str, Any]  # ficoco.geometry.LlavaGeometry.to_dict()
    variant: str
    method: str
    preset: str
    positions: str
    schedule_request: dict[str, Any]  # ficoco.planner.ScheduleRequest as a dict: what was asked for
    schedule: dict[str, Any]  # ficoco.schedule.Schedule.to_dict(): what the planner made of it
    flops_tflops: dict[str, float]
    visual_tokens: dict[str, int]  # in, to_decoder, final
    export: dict[str, Any]  # exporter.export.ExportOptions.to_dict()
    precision: str
    opset: int
    graphs: dict[str, GraphRecord]
    shape_ranges: dict[str, Any]  # batch [min, max], text_len [min, max], max_new_tokens
    trt_profiles: dict[str, Any]  # graph -> profile name -> input -> {min, opt, max}
    decoder: dict[str, Any]  # num_layers, segments, position_offsets, kv_lengths_rule
    prompt: dict[str, Any]  # chat_template, image_token(_id), eos/bos ids, image_offset_rule
    validation: dict[str, Any]
    lint: dict[str, Any]
    tool_versions: dict[str, str]
    export_seconds: float | None = None
    quantization: dict[str, Any] | None = None  # only in bundles written by ficoco-quantize
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256, every file but this one
    schema_version: int = SCHEMA_VERSION

    # ------------------------------------------------------------------------------------------ views
    @property
    def is_quantized(self) -> bool:
        return bool(self.quantization)

    @property
    def max_new_tokens(self) -> int:
        return int(self.shape_ranges["max_new_tokens"])

    def geometry_object(self) -> Any:
        from ficoco.geometry import LlavaGeometry

        return LlavaGeometry.from_dict(self.geometry)

    def decoder_segments(self) -> tuple[Any, ...]:
        """The decoder's segments (`ficoco.segments.DecoderSegment`), planned from the recorded schedule."""
        from ficoco.schedule import Schedule
        from ficoco.segments import decoder_segments

        return decoder_segments(Schedule.from_dict(self.schedule).decoder, self.positions)

    def graph_names(self) -> tuple[str, ...]:
        """Every graph of the bundle, in running order (`bundle.names.graph_names`)."""
        from bundle.names import graph_names

        return graph_names(len(self.decoder_segments()))

    def updated(self, **changes: Any) -> Manifest:
        """A copy with some fields replaced (the manifest itself is frozen)."""
        return replace(self, **changes)

    # ------------------------------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema_version": self.schema_version}
        for f in fields(self):
            if f.name == "schema_version":
                continue
            value = getattr(self, f.name)
            if f.name == "graphs":
                value = {name: g.to_dict() for name, g in value.items()}
            if f.name == "quantization" and value is None:
                continue
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "manifest.json") -> Manifest:
        """The typed manifest of a parsed manifest.json (BundleError naming what is missing or unknown)."""
        names = {f.name for f in fields(cls)}
        body = {k: v for k, v in data.items() if k != INTEGRITY}
        unknown = sorted(set(body) - names)
        missing = sorted(f.name for f in fields(cls) if f.name not in body and f.default is MISSING and f.default_factory is MISSING)
        if unknown or missing:
            raise BundleError(
                f"{where} does not match schema {SCHEMA_VERSION} ("
                + "; ".join(p for p in (f"missing {', '.join(missing)}" if missing else "",
                                        f"unknown {', '.join(unknown)}" if unknown else "") if p)
                + "); re-export the bundle with this version.")
        try:
            graphs = {name: GraphRecord(**g) for name, g in body["graphs"].items()}
        except (AttributeError, TypeError) as err:
            raise BundleError(f"{where} has an unreadable graph list ({err}); re-export the bundle.") from err
        return cls(**{**body, "graphs": graphs})



def manifest_digest(body: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no whitespace) without its "integrity" key.

    Through `files` (the sha256 of every other file) it covers the whole bundle: an edited value, a
    deleted `files` entry or an edited chat template all change it. It guards against accidents and
    naive edits, not against someone who recomputes it: it is not a signature."""
    body = {k: v for k, v in body.items() if k != INTEGRITY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tool_versions(packages: tuple[str, ...]) -> dict[str, str]:
    """Python's and each package's installed version ("not installed" for a missing one), for manifests
    and reports."""
    import importlib.metadata
    import platform

    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def write_manifest(root: str | os.PathLike[str], manifest: Manifest, files: dict[str, str] | None = None) -> Manifest:
    """Write `root`/manifest.json (atomically) with its integrity digest; the one writer of manifests.

    `files`, when given, replaces the manifest's file hashes (pass `hash_files(root)` once the bundle's
    other files are all written). Returns the manifest as written."""
    if files is not None:
        manifest = replace(manifest, files=dict(files))
    if not manifest.files:
        raise BundleError("a manifest must list the bundle's files (pass files=hash_files(root))")
    body = manifest.to_dict()
    body[INTEGRITY] = {"sha256": manifest_digest(body), "covers": "canonical JSON of every other key; files by their sha256"}
    write_json(Path(root) / MANIFEST, body)
    return manifest


def read_manifest_json(root: Path) -> dict[str, Any]:
    """The parsed, digest-checked manifest.json of the bundle at `root` (BundleError with the fix otherwise)."""
    mpath = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"no bundle at {root}: the directory does not exist. Create one with `ficoco-export -o {root}`.")
    if not mpath.is_file():
        raise BundleError(f"{root} is not a ficoco-export bundle: {MANIFEST} is missing. Re-run `ficoco-export -o {root}`.")
    try:
        data = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{mpath} is not valid JSON ({e}); the bundle is damaged, re-export it.") from e
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath} cannot be read ({e}); the bundle is damaged, re-export it.") from e
    if not isinstance(data, dict):
        raise BundleError(f"{mpath} holds a JSON {type(data).__name__}, not an object; the bundle is damaged, re-export it.")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(
            f"{mpath} has schema version {data.get('schema_version')!r}; this ficoco-export reads version "
            f"{SCHEMA_VERSION}. Re-export the bundle with this version."
        )
    recorded = data.get(INTEGRITY)
    if not isinstance(recorded, dict) or recorded.get("sha256") != manifest_digest(data):
        raise BundleError(
            f"{mpath} was changed after export (its integrity digest does not match its content); the runtime "
            "would trust edited values, so re-export the bundle or restore the original manifest."
        )
    if not isinstance(data.get("files"), dict) or not data["files"]:
        raise BundleError(f"{mpath} lists no files; the bundle is damaged, re-export it.")
    return data


def verify_files(root: Path, files: dict[str, str]) -> None:
    """BundleError unless every listed file exists with its recorded sha256."""
    for rel, digest in files.items():
        f = root / rel
        if not f.is_file():
            raise BundleError(f"bundle file {rel} is missing from {root}; re-export the bundle.")
        if sha256_file(f) != digest:
            raise BundleError(
                f"bundle file {rel} was modified after export (sha256 mismatch); re-export the bundle "
                "or restore the original file."
            )


def load_manifest(bundle: str | os.PathLike[str], verify: bool = True) -> Manifest:
    """Read `<bundle>/manifest.json`, check its own digest; with `verify`, also every listed file's sha256."""
    root = Path(bundle)
    manifest = Manifest.from_dict(read_manifest_json(root), where=str(root / MANIFEST))
    if verify:
        verify_files(root, manifest.files)
    return manifest
