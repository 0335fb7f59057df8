"""Model loading, offline: built-in models, aliases, the local Hugging Face cache, llava-hf layout directories.

`load_model` / `load_config` (in `resolve`) say how a name resolves. The modules: `specs` (names, constants,
errors, `LoadedModel`), `locations` (caches, the shipped `shapes` directory), `checkpoint` (llava-hf
directories on disk), `llava_configs` (configs without weights), `processing` (chat templates, image-processor
config, the tiny tokenizer), `seeded` (random weights; `tiny`, `bench`), `smol` (the GGUF SmolLM2 decoder).
"""

from __future__ import annotations

from ficoco.models.checkpoint import _quiet_transformers, check_layout, save_model_dir
from ficoco.models.llava_configs import BENCH_DECODER_LAYERS, _clip_336_config, _llama_llava_config
from ficoco.models.locations import ficoco_cache, hf_hub_cache, shapes_dir
from ficoco.models.processing import LLAVA_CHAT_TEMPLATE, SMOL_CHAT_TEMPLATE, clip_processor_config
from ficoco.models.resolve import load_config, load_model
from ficoco.models.seeded import build_bench, build_tiny, init_peaky_, state_dict_sha256
from ficoco.models.smol import build_smol, smol_cache_dir
from ficoco.models.specs import (
    ALIASES,
    BUILD_VERSION,
    BUILTINS,
    IMAGE_TOKEN,
    METADATA_FILE,
    LoadedModel,
    ModelLayoutError,
    ModelNotFoundError,
)

__all__ = [
    "ALIASES",
    "BENCH_DECODER_LAYERS",
    "BUILD_VERSION",
    "BUILTINS",
    "IMAGE_TOKEN",
    "LLAVA_CHAT_TEMPLATE",
    "METADATA_FILE",
    "SMOL_CHAT_TEMPLATE",
    "LoadedModel",
    "ModelLayoutError",
    "ModelNotFoundError",
    "build_bench",
    "build_smol",
    "build_tiny",
    "check_layout",
    "clip_processor_config",
    "ficoco_cache",
    "hf_hub_cache",
    "init_peaky_",
    "load_config",
    "load_model",
    "save_model_dir",
    "shapes_dir",
    "smol_cache_dir",
    "state_dict_sha256",
    # private helpers that the training package imports from here
    "_clip_336_config",
    "_llama_llava_config",
    "_quiet_transformers",
]
