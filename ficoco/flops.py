"""Theoretical FLOPs of a (reduced) LLaVA forward pass, LLM-Viewer style (docs/method-spec.md A9, §6.2).

Counting rules (2 FLOPs per multiply-accumulate; norms, activations, RoPE, softmax and the reduction
steps' own arithmetic are not counted, as in LLM-Viewer and the FiCoCo paper):

* A matrix product [P, a] x [a, b] costs 2·P·a·b FLOPs.
* Decoder block l at prefill sees ``P_att = span_at(l) + M`` tokens at its attention (visual span plus the
  M text tokens, prompt prefix included in M) and ``P_mlp = span_at(l + 1) + M`` tokens at its MLP (the
  block's own reduction step runs between the two). With D = hidden size, H·hd = query width,
  Hkv·hd = key/value width, I = FFN width::

      q          2·P_att·D·(H·hd)
      k, v       2·2·P_att·D·(Hkv·hd)
      o          2·P_att·(H·hd)·D
      QKᵀ and AV 4·P_att²·(H·hd)          (full square, no causal halving, as LLM-Viewer)
      gated FFN  6·P_mlp·D·I              (gate, up, down)

  For MHA with H·hd = Hkv·hd = D and no reduction this is the paper's fit 8PD² + 4P²D + 6PDI per layer;
  LLaVA-1.5-7B with M = 60 gives 8.45 / 3.30 / 2.45 / 1.61 TFLOPs at 576 / 192 / 128 / 64 visual tokens.
  The lm_head (2·D·V per token whose logits are computed) is not in the paper's figure and is reported
  separately.
* Vision tower (not in the paper's figure, reported separately): patch embedding 2·Np·(3·p²)·Dv; each
  run block b = 0..select_block costs 8·n·Dv² + 4·n²·Dv at ``n = span_at(b)`` (CLS included) plus the
  2-matrix MLP 4·n'·Dv·Iv at ``n' = span_at(b + 1)``; the projector (Linear, GELU, Linear) costs
  2·n_vis·(Dv·D + D·D) on the visual tokens handed to the decoder. CLIP-L/336 unreduced: ≈ 0.39 T.
* Decode, one generated token: every decoder block runs the projections and the FFN on 1 token and
  attends over its cache of ``L_l = M + span_at(l) + 1`` entries (4·L_l·(H·hd)); lm_head excluded.

All functions return exact integer FLOPs except `flops_report`, which returns TFLOPs (1e12) as floats.
"""

from __future__ import annotations

from ficoco.geometry import DecoderGeometry, LlavaGeometry, VisionGeometry
from ficoco.schedule import TowerSchedule

TERA = 1e12


def _check_tower(schedule: TowerSchedule, tower: str, num_layers: int) -> None:
    if schedule.tower != tower:
        raise ValueError(f"expected a {tower} TowerSchedule, got tower={schedule.tower!r}")
    if schedule.num_layers != num_layers:
        raise ValueError(
            f"{tower} schedule covers {schedule.num_layers} blocks but the geometry runs {num_layers}"
        )


# --------------------------------------------------------------------------------------------- decoder
def decoder_block_prefill_flops(dec: DecoderGeometry, p_att: int, p_mlp: int) -> int:
    """FLOPs of one decoder block at prefill: p_att tokens at attention, p_mlp tokens at the MLP.

    2·P·D·(H·hd) [q] + 4·P·D·(Hkv·hd) [k, v] + 2·P·(H·hd)·D [o] + 4·P²·(H·hd) [scores, values]
    + 6·P'·D·I [gated FFN], with P = p_att and P' = p_mlp.
    """
    d, qw, kvw = dec.hidden_size, dec.num_heads * dec.head_dim, dec.num_kv_heads * dec.head_dim
    proj = 2 * p_att * d * qw + 2 * 2 * p_att * d * kvw + 2 * p_att * qw * d
    attn = 4 * p_att * p_att * qw
    ffn = 6 * p_mlp * d * dec.intermediate_size
    return proj + attn + ffn


def decoder_prefill_flops(dec: DecoderGeometry, schedule: TowerSchedule, text_tokens: int) -> int:
    """Prefill FLOPs of all decoder blocks (lm_head excluded), following the decoder schedule.

    Block l: P_att = schedule.span_at(l) + M, P_mlp = schedule.span_at(l + 1) + M, M = text_tokens.
    """
    _check_tower(schedule, "decoder", dec.num_layers)
    m = text_tokens
    return sum(
        decoder_block_prefill_flops(dec, schedule.span_at(layer) + m, schedule.span_at(layer + 1) + m)
        for layer in range(dec.num_layers)
    )


def decoder_decode_flops(dec: DecoderGeometry, schedule: TowerSchedule, text_tokens: int) -> int:
    """FLOPs of one generated token right after prefill (lm_head excluded).

    Block l: projections and gated FFN on 1 token, 8·D·(H·hd)-style terms as in prefill, plus
    4·L_l·(H·hd) for scores and values over the cache, L_l = M + span_at(l) + 1 (the token itself).
    """
    _check_tower(schedule, "decoder", dec.num_layers)
    d, qw, kvw = dec.hidden_size, dec.num_heads * dec.head_dim, dec.num_kv_heads * dec.head_dim
    per_token = 2 * d * qw + 4 * d * kvw + 2 * qw * d + 6 * d * dec.intermediate_size
    total = 0
    for layer in range(dec.num_layers):
        cache_len = text_tokens + schedule.span_at(layer) + 1
        total += per_token + 4 * cache_len * qw
    return total


def lm_head_flops(dec: DecoderGeometry, tokens: int = 1) -> int:
    """2·tokens·D·V: the logits of `tokens` positions (prefill needs only the last one)."""
    return 2 * tokens * dec.hidden_size * dec.vocab_size


def kv_cache_bytes(
    dec: DecoderGeometry, schedule: TowerSchedule, text_tokens: int, bytes_per_element: int = 2
) -> int:
    """Bytes of the KV cache after prefill: Σ_l 2·(Hkv·hd)·(M + span_at(l))·bytes_per_element.

    LLaVA-1.5-7B in fp16 with M = 60: 333 MB at 576 visual tokens, 65.0 MB at 64 (paper Table 10).
    """
    _check_tower(schedule, "decoder", dec.num_layers)
    kvw = dec.num_kv_heads * dec.head_dim
    return sum(
        2 * kvw * (text_tokens + schedule.span_at(layer)) * bytes_per_element for layer in range(dec.num_layers)
    )


# ---------------------------------------------------------------------------------------------- vision
def vision_block_flops(vis: VisionGeometry, n_att: int, n_mlp: int) -> int:
    """One CLIP block: 8·n·Dv² (q, k, v, o) + 4·n²·Dv (scores, values) + 4·n'·Dv·Iv (2-matrix MLP)."""
    dv = vis.hidden_size
    return 8 * n_att * dv * dv + 4 * n_att * n_att * dv + 4 * n_mlp * dv * vis.intermediate_size


def patch_embed_flops(vis: VisionGeometry) -> int:
    """The patch-embedding convolution: 2·Np·(3·p²)·Dv."""
    return 2 * vis.num_patches * 3 * vis.patch_size**2 * vis.hidden_size


def projector_flops(vis: VisionGeometry, decoder_hidden: int, visual_tokens: int) -> int:
    """The 2-layer MLP projector on n_vis tokens: 2·n_vis·(Dv·D + D·D)."""
    d = decoder_hidden
    return 2 * visual_tokens * (vis.hidden_size * d + d * d)


def vision_tokens_out(vis: VisionGeometry, schedule: TowerSchedule) -> int:
    """Visual tokens the projector receives: the vision span after block select_block, with [CLS]
    dropped unless the feature strategy is "full"."""
    drop_cls = vis.has_cls and vis.feature_strategy != "full"
    return schedule.span_out - int(drop_cls)


def vision_flops(geometry: LlavaGeometry, schedule: TowerSchedule) -> int:
    """Vision tower + projector FLOPs: patch embedding, blocks 0..select_block, projector."""
    vis = geometry.vision
    _check_tower(schedule, "vision", vis.blocks_run)
    blocks = sum(
        vision_block_flops(vis, schedule.span_at(b), schedule.span_at(b + 1)) for b in range(vis.blocks_run)
    )
    proj = projector_flops(vis, geometry.decoder.hidden_size, vision_tokens_out(vis, schedule))
    return patch_embed_flops(vis) + blocks + proj


# ---------------------------------------------------------------------------------------------- report
def flops_report(
    geometry: LlavaGeometry, vision: TowerSchedule, decoder: TowerSchedule, text_tokens: int = 60
) -> dict[str, float]:
    """TFLOPs of a planned model: ``{"vision", "prefill", "decode_per_token", "total", "lm_head_per_token"}``.

    ``prefill`` is the paper's figure (decoder blocks only, M = text_tokens); ``total`` = vision + prefill;
    ``decode_per_token`` is one generated token right after prefill; ``lm_head_per_token`` (2·D·V) is
    excluded from all of them and reported for completeness.
    """
    if text_tokens < 0:
        raise ValueError(f"text_tokens must be >= 0, got {text_tokens}")
    n_vis = vision_tokens_out(geometry.vision, vision)
    if decoder.span_in != n_vis:
        raise ValueError(
            f"decoder span_in {decoder.span_in} does not match the {n_vis} visual tokens the vision tower yields"
        )
    dec = geometry.decoder
    v = vision_flops(geometry, vision) / TERA
    p = decoder_prefill_flops(dec, decoder, text_tokens) / TERA
    return {
        "vision": v,
        "prefill": p,
        "decode_per_token": decoder_decode_flops(dec, decoder, text_tokens) / TERA,
        "total": v + p,
        "lm_head_per_token": lm_head_flops(dec) / TERA,
    }


def unreduced_prefill_tflops(dec: DecoderGeometry, visual_tokens: int, text_tokens: int = 60) -> float:
    """Prefill TFLOPs with `visual_tokens` fed unreduced through every block (the paper's table)."""
    tower = TowerSchedule(tower="decoder", method="none", num_layers=dec.num_layers, span_in=visual_tokens)
    return decoder_prefill_flops(dec, tower, text_tokens) / TERA
