"""llava-hf layout directories on disk: checking one (missing, damaged or unreadable files raise
ModelLayoutError naming them), loading one into a `LoadedModel`, and saving a `LoadedModel` as one."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerBase

from ficoco.models.processing import LLAVA_CHAT_TEMPLATE
from ficoco.models.specs import BUILD_VERSION, METADATA_FILE, LoadedModel, ModelLayoutError

logger = logging.getLogger(__name__)

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def _read_json(path: Path) -> Any:
    """A model directory's JSON file; ModelLayoutError naming the file when it is unreadable or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLayoutError(f"{path} cannot be read as JSON ({err}); restore the file or re-download the model.") from err


def _check_weight_files(path: Path) -> None:
    """Every safetensors file of the directory opens (header and data size), else ModelLayoutError naming it."""
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except Exception as err:  # safetensors raises its own SafetensorError for a truncated or corrupt file
            raise ModelLayoutError(
                f"{f} is not a readable safetensors file ({err}); it is truncated or damaged: re-download or re-save the weights."
            ) from err


def _read_llava_config(cfg_file: Path) -> LlavaConfig:
    data = _read_json(cfg_file)
    if not isinstance(data, dict):
        raise ModelLayoutError(f"{cfg_file} holds a JSON {type(data).__name__}, not an object; restore the file.")
    if data.get("model_type") != "llava":
        raise ModelLayoutError(
            f"{cfg_file}: model_type is {data.get('model_type')!r}, expected 'llava' (LlavaForConditionalGeneration)."
        )
    return LlavaConfig(**data)


def check_layout(path: str | os.PathLike[str]) -> None:
    """Raise ModelLayoutError naming every file a llava-hf layout directory needs and `path` lacks."""
    p = Path(path)
    missing: list[str] = []
    if not (p / "config.json").is_file():
        missing.append("config.json")
    weights = [f for f in _WEIGHT_FILES if (p / f).is_file()]
    if not weights:
        missing.append(" or ".join(_WEIGHT_FILES[:2]) + " (weights)")
    for index in (f for f in weights if f.endswith(".index.json")):
        shards = sorted(
            set((_read_json(p / index) or {}).get("weight_map", {}).values())
        )
        missing.extend(f"{s} (shard listed in {index})" for s in shards if not (p / s).is_file())
    if not any((p / f).is_file() for f in _TOKENIZER_FILES):
        missing.append(" or ".join(_TOKENIZER_FILES) + " (tokenizer)")
    if not (p / "preprocessor_config.json").is_file():
        missing.append("preprocessor_config.json")
    if missing:
        raise ModelLayoutError(
            f"{p.absolute()} is not a llava-hf layout model directory; missing: {', '.join(missing)}. "
            "Expected config.json, model.safetensors (or an index + shards), tokenizer.json / tokenizer.model "
            "and preprocessor_config.json, as in `hf download llava-hf/llava-1.5-7b-hf --local-dir DIR` "
            "or `ficoco.models.save_model_dir`."
        )


def _read_chat_template(path: Path, tokenizer: PreTrainedTokenizerBase) -> str:
    for fname in ("chat_template.json", "processor_config.json"):
        f = path / fname
        if f.is_file():
            tmpl = (_read_json(f) or {}).get("chat_template")
            if isinstance(tmpl, str) and tmpl:
                return tmpl
    f = path / "chat_template.jinja"
    if f.is_file():
        return f.read_text(encoding="utf-8")
    tmpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tmpl, str) and tmpl:
        return tmpl
    logger.warning("%s has no chat template; using LLaVA-1.5's (USER: <image>\\n... ASSISTANT:).", path)
    return LLAVA_CHAT_TEMPLATE


def _commit_of_dir(path: Path) -> str | None:
    """The hub commit a directory came from: an HF cache snapshot's name, or the commit huggingface_hub
    records for `hf download --local-dir` (first line of .cache/huggingface/download/config.json.metadata)."""
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.name
    meta = path / ".cache" / "huggingface" / "download" / "config.json.metadata"
    if meta.is_file():
        first = meta.read_text(encoding="utf-8").splitlines()[:1]
        if first and re.fullmatch(r"[0-9a-f]{40}", first[0].strip()):
            return first[0].strip()
    return None


def _files_revision(path: Path) -> str:
    """sha256 over config.json and the weight files' bytes (a content hash of an unmarked local directory)."""
    h = hashlib.sha256()
    files = ["config.json"] + sorted(
        f.name for f in path.iterdir() if f.is_file() and f.suffix in (".safetensors", ".bin")
    )
    for fname in files:
        h.update(fname.encode() + b"\0")
        with open(path / fname, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 22), b""):
                h.update(chunk)
    return "files-sha256:" + h.hexdigest()


def _load_local_dir(
    path: Path,
    *,
    dtype: torch.dtype,
    attn_implementation: str,
    name: str | None = None,
    source: str | None = None,
    revision: str | None = None,
) -> LoadedModel:
    path = path.absolute()
    check_layout(path)
    _read_llava_config(path / "config.json")  # clear error for a non-LLaVA config before transformers' own
    meta: dict[str, Any] = {}
    if (path / METADATA_FILE).is_file():
        meta = _read_json(path / METADATA_FILE)
    _check_weight_files(path)
    with _quiet_transformers():
        model, info = LlavaForConditionalGeneration.from_pretrained(
            str(path),
            dtype=dtype,
            attn_implementation=attn_implementation,
            local_files_only=True,
            output_loading_info=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model.eval()
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in (info.get(kind) or ()))
        if keys:  # transformers' own warning is silenced above, so say it here
            logger.warning("%s: %d %s in the weights, e.g. %s", path, len(keys), kind, ", ".join(keys[:5]))
    processor_config = _read_json(path / "preprocessor_config.json")
    if revision is None:
        revision = meta.get("revision")
    if revision is None:
        revision = _commit_of_dir(path) or _files_revision(path)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        processor_config=processor_config,
        chat_template=_read_chat_template(path, tokenizer),
        source=source or str(path),
        revision=revision,
        name=name or meta.get("name") or path.name,
        path=str(path),
    )


def save_model_dir(loaded: LoadedModel, path: str | os.PathLike[str]) -> Path:
    """Write `loaded` as a llava-hf layout directory that `load_model(path)` reads back bit-identically.

    Files: config.json, model.safetensors, tokenizer files, preprocessor_config.json, chat_template.json
    (llava-hf's processor format) and ficoco_model.json (name, source, revision).
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    with _quiet_transformers():
        loaded.model.save_pretrained(str(out), safe_serialization=True)
    write_side_files(out, loaded.tokenizer, loaded.processor_config, loaded.chat_template,
                     name=loaded.name, source=loaded.source, revision=loaded.revision)
    return out


def write_side_files(
    out: Path, tokenizer: PreTrainedTokenizerBase, processor_config: dict[str, Any], chat_template: str,
    *, name: str, source: str, revision: str,
) -> None:
    """Everything of a llava-hf directory beside config.json and the weights: tokenizer files,
    preprocessor_config.json, chat_template.json (llava-hf's processor format) and ficoco_model.json."""
    with _quiet_transformers():
        tokenizer.save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text(json.dumps(processor_config, indent=2) + "\n")
    (out / "chat_template.json").write_text(json.dumps({"chat_template": chat_template}, indent=2) + "\n")
    meta = {"name": name, "source": source, "revision": revision, "build_version": BUILD_VERSION}
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' info/warning chatter and progress bars for the duration (restored afterwards)."""
    from transformers.utils import logging as tlog

    verbosity = tlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()
