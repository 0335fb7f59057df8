"""The generation loop over the four stages, shared by every backend.

PyTorch (`ficoco.reduced_llava`), the exporter's ONNX Runtime validation and the runtime's backends all
expose the same four calls; this loop drives them, so "the same tokens" means the same loop, sampler and
stopping rule everywhere.

The host side of the loop is numpy and nothing else (it imports no torch): token ids, image offsets and
positions go into the stages as int64 arrays, logits come back as float32 arrays [B, V] on the host, and
the chosen tokens are int64 arrays. What flows between the stages (visual tokens, embeddings, the KV
cache) is the backend's own (torch tensors for the reference and the GPU backends, numpy arrays for ONNX
Runtime on CPU) and the loop only passes it along.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from ficoco.sampling import Sampler, SamplingConfig

Array = Any  # a backend's tensor (numpy array or torch tensor): opaque to the loop

class DecoderStages(Protocol):
    """The three decoder-side stages: what `decode_tokens` drives."""

    def embed(self, input_ids: np.ndarray) -> Array:
        """input_ids [B, T] (int64) -> embeddings [B, T, D]."""

    def prefill(self, embeds: Array, visual: Array, image_offset: np.ndarray) -> tuple[np.ndarray, list[Array]]:
        """-> last-position logits [B, V] (float32, host) and the flat per-layer K/V list [k0, v0, k1, v1, ...]."""

    def step(self, embeds: Array, position: np.ndarray, past: list[Array]) -> tuple[np.ndarray, list[Array]]:
        """One token [B, 1, D] at `position` [B] (int64) -> logits [B, V] (float32, host) and the grown K/V list."""

    def extend(self, embeds: Array, position: np.ndarray, past: list[Array]) -> tuple[np.ndarray, list[Array]]:
        """T tokens [B, T, D], the first at `position` [B] -> logits [B, V] at the last and the K/V grown by T
        (a chat's next turn; `step` is the case T = 1)."""


class StagedModel(DecoderStages, Protocol):
    """All four stages: what `generate_tokens` drives."""

    def encode_image(self, pixel_values: Array) -> Array:
        """pixel_values [B, 3, H, W] -> visual tokens [B, n_V, D]."""


def host_ids(x: Any) -> np.ndarray:
    """Token ids, offsets or positions (a numpy array, a torch tensor, a list or an int) as an int64 array."""
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.int64)


def host_offsets(image_offset: Any, batch: int) -> np.ndarray:
    """Image offsets (one for all rows, or one per row) as an int64 array [batch]."""
    return np.ascontiguousarray(np.broadcast_to(host_ids(image_offset).reshape(-1), (batch,)))


def host_logits(x: Any) -> np.ndarray:
    """Logits (a numpy array or a torch tensor on any device) as a float32 host array."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def generate_tokens(
    model: StagedModel,
    pixel_values: Array,
    input_ids: Any,
    image_offset: Any,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    on_token: Callable[[np.ndarray], None] | None = None,
) -> np.ndarray:
    """Run the vision tower on `pixel_values`, then `decode_tokens`: ids [B, <= max_new_tokens] (int64)."""
    return decode_tokens(model, model.encode_image(pixel_values), input_ids, image_offset, max_new_tokens,
                         sampling, eos_token_id, on_token)


def _eos_list(eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, (int, np.integer)) else [int(e) for e in eos_token_id]


def decode_tokens(
    model: DecoderStages,
    visual: Array,
    input_ids: Any,
    image_offset: Any,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    on_token: Callable[[np.ndarray], None] | None = None,
    prefilled: tuple[Any, list[Array]] | None = None,
    on_logits: Callable[[np.ndarray], None] | None = None,
    should_stop: Callable[[np.ndarray], np.ndarray] | None = None,
    on_cache: Callable[[list[Array]], None] | None = None,
    start_position: int | None = None,
) -> np.ndarray:
    """Generate up to `max_new_tokens` ids [B, <= max_new_tokens] (int64) from visual tokens [B, n_V, D] that
    the vision tower already produced, for prompts `input_ids` [B, T] without the image placeholder.

    `prefilled` (the prefill's logits and K/V for exactly these inputs) skips the prefill call, for callers
    that already ran it. The first decode token sits at position T + n_V (the unreduced prompt numbering);
    each backend's step maps it to per-layer positions. `sampling` picks each token (`ficoco.sampling`:
    the repetition penalty sees the prompt's ids and the generated ones; `min_new_tokens` holds EOS back).
    A row finishes when it produces an EOS id or when `should_stop` (given the new column [B]) marks it
    (stop strings); finished rows repeat their filler (the first EOS id, else 0), and the loop ends once
    every row has finished. `on_token` receives each new column [B] as soon as it is chosen (streaming);
    `on_logits` the logits [B, V] each column was chosen from (greedy: the model's `forced_logits` along its
    own tokens, without running the steps again); `on_cache` the K/V list that holds every token the loop
    fed (the prompt, then each chosen token but the last), for callers that continue the conversation.
    `start_position` (with `prefilled`): the first decode token's position when the cache holds more than
    the prompt (a chat's later turn; `input_ids` is then the whole conversation, for the repetition penalty).
    """
    ids = host_ids(input_ids)
    b = ids.shape[0]
    offset = host_offsets(image_offset, b)
    config = sampling or SamplingConfig()
    eos_ids = _eos_list(eos_token_id)
    sampler = Sampler(config, eos_ids)
    fill = eos_ids[0] if eos_ids else 0
    logits, past = prefilled if prefilled is not None else model.prefill(model.embed(ids), visual, offset)
    logits = host_logits(logits)
    first = ids.shape[1] + int(visual.shape[1]) if start_position is None else int(start_position)
    position = np.full((b,), first, dtype=np.int64)
    done = np.zeros(b, dtype=bool)
    history = [row for row in ids] if config.repetition_penalty != 1.0 else []
    tokens: list[np.ndarray] = []
    for _ in range(max_new_tokens):
        if on_logits is not None:
            on_logits(logits)
        nxt = sampler(logits, history, len(tokens))
        nxt = np.where(done, fill, nxt).astype(np.int64)
        if eos_ids:
            done = done | np.isin(nxt, eos_ids)
        tokens.append(nxt)
        if history:
            history = [np.append(h, t) for h, t in zip(history, nxt, strict=True)]
        if on_token is not None:
            on_token(nxt)
        if should_stop is not None:
            done = done | np.asarray(should_stop(nxt), dtype=bool)
        if len(tokens) == max_new_tokens or bool(done.all()):
            break
        logits, past = model.step(model.embed(nxt[:, None]), position, past)
        logits = host_logits(logits)
        position = position + 1
    if on_cache is not None:
        on_cache(past)
    return np.stack(tokens, axis=1) if tokens else np.zeros((b, 0), dtype=np.int64)


def extend_cache(model: DecoderStages, ids: Any, position: int, past: list[Array]) -> tuple[np.ndarray, list[Array]]:
    """Feed token ids [B, T] (T >= 1) into the cache, the first at `position`: logits [B, V] after the last
    and the grown K/V list, in one `extend` call."""
    tokens = host_ids(ids)
    b = tokens.shape[0]
    logits, past = model.extend(model.embed(tokens), np.full((b,), int(position), dtype=np.int64), past)
    return host_logits(logits), past


def forced_logits(
    model: DecoderStages,
    visual: Array,
    input_ids: Any,
    image_offset: Any,
    tokens: Any,
    prefilled: tuple[Any, list[Array]] | None = None,
) -> np.ndarray:
    """Teacher forcing: the next-token logits [B, n, V] (float32) before each of `tokens` [B, n], every one
    given the same prefix (the prompt, then tokens[:, :t]) whatever the model itself would have chosen.

    Row t is the distribution the model puts on position T + n_V + t. Two backends driven along one token
    path are compared position by position on equal prefixes, which free-running greedy decoding cannot
    do once the two have chosen differently (`bundle.compare.forced_agreement`). Positions and stepping are
    those of `decode_tokens`, so row t of a model's own greedy path is exactly the logits it chose from.
    """
    ids, path = host_ids(input_ids), host_ids(tokens)
    b, n = path.shape
    offset = host_offsets(image_offset, b)
    logits, past = prefilled if prefilled is not None else model.prefill(model.embed(ids), visual, offset)
    position = np.full((b,), ids.shape[1] + int(visual.shape[1]), dtype=np.int64)
    rows = [host_logits(logits)]
    for t in range(n - 1):
        logits, past = model.step(model.embed(path[:, t : t + 1]), position, past)
        rows.append(host_logits(logits))
        position = position + 1
    return np.stack(rows, axis=1) if n else np.zeros((b, 0, rows[0].shape[-1]), dtype=np.float32)
