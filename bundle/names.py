"""The names of a bundle's stages, of its graphs and of their inputs and outputs.

A bundle runs in four **stages** (`STAGES`): vision, embed, prefill and decode step. The first two are one
graph each. The decoder's two stages share one set of **graphs** so that every decoder weight is stored and
loaded once (docs/export-notes.md §14): the weightless `decoder_splice` (the visual tokens into the text),
the decoder **segments** `decoder_segment_{s}` (s = 0..S, the weights, each serving prefill and decode) and,
between segments s - 1 and s, the weightless reduction `decoder_reduce_{s}` (s = 1..S) that only prefill runs.

Graph I/O names follow the ONNX-community convention (`past_key_values.{i}.key`, `present.{i}.value`, with i
the decoder block). The exporter names the graphs it writes with these, every consumer finds them by them.
"""

from __future__ import annotations

import re

VISION = "vision_encoder"
EMBED = "embed_tokens"
PREFILL = "decoder_prefill"
STEP = "decoder_step"
STAGES = (VISION, EMBED, PREFILL, STEP)  # the four pipeline stages, in running order

SPLICE = "decoder_splice"
_SEGMENT = "decoder_segment_"
_REDUCE = "decoder_reduce_"


def segment_graph(index: int) -> str:
    """The graph of decoder segment `index` (0-based): its blocks' weights, for prefill and decode."""
    return f"{_SEGMENT}{index}"


def reduce_graph(index: int) -> str:
    """The weightless reduction between segments index - 1 and index (index >= 1), run by prefill only."""
    return f"{_REDUCE}{index}"


def graph_names(num_segments: int) -> tuple[str, ...]:
    """Every graph of a bundle whose decoder has `num_segments` segments, in running order."""
    names = [VISION, EMBED, SPLICE, segment_graph(0)]
    for s in range(1, num_segments):
        names += [reduce_graph(s), segment_graph(s)]
    return tuple(names)


def segment_index(graph: str) -> int | None:
    """s for `decoder_segment_{s}`, else None."""
    m = re.fullmatch(rf"{_SEGMENT}(\d+)", graph)
    return int(m.group(1)) if m else None


def reduce_index(graph: str) -> int | None:
    """s for `decoder_reduce_{s}`, else None."""
    m = re.fullmatch(rf"{_REDUCE}(\d+)", graph)
    return int(m.group(1)) if m else None


def is_decoder_graph(graph: str) -> bool:
    """A graph of the decoder stages (splice, segment or reduction)."""
    return graph == SPLICE or graph.startswith((_SEGMENT, _REDUCE))


def weighted_decoder_graph(graph: str) -> bool:
    """A decoder graph that holds weights: the segments (splice and reductions are weightless)."""
    return segment_index(graph) is not None


#: Each graph kind's runtime inputs besides past_key_values.* (a --graph-only graph also carries its
#: weights as inputs; these names tell them apart).
_RUNTIME_INPUTS: dict[str, tuple[str, ...]] = {
    VISION: ("pixel_values",),
    EMBED: ("input_ids",),
    SPLICE: ("inputs_embeds", "visual_tokens", "image_offset"),
    _SEGMENT: ("hidden_states", "position_ids"),
    _REDUCE: ("hidden_states", "query_states", "key_states", "image_offset", "position_ids"),
}


def runtime_inputs(graph: str) -> tuple[str, ...] | None:
    """The declared runtime inputs of a graph besides past_key_values.* (None: not a bundle graph name)."""
    if graph in _RUNTIME_INPUTS:
        return _RUNTIME_INPUTS[graph]
    if graph.startswith(_SEGMENT):
        return _RUNTIME_INPUTS[_SEGMENT]
    if graph.startswith(_REDUCE):
        return _RUNTIME_INPUTS[_REDUCE]
    return None


def present_names(layers: range | tuple[int, ...] | int) -> list[str]:
    """The K/V outputs of decoder blocks `layers` (an int n: blocks 0..n-1): present.{i}.key, present.{i}.value."""
    blocks = range(layers) if isinstance(layers, int) else layers
    return [f"present.{i}.{kv}" for i in blocks for kv in ("key", "value")]


def past_names(layers: range | tuple[int, ...] | int) -> list[str]:
    """The K/V inputs of decoder blocks `layers` (an int n: blocks 0..n-1): past_key_values.{i}.key, ....value."""
    blocks = range(layers) if isinstance(layers, int) else layers
    return [f"past_key_values.{i}.{kv}" for i in blocks for kv in ("key", "value")]
