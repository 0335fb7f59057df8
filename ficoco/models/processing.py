"""What turns (image, question) into model inputs: the chat templates, CLIP's image-processor config, and the
byte-level BPE tokenizer (trained on an embedded corpus) that the `tiny` and `bench` built-ins share."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from ficoco.models.specs import IMAGE_TOKEN

SMOL_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

#: llava-hf/llava-1.5-*-hf's chat template (images first in a turn, then text): "USER: <image>\n{q} ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

#: SmolLM2's ChatML template, extended with llava-style content lists (image first in the user turn).
SMOL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SMOL_SYSTEM_PROMPT + "<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def clip_processor_config() -> dict[str, Any]:
    """CLIP ViT-L/14-336's `preprocessor_config.json` as llava-hf ships it (a fresh dict each call)."""
    return {
        "crop_size": {"height": 336, "width": 336},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": 336},
    }


_TINY_SENTENCES = """\
USER: What is in this photo? ASSISTANT: A cat is sleeping on a wooden chair near the window.
USER: Describe the image. ASSISTANT: An astronaut in a white suit is standing in front of a flag.
USER: What color is the rocket? ASSISTANT: The rocket is white with a red stripe and a black nose.
USER: How many cups are on the table? ASSISTANT: There are two cups of coffee on the table.
USER: Is it day or night? ASSISTANT: It is day, and the sky is bright blue with a few clouds.
USER: What is the man holding? ASSISTANT: He is holding a camera with a long lens.
USER: Where was this picture taken? ASSISTANT: It looks like a busy market in an old city.
USER: What is the cat doing? ASSISTANT: The cat is looking at the camera with big green eyes.
USER: Can you read the sign? ASSISTANT: The sign says coffee, tea and fresh bread.
USER: What is the weather like? ASSISTANT: It is cloudy and a little rainy, but warm.
The photo shows a tabby cat with orange fur and dark stripes.
A steaming cup of coffee sits on a saucer next to a silver spoon.
The rocket stands on the launch pad, ready to fly into space.
An astronaut floats above the earth, tethered to the space station.
Latte art in the shape of a leaf decorates the top of the cup.
The kitten is curled up in a basket of soft blankets.
Smoke and fire pour out of the engines as the rocket lifts off.
The barista pours hot milk into a tall glass of espresso.
A galaxy of stars fills the dark sky above the mountains.
The dog runs across the green grass chasing a yellow ball.
Two children are building a sand castle on the beach.
A red bicycle leans against a brick wall covered in ivy.
The old clock on the tower shows a quarter past three.
Fresh fruit is piled high in wooden crates at the market.
A white horse grazes in a field of tall grass and flowers.
The city lights reflect on the river at night.
A bowl of soup, a slice of bread and a glass of water are on the table.
The scientist looks through a microscope at a tiny sample.
Snow covers the roofs of the small village in the valley.
The photographer kneels down to take a picture of a flower.
Question: what animal is in the picture? Answer: a cat.
Question: what drink is in the cup? Answer: coffee.
Question: what is about to launch? Answer: a rocket.
Question: who is wearing the space suit? Answer: the astronaut.
Question: what color is the sky? Answer: blue.
Question: how many people are in the photo? Answer: three.
Question: is the cat asleep? Answer: no, it is awake.
Question: what is on the plate? Answer: a piece of chocolate cake.
Please describe this image in detail.
Please answer the question with a single word.
Look at the picture carefully and tell me what you see.
The image is blurry, so it is hard to tell what the object is.
In the background there is a tall building with many windows.
In the foreground a person is sitting on a bench reading a book.
On the left side of the image there is a tree; on the right side there is a car.
The colors are warm: orange, red, brown and gold.
The light comes from the window and casts long shadows on the floor.
This is a close-up photo of a cup of black coffee with a little foam.
This is a wide shot of a rocket launch taken from far away.
This is a portrait of an astronaut smiling at the camera.
The cat's whiskers are long and white, and its ears are pointed.
Coffee beans are roasted until they turn dark brown and shiny.
The crew waves goodbye before climbing into the capsule.
Mission control counts down: ten, nine, eight, seven, six, five, four, three, two, one.
I think the answer is yes, because the lamp is turned on.
I think the answer is no, because the door is closed.
Maybe the picture was taken in the morning, when the light is soft.
It is difficult to say for sure, but it looks like a kitchen.
"""

_TINY_SUBJECTS = (
    "the cat",
    "a small dog",
    "the astronaut",
    "a red rocket",
    "the barista",
    "my friend",
    "an old man",
    "a young girl",
    "the photographer",
    "a white horse",
    "the teacher",
    "a tired student",
)
_TINY_VERBS = (
    "is looking at",
    "is sitting near",
    "is holding",
    "is standing next to",
    "is pointing at",
    "walks toward",
    "is painting",
    "is drinking",
)
_TINY_OBJECTS = (
    "a cup of coffee",
    "the launch pad",
    "a green field",
    "the blue sky",
    "a wooden table",
    "the camera",
    "a bright moon",
    "the city street",
    "a glass of milk",
    "the kitchen window",
    "a pile of books",
)
_TINY_QUESTIONS = (
    "What is in this photo?",
    "What color is it?",
    "How many are there?",
    "Where is this?",
    "Who is this?",
    "What is happening here?",
    "Why is it dark?",
    "Is this a cat or a dog?",
    "What time of day is it?",
)


def _tiny_corpus() -> list[str]:
    """A few hundred lines of plain English, built deterministically (no randomness, fixed order)."""
    lines = [ln for ln in _TINY_SENTENCES.splitlines() if ln.strip()]
    n = 0
    for i, s in enumerate(_TINY_SUBJECTS):
        for j, v in enumerate(_TINY_VERBS):
            for k, o in enumerate(_TINY_OBJECTS):
                if (i + 2 * j + 3 * k) % 4 == 0:
                    lines.append(f"In this photo, {s} {v} {o}.")
                    n += 1
    for i, q in enumerate(_TINY_QUESTIONS):
        for j, s in enumerate(_TINY_SUBJECTS):
            if (i + j) % 3 == 0:
                lines.append(f"USER: <image>\n{q} ASSISTANT: I can see {s} in the picture.")
    return lines


def _build_tiny_tokenizer(vocab_size: int = 1000, pad_vocab_to: int | None = None) -> PreTrainedTokenizerBase:
    """ByteLevel BPE trained on the embedded corpus (deterministic), with LLaVA/Llama-style special tokens.

    Ids: <unk> 0, <s> 1 (BOS, prepended on encode), </s> 2 (EOS), trained merges, then <image> and <pad>
    appended after the trained vocabulary (as llava-hf appends 32000/32001 to Vicuna's 32000).
    `pad_vocab_to`: fill the vocabulary with never-produced `<unused_i>` entries up to that size first, so
    <image> and <pad> land where a real checkpoint's config puts them (32000 / 32001 for LLaVA-1.5).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2,
        min_frequency=1,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [ln.replace(IMAGE_TOKEN, "") for ln in _tiny_corpus()]
    tok.train_from_iterator(corpus, trainer=trainer)
    if pad_vocab_to is not None:
        import json

        spec = json.loads(tok.to_str())
        vocab = spec["model"]["vocab"]
        if len(vocab) > pad_vocab_to:
            raise ValueError(f"the trained vocabulary has {len(vocab)} entries, more than pad_vocab_to={pad_vocab_to}")
        for i in range(len(vocab), pad_vocab_to):
            vocab[f"<unused_{i}>"] = i
        tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens(
        [
            AddedToken(IMAGE_TOKEN, special=True, normalized=False),
            AddedToken("<pad>", special=True, normalized=False),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        image_token=IMAGE_TOKEN,
        model_max_length=4096,
    )
    fast.chat_template = LLAVA_CHAT_TEMPLATE
    return fast
