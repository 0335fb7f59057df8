"""Where models live on this machine: the Hugging Face hub cache (looked up offline, with the not-found
message that says how to get the weights), the build cache of the built-ins, and the shipped `shapes` model."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

from ficoco.models.specs import ALIASES, BUILTINS, ModelNotFoundError


def shapes_dir() -> Path:
    """The shipped llava-hf directory of the trained `shapes` model (inside the package; never downloaded)."""
    path = Path(str(importlib.resources.files("ficoco").joinpath("builtin", "shapes")))
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"the built-in model 'shapes' is not installed ({path} has no config.json); reinstall the package, "
            "or rebuild it with `make train`."
        )
    return path


def hf_hub_cache(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The Hugging Face hub cache directory, read from the environment at call time.

    Precedence as in huggingface_hub: an explicit `cache_dir`, then `HF_HUB_CACHE` (or the legacy
    `HUGGINGFACE_HUB_CACHE`), then `$HF_HOME/hub`, then `$XDG_CACHE_HOME/huggingface/hub` (default `~/.cache`).
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def ficoco_cache(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where built models are cached: `cache_dir`, else `$FICOCO_CACHE`, else `~/.cache/ficoco-export`."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("FICOCO_CACHE"):
        return Path(os.environ["FICOCO_CACHE"]).expanduser()
    return Path.home() / ".cache" / "ficoco-export"


def _repo_cache_dir(repo_id: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    return hf_hub_cache(cache_dir) / ("models--" + repo_id.replace("/", "--"))


def _not_in_cache_error(
    name: str, repo_id: str, cache_dir: str | os.PathLike[str] | None, why: str = ""
) -> ModelNotFoundError:
    searched = _repo_cache_dir(repo_id, cache_dir)
    label = f"{name!r} ({repo_id})" if name != repo_id else repr(repo_id)
    lines = [
        f"Model {label} is not in the local Hugging Face cache{': ' + why if why else ''}.",
        f"  searched: {searched}",
        "  (cache dir from the cache_dir argument, else HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub)",
        "This toolkit never downloads. To get the weights, on a machine with internet run",
        f"    hf download {repo_id}          (or: huggingface-cli download {repo_id})",
        f"  optionally with --local-dir /path/to/{repo_id.split('/')[-1]}, copy the directory here, then pass",
        "  --model /path/to/dir (a llava-hf layout directory), or copy the cache and set HF_HOME to it.",
        f"Built-in models available offline: {', '.join(BUILTINS)}.",
    ]
    if name not in ALIASES:
        lines.insert(2, f"  (nor is there a local directory {Path(name).expanduser().absolute()})")
    return ModelNotFoundError("\n".join(lines))


def _resolve_repo_snapshot(name: str, repo_id: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    """The snapshot directory of `repo_id` in the local HF cache (offline), or ModelNotFoundError."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_dir = _repo_cache_dir(repo_id, cache_dir)
    if not repo_dir.is_dir():
        raise _not_in_cache_error(name, repo_id, cache_dir, "no such directory")
    try:
        snap = snapshot_download(repo_id, cache_dir=str(hf_hub_cache(cache_dir)), local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as err:
        raise _not_in_cache_error(
            name, repo_id, cache_dir, f"no usable snapshot ({type(err).__name__})"
        ) from err
    return Path(snap)
