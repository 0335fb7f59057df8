"""Prompt side of the inputs: chat template → text, text → token ids without the image placeholder.

The runtime and the exported graphs never see the 576 image placeholders: they get the text tokens and the
offset `a` where the visual tokens are spliced in (``[prefix | visual | suffix]``). `hf_input_ids` rebuilds the
expanded form transformers' own `LlavaForConditionalGeneration` wants, for reference runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ficoco.chat_template import TemplateError, render_chat

if TYPE_CHECKING:
    import torch

IMAGE_PLACEHOLDER = "<image>"


class PromptError(ValueError):
    """A prompt or chat template does not give exactly one image placeholder."""


@dataclass
class PromptInputs:
    """`text_ids` [1, T]: the prompt's tokens WITHOUT the image placeholder; `image_offset`: where in
    `text_ids` the visual tokens go (tokens ``text_ids[:, :a]`` precede the image)."""

    text_ids: torch.Tensor
    image_offset: int

    @property
    def num_text_tokens(self) -> int:
        return int(self.text_ids.shape[1])

    def sequence_length(self, num_visual_tokens: int) -> int:
        """Length of the decoder's prefill sequence once `num_visual_tokens` are spliced in."""
        return self.num_text_tokens + num_visual_tokens


def _render(chat_template: str, messages: list[dict[str, Any]]) -> str:
    return render_chat(chat_template, messages, add_generation_prompt=True)


_MARKER = re.compile(r"<\|[^|<>]+\|>|</?[A-Za-z_][^<>\s]*>|\[/?[A-Z_]+\]|\b[A-Za-z_]+:")


#: special-token spellings refused in any question, whether or not the template shows them (BOS/EOS, ChatML, Llama-2)
_SPECIAL = re.compile(r"</?s>|<\|[^|<>]+\|>|\[/?INST\]")


def _refuse_role_markers(rendered: str, question: str) -> None:
    """PromptError when the question contains a marker the template itself uses around it.

    Policy (docs/reliability.md): a question is data, never structure. The template's own role markers
    (``USER:``, ``ASSISTANT:``; case-insensitive) and special tokens (``</s>``, ``<|im_end|>``, ``[INST]``)
    in a question would let it fake a turn, so such a question is refused, not escaped: an escaped marker
    tokenizes differently from what the user wrote, and silently changing a question is worse than saying
    so. Markers are read from the rendered prompt, so this follows whatever template the bundle carries.
    """
    at = rendered.index(question)
    frame = rendered[:at] + " " + rendered[at + len(question):]
    markers = {m.group(0) for m in _MARKER.finditer(frame)} - {IMAGE_PLACEHOLDER}
    lowered = question.lower()
    found = sorted({m for m in markers if m.lower() in lowered} | {m.group(0) for m in _SPECIAL.finditer(question)})
    if found:
        raise PromptError(
            f"the question contains {', '.join(repr(m) for m in found)}, which the chat template uses to mark turns; "
            "a question cannot add turns of its own: remove it from the question"
        )


def _messages(questions: list[str], answers: list[str], list_form: bool) -> list[dict[str, Any]]:
    """User and assistant messages, the image in the first user message (llava-hf's content-list form, or
    plain strings with ``<image>\n`` in front of the first question)."""
    out: list[dict[str, Any]] = []
    for i, q in enumerate(questions):
        if list_form:
            parts: list[dict[str, Any]] = [{"type": "image"}] if i == 0 else []
            out.append({"role": "user", "content": [*parts, {"type": "text", "text": q}]})
        else:
            out.append({"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{q}" if i == 0 else q})
        if i < len(answers):
            a = answers[i]
            out.append({"role": "assistant", "content": [{"type": "text", "text": a}] if list_form else a})
    return out


def format_conversation(chat_template: str, questions: list[str], answers: list[str] = ()) -> str:  # type: ignore[assignment]
    """Render a conversation about one image with `chat_template`, ready for the next answer: user turn i
    asks `questions[i]`, assistant turn i answered `answers[i]` (one answer fewer than questions).

    The messages use llava-hf's content-list form (``[{"type": "image"}, {"type": "text", "text": q}]`` in
    the first user turn); a template that only understands string content gets ``"<image>\n" + q``
    instead. The result contains exactly one ``<image>`` and every question (PromptError otherwise, e.g.
    when a question contains ``<image>`` or one of the template's own turn markers).
    """
    answers = list(answers)
    if len(answers) != len(questions) - 1:
        raise PromptError(f"{len(questions)} questions need {len(questions) - 1} earlier answers, got {len(answers)}")
    for q in questions:
        if IMAGE_PLACEHOLDER in q:
            raise PromptError(f"the question must not contain {IMAGE_PLACEHOLDER!r}; the template places the image")
    errors: list[str] = []
    for list_form in (True, False):
        try:
            text = _render(chat_template, _messages(list(questions), answers, list_form))
        except TemplateError as err:  # a template may reject one of the two message forms
            errors.append(str(err))
            continue
        if text.count(IMAGE_PLACEHOLDER) == 1 and all(q in text for q in questions):
            for q in questions:
                _refuse_role_markers(text, q)
            return text
        errors.append(f"rendered {text.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER!r} in {text!r}")
    raise PromptError("the chat template does not render one image and the questions: " + "; ".join(errors))


def format_prompt(chat_template: str, question: str) -> str:
    """Render a single user turn (one image, then `question`) with `chat_template` (`format_conversation`)."""
    return format_conversation(chat_template, [question])


def prompt_ids(tokenizer: Any, prompt_text: str, image_token_id: int) -> tuple[list[int], int]:
    """Tokenize a rendered prompt (with the tokenizer's own special-token handling, e.g. BOS) and take out
    its single image token: (the text ids without it, the image offset = that token's index)."""
    ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    positions = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(positions) != 1:
        raise PromptError(
            f"the prompt must tokenize to exactly one image token (id {image_token_id}); found {len(positions)} "
            f"in {prompt_text!r}"
        )
    a = positions[0]
    return [int(t) for t in ids[:a] + ids[a + 1 :]], a


def encode_prompt(tokenizer: Any, prompt_text: str, image_token_id: int) -> PromptInputs:
    """`prompt_ids` as `PromptInputs` (a torch tensor [1, T], for the PyTorch side)."""
    import torch

    ids, a = prompt_ids(tokenizer, prompt_text, image_token_id)
    return PromptInputs(text_ids=torch.tensor([ids], dtype=torch.long), image_offset=a)


def hf_input_ids(inputs: PromptInputs, image_token_id: int, num_image_tokens: int = 576) -> torch.Tensor:
    """`input_ids` [1, T + num_image_tokens] with the placeholder expanded, as transformers' LLaVA expects."""
    import torch

    a = inputs.image_offset
    ids = inputs.text_ids
    image = torch.full((ids.shape[0], num_image_tokens), image_token_id, dtype=ids.dtype)
    return torch.cat([ids[:, :a], image, ids[:, a:]], dim=1)
