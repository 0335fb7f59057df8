"""The bundle's tokenizer from its own `tokenizer/tokenizer.json`, with the `tokenizers` library alone.

The runtime must not need transformers, so it reads the fast-tokenizer file that transformers'
`save_pretrained` writes into the bundle and drives it through the `tokenizers` library, the engine
transformers' fast tokenizers run on: encoding applies the file's normalizer, pre-tokenizer, model and
post-processor (which adds BOS for LLaVA's Llama tokenizer), decoding skips special tokens when asked and
applies `clean_up_tokenization_spaces` when `tokenizer_config.json` sets it, as transformers does.
`BundleTokenizer` offers the three calls the runtime makes (`__call__`, `decode`, `len`), with
transformers' names; `tests/test_runtime.py` holds its ids and text equal to transformers' tokenizer's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bundle.layout import BundleError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


def _clean_up(text: str) -> str:
    """transformers' `clean_up_tokenization`: no space before punctuation and English contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class BundleTokenizer:
    """A `tokenizers.Tokenizer` with the subset of transformers' tokenizer API the runtime uses."""

    def __init__(self, tokenizer: Any, clean_up_spaces: bool = False, config: dict[str, Any] | None = None) -> None:
        self.backend = tokenizer
        self.clean_up_spaces = clean_up_spaces
        self.config = dict(config or {})

    @classmethod
    def from_dir(cls, directory: str | Path) -> BundleTokenizer:
        """Load `directory/tokenizer.json` (and `tokenizer_config.json`); BundleError naming the fix otherwise."""
        from tokenizers import Tokenizer

        d = Path(directory)
        path = d / TOKENIZER_FILE
        if not path.is_file():
            raise BundleError(f"{path} is missing: the bundle has no fast tokenizer file; re-export the bundle")
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises its own Exception subclass
            raise BundleError(f"cannot load the tokenizer {path}: {err}; re-export the bundle") from err
        config: dict[str, Any] = {}
        cfg = d / CONFIG_FILE
        if cfg.is_file():
            try:
                config = json.loads(cfg.read_text())
            except json.JSONDecodeError as err:
                raise BundleError(f"{cfg} is not valid JSON ({err}); re-export the bundle") from err
        return cls(backend, bool(config.get("clean_up_tokenization_spaces", False)), config)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        """{"input_ids": ids} for one text, like transformers' tokenizer call."""
        return {"input_ids": list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self(text, add_special_tokens)["input_ids"]

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        text = self.backend.decode([int(t) for t in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up(text) if self.clean_up_spaces else text

    def __len__(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)
