"""The shapes of a LLaVA model that reduction, planning and FLOPs counting need, read from its config.

Everything downstream (planner, FLOPs model, reduced model, exporter) talks about geometry through these
frozen dataclasses, never through a transformers config directly, so that a 7B plan needs only a JSON file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal


class GeometryError(ValueError):
    """The model config is not a LLaVA layout this toolkit can reduce (the message says what and why)."""


@dataclass(frozen=True)
class VisionGeometry:
    """A CLIP-style vision tower.

    `select_block` is the 0-based index of the encoder block whose output feeds the projector
    (LLaVA-1.5: `vision_feature_layer = -2` on 24 blocks -> block 22); blocks after it are never run.
    """

    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    select_block: int
    feature_strategy: Literal["default", "full"] = "default"
    has_cls: bool = True

    @property
    def grid_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_side**2

    @property
    def seq_len(self) -> int:
        """Tokens entering block 0: [CLS] (if any) + patches."""
        return self.num_patches + int(self.has_cls)

    @property
    def blocks_run(self) -> int:
        return self.select_block + 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class DecoderGeometry:
    """A Llama-style decoder (GQA allowed: `num_kv_heads` may be smaller than `num_heads`)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int


@dataclass(frozen=True)
class LlavaGeometry:
    vision: VisionGeometry
    decoder: DecoderGeometry
    image_token_id: int

    @property
    def visual_tokens(self) -> int:
        """Visual tokens the projector hands to the decoder without reduction (576 for LLaVA-1.5)."""
        v = self.vision
        return v.num_patches + (1 if (v.has_cls and v.feature_strategy == "full") else 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlavaGeometry:
        return cls(
            vision=VisionGeometry(**d["vision"]),
            decoder=DecoderGeometry(**d["decoder"]),
            image_token_id=int(d["image_token_id"]),
        )

    @classmethod
    def from_config(cls, config: Any) -> LlavaGeometry:
        """Read a `LlavaConfig` (or anything with the same attributes / a dict of its JSON)."""
        if isinstance(config, dict):
            from transformers import LlavaConfig

            config = LlavaConfig(**config)
        vc, tc = config.vision_config, config.text_config
        if getattr(vc, "model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
            raise GeometryError(
                f"vision tower type {vc.model_type!r} is not supported; ficoco-export reduces CLIP towers "
                "(LLaVA-1.5 layout)."
            )
        if getattr(tc, "model_type", "llama") not in ("llama",):
            raise GeometryError(
                f"decoder type {tc.model_type!r} is not supported; ficoco-export reduces Llama decoders "
                "(LLaVA-1.5 / Vicuna / SmolLM2 layout)."
            )
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise GeometryError(
                f"vision_feature_layer={layer!r}: only a single feature layer is supported (LLaVA-1.5 uses -2)."
            )
        n_layers = vc.num_hidden_layers
        # hidden_states[0] is the embedding output, hidden_states[i] the output of block i-1.
        select_block = n_layers + layer if layer < 0 else layer - 1
        if not 0 <= select_block < n_layers:
            raise GeometryError(f"vision_feature_layer={layer} selects no encoder block of {n_layers}.")
        strategy = config.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise GeometryError(f"vision_feature_select_strategy={strategy!r} is not supported.")
        if vc.image_size % vc.patch_size:
            raise GeometryError(f"image_size {vc.image_size} is not a multiple of patch_size {vc.patch_size}.")
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        return cls(
            vision=VisionGeometry(
                image_size=vc.image_size,
                patch_size=vc.patch_size,
                hidden_size=vc.hidden_size,
                intermediate_size=vc.intermediate_size,
                num_heads=vc.num_attention_heads,
                num_layers=n_layers,
                select_block=select_block,
                feature_strategy=strategy,
            ),
            decoder=DecoderGeometry(
                hidden_size=tc.hidden_size,
                intermediate_size=tc.intermediate_size,
                num_layers=tc.num_hidden_layers,
                num_heads=tc.num_attention_heads,
                num_kv_heads=getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads,
                head_dim=head_dim,
                vocab_size=tc.vocab_size,
            ),
            image_token_id=int(config.image_token_id if hasattr(config, "image_token_id") else config.image_token_index),
        )
