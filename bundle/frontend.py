"""`Frontend`: the bundle's input side without any backend — manifest, tokenizer, image preprocessing, the
chat template, and the limits a request is checked against.

It is the half of the contract that turns (image, question) into the graphs' inputs: pixel_values per the
bundle's preprocessor_config.json, text ids and the `<image>` offset per the manifest's chat template and
the bundle's tokenizer (`ficoco.inputs`). Cheap to load, so a request is checked (image readable, prompt
within the exported text range, new tokens within the exported limit, stop ids in the vocabulary) before
engines or sessions are loaded. `engines.runtime.Pipeline` adds a backend on top.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bundle import layout as B
from bundle.manifest import Manifest, load_manifest
from ficoco.inputs import encode_prompt, format_prompt
from ficoco.preprocess import ImageLike, preprocess_image


class InputError(ValueError):
    """A request the bundle cannot serve (prompt too long, too many new tokens, mismatched batch)."""


@dataclass(frozen=True)
class TextRequest:
    """The text side of a request, tokenized and checked against the bundle once (`Frontend.prepare_text`)."""

    input_ids: Tensor  # [B, T] without the image placeholder
    image_offsets: Tensor  # [B]
    max_new_tokens: int
    stop_token_ids: tuple[int, ...]
    tokenize_ms: float = 0.0


class Frontend:
    """The bundle's input side without any backend: manifest, tokenizer, image preprocessing and limits.

    Cheap to load, so a request can be checked (image readable, prompt within the exported text range,
    new tokens within the exported limit) before engines or sessions are loaded.
    """

    def __init__(self, bundle: Path, manifest: Manifest, tokenizer: Any, processor_config: dict[str, Any]) -> None:
        self.bundle = bundle
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.processor_config = processor_config
        prompt = manifest.prompt
        self.chat_template: str = prompt["chat_template"]
        self.image_token_id = int(prompt["image_token_id"])
        eos = prompt.get("eos_token_id")
        self.eos_token_ids: tuple[int, ...] = () if eos is None else ((int(eos),) if isinstance(eos, int) else tuple(int(e) for e in eos))
        ranges = manifest.shape_ranges
        self.text_len_range: tuple[int, int] = tuple(ranges.get("text_len", (1, 1 << 30)))  # type: ignore[assignment]
        self.batch_range: tuple[int, int] = tuple(ranges.get("batch", (1, 1)))  # type: ignore[assignment]
        self.max_new_tokens_limit = manifest.max_new_tokens

    @classmethod
    def from_bundle(cls, path: str | os.PathLike[str], *, verify: bool = True) -> Frontend:
        """Read the manifest (with `verify`, check every file's sha256), tokenizer and preprocessor config."""
        root = Path(path)
        manifest = load_manifest(root, verify=verify)
        if manifest.graph_only or not manifest.prompt.get("chat_template"):
            raise B.BundleError(
                f"{root} is a --graph-only bundle (no weights, tokenizer or chat template); export it with weights to run it"
            )
        tokenizer = load_tokenizer(root)
        pre = root / B.PREPROCESSOR
        try:
            processor_config = json.loads(pre.read_text())
        except FileNotFoundError as err:
            raise B.BundleError(f"{pre} is missing; re-export the bundle") from err
        except json.JSONDecodeError as err:
            raise B.BundleError(f"{pre} is not valid JSON ({err}); re-export the bundle") from err
        return cls(root, manifest, tokenizer, processor_config)

    def check_request(self, text_len: int, max_new_tokens: int) -> None:
        """InputError unless the bundle was exported for this prompt length and number of new tokens."""
        lo, hi = int(self.text_len_range[0]), int(self.text_len_range[1])
        if text_len > hi:
            raise InputError(
                f"the prompt is {text_len} tokens after the chat template; this bundle was exported for at most {hi} "
                f"text tokens (shape_ranges.text_len). Shorten the question, or re-export with a larger --max-text-len."
            )
        if text_len < lo:
            raise InputError(f"the prompt is {text_len} tokens; this bundle needs at least {lo} (shape_ranges.text_len)")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
        if max_new_tokens > self.max_new_tokens_limit:
            raise InputError(
                f"{max_new_tokens} new tokens asked for; this bundle was exported for at most {self.max_new_tokens_limit} "
                "(shape_ranges.max_new_tokens). Ask for fewer, or re-export with a larger --max-new-tokens."
            )

    def check_stop_ids(self, stop_token_ids: Sequence[int]) -> None:
        """InputError for a stop token id outside the tokenizer's vocabulary (it could never be generated)."""
        vocab = len(self.tokenizer)
        bad = [int(t) for t in stop_token_ids if not 0 <= int(t) < vocab]
        if bad:
            raise InputError(
                f"stop token id(s) {', '.join(map(str, bad))} outside the vocabulary (0..{vocab - 1}); "
                "give ids of the bundle's tokenizer (tokenizer/tokenizer.json)"
            )

    def prepare_text(
        self, questions: Sequence[str], max_new_tokens: int | None = None, stop_token_ids: Sequence[int] | None = None
    ) -> TextRequest:
        """Tokenize the questions and check them, the number of new tokens (default: the bundle's limit) and
        the stop ids (default: the bundle's EOS ids; [] for none) against the bundle, once."""
        t0 = time.perf_counter()
        input_ids, offsets = self.tokenize(questions)
        ms = (time.perf_counter() - t0) * 1e3
        n_new = self.max_new_tokens_limit if max_new_tokens is None else int(max_new_tokens)
        self.check_request(int(input_ids.shape[1]), n_new)
        stops = tuple(int(t) for t in (self.eos_token_ids if stop_token_ids is None else stop_token_ids))
        self.check_stop_ids(stops)
        return TextRequest(input_ids, offsets, n_new, stops, ms)

    # -- inputs ----------------------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[ImageLike]) -> Tensor:
        """pixel_values [B, 3, H, W] (float32) per the bundle's preprocessor_config.json; ImageError on a bad file."""
        if not images:
            raise InputError("no image given")
        return torch.cat([preprocess_image(im, self.processor_config) for im in images], dim=0)

    def tokenize(self, questions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(input_ids [B, T] without the image placeholder, image offsets [B]) for questions of equal token length."""
        ids: list[Tensor] = []
        offsets: list[int] = []
        if isinstance(questions, str) or not questions:
            raise InputError("give a list of questions (strings), one per image")
        for q in questions:
            if not isinstance(q, str):
                raise InputError(f"a question must be a string, got {type(q).__name__}")
            if not q.strip():
                raise InputError("the question is empty; ask something about the image")
            p = encode_prompt(self.tokenizer, format_prompt(self.chat_template, q), self.image_token_id)
            ids.append(p.text_ids)
            offsets.append(p.image_offset)
        lengths = sorted({int(t.shape[1]) for t in ids})
        if len(lengths) > 1:
            raise InputError(
                f"the questions tokenize to different lengths ({', '.join(map(str, lengths))}); the graphs take no attention "
                "mask, so one batch needs prompts of equal token length (run them separately)"
            )
        return torch.cat(ids, dim=0), torch.tensor(offsets, dtype=torch.long)


def load_tokenizer(root: Path) -> Any:
    from transformers import AutoTokenizer

    tdir = root / B.TOKENIZER_DIR
    if not tdir.is_dir():
        raise B.BundleError(f"{tdir} is missing: the bundle has no tokenizer (a --graph-only export?); re-export it with weights")
    try:
        return AutoTokenizer.from_pretrained(str(tdir), local_files_only=True)
    except (OSError, ValueError) as err:
        raise B.BundleError(f"cannot load the tokenizer from {tdir}: {err}; re-export the bundle") from err
