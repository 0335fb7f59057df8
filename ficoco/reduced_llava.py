"""The reduced LLaVA: a transformers `LlavaForConditionalGeneration` run by our own layer loops.

Why our own loops: transformers computes RoPE, the causal mask and the cache length once for all layers,
which per-layer token counts break. This file re-runs the same submodules (no weight copies) block by
block, calls the reduction steps of `ficoco.methods` where the schedule says, keeps one KV cache per
decoder layer (layer l holds its own length L_l), and decodes with the positions of docs/method-spec.md A8.

It is written the way the exported graphs need it: every shape follows from the schedule, the image
offset is a tensor, and there is no `.item()` or data-dependent branch. The exporter wraps
`encode_image`, `prefill` and `decode_step` as they are; this model is the accuracy reference for
everything exported.

Data flow:  pixel_values -> encode_image -> visual [B, n_V, D]
            text ids -> embed_text -> splice visual at image_offset -> prefill -> logits, cache
            token -> decode_step(position) -> logits, cache (grown by one per layer)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ficoco.generation import generate_tokens, host_logits
from ficoco.geometry import LlavaGeometry
from ficoco.methods import MethodParams, VisionTokens, decoder_compress, decoder_plan, vision_step
from ficoco.methods.ficoco_l import visual_index
from ficoco.paradigm import MergePlan, gather_tokens
from ficoco.sampling import SamplingConfig
from ficoco.schedule import ReductionStep, Schedule
from ficoco.segments import DecoderSegment, decoder_segments

KVCache = list[tuple[Tensor, Tensor]]  # per decoder layer: key, value [B, H_kv, L_l, d]


@dataclass
class PrefillOutput:
    logits: Tensor  # [B, V] at the last prompt position
    cache: KVCache
    plans: dict[int, MergePlan] = field(default_factory=dict)  # decoder block -> its reduction plan


@dataclass
class SegmentOutput:
    hidden: Tensor  # [B, T, D] after the closing block's attention; the last segment: logits [B, V]
    present: KVCache  # per attention block of the segment: key, value [B, H_kv, P + T, d]
    q: Tensor | None = None  # the closing block's queries [B, H, T, d] (RoPE applied)
    k: Tensor | None = None  # the closing block's keys [B, H_kv, P + T, d] (RoPE applied; its present key)


@dataclass(frozen=True)
class FollowedSelection:
    """Kept sets to follow instead of choosing (`ficoco.paradigm.choose_sources`), per reducing block:
    vision block -> kept [B, n - r], decoder block -> kept [B, n - r]. A checker reads a bundle's kept sets
    from its graphs and runs this model with them, so the two compute on the same tokens."""

    vision: dict[int, Tensor] = field(default_factory=dict)
    decoder: dict[int, Tensor] = field(default_factory=dict)


@dataclass
class VisionOutput:
    visual: Tensor  # [B, n_V, D_text] projected visual tokens
    pos: Tensor  # [B, n_V] original patch index of each token (-1 for [CLS] / a fused token)
    plans: dict[int, MergePlan] = field(default_factory=dict)


def splice(text: Tensor, visual: Tensor, image_offset: Tensor) -> Tensor:
    """[B, T, ...] text and [B, n, ...] visual -> [B, T + n, ...] with the visual block at [a, a + n).

    Done with index arithmetic and gathers, not slices, so `image_offset` ([B] int64) can be a graph input.
    """
    t_len, n = text.shape[1], visual.shape[1]
    t = torch.arange(t_len + n, device=text.device).unsqueeze(0)
    a = image_offset.reshape(-1, 1)
    is_visual = (t >= a) & (t < a + n)
    text_idx = torch.where(t < a, t, t - n).clamp(0, t_len - 1)
    vis_idx = (t - a).clamp(0, n - 1)
    from_text = gather_tokens(text, text_idx.expand(text.shape[0], -1))
    from_vis = gather_tokens(visual, vis_idx.expand(text.shape[0], -1))
    mask = is_visual.reshape(is_visual.shape + (1,) * (text.dim() - 2))
    return torch.where(mask, from_vis, from_text)


def resplice(seq: Tensor, visual: Tensor, image_offset: Tensor, n_old: int) -> Tensor:
    """Replace the visual block [a, a + n_old) of `seq` [B, L, ...] by `visual` [B, n_new, ...]."""
    n_new = visual.shape[1]
    r = n_old - n_new
    length = seq.shape[1] - r
    t = torch.arange(length, device=seq.device).unsqueeze(0)
    a = image_offset.reshape(-1, 1)
    is_visual = (t >= a) & (t < a + n_new)
    seq_idx = torch.where(t < a, t, t + r)
    vis_idx = (t - a).clamp(0, n_new - 1)
    from_seq = gather_tokens(seq, seq_idx.expand(seq.shape[0], -1))
    from_vis = gather_tokens(visual, vis_idx.expand(seq.shape[0], -1))
    mask = is_visual.reshape(is_visual.shape + (1,) * (seq.dim() - 2))
    return torch.where(mask, from_vis, from_seq)


def causal_mask(t: int, length: int, device: torch.device) -> Tensor:
    """[t, length] bool: new token t (absolute length - t_total + t) sees keys 0..its own position."""
    past = length - t
    return torch.arange(length, device=device).unsqueeze(0) <= (past + torch.arange(t, device=device)).unsqueeze(1)


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """[B, H_kv, L, d] -> [B, H_kv * groups, L, d] (GQA key/value heads shared by `groups` query heads)."""
    if groups == 1:
        return x
    b, h, length, d = x.shape
    return x[:, :, None].expand(b, h, groups, length, d).reshape(b, h * groups, length, d)


class VisionReduction(nn.Module):
    """One vision reduction step (`ficoco.methods.vision_step`), called as a module for one reason only:
    every ONNX node it exports then carries `VisionReduction` in its `namespace` metadata, so the
    benchmark can attribute profile time to the reduction and quantization can leave its ops alone
    (`exporter.regions`). It has no parameters and no state."""

    def forward(self, method: str, params: MethodParams, tokens: VisionTokens, q: Tensor, k: Tensor, step: ReductionStep,
                grid_side: int, scale: float, size_bias: Tensor | None, kept: Tensor | None = None) -> tuple[VisionTokens, MergePlan]:
        return vision_step(method, params, tokens, q, k, step, grid_side=grid_side, scale=scale, size_bias=size_bias, kept=kept)


class DecoderReduction(nn.Module):
    """One decoder reduction step: plan on the block's attention (`decoder_plan`), compress the visual block
    of the hidden states (`decoder_compress`) and splice it back; also moves the position ids along.
    A module only so its exported nodes are named (see `VisionReduction`)."""

    def forward(self, method: str, params: MethodParams, h: Tensor, q: Tensor, k: Tensor, image_offset: Tensor,
                step: ReductionStep, scale: float, position_ids: Tensor, positions: str,
                kept: Tensor | None = None) -> tuple[Tensor, Tensor, MergePlan]:
        merge = decoder_plan(method, params, q, k, image_offset, step, scale=scale, kept=kept)
        vis_idx = visual_index(image_offset, step.n)
        h = resplice(h, decoder_compress(method, params, gather_tokens(h, vis_idx), merge), image_offset, step.n)
        if positions == "original":
            kept_pos = gather_tokens(gather_tokens(position_ids, vis_idx), merge.kept)
            position_ids = resplice(position_ids, kept_pos, image_offset, step.n)
        else:
            b = h.shape[0]
            position_ids = torch.arange(h.shape[1], device=h.device).unsqueeze(0).expand(b, -1)
        return h, position_ids, merge


class ReducedLlava(nn.Module):
    """LLaVA with the schedule's reduction steps inside, sharing the weights of `hf_model`."""

    def __init__(self, hf_model: nn.Module, schedule: Schedule, params: MethodParams | None = None) -> None:
        super().__init__()
        core = hf_model.model
        tower = core.vision_tower
        self.vision = getattr(tower, "vision_model", tower)  # CLIPVisionModel (v5 flattens vision_model)
        self.projector = core.multi_modal_projector
        self.lm = core.language_model  # LlamaModel
        self.lm_head = hf_model.lm_head
        self.geometry = LlavaGeometry.from_config(hf_model.config)
        self.schedule = schedule
        self.params = params or MethodParams.for_preset(schedule.preset)
        self._check_schedule()
        self.reduce_vision = VisionReduction()
        self.reduce_decoder = DecoderReduction()
        self.segments = decoder_segments(schedule.decoder, schedule.positions)

    def _check_schedule(self) -> None:
        g, s = self.geometry, self.schedule
        if s.vision.num_layers != g.vision.blocks_run or s.vision.span_in != g.vision.seq_len:
            raise ValueError(
                f"schedule vision tower ({s.vision.num_layers} blocks, {s.vision.span_in} tokens) does not fit the "
                f"model ({g.vision.blocks_run} blocks, {g.vision.seq_len} tokens); plan it for this model"
            )
        if s.decoder.num_layers != g.decoder.num_layers:
            raise ValueError(
                f"schedule decoder tower has {s.decoder.num_layers} blocks, the model {g.decoder.num_layers}"
            )
        expected = s.vision.span_out - (1 if g.vision.feature_strategy == "default" else 0)
        if s.decoder.span_in != expected:
            raise ValueError(f"decoder tower expects {s.decoder.span_in} visual tokens, vision tower gives {expected}")

    # ------------------------------------------------------------------------------------------------
    # Vision tower: CLIP blocks 0..select_block with reduction steps, drop [CLS], project
    # ------------------------------------------------------------------------------------------------

    def _clip_block(self, i: int, tokens: VisionTokens, plans: dict[int, MergePlan], follow: dict[int, Tensor]) -> VisionTokens:
        layer = self.vision.encoder.layers[i]
        attn = layer.self_attn
        h = tokens.hidden
        b, n, dim = h.shape
        x = layer.layer_norm1(h)
        shape = (b, n, attn.num_heads, attn.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        size_bias = None
        if self.schedule.vision.method == "tome" and self.params.tome.prop_attn:
            size_bias = torch.log(tokens.size[..., 0].float()).to(q.dtype)  # ToMe proportional attention
        mask = None if size_bias is None else size_bias[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
        h = h + attn.out_proj(o.transpose(1, 2).reshape(b, n, dim))
        step = self.schedule.vision.step_at(i)
        if step is not None:
            tokens, plans[i] = self.reduce_vision(
                self.schedule.vision.method,
                self.params,
                VisionTokens(h, tokens.pos, tokens.size, tokens.order),
                q,
                k,
                step,
                self.geometry.vision.grid_side,
                attn.scale,
                size_bias,
                follow.get(i),
            )
            h = tokens.hidden
        h = h + layer.mlp(layer.layer_norm2(h))
        return VisionTokens(h, tokens.pos, tokens.size, tokens.order)

    def encode_image(self, pixel_values: Tensor, follow: FollowedSelection | None = None) -> VisionOutput:
        """pixel_values [B, 3, H, W] -> projected visual tokens [B, n_V, D_text]; `follow`: make its vision
        kept sets instead of choosing."""
        chosen = {} if follow is None else follow.vision
        g = self.geometry.vision
        h = self.vision.pre_layrnorm(self.vision.embeddings(pixel_values))
        b = h.shape[0]
        pos = torch.arange(-1, g.num_patches, device=h.device).unsqueeze(0).expand(b, -1)
        tokens = VisionTokens(h, pos, torch.ones(b, h.shape[1], 1, dtype=h.dtype, device=h.device))
        plans: dict[int, MergePlan] = {}
        for i in range(g.blocks_run):
            tokens = self._clip_block(i, tokens, plans, chosen)
        feats, pos = tokens.hidden, tokens.pos
        if g.feature_strategy == "default":  # drop [CLS] (always slot 0)
            feats, pos = feats[:, 1:], pos[:, 1:]
        return VisionOutput(self.projector(feats), pos, plans)

    # ------------------------------------------------------------------------------------------------
    # Decoder tower
    # ------------------------------------------------------------------------------------------------

    def embed_text(self, input_ids: Tensor) -> Tensor:
        return self.lm.embed_tokens(input_ids)

    def _attention_inputs(self, layer: nn.Module, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        attn = layer.self_attn
        b, length, _ = x.shape
        q = attn.q_proj(x).view(b, length, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, length, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, length, -1, attn.head_dim).transpose(1, 2)
        cos, sin = self.lm.rotary_emb(v, position_ids)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def prefill(self, text_embeds: Tensor, visual: Tensor, image_offset: Tensor,
                follow: FollowedSelection | None = None) -> PrefillOutput:
        """text_embeds [B, T, D] (prompt without the image placeholder), visual [B, n_V, D], image_offset [B].

        Block l sees L_l = T + n_l tokens; its cache holds all of them. With `compact` positions every block
        numbers its sequence 0..L_l-1; with `original` positions kept tokens keep their input positions.
        The decoder runs as its segments (`ficoco.segments`) with each step's reduction between two.
        `follow`: make its decoder kept sets instead of choosing.
        """
        chosen = {} if follow is None else follow.decoder
        h = splice(text_embeds, visual, image_offset)
        b, length, _ = h.shape
        position_ids = torch.arange(length, device=h.device).unsqueeze(0).expand(b, -1)
        cache: KVCache = []
        plans: dict[int, MergePlan] = {}
        for seg in self.segments:
            out = self.run_segment(seg, h, position_ids, None)
            cache.extend(out.present)
            if seg.closing_step is None:
                return PrefillOutput(out.hidden, cache, plans)
            h, position_ids, plans[seg.closing_step.layer] = self.reduce_between(
                seg, out.hidden, out.q, out.k, image_offset, position_ids, chosen.get(seg.closing_step.layer)
            )
        raise AssertionError("the last segment returns")  # pragma: no cover

    def reduce_between(
        self, seg: DecoderSegment, h: Tensor, q: Tensor, k: Tensor, image_offset: Tensor, position_ids: Tensor,
        kept: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, MergePlan]:
        """The weightless reduction after segment `seg`: its closing step on the closing block's q and k
        (k [B, H_kv, L, d] as the block's cache holds it; its KV heads are repeated here)."""
        step = seg.closing_step
        assert step is not None
        attn = self.lm.layers[step.layer].self_attn
        k_rep = repeat_kv(k, attn.num_key_value_groups)
        return self.reduce_decoder(
            self.schedule.decoder.method, self.params, h, q, k_rep, image_offset, step, attn.scaling, position_ids,
            self.schedule.positions, kept,
        )

    def run_segment(self, seg: DecoderSegment, h: Tensor, position_ids: Tensor, past: KVCache | None) -> SegmentOutput:
        """One decoder segment over T new tokens: h [B, T, D], position_ids [B, T], past: one (key, value)
        [B, H_kv, P, d] per attention block of the segment (None: P = 0, a prefill).

        Token t (absolute P + t) attends the keys 0..P + t, so the same code is a prefill (P = 0), a decode
        step (T = 1) or a cache extension by several tokens. The last segment returns logits [B, V] at the
        last position as `hidden`; any other returns the hidden states after its closing block's attention
        and that block's q and k (RoPE applied), which the step between segments plans on.
        """
        layers = self.lm.layers
        b, t, _ = h.shape
        if seg.opening_mlp is not None:
            layer = layers[seg.opening_mlp]
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        present: KVCache = []
        q = k = None
        closing = None if seg.closing_step is None else seg.closing_step.layer
        for j, i in enumerate(seg.attention_blocks):
            layer = layers[i]
            attn = layer.self_attn
            q, k, v = self._attention_inputs(layer, layer.input_layernorm(h), position_ids)
            if past is not None:
                k = torch.cat([past[j][0], k], dim=2)
                v = torch.cat([past[j][1], v], dim=2)
            present.append((k, v))
            groups = attn.num_key_value_groups
            k_rep, v_rep = repeat_kv(k, groups), repeat_kv(v, groups)
            o = F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=causal_mask(t, k.shape[2], h.device),
                                               scale=attn.scaling)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(b, t, -1))
            if i != closing:
                h = h + layer.mlp(layer.post_attention_layernorm(h))
        if closing is None:
            return SegmentOutput(self.lm_head(self.lm.norm(h[:, -1:]))[:, 0], present)
        return SegmentOutput(h, present, q, k)

    @property
    def position_offsets(self) -> list[int]:
        """Per decoder block, what its segment subtracts from a decode token's input position (A8)."""
        return [seg.position_offset for seg in self.segments for _ in seg.attention_blocks]

    def decode_step(self, token_embeds: Tensor, position: Tensor, cache: KVCache) -> tuple[Tensor, KVCache]:
        """One token: token_embeds [B, 1, D], position [B] (its position in the unreduced prompt numbering,
        = prompt length T + n_0 for the first generated token) -> logits [B, V] and the grown cache."""
        return self.extend(token_embeds, position, cache)

    def extend(self, embeds: Tensor, position: Tensor, cache: KVCache) -> tuple[Tensor, KVCache]:
        """Extend the cache by T tokens: embeds [B, T, D], position [B] the unreduced position of the first
        -> logits [B, V] at the last of them and the cache grown by T per layer (segment s numbers its
        tokens position + t - offset_s, docs/method-spec.md A8)."""
        b, t, _ = embeds.shape
        h = embeds
        new_cache: KVCache = []
        for seg in self.segments:
            first = seg.attention_blocks[0] if seg.attention_blocks else 0
            past = cache[first:first + len(seg.attention_blocks)]
            pos = position.reshape(b, 1) + torch.arange(t, device=h.device).unsqueeze(0) - seg.position_offset
            out = self.run_segment(seg, h, pos, past)
            new_cache.extend(out.present)
            h = out.hidden
        return h, new_cache

    # ------------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------------

    def stages(self, follow: FollowedSelection | None = None) -> TorchStages:
        """This model as the four stage calls of `ficoco.generation.StagedModel` (making `follow`'s choices)."""
        return TorchStages(self, follow)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: Tensor,
        input_ids: Tensor,
        image_offset: Tensor | int,
        max_new_tokens: int = 32,
        sampling: SamplingConfig | None = None,
        eos_token_id: int | list[int] | None = None,
    ) -> Tensor:
        """Greedy (default) or sampled generation; input_ids [B, T] without the image placeholder."""
        return torch.from_numpy(generate_tokens(
            self.stages(), pixel_values, input_ids, image_offset, max_new_tokens, sampling, eos_token_id
        ))


def _tensor(x: Any, dtype: torch.dtype | None = None) -> Tensor:
    """A stage input (a torch tensor, or a numpy array from the generation loop or another backend) as a tensor."""
    if not isinstance(x, Tensor):
        a = np.ascontiguousarray(x)
        x = torch.from_numpy(a if a.flags.writeable else a.copy())
    t = x
    return t if dtype is None else t.to(dtype)


class TorchStages:
    """A `ReducedLlava` behind the stage interface of `ficoco.generation` (numpy ids in, host logits out)."""

    def __init__(self, model: ReducedLlava, follow: FollowedSelection | None = None) -> None:
        self.model = model
        self.follow = follow

    def _float(self, x: Any) -> Tensor:
        """A torch tensor as it is (the reference's own dtype); a numpy array in the model's dtype."""
        if isinstance(x, Tensor):
            return x
        return _tensor(x, next(self.model.parameters()).dtype)

    def encode_image(self, pixel_values: Any) -> Tensor:
        return self.model.encode_image(self._float(pixel_values), self.follow).visual

    def embed(self, input_ids: Any) -> Tensor:
        return self.model.embed_text(_tensor(input_ids, torch.long))

    def prefill(self, embeds: Any, visual: Any, image_offset: Any) -> tuple[np.ndarray, list[Tensor]]:
        out = self.model.prefill(self._float(embeds), self._float(visual), _tensor(image_offset, torch.long), self.follow)
        return host_logits(out.logits), [t for kv in out.cache for t in kv]

    def step(self, embeds: Any, position: Any, past: list[Any]) -> tuple[np.ndarray, list[Tensor]]:
        return self.extend(embeds, position, past)

    def extend(self, embeds: Any, position: Any, past: list[Any]) -> tuple[np.ndarray, list[Tensor]]:
        kv = [self._float(t) for t in past]
        cache = [(kv[2 * i], kv[2 * i + 1]) for i in range(len(kv) // 2)]
        logits, new = self.model.extend(self._float(embeds), _tensor(position, torch.long), cache)
        return host_logits(logits), [t for kv in new for t in kv]
