"""The `shapes` built-in model: its config, its word-level tokenizer and its llava-hf directory.

Vision: LLaVA-1.5's geometry exactly (CLIP 336 px / 14 px patches → 576 patches + [CLS], 24 layers,
feature layer −2, "default" strategy) at width 64 (2 heads, MLP 256). Projector: two-layer GELU MLP
64 → 128 → 128. Decoder: Llama, 8 layers, width 128, 4 heads, MLP 344. Vocabulary: every word of the
easy-vqa and mosaic questions and answers plus LLaVA-1.5's chat-template words, one token per word.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import LlavaConfig, PreTrainedTokenizerBase

from ficoco import vqa
from ficoco.models import (
    IMAGE_TOKEN,
    LLAVA_CHAT_TEMPLATE,
    _clip_336_config,
    _llama_llava_config,
    clip_processor_config,
)

VISION_WIDTH = 64
DECODER_WIDTH = 128
DECODER_LAYERS = 8
DECODER_HEADS = 4
DECODER_MLP = 344
#: The template words around a question: "USER: <image>\n{question} ASSISTANT:".
TEMPLATE_WORDS = ("user", ":", "assistant")


def vocabulary() -> list[str]:
    """Every word the model can read or write, sorted (deterministic)."""
    words: set[str] = set(TEMPLATE_WORDS) | set(vqa.ANSWERS) | {"?"}
    for q, _, _ in vqa._read_questions("train"):
        words.update(q.lower().replace("?", " ?").split())
    rng = __import__("random").Random(0)
    for _ in range(400):  # every mosaic template, over every shape / colour / quadrant
        labels = [(rng.choice(vqa.SHAPES), rng.choice(list(vqa.COLORS))) for _ in range(4)]
        for q, _, _ in vqa.mosaic_questions(labels, rng, 16):
            words.update(q.lower().replace("?", " ?").split())
    return sorted(words)


def build_tokenizer() -> PreTrainedTokenizerBase:
    """Word-level tokenizer (lower-cased, whitespace/punctuation split): <unk> 0, <s> 1 (prepended), </s> 2,
    the vocabulary, then <image> and <pad> (as llava-hf appends them after Vicuna's vocabulary)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in vocabulary():
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies " ?"
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")]
        + [AddedToken(IMAGE_TOKEN, special=True, normalized=False), AddedToken("<pad>", special=True, normalized=False)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=4096,
        image_token=IMAGE_TOKEN,
    )
    fast.chat_template = LLAVA_CHAT_TEMPLATE
    return fast


def build_config(tokenizer: PreTrainedTokenizerBase) -> LlavaConfig:
    vision = _clip_336_config(width=VISION_WIDTH, mlp=4 * VISION_WIDTH, heads=2, projection_dim=VISION_WIDTH)
    return _llama_llava_config(
        tokenizer, width=DECODER_WIDTH, mlp=DECODER_MLP, layers=DECODER_LAYERS, heads=DECODER_HEADS, vision=vision
    )


def processor_files() -> dict[str, dict]:
    """The llava-hf processor files besides the tokenizer's: preprocessor_config.json, processor_config.json,
    chat_template.json (what `AutoProcessor.from_pretrained` reads)."""
    pre = clip_processor_config()
    pre["processor_class"] = "LlavaProcessor"
    return {
        "preprocessor_config.json": pre,
        "processor_config.json": {
            "processor_class": "LlavaProcessor",
            "patch_size": 14,
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1,
            "image_token": IMAGE_TOKEN,
        },
        "chat_template.json": {"chat_template": LLAVA_CHAT_TEMPLATE},
    }


def write_processor_files(out: Path) -> None:
    for name, data in processor_files().items():
        (out / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
