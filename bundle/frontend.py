"""`Frontend`: the bundle's input side without any backend — manifest, tokenizer, image preprocessing, the
chat template, and the limits a request is checked against.

It is the half of the contract that turns (image, question) into the graphs' inputs: pixel_values per the
bundle's preprocessor_config.json, text ids and the `<image>` offset per the manifest's chat template and
the bundle's tokenizer (`ficoco.inputs`, `bundle.tokenizer`). numpy, PIL, jinja2 and tokenizers only: no
torch, no transformers. Cheap to load, so a request is checked (image readable, prompt
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

import numpy as np

from bundle import layout as B
from bundle.manifest import Manifest, load_manifest
from bundle.tokenizer import BundleTokenizer
from ficoco.inputs import format_prompt, prompt_ids
from ficoco.preprocess import ImageLike, pixel_batch
from ficoco.sampling import SamplingConfig, read_generation_config, sampling_defaults


class InputError(ValueError):
    """A request the bundle cannot serve (prompt too long, too many new tokens, mismatched batch)."""


@dataclass(frozen=True)
class TextRequest:
    """The text side of a request, tokenized and checked against the bundle once (`Frontend.prepare_text`)."""

    input_ids: np.ndarray  # [B, T] int64, without the image placeholder
    image_offsets: np.ndarray  # [B] int64
    max_new_tokens: int
    stop_token_ids: tuple[int, ...]
    tokenize_ms: float = 0.0
    stop_strings: tuple[str, ...] = ()


class Frontend:
    """The bundle's input side without any backend: manifest, tokenizer, image preprocessing and limits.

    Cheap to load, so a request can be checked (image readable, prompt within the exported text range,
    new tokens within the exported limit) before engines or sessions are loaded.
    """

    def __init__(self, bundle: Path, manifest: Manifest, tokenizer: Any, processor_config: dict[str, Any],
                 generation_config: dict[str, Any] | None = None) -> None:
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
        #: the checkpoint's generation_config.json, as exported into the bundle ({} when it has none)
        self.generation_config: dict[str, Any] = dict(generation_config or {})
        try:
            #: how tokens are chosen when a request does not say (greedy unless the checkpoint asks otherwise)
            self.default_sampling: SamplingConfig = sampling_defaults(self.generation_config)
        except (TypeError, ValueError) as err:
            raise B.BundleError(f"{bundle / B.GENERATION_CONFIG}: {err}; fix or delete the file, or re-export") from err

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
        try:
            generation = read_generation_config(root / B.GENERATION_CONFIG)
        except ValueError as err:
            raise B.BundleError(str(err)) from err
        return cls(root, manifest, tokenizer, processor_config, generation)

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
        self, questions: Sequence[str], max_new_tokens: int | None = None, stop_token_ids: Sequence[int] | None = None,
        stop_strings: Sequence[str] | None = None,
    ) -> TextRequest:
        """Tokenize the questions and check them, the number of new tokens (default: the bundle's limit),
        the stop ids (default: the bundle's EOS ids; [] for none) and the stop strings against the bundle, once."""
        t0 = time.perf_counter()
        input_ids, offsets = self.tokenize(questions)
        ms = (time.perf_counter() - t0) * 1e3
        n_new = self.max_new_tokens_limit if max_new_tokens is None else int(max_new_tokens)
        self.check_request(int(input_ids.shape[1]), n_new)
        stops = tuple(int(t) for t in (self.eos_token_ids if stop_token_ids is None else stop_token_ids))
        self.check_stop_ids(stops)
        return TextRequest(input_ids, offsets, n_new, stops, ms, check_stop_strings(stop_strings))

    # -- inputs ----------------------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[ImageLike]) -> np.ndarray:
        """pixel_values [B, 3, H, W] (float32) per the bundle's preprocessor_config.json; ImageError on a bad file."""
        if not images:
            raise InputError("no image given")
        return pixel_batch(images, self.processor_config)

    def tokenize(self, questions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids [B, T] without the image placeholder, image offsets [B]), int64, for questions of equal token length."""
        ids: list[list[int]] = []
        offsets: list[int] = []
        if isinstance(questions, str) or not questions:
            raise InputError("give a list of questions (strings), one per image")
        for q in questions:
            if not isinstance(q, str):
                raise InputError(f"a question must be a string, got {type(q).__name__}")
            if not q.strip():
                raise InputError("the question is empty; ask something about the image")
            row, offset = prompt_ids(self.tokenizer, format_prompt(self.chat_template, q), self.image_token_id)
            ids.append(row)
            offsets.append(offset)
        lengths = sorted({len(r) for r in ids})
        if len(lengths) > 1:
            raise InputError(
                f"the questions tokenize to different lengths ({', '.join(map(str, lengths))}); the graphs take no attention "
                "mask, so one batch needs prompts of equal token length (run them separately)"
            )
        return np.asarray(ids, dtype=np.int64), np.asarray(offsets, dtype=np.int64)


#: most stop strings one request may give, and the longest one (OpenAI's API takes up to 4)
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256


def check_stop_strings(stop_strings: Sequence[str] | str | None) -> tuple[str, ...]:
    """The stop strings as a tuple; InputError for an empty one, a non-string, or too many or too long."""
    if stop_strings is None:
        return ()
    items = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
    if len(items) > MAX_STOP_STRINGS:
        raise InputError(f"{len(items)} stop strings given; at most {MAX_STOP_STRINGS} are accepted")
    for s in items:
        if not isinstance(s, str) or not s:
            raise InputError(f"a stop string must be a non-empty string (got {s!r})")
        if len(s) > MAX_STOP_CHARS:
            raise InputError(f"a stop string is {len(s)} characters; at most {MAX_STOP_CHARS} are accepted")
    return tuple(items)


def load_tokenizer(root: Path) -> BundleTokenizer:
    """The bundle's tokenizer (`bundle.tokenizer`): its tokenizer/tokenizer.json, without transformers."""
    tdir = root / B.TOKENIZER_DIR
    if not tdir.is_dir():
        raise B.BundleError(f"{tdir} is missing: the bundle has no tokenizer (a --graph-only export?); re-export it with weights")
    return BundleTokenizer.from_dir(tdir)
