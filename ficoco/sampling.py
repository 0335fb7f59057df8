"""Next-token selection: transformers' logits processors and its sampler, in numpy.

One implementation serves the PyTorch reference, the full runtime and the torch-free runtime, so a seed
and a set of controls mean the same thing on every backend. The controls carry transformers' names and
semantics (`transformers.GenerationConfig`), applied in its order:

1. repetition penalty θ (`RepetitionPenaltyLogitsProcessor`): for every token id that occurs in the row's
   prompt or its generated tokens, the logit x becomes x / θ where x > 0 and x · θ where x < 0;
2. minimum length (`MinNewTokensLengthLogitsProcessor`): while fewer than `min_new_tokens` tokens have been
   generated, the EOS logits are −∞;
3. (sampling only) temperature τ: x / τ; top-k: every logit below the k-th largest is −∞; top-p: tokens
   are sorted by probability and the smallest prefix whose mass reaches p is kept (the most likely token
   always), the rest −∞; then one draw from softmax(x) with the sampler's seeded generator.

Greedy decoding applies 1–2 and takes the arg max (first index on ties, as torch.argmax does).
`tests/test_sampling.py` holds these against transformers' own processors. The random stream is numpy's
PCG64 seeded with `seed`, one generator per decode loop.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SamplingConfig:
    """How each next token is chosen (transformers' `GenerationConfig` names; defaults: greedy, no penalty).

    `do_sample` False: greedy (temperature, top_k, top_p unused). `repetition_penalty` 1.0 and
    `min_new_tokens` 0 are off. `top_k` 0 and `top_p` 1.0 keep every token.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    _: KW_ONLY
    top_k: int = 0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0 (got {self.temperature}); use greedy decoding instead")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k must be a whole number >= 0 (got {self.top_k}); 0 keeps every token")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (got {self.repetition_penalty}); 1.0 is no penalty")
        if int(self.min_new_tokens) != self.min_new_tokens or self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be a whole number >= 0 (got {self.min_new_tokens})")

    def merged(self, **overrides: Any) -> SamplingConfig:
        """This config with the given fields replaced (None values are ignored)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


#: the `generation_config.json` keys that `SamplingConfig` takes (the rest: max_new_tokens, eos ids)
CONFIG_KEYS = tuple(f.name for f in fields(SamplingConfig) if f.name not in ("seed", "_"))


def read_generation_config(path: str | Path) -> dict[str, Any]:
    """A `generation_config.json` as a dict ({} when the file is absent); ValueError when it is not JSON."""
    p = Path(path)
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{p} is not valid JSON ({err}); re-export the bundle") from err
    if not isinstance(data, dict):
        raise ValueError(f"{p} holds {type(data).__name__}, not an object; re-export the bundle")
    return data


def sampling_defaults(generation_config: Mapping[str, Any]) -> SamplingConfig:
    """The SamplingConfig a checkpoint's `generation_config.json` asks for (keys it does not set: defaults).

    transformers' own defaults for an absent key are the same as ours except `top_k`, which it sets to 50
    when sampling; a config that samples without naming top_k gets 50 here too."""
    picked: dict[str, Any] = {}
    for key in CONFIG_KEYS:
        value = generation_config.get(key)
        if value is not None:
            picked[key] = type(getattr(SamplingConfig(), key))(value)
    if picked.get("do_sample") and "top_k" not in generation_config:
        picked["top_k"] = 50
    return SamplingConfig(**picked)


def _penalise(logits: np.ndarray, history: Sequence[np.ndarray], penalty: float) -> None:
    for row, seen in enumerate(history):
        if len(seen) == 0:
            continue
        ids = np.unique(seen)
        ids = ids[(ids >= 0) & (ids < logits.shape[1])]
        x = logits[row, ids]
        logits[row, ids] = np.where(x < 0, x * penalty, x / penalty)


def process_logits(
    logits: np.ndarray,
    config: SamplingConfig,
    history: Sequence[np.ndarray] = (),
    generated: int = 0,
    eos_token_ids: Sequence[int] = (),
) -> np.ndarray:
    """The processed scores [B, V] (float32, −∞ for excluded tokens) the next token is chosen from.

    `history`: per row, the token ids seen so far (prompt, then generated); `generated`: how many tokens
    were generated before this one (for `min_new_tokens`)."""
    x = np.array(logits, dtype=np.float32, copy=True)
    if config.repetition_penalty != 1.0 and history:
        _penalise(x, history, float(config.repetition_penalty))
    if generated < config.min_new_tokens and len(eos_token_ids):
        x[:, [int(e) for e in eos_token_ids if 0 <= int(e) < x.shape[1]]] = -np.inf
    if not config.do_sample:
        return x
    if config.temperature != 1.0:
        x = x / np.float32(config.temperature)
    if 0 < config.top_k < x.shape[1]:
        kth = np.partition(x, -config.top_k, axis=-1)[:, -config.top_k][:, None]
        x = np.where(x < kth, -np.inf, x).astype(np.float32)
    if config.top_p < 1.0:
        order = np.argsort(x, axis=-1, kind="stable")  # ascending, as transformers sorts
        sorted_x = np.take_along_axis(x, order, axis=-1)
        probs = _softmax(sorted_x)
        drop = np.cumsum(probs, axis=-1) <= (1.0 - config.top_p)
        drop[:, -1] = False  # the most likely token always stays
        sorted_x = np.where(drop, -np.inf, sorted_x)
        out = np.empty_like(x)
        np.put_along_axis(out, order, sorted_x, axis=-1)
        x = out
    return x


def _softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - np.where(np.isfinite(m), m, 0))
    return e / e.sum(axis=-1, keepdims=True)


class Sampler:
    """Picks the next token [B] (int64) from last-position logits [B, V]; holds its own seeded generator."""

    def __init__(self, config: SamplingConfig | None = None, eos_token_ids: Sequence[int] = ()) -> None:
        self.config = config or SamplingConfig()
        self.eos_token_ids = tuple(int(e) for e in eos_token_ids)
        self.rng = np.random.Generator(np.random.PCG64(self.config.seed))

    def __call__(self, logits: np.ndarray, history: Sequence[np.ndarray] = (), generated: int = 0) -> np.ndarray:
        scores = process_logits(logits, self.config, history, generated, self.eos_token_ids)
        if not self.config.do_sample:
            return np.argmax(scores, axis=-1).astype(np.int64)
        probs = _softmax(scores.astype(np.float64))
        draws = self.rng.random(probs.shape[0])
        cdf = np.cumsum(probs, axis=-1)
        picks = [int(np.searchsorted(cdf[r], draws[r] * cdf[r, -1], side="right")) for r in range(probs.shape[0])]
        # a draw can land on a zero-probability token only through rounding at the top end: step back to a kept one
        out = np.empty(probs.shape[0], dtype=np.int64)
        for r, p in enumerate(picks):
            p = min(p, probs.shape[1] - 1)
            while probs[r, p] == 0 and p > 0:
                p -= 1
            out[r] = p
        return out
