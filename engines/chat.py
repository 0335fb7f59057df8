"""Multi-turn chat about one image: each follow-up reuses the cache of the turns before it.

    chat = pipe.chat("cat.jpg")
    chat.ask("What is in the picture?").text
    chat.ask("What colour is it?").text          # the image and the first turn are not run again

The first turn is an ordinary request: the vision tower, the prefill (where FiCoCo-L drops visual tokens
with the first question's text) and decoding. After it, the cache holds the prompt and every answer
token but the last. A later turn renders the whole conversation with the bundle's chat template, takes
the text that follows what the cache already holds (the end of the previous answer's turn, the new user
turn, the generation prompt), tokenizes it, and feeds it — with the previous answer's last token unless
that was a stop token, which the template's own end-of-turn text replaces — into the cache in one
`extend` call (every decoder segment on T tokens; TensorRT engines, whose profiles are a prefill and a
one-token step, take them as T steps). Then it decodes from there.

So a follow-up costs its own tokens, not the conversation's: no vision tower, no prefill of the image or
of the earlier turns, and the visual tokens the decoder kept stay what the first question chose. That
last point means a cached follow-up is not the same computation as a fresh prefill of the whole
conversation (which would let FiCoCo-L choose with every question's text); it is the same as the reduced
PyTorch model given the same history the same way, which is what `tests/test_chat.py` holds it to.
When the rendered conversation does not begin with the text the cache holds (a template that rewrites
earlier turns), the turn falls back to one fresh prefill of the whole conversation, logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bundle.frontend import InputError, check_stop_strings
from engines.streaming import TextStream
from ficoco.generation import StagedModel, decode_tokens, extend_cache
from ficoco.inputs import format_conversation, prompt_ids
from ficoco.sampling import SamplingConfig

log = logging.getLogger(__name__)


@dataclass
class ChatTurn:
    """One answered turn: the question, the answer's text and token ids, and how the turn was fed."""

    question: str
    text: str
    token_ids: list[int]
    stopped: bool
    #: "prefill" (the first turn, or a fallback) or "cache" (fed into the previous turns' cache)
    fed_by: str
    fed_tokens: int
    #: a stop string ended it: the cache holds text the rendered history does not, so the next turn is prefilled
    cut_by_string: bool = False
    #: text tokens in the context the answer was generated from (the conversation so far)
    context_tokens: int = 0


@dataclass
class _State:
    visual: Any
    past: list[Any]
    fed: list[int]  # every token id the cache holds, in order (the image's place is `offset`)
    offset: int
    prompt_text: str  # the rendered conversation up to the last generation prompt
    pending: int | None  # the last answer's last token: chosen, not yet fed
    history: list[ChatTurn] = field(default_factory=list)


class ChatSession:
    """A conversation about one image over any `StagedModel` (a bundle's sessions, or the PyTorch reference).

    `front` gives the prompt side: `tokenizer`, `chat_template`, `image_token_id`, `eos_token_ids`,
    `default_sampling`, and the limits `text_len_range` and `max_new_tokens_limit`.
    """

    def __init__(self, stages: StagedModel, front: Any, pixel_values: Any,
                 history: Sequence[tuple[str, str]] = ()) -> None:
        """`history`: earlier (question, answer) turns this session did not generate (a client's message
        history); the first `ask` prefills them with its own question, later ones reuse the cache."""
        self.stages = stages
        self.front = front
        self.pixel_values = pixel_values
        self._given = [ChatTurn(q, a, [], True, "history", 0) for q, a in history]
        self._state: _State | None = None

    @property
    def turns(self) -> list[ChatTurn]:
        return self._given + ([] if self._state is None else list(self._state.history))

    @property
    def cached_tokens(self) -> int:
        """Text tokens the cache holds (the image's visual tokens not counted)."""
        return 0 if self._state is None else len(self._state.fed)

    @property
    def token_limit(self) -> int:
        """Most text tokens one conversation may hold: the bundle's text length plus its new-token limit."""
        return int(self.front.text_len_range[1]) + int(self.front.max_new_tokens_limit)

    def ask(
        self,
        question: str,
        *,
        max_new_tokens: int | None = None,
        sampling: SamplingConfig | None = None,
        stop_token_ids: Sequence[int] | None = None,
        stop_strings: Sequence[str] | None = None,
        on_text: Callable[[str], None] | None = None,
        on_start: Callable[[int], None] | None = None,
    ) -> ChatTurn:
        """Answer the next question of the conversation; `on_text` receives the answer as it is generated,
        `on_start` the context's length in text tokens once the question is checked and fed."""
        if not isinstance(question, str) or not question.strip():
            raise InputError("the question is empty; ask something about the image")
        n_new = int(self.front.max_new_tokens_limit if max_new_tokens is None else max_new_tokens)
        if not 1 <= n_new <= int(self.front.max_new_tokens_limit):
            raise InputError(f"max_new_tokens must be in 1..{self.front.max_new_tokens_limit} for this bundle (got {n_new})")
        stops = tuple(int(t) for t in (self.front.eos_token_ids if stop_token_ids is None else stop_token_ids))
        self.front.check_stop_ids(stops)
        strings = check_stop_strings(stop_strings)
        sampling = self.front.default_sampling if sampling is None else sampling
        questions = [t.question for t in self.turns] + [question]
        answers = [t.text for t in self.turns]
        text = format_conversation(self.front.chat_template, questions, answers)
        st = self._state
        fed_by, new_ids = "prefill", None
        if st is not None:
            rest = _continuation(text, st.prompt_text, answers[-1]) if not st.history[-1].cut_by_string else None
            if rest is not None:
                delta = self.front.tokenizer(rest, add_special_tokens=False)["input_ids"]
                new_ids = ([] if st.pending is None or st.pending in stops else [st.pending]) + [int(t) for t in delta]
                fed_by = "cache"
            else:
                log.info("this turn is prefilled from the start: the cache does not hold the conversation as the "
                         "template renders it (a template that rewrites earlier turns, or an answer cut by a stop string)")
        if new_ids is not None and st is not None:
            total = len(st.fed) + len(new_ids) + n_new
            self._check_length(total)
            position = len(st.fed) + int(st.visual.shape[1])
            logits, past = extend_cache(self.stages, np.asarray([new_ids], dtype=np.int64), position, st.past)
            fed = st.fed + new_ids
            visual, offset, start = st.visual, st.offset, position + len(new_ids)
            history_ids = np.asarray([fed], dtype=np.int64)
            prefilled = (logits, past)
            fed_count = len(new_ids)
        else:
            ids, offset = prompt_ids(self.front.tokenizer, text, self.front.image_token_id)
            if st is None and not self._given:
                self.front.check_request(len(ids), n_new)  # a first question: the bundle's own prompt limits
            self._check_length(len(ids) + n_new)
            visual = st.visual if st is not None else self.stages.encode_image(self.pixel_values)
            history_ids = np.asarray([ids], dtype=np.int64)
            prefilled = self.stages.prefill(self.stages.embed(history_ids), visual, np.asarray([offset], dtype=np.int64))
            fed, start, fed_count = list(ids), None, len(ids)
        if on_start is not None:
            on_start(len(fed))
        stream = TextStream(self.front.tokenizer, set(stops), 0, None if on_text is None else (lambda _r, s: on_text(s)), strings)
        caches: list[list[Any]] = []
        tokens = decode_tokens(
            self.stages, visual, history_ids, offset, n_new, sampling, list(stops) or None,
            on_token=lambda col: stream.push(int(col[0])),
            prefilled=prefilled, start_position=start, on_cache=caches.append,
            should_stop=(lambda col: np.array([stream.stopped])) if strings else None,
        )
        stream.flush()
        gen = [int(t) for t in tokens[0]]
        turn = ChatTurn(question, stream.answer_text(), list(stream.ids), stream.stopped, fed_by, fed_count,
                        cut_by_string=stream.final_text is not None, context_tokens=len(fed))
        history = [] if st is None else st.history
        self._state = _State(visual, caches[0], fed + gen[:-1], offset, text, gen[-1] if gen else None, [*history, turn])
        return turn

    def _check_length(self, total: int) -> None:
        """InputError when the conversation would outgrow what the bundle takes in one sequence."""
        if total > self.token_limit:
            raise InputError(
                f"the conversation would hold {total} text tokens; this bundle takes at most {self.token_limit} "
                "in one sequence (shape_ranges.text_len + max_new_tokens): start a new chat, or ask for fewer new tokens"
            )


def _continuation(text: str, prompt_text: str, answer: str) -> str | None:
    """The part of the rendered conversation `text` after the previous prompt and its answer (None when
    `text` does not begin with them; whitespace the template puts before the answer is allowed, since the
    answer's first token carries it)."""
    if not text.startswith(prompt_text):
        return None
    at = text.find(answer, len(prompt_text)) if answer else len(prompt_text)
    if at < 0 or text[len(prompt_text):at].strip():
        return None
    return text[at + len(answer):]
