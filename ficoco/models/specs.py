"""The model names this package knows, its shared constants, its error types and `LoadedModel`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerBase

from ficoco.geometry import LlavaGeometry

ALIASES: dict[str, str] = {
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
    "llava-1.5-13b": "llava-hf/llava-1.5-13b-hf",
}
BUILTINS: tuple[str, ...] = ("tiny", "smol", "bench", "shapes")

#: Bumped whenever `build_smol` would produce different files; part of the smol cache key.
BUILD_VERSION = 3
#: Written by `save_model_dir`; carries name/source/revision through a save → load round trip.
METADATA_FILE = "ficoco_model.json"

IMAGE_TOKEN = "<image>"
IMAGE_SEQ_LENGTH = 576


class ModelNotFoundError(FileNotFoundError):
    """A model name resolved to nothing on this machine; the message says where we looked and what to do."""


class ModelLayoutError(ModelNotFoundError):
    """A local directory exists but is not in the llava-hf layout (the message names the missing files)."""


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
