"""The decoder cut into segments: one piece of weights that serves prefill and decode alike.

A decoder reduction step at block l runs after block l's attention (whose cache keeps all its input tokens)
and before block l's MLP (docs/method-spec.md A6). Cutting the decoder right there, after the attention of
every step block, splits a decoder with S steps into S + 1 segments that hold each weight exactly once:

    segment 0:  blocks 0 .. l_1 - 1,        then the attention of l_1          -> hidden, q, k of l_1
    segment s:  the MLP of l_s, blocks l_s + 1 .. l_{s+1} - 1, the attention of l_{s+1}
    segment S:  the MLP of l_S, blocks l_S + 1 .. N - 1, the final norm and the LM head (last position)

Between segment s - 1 and s, prefill runs the weightless reduction of step s (it needs the closing block's
q and k over the whole sequence); decode skips it. Every attention block of one segment sees the same span
n_s (= n_0 minus the first s steps' removals), so one position offset per segment numbers a decode token
(compact positions: n_0 - n_s, A8). Without decoder steps the whole decoder is one segment.

The segments are data planned once from the schedule, like the schedule itself; `ReducedLlava` runs them
in order (its prefill and decode are these segments, nothing else) and the exporter writes one graph each.
"""

from __future__ import annotations

from dataclasses import dataclass

from ficoco.schedule import ReductionStep, TowerSchedule


@dataclass(frozen=True)
class DecoderSegment:
    """One run of decoder half-blocks between two cuts (see the module docstring)."""

    index: int
    opening_mlp: int | None  # the step block whose MLP starts this segment (None: segment 0)
    attention_blocks: tuple[int, ...]  # blocks whose attention (and KV cache) lives here, ascending
    closing_step: ReductionStep | None  # the step whose block's attention ends this segment (None: the last)
    span: int  # visual tokens each attention block here sees (its cache holds T + span prompt tokens)
    position_offset: int  # subtracted from a decode token's unreduced position in this segment's blocks

    @property
    def mlp_blocks(self) -> tuple[int, ...]:
        """Blocks whose MLP runs here: the opening one, then every attention block but the closing one."""
        full = self.attention_blocks if self.closing_step is None else self.attention_blocks[:-1]
        return ((self.opening_mlp,) if self.opening_mlp is not None else ()) + full

    @property
    def is_last(self) -> bool:
        return self.closing_step is None


def decoder_segments(decoder: TowerSchedule, positions: str) -> tuple[DecoderSegment, ...]:
    """The S + 1 segments of a decoder tower with S steps (`positions`: "compact" or "original")."""
    segments: list[DecoderSegment] = []
    first, opening, span = 0, None, decoder.span_in
    for i, step in enumerate((*decoder.steps, None)):
        last_block = decoder.num_layers - 1 if step is None else step.layer
        offset = 0 if positions == "original" else decoder.span_in - span
        segments.append(DecoderSegment(
            index=i,
            opening_mlp=opening,
            attention_blocks=tuple(range(first, last_block + 1)),
            closing_step=step,
            span=span,
            position_offset=offset,
        ))
        if step is not None:
            first, opening, span = step.layer + 1, step.layer, span - step.r
    return tuple(segments)
