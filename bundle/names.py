"""The names of a bundle's four graphs and of their KV-cache inputs and outputs.

Graph I/O names follow the ONNX-community convention (`past_key_values.{i}.key`, `present.{i}.value`).
The exporter names the graphs it writes with these (`exporter.wrappers`), every consumer finds them by them.
"""

from __future__ import annotations

VISION = "vision_encoder"
EMBED = "embed_tokens"
PREFILL = "decoder_prefill"
STEP = "decoder_step"
STAGES = (VISION, EMBED, PREFILL, STEP)  # the four pipeline stages, one graph each, in running order

#: Each graph's runtime inputs besides the step graph's past_key_values.* (a --graph-only graph also carries
#: its weights as inputs; these names tell them apart).
GRAPH_INPUTS: dict[str, tuple[str, ...]] = {
    VISION: ("pixel_values",),
    EMBED: ("input_ids",),
    PREFILL: ("inputs_embeds", "visual_tokens", "image_offset"),
    STEP: ("inputs_embeds", "position"),
}


def present_names(num_layers: int) -> list[str]:
    """The K/V outputs of the prefill and step graphs, layer by layer: present.{i}.key, present.{i}.value."""
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def past_names(num_layers: int) -> list[str]:
    """The step graph's K/V inputs, layer by layer: past_key_values.{i}.key, past_key_values.{i}.value."""
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
