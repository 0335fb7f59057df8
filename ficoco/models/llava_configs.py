"""`LlavaConfig`s without weights: the LLaVA-1.5 configs shipped with the package (the aliases) and the recipes
of the built-ins' architectures (LLaVA-1.5's vision side around a Llama decoder at tiny or 7B width)."""

from __future__ import annotations

import importlib.resources
import json

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, PreTrainedTokenizerBase

from ficoco.models.specs import IMAGE_SEQ_LENGTH, IMAGE_TOKEN

#: Decoder blocks of the `bench` model: enough for FiCoCo-L steps in blocks 1..2 with unreduced first and
#: last blocks; one LLaVA-7B-width block costs ~1.3 s at ~600 tokens on a 2-core CPU, so more only adds time.
BENCH_DECODER_LAYERS = 4


def _shipped_config(alias: str) -> LlavaConfig:
    text = (
        importlib.resources.files("ficoco").joinpath("configs", f"{alias}.json").read_text(encoding="utf-8")
    )
    return LlavaConfig(**json.loads(text))


def _llava_config(
    text: LlamaConfig,
    *,
    image_token_id: int,
    pad_token_id: int | None,
    tie_word_embeddings: bool,
    vision: CLIPVisionConfig | None = None,
) -> LlavaConfig:
    """LLaVA-1.5's vision side (336 px / 14 px patches, select layer -2, "default" strategy, GELU projector)
    around a given decoder config; shared by `tiny`, `smol` and `bench` (`vision`: default the tiny width)."""
    return LlavaConfig(
        vision_config=vision if vision is not None else _tiny_vision_config(),
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=IMAGE_SEQ_LENGTH,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=pad_token_id,
    )


def _clip_336_config(width: int, mlp: int, heads: int, projection_dim: int) -> CLIPVisionConfig:
    """CLIP ViT-L/14-336's geometry (336 px, 14 px patches, 24 layers, quick_gelu) at a given width."""
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=24,
        num_attention_heads=heads,
        image_size=336,
        patch_size=14,
        projection_dim=projection_dim,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def _tiny_vision_config() -> CLIPVisionConfig:
    """CLIP ViT-L/14-336's geometry at width 64 (4 heads, MLP 128)."""
    return _clip_336_config(width=64, mlp=128, heads=4, projection_dim=64)


def _llama_llava_config(
    tokenizer: PreTrainedTokenizerBase, *, width: int, mlp: int, layers: int, heads: int, vision: CLIPVisionConfig | None = None
) -> LlavaConfig:
    """A Llama decoder (MHA, untied lm_head) over `tokenizer`'s vocabulary, inside LLaVA-1.5's vision side."""
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return _llava_config(
        text, image_token_id=image_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, vision=vision
    )


def _tiny_config(tokenizer: PreTrainedTokenizerBase) -> LlavaConfig:
    return _llama_llava_config(tokenizer, width=64, mlp=172, layers=32, heads=4)


def _bench_vision_config() -> CLIPVisionConfig:
    """CLIP ViT-L/14-336 at full width and depth: 1024 wide, 24 layers, 16 heads, MLP 4096, quick_gelu."""
    return _clip_336_config(width=1024, mlp=4096, heads=16, projection_dim=768)


def _bench_config(tokenizer: PreTrainedTokenizerBase, num_layers: int = BENCH_DECODER_LAYERS) -> LlavaConfig:
    """ViT-L/14-336 + a LLaVA-1.5-7B-width Llama decoder (4096 wide, MLP 11008, 32 heads, MHA) with
    `num_layers` blocks and the tiny tokenizer's ~1000-token vocabulary."""
    return _llama_llava_config(
        tokenizer, width=4096, mlp=11008, layers=num_layers, heads=32, vision=_bench_vision_config()
    )
