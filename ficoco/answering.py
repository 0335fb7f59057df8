"""Answering a split's questions with any staged model: the reduced PyTorch model or a bundle's backend.

Each image is encoded once; its questions are grouped by prompt length (the graphs take no attention
mask, so one batch holds prompts of equal token length) and generated greedily in batches that reuse the
image's visual tokens. The same loop (`ficoco.generation.generate_tokens`) runs every backend, so two
backends that agree on tokens agree on answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ficoco.generation import StagedModel, decode_tokens
from ficoco.inputs import encode_prompt, format_prompt
from ficoco.preprocess import preprocess_image
from ficoco.vqa import Question, Split

#: An answer is one word and </s>; a little room for a model that says more.
ANSWER_TOKENS = 4


@dataclass(frozen=True)
class Prompting:
    """What turns (image, question) into a model's inputs: tokenizer, chat template, preprocessing, ids."""

    tokenizer: Any
    chat_template: str
    processor_config: dict[str, Any]
    image_token_id: int
    eos_token_ids: tuple[int, ...]

    @classmethod
    def of_model(cls, loaded: Any) -> Prompting:
        """From a `ficoco.models.LoadedModel`."""
        eos = loaded.tokenizer.eos_token_id
        return cls(loaded.tokenizer, loaded.chat_template, loaded.processor_config, loaded.image_token_id,
                   () if eos is None else (int(eos),))

    @classmethod
    def of_frontend(cls, front: Any) -> Prompting:
        """From an `engines.runtime.Frontend` (the bundle's own tokenizer, template and preprocessing)."""
        return cls(front.tokenizer, front.chat_template, front.processor_config, front.image_token_id,
                   tuple(front.eos_token_ids))


def answer_split(
    stages: StagedModel,
    prompting: Prompting,
    split: Split,
    *,
    max_batch: int = 16,
    on_image: Callable[[int], None] | None = None,
) -> list[str]:
    """The decoded greedy answer to every question of `split`, in its order."""
    by_image: dict[str, list[int]] = {}
    for i, q in enumerate(split.questions):
        by_image.setdefault(q.image_key, []).append(i)
    out: list[str] = [""] * len(split.questions)
    with torch.inference_mode():
        for n_done, (key, idx) in enumerate(by_image.items()):
            qs = [split.questions[i] for i in idx]
            for i, ans in zip(idx, answer_image(stages, prompting, split.image(key), qs, max_batch=max_batch), strict=True):
                out[i] = ans
            if on_image is not None:
                on_image(n_done + 1)
    return out


def _repeat_rows(visual: Any, b: int) -> Any:
    """visual [1, n, D] repeated to [b, n, D], in the backend's own kind of array (numpy or torch)."""
    if hasattr(visual, "expand"):
        return visual.expand(b, -1, -1).contiguous()
    import numpy as np

    return np.ascontiguousarray(np.broadcast_to(visual, (b, *visual.shape[1:])))


def answer_image(
    stages: StagedModel, prompting: Prompting, image: Any, questions: Sequence[Question | str], *, max_batch: int = 16
) -> list[str]:
    """Greedy answers to `questions` about one image (its vision tower runs once)."""
    pixel_values = preprocess_image(image, prompting.processor_config)
    visual = stages.encode_image(pixel_values)
    prompts = []
    for q in questions:
        text = q.question if isinstance(q, Question) else q
        prompts.append(encode_prompt(prompting.tokenizer, format_prompt(prompting.chat_template, text), prompting.image_token_id))
    groups: dict[tuple[int, int], list[int]] = {}
    for j, p in enumerate(prompts):
        groups.setdefault((int(p.text_ids.shape[1]), p.image_offset), []).append(j)
    answers: list[str] = [""] * len(prompts)
    stops = set(prompting.eos_token_ids)
    for (_, offset), members in groups.items():
        for c in range(0, len(members), max_batch):
            chunk = members[c:c + max_batch]
            ids = torch.cat([prompts[j].text_ids for j in chunk], dim=0)
            b = len(chunk)
            tokens = decode_tokens(
                stages,
                _repeat_rows(visual, b),
                ids,
                offset,
                ANSWER_TOKENS,
                None,
                list(stops) or None,
            )
            for j, row in zip(chunk, tokens.tolist(), strict=True):
                cut = next((t for t, v in enumerate(row) if v in stops), len(row))
                answers[j] = prompting.tokenizer.decode(row[:cut], skip_special_tokens=True)
    return answers
