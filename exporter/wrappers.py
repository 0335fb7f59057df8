"""One `nn.Module` per exported graph, with explicit tensor inputs and outputs.

transformers' full LLaVA does not export (its placeholder check and mask utilities fail both exporters),
so each stage wraps the matching method of `ficoco.reduced_llava.ReducedLlava`. The wrappers only
rename and flatten; every computation, the reduction included, is the reduced model's own code.

The graph and I/O names (`past_key_values.{i}.key`, `present.{i}.value`, ...) are `bundle.names`.
"""

from __future__ import annotations

from torch import Tensor, nn

from bundle.names import past_names, present_names
from ficoco.reduced_llava import ReducedLlava, splice
from ficoco.segments import DecoderSegment


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


class DecoderSplice(nn.Module):
    """(inputs_embeds [B, T, D], visual_tokens [B, n_V, D], image_offset [B]) -> hidden_states [B, T + n_V, D].

    The visual tokens go in at image_offset (`ficoco.reduced_llava.splice`); no weights.
    """

    input_names = ("inputs_embeds", "visual_tokens", "image_offset")
    output_names = ("hidden_states",)

    def forward(self, inputs_embeds: Tensor, visual_tokens: Tensor, image_offset: Tensor) -> Tensor:
        return splice(inputs_embeds, visual_tokens, image_offset)


class DecoderSegmentGraph(nn.Module):
    """Decoder segment s (`ficoco.segments`): (hidden_states [B, T, D], position_ids [B, T], past K/V
    [B, H_kv, P, d] of its blocks) -> its output and present K/V [B, H_kv, P + T, d].

    One graph for prefill (P = 0) and decode (T = 1) alike. The last segment outputs `logits` [B, V] at
    the last position; every other one `hidden_out` (the hidden states after its closing block's attention)
    and that block's `query_states` [B, H, T, d] for the reduction that follows, which also reads the
    block's `present.{l}.key` (its keys).
    """

    def __init__(self, model: ReducedLlava, segment: DecoderSegment) -> None:
        super().__init__()
        self.model = model
        self.segment = segment
        blocks = segment.attention_blocks
        self.input_names = ("hidden_states", "position_ids", *past_names(blocks))
        head = ("logits",) if segment.is_last else ("hidden_out", "query_states")
        self.output_names = (*head, *present_names(blocks))

    def forward(self, hidden_states: Tensor, position_ids: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        cache = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        out = self.model.run_segment(self.segment, hidden_states, position_ids, cache)
        presents = [t for kv in out.present for t in kv]
        if self.segment.is_last:
            return (out.hidden, *presents)
        assert out.q is not None
        return (out.hidden, out.q, *presents)


class DecoderReduceGraph(nn.Module):
    """The reduction after segment s - 1 (its closing step): (hidden_states [B, L, D], query_states
    [B, H, L, d], key_states [B, H_kv, L, d] (the closing block's present key), image_offset [B],
    position_ids [B, L]) -> hidden_out, position_ids_out of length L - r. No weights; prefill only."""

    input_names = ("hidden_states", "query_states", "key_states", "image_offset", "position_ids")
    output_names = ("hidden_out", "position_ids_out")

    def __init__(self, model: ReducedLlava, segment: DecoderSegment) -> None:
        super().__init__()
        if segment.closing_step is None:
            raise ValueError(f"decoder segment {segment.index} is the last; no reduction follows it")
        self.model = model
        self.segment = segment

    def forward(self, hidden_states: Tensor, query_states: Tensor, key_states: Tensor, image_offset: Tensor,
                position_ids: Tensor) -> tuple[Tensor, Tensor]:
        h, pos, _ = self.model.reduce_between(self.segment, hidden_states, query_states, key_states, image_offset, position_ids)
        return h, pos
