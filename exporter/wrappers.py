"""One `nn.Module` per exported stage, with explicit tensor inputs and outputs.

transformers' full LLaVA does not export (its placeholder check and mask utilities fail both exporters),
so each stage wraps the matching method of `ficoco.reduced_llava.ReducedLlava`. The wrappers only
rename and flatten; every computation, the reduction included, is the reduced model's own code.

The graph and I/O names (`past_key_values.{i}.key`, `present.{i}.value`, ...) are `bundle.names`.
"""

from __future__ import annotations

from torch import Tensor, nn

from bundle.names import past_names, present_names
from ficoco.reduced_llava import ReducedLlava


class VisionEncoder(nn.Module):
    """pixel_values [B, 3, H, W] -> visual_tokens [B, n_V, D] (CLIP blocks with reduction, CLS dropped, projector)."""

    input_names = ("pixel_values",)
    output_names = ("visual_tokens",)

    def __init__(self, model: ReducedLlava) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.model.encode_image(pixel_values).visual


class EmbedTokens(nn.Module):
    """input_ids [B, T] -> inputs_embeds [B, T, D]."""

    input_names = ("input_ids",)
    output_names = ("inputs_embeds",)

    def __init__(self, model: ReducedLlava) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_text(input_ids)


class DecoderPrefill(nn.Module):
    """(inputs_embeds [B, T, D], visual_tokens [B, n_V, D], image_offset [B]) -> logits [B, V] + presents.

    The visual tokens are spliced in at image_offset; FiCoCo-L / FastV steps run inside; layer i's
    present K/V hold T + n_i tokens.
    """

    input_names = ("inputs_embeds", "visual_tokens", "image_offset")

    def __init__(self, model: ReducedLlava) -> None:
        super().__init__()
        self.model = model
        self.output_names = ("logits", *present_names(model.geometry.decoder.num_layers))

    def forward(self, inputs_embeds: Tensor, visual_tokens: Tensor, image_offset: Tensor) -> tuple[Tensor, ...]:
        out = self.model.prefill(inputs_embeds, visual_tokens, image_offset)
        return (out.logits, *[t for kv in out.cache for t in kv])


class DecoderStep(nn.Module):
    """(inputs_embeds [B, 1, D], position [B], past K/V per layer) -> logits [B, V] + presents (one longer).

    No reduction ops; each layer's RoPE position is `position` minus that layer's constant offset.
    """

    def __init__(self, model: ReducedLlava) -> None:
        super().__init__()
        self.model = model
        n = model.geometry.decoder.num_layers
        self.input_names = ("inputs_embeds", "position", *past_names(n))
        self.output_names = ("logits", *present_names(n))

    def forward(self, inputs_embeds: Tensor, position: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        cache = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, new_cache = self.model.decode_step(inputs_embeds, position, cache)
        return (logits, *[t for kv in new_cache for t in kv])
