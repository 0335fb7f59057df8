"""Rendering a chat template with jinja2 alone, as transformers' `apply_chat_template` renders it.

The runtime must not need transformers to turn a question into a prompt, so the bundle's chat template is
rendered here: a sandboxed jinja2 environment with `trim_blocks` and `lstrip_blocks`, the `loopcontrols`
extension, a `{% generation %}` block that renders its body, a `tojson` filter that does not escape HTML
(`ensure_ascii=False`) and the `raise_exception(message)` and `strftime_now(format)` globals, the
environment transformers gives a template. Special-token variables (`bos_token`, ...) are not passed:
the tokenizer adds BOS itself. `tests/test_inputs_images.py` holds the output equal to transformers' for
the built-in and LLaVA templates.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(ValueError):
    """A chat template that cannot be compiled or rendered (the message carries jinja2's reason)."""


class _GenerationBlock(Extension):
    """`{% generation %} ... {% endgeneration %}`: transformers marks assistant text with it; render the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(chat_template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(chat_template)
    except jinja2.exceptions.TemplateError as err:
        raise TemplateError(f"the chat template does not compile: {err}") from err


def render_chat(chat_template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The prompt text `chat_template` makes of `messages` (role/content dicts), ready for generation."""
    template = _compile(chat_template)
    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # a template is code: any failure in it (a TypeError on a message form too) is its own
        raise TemplateError(f"the chat template cannot render these messages: {type(err).__name__}: {err}") from err
