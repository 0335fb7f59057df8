"""Multi-turn chat: follow-ups reuse the cache, and the bundle answers as the reduced PyTorch model does."""

from __future__ import annotations

import pytest
import torch

from bundle.manifest import load_manifest
from engines.chat import ChatSession, _continuation
from engines.runtime import InputError, Pipeline
from ficoco.images import test_image
from ficoco.inputs import format_conversation, prompt_ids
from ficoco.models import LoadedModel
from ficoco.reduced_llava import ReducedLlava
from ficoco.schedule import Schedule

QUESTIONS = ["What is in the picture?", "What colour is it?", "Where is it?"]


@pytest.fixture(scope="module")
def pipe(tiny_bundle) -> Pipeline:
    return Pipeline.from_bundle(tiny_bundle, backend="onnxruntime", verify=False)


def test_follow_ups_reuse_the_cache_and_match_the_reduced_pytorch_model(pipe: Pipeline, tiny: LoadedModel, tiny_bundle) -> None:
    image = test_image("rocket")
    chat = pipe.chat(image)
    model = ReducedLlava(tiny.model, Schedule.from_dict(load_manifest(tiny_bundle).schedule)).eval()
    ref = ChatSession(model.stages(), pipe, pipe.preprocess([image]))
    streamed: list[str] = []
    for i, q in enumerate(QUESTIONS):
        got = chat.ask(q, max_new_tokens=6, stop_token_ids=[], on_text=streamed.append)
        with torch.no_grad():
            want = ref.ask(q, max_new_tokens=6, stop_token_ids=[])
        assert got.token_ids == want.token_ids, i
        assert got.fed_by == want.fed_by == ("prefill" if i == 0 else "cache")
        assert "".join(streamed) == got.text
        streamed.clear()
    turns = chat.turns
    # a follow-up feeds only its own tokens (the previous answer's last token, the new turn's text), far fewer
    # than a prefill of the conversation so far would
    for k in (1, 2):
        text = format_conversation(pipe.chat_template, QUESTIONS[: k + 1], [t.text for t in turns[:k]])
        whole, _ = prompt_ids(pipe.tokenizer, text, pipe.image_token_id)
        assert turns[k].fed_tokens < len(whole) - turns[0].fed_tokens
    assert chat.cached_tokens == sum(t.fed_tokens for t in chat.turns) + 3 * 5  # each answer's 6 tokens but the last


def test_a_conversation_longer_than_the_bundle_is_refused(pipe: Pipeline) -> None:
    chat = pipe.chat(test_image("rocket"))
    with pytest.raises(InputError, match="start a new chat"):
        for _ in range(200):
            chat.ask("Say more about it.", max_new_tokens=pipe.max_new_tokens_limit, stop_token_ids=[])
    assert chat.turns and sum(len(t.token_ids) for t in chat.turns) <= chat.token_limit


def test_continuation_finds_the_new_turn_after_the_answer() -> None:
    prompt = "USER: <image>\nq1 ASSISTANT:"
    full = "USER: <image>\nq1 ASSISTANT: a1 USER: q2 ASSISTANT:"
    assert _continuation(full, prompt, "a1") == " USER: q2 ASSISTANT:"
    assert _continuation(full, prompt, "other") is None
    assert _continuation("SYSTEM: x " + full, prompt, "a1") is None


def test_ficoco_run_chat_reads_follow_ups_from_stdin(pipe: Pipeline, tiny_bundle, tmp_path) -> None:
    from click.testing import CliRunner

    from commands.run import main as run_main

    path = tmp_path / "rocket.png"
    test_image("rocket").save(path)
    chat = pipe.chat(path)
    want = [chat.ask(q, max_new_tokens=5, stop_token_ids=[]).text for q in QUESTIONS[:2]]
    res = CliRunner().invoke(run_main, [str(tiny_bundle), "--image", str(path), "--chat", "--prompt", QUESTIONS[0],
                                        "--max-new-tokens", "5", "--ignore-eos", "--backend", "onnxruntime"],
                             input=QUESTIONS[1] + "\n\n", catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert res.stdout == want[0] + "\n" + want[1] + "\n"
    res = CliRunner().invoke(run_main, [str(tiny_bundle), "--image", str(path), "--image", str(path), "--chat"])
    assert res.exit_code == 2 and "exactly one --image" in res.output
