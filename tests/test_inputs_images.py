"""Prompts (chat template → ids + image offset), bundled test images, CLIP preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ficoco.images import TEST_IMAGES, test_image, test_images
from ficoco.inputs import PromptError, PromptInputs, encode_prompt, format_prompt, hf_input_ids
from ficoco.models import LLAVA_CHAT_TEMPLATE, SMOL_CHAT_TEMPLATE, LoadedModel, clip_processor_config
from ficoco.preprocess import ImageError, load_image, preprocess_batch, preprocess_image

QUESTION = "What is in this photo?"

# SmolLM2's own text-only template: content must be a string.
STRING_ONLY_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' "
    "+ '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------------------------- prompts


def test_format_prompt_llava() -> None:
    assert format_prompt(LLAVA_CHAT_TEMPLATE, QUESTION) == f"USER: <image>\n{QUESTION} ASSISTANT:"


def test_format_prompt_smol() -> None:
    text = format_prompt(SMOL_CHAT_TEMPLATE, QUESTION)
    assert text.startswith("<|im_start|>system\n") and text.count("<image>") == 1
    assert text.endswith(f"<|im_start|>user\n<image>\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")


def test_format_prompt_string_only_template() -> None:
    text = format_prompt(STRING_ONLY_TEMPLATE, QUESTION)
    assert text == f"<|im_start|>user\n<image>\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"


def test_format_prompt_rejects_templates_without_image() -> None:
    with pytest.raises(PromptError):
        format_prompt("{{ 'no image here' }}", QUESTION)
    with pytest.raises(PromptError):
        format_prompt(LLAVA_CHAT_TEMPLATE, "what about <image>?")


def test_encode_prompt_tiny(tiny: LoadedModel) -> None:
    image_id = tiny.image_token_id
    inputs = encode_prompt(tiny.tokenizer, format_prompt(tiny.chat_template, QUESTION), image_id)
    ids = inputs.text_ids
    assert ids.dtype == torch.long and ids.shape[0] == 1
    assert image_id not in ids[0].tolist() and ids[0, 0].item() == tiny.tokenizer.bos_token_id
    a = inputs.image_offset
    assert 0 < a < ids.shape[1]
    # everything before the image is "<s>USER: " and decodes back to the template's prefix
    assert tiny.tokenizer.decode(ids[0, :a]) == "<s>USER: "
    assert tiny.tokenizer.decode(ids[0, a:]) == f"\n{QUESTION} ASSISTANT:"

    full = hf_input_ids(inputs, image_id)
    assert full.shape == (1, ids.shape[1] + 576)
    assert (full[0, a : a + 576] == image_id).all() and int((full == image_id).sum()) == 576
    assert torch.equal(torch.cat([full[:, :a], full[:, a + 576 :]], dim=1), ids)
    # the expanded ids are what transformers' processor would make: tokenize the text with 576 placeholders
    expanded = format_prompt(tiny.chat_template, QUESTION).replace("<image>", "<image>" * 576)
    assert tiny.tokenizer(expanded).input_ids == full[0].tolist()


def test_encode_prompt_needs_exactly_one_image(tiny: LoadedModel) -> None:
    with pytest.raises(PromptError, match="found 0"):
        encode_prompt(tiny.tokenizer, "USER: hello ASSISTANT:", tiny.image_token_id)
    with pytest.raises(PromptError, match="found 2"):
        encode_prompt(tiny.tokenizer, "USER: <image><image> hi ASSISTANT:", tiny.image_token_id)


def test_hf_input_ids_offsets() -> None:
    inputs = PromptInputs(text_ids=torch.tensor([[5, 6, 7]]), image_offset=1)
    assert hf_input_ids(inputs, 9, num_image_tokens=2).tolist() == [[5, 9, 9, 6, 7]]
    assert inputs.sequence_length(2) == 5


# ---------------------------------------------------------------------------------------------- images


def test_test_images() -> None:
    assert {"astronaut", "chelsea", "coffee", "rocket"} <= set(TEST_IMAGES)
    pairs = test_images()
    assert [n for n, _ in pairs] == list(TEST_IMAGES)
    for _, im in pairs:
        assert im.mode == "RGB" and min(im.size) >= 256
    assert test_image("chelsea").size == (451, 300)
    with pytest.raises(KeyError):
        test_image("no-such-photo")


# ---------------------------------------------------------------------------------------------- preprocess


def _reference(image: Image.Image) -> np.ndarray:
    from transformers import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(
        **{k: v for k, v in clip_processor_config().items() if k != "image_processor_type"}
    )
    return np.asarray(proc(images=image, return_tensors="np")["pixel_values"])


def _extra_images() -> list[tuple[str, Image.Image]]:
    import skimage.data

    rng = np.random.default_rng(0)
    return [
        ("logo-rgba", Image.fromarray(skimage.data.logo())),  # alpha composited onto white
        ("gray", Image.fromarray(skimage.data.camera())),
        ("small", Image.fromarray(rng.integers(0, 256, (120, 200, 3), dtype=np.uint8))),  # padded crop
        ("tall", Image.fromarray(rng.integers(0, 256, (1001, 337, 3), dtype=np.uint8))),
    ]


@pytest.mark.parametrize("name", list(TEST_IMAGES))
def test_preprocess_matches_clip_image_processor(name: str) -> None:
    image = test_image(name)
    ours = preprocess_image(image, clip_processor_config())
    assert ours.shape == (1, 3, 336, 336) and ours.dtype == torch.float32
    # Same PIL resize and the same float64-rescale / float32-normalize order: bit-identical.
    np.testing.assert_array_equal(ours.numpy(), _reference(image))


def test_preprocess_matches_on_odd_images() -> None:
    for name, image in _extra_images():
        ours = preprocess_image(image, clip_processor_config()).numpy()
        ref = _reference(image)
        assert ours.shape == ref.shape, name
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5, err_msg=name)


def test_preprocess_from_path_and_batch(tmp_path: Path) -> None:
    path = tmp_path / "coffee.png"
    test_image("coffee").save(path)
    from_path = preprocess_image(path, clip_processor_config())
    assert torch.equal(from_path, preprocess_image(str(path), clip_processor_config()))
    assert torch.equal(from_path, preprocess_image(test_image("coffee"), clip_processor_config()))
    batch = preprocess_batch([path, test_image("rocket")], clip_processor_config())
    assert batch.shape == (2, 3, 336, 336) and torch.equal(batch[:1], from_path)


def test_image_errors(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("this is not an image\n")
    with pytest.raises(ImageError, match="notes.txt"):
        load_image(text)
    with pytest.raises(ImageError, match="notes.txt"):
        preprocess_image(text, clip_processor_config())
    with pytest.raises(ImageError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(ImageError, match="broken.png"):
        load_image(broken)
    with pytest.raises(ImageError):
        preprocess_batch([], clip_processor_config())


CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
    [{"role": "user", "content": "<image>\nWhat colour is the shape?"}],
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count them."}]},
     {"role": "assistant", "content": [{"type": "text", "text": "three"}]},
     {"role": "user", "content": [{"type": "text", "text": "And the colours?"}]}],
]


@pytest.mark.parametrize("template", ["llava", "smol", "shapes"])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_chat_template_renders_as_transformers(template: str, conv: int) -> None:
    """jinja2 alone (the torch-free runtime) renders a template exactly as transformers does."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from ficoco.chat_template import TemplateError, render_chat
    from ficoco.models import shapes_dir

    text = {"llava": LLAVA_CHAT_TEMPLATE, "smol": SMOL_CHAT_TEMPLATE,
            "shapes": (shapes_dir() / "chat_template.jinja").read_text()}[template]
    messages = CONVERSATIONS[conv]
    try:
        theirs = render_jinja_template(conversations=[messages], chat_template=text, add_generation_prompt=True)[0][0]
    except Exception:  # a template may reject a message form; then ours must refuse it too
        with pytest.raises(TemplateError):
            render_chat(text, messages)
        return
    assert render_chat(text, messages) == theirs


def test_pixel_array_is_the_tensor_path() -> None:
    from ficoco.preprocess import pixel_array

    cfg = clip_processor_config()
    im = test_image("rocket")
    arr = pixel_array(im, cfg)
    assert arr.dtype == np.float32 and arr.shape == (1, 3, 336, 336)
    assert torch.equal(torch.from_numpy(arr), preprocess_image(im, cfg))
