"""Turning one row's tokens into text as they arrive: stop tokens, stop strings, and text that is final.

`TextStream` is fed every token the decode loop chooses for its row. It hands its callback only text that
later tokens cannot change: an incomplete UTF-8 sequence (a byte-fallback token that decodes to U+FFFD)
waits for its next byte, and a tail that could be the start of a stop string waits until it either
completes the stop string or no longer can. The row ends at its first stop token id or at the first
occurrence of a stop string (transformers' `stop_strings`: the text is searched, so a stop string that
spans tokens, or ends inside one, still stops it). The answer's text stops before the stop string (as a
stop token is left out of it, and as OpenAI's `stop` behaves); its token ids run through the token that
completed it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

TextCallback = Callable[[int, str], None]  # (row in the batch, newly decoded text)


def _held_back(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class TextStream:
    """Incremental detokenization of one row, with its stop ids and stop strings."""

    def __init__(self, tokenizer: Any, stop_ids: set[int], row: int, callback: TextCallback | None,
                 stop_strings: Sequence[str] = ()) -> None:
        self.tokenizer, self.stop_ids, self.row, self.callback = tokenizer, stop_ids, row, callback
        self.stop_strings = tuple(stop_strings)
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False  # a stop token or a stop string ended the row
        self.final_text: str | None = None  # the text, cut before the stop string that ended it

    def push(self, token: int) -> None:
        if self.stopped:
            return
        if token in self.stop_ids:
            self.stopped = True
            self.flush()
            return
        self.ids.append(token)
        text = self.text()
        if self.stop_strings:
            hits = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
            if hits:
                self.stopped = True
                self.final_text = text[: min(hits)]
                self._emit(self.final_text)
                return
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next byte token
            return
        hold = _held_back(text, self.stop_strings)
        self._emit(text[: len(text) - hold] if hold else text)

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def answer_text(self) -> str:
        return self.final_text if self.final_text is not None else self.text()

    def flush(self) -> None:
        self._emit(self.answer_text())

    def _emit(self, text: str) -> None:
        if self.callback is not None and text.startswith(self.emitted) and len(text) > len(self.emitted):
            self.callback(self.row, text[len(self.emitted) :])
        if text.startswith(self.emitted):
            self.emitted = text
