"""Deterministic random weights (`init_peaky_`, `state_dict_sha256`) and the two built-ins made of nothing
else: `tiny` (LLaVA-1.5's vision geometry at tiny widths) and `bench` (real widths, for CPU timings)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from ficoco.models.checkpoint import _quiet_transformers, write_side_files
from ficoco.models.llava_configs import BENCH_DECODER_LAYERS, _bench_config, _tiny_config
from ficoco.models.processing import LLAVA_CHAT_TEMPLATE, _build_tiny_tokenizer, clip_processor_config
from ficoco.models.specs import BUILD_VERSION, LoadedModel


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 over the state dict: for each key in sorted order, the key, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


#: Extra gain on q_proj / k_proj init (attention logit std ≈ QK_GAIN**2) so that attention is peaky.
QK_GAIN = 2.0
#: Extra gain on lm_head init: logit std ≈ 4 gives clear greedy margins (robust fp16 / ONNX token comparisons).
LM_HEAD_GAIN = 4.0


def _normal(shape: torch.Size, std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std


def peaky_values(module: nn.Module, gen: torch.Generator, *, qk_gain: float = QK_GAIN) -> Iterator[tuple[str, torch.Tensor]]:
    """(parameter name, fp32 value) for every parameter of `module`, in the order `init_peaky_` draws them
    from `gen` (a parameter shared by two modules, a tied embedding, once). `module` may live on the meta
    device: only names and shapes are read, so a checkpoint can be written tensor by tensor
    (`write_random_checkpoint`) without ever holding the model.

    Linear/Conv weights N(0, 1/fan_in) (unit-variance outputs), biases 0, token embeddings N(0, 1), norm
    weights 1 / biases 0, CLIP class and position embeddings 0.5·N(0, 1). With unit-variance q and k the
    attention logits have std 1 only (softmax over ~600 keys is then nearly flat), so q_proj and k_proj get
    an extra gain `qk_gain` each: logit std ≈ qk_gain². lm_head gets LM_HEAD_GAIN.
    """
    done: set[int] = set()
    for mod_name, mod in module.named_modules():
        cls_name = type(mod).__name__
        prefix = f"{mod_name}." if mod_name else ""
        out: list[tuple[str, nn.Parameter | None, torch.Tensor | None]] = []
        if isinstance(mod, nn.Linear):
            leaf = mod_name.rsplit(".", 1)[-1]
            gain = qk_gain if leaf in ("q_proj", "k_proj") else LM_HEAD_GAIN if leaf == "lm_head" else 1.0
            out = [("weight", mod.weight, _normal(mod.weight.shape, gain * mod.in_features**-0.5, gen))]
            if mod.bias is not None:
                out.append(("bias", mod.bias, torch.zeros(mod.bias.shape)))
        elif isinstance(mod, nn.Conv2d):
            fan_in = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1] // mod.groups
            out = [("weight", mod.weight, _normal(mod.weight.shape, fan_in**-0.5, gen))]
            if mod.bias is not None:
                out.append(("bias", mod.bias, torch.zeros(mod.bias.shape)))
        elif cls_name == "CLIPVisionEmbeddings":
            out = [("class_embedding", mod.class_embedding, _normal(mod.class_embedding.shape, 0.5, gen)),
                   ("position_embedding.weight", mod.position_embedding.weight,
                    _normal(mod.position_embedding.weight.shape, 0.5, gen))]
        elif isinstance(mod, nn.Embedding):
            if id(mod.weight) not in done:
                out = [("weight", mod.weight, _normal(mod.weight.shape, 1.0, gen))]
        elif isinstance(mod, nn.LayerNorm) or cls_name.endswith("RMSNorm"):
            out = [("weight", mod.weight, torch.ones(mod.weight.shape))]
            if getattr(mod, "bias", None) is not None:
                out.append(("bias", mod.bias, torch.zeros(mod.bias.shape)))
        for name, p, value in out:
            if p is None or value is None:
                continue
            done.add(id(p))
            yield prefix + name, value
    left = [n for n, p in module.named_parameters() if id(p) not in done]
    if left:
        raise RuntimeError(f"peaky init left parameters uninitialised: {left[:5]}")


@torch.no_grad()
def init_peaky_(module: nn.Module, gen: torch.Generator, *, qk_gain: float = QK_GAIN) -> None:
    """Re-initialise every parameter of `module` from `gen` (deterministic, independent of the global RNG)
    with `peaky_values`' rules. HF's default (N(0, 0.02)) gives near-uniform attention at width 64, which
    makes token-reduction scores degenerate."""
    for name, value in peaky_values(module, gen, qk_gain=qk_gain):
        p = module.get_parameter(name)
        p.copy_(value.to(p.dtype))


@contextmanager
def _isolated_rng() -> Iterator[None]:
    """HF constructors draw their default init from the global RNG; keep the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        yield


def build_tiny(
    seed: int = 0, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> LoadedModel:
    """A seeded random-weight LLaVA with LLaVA-1.5's real vision geometry and tiny widths.

    Vision: CLIP 336 px / 14 px patches (576 patches + CLS), 24 layers, width 64, feature layer -2, "default".
    Projector: gelu MLP 64 -> 64 -> 64. Decoder: Llama, 32 layers, width 64, 4 heads (MHA), vocab ~1000.
    Weights come only from `torch.Generator().manual_seed(seed)`: two builds have bit-identical state dicts.
    `revision` is the sha256 of the (fp32) state dict.
    """
    tokenizer = _build_tiny_tokenizer()
    config = _tiny_config(tokenizer)
    with _quiet_transformers(), _isolated_rng():
        model = LlavaForConditionalGeneration(config)
    init_peaky_(model, torch.Generator().manual_seed(seed))
    model.set_attn_implementation(attn_implementation)
    model.eval()
    revision = state_dict_sha256(model)
    if dtype != torch.float32:
        model.to(dtype)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        processor_config=clip_processor_config(),
        chat_template=LLAVA_CHAT_TEMPLATE,
        source=f"builtin:tiny(seed={seed})",
        revision=revision,
        name="tiny",
    )


def build_bench(
    seed: int = 0,
    *,
    num_layers: int = BENCH_DECODER_LAYERS,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """A seeded random-weight LLaVA with real per-layer cost, for CPU benchmarks (`ficoco-bench`, `make bench`).

    Vision: CLIP ViT-L/14-336 at full width and depth; projector GELU MLP 1024 -> 4096 -> 4096; decoder:
    Llama blocks of LLaVA-1.5-7B's width (4096, MLP 11008, 32 heads / 32 KV heads) but only `num_layers`
    of them, and the tiny model's tokenizer, chat template and processor config, so the vocabulary is ~1000
    tokens: the 7B model's 32000-row embedding and lm_head are not modelled. About 1.1 G parameters
    (4.5 GB fp32); built in memory each time (no cache), weights from `init_peaky_` so attention is peaky
    and token selection is meaningful. `revision` identifies the recipe (seed, layers, BUILD_VERSION)
    rather than hashing 4.5 GB of weights: the build is deterministic.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    from transformers.initialization import no_init_weights

    tokenizer = _build_tiny_tokenizer()
    config = _bench_config(tokenizer, num_layers)
    with _quiet_transformers(), _isolated_rng(), no_init_weights():  # init_peaky_ sets every parameter below
        model = LlavaForConditionalGeneration(config)
    init_peaky_(model, torch.Generator().manual_seed(seed))
    model.set_attn_implementation(attn_implementation)
    model.eval()
    if dtype != torch.float32:
        model.to(dtype)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        processor_config=clip_processor_config(),
        chat_template=LLAVA_CHAT_TEMPLATE,
        source=f"builtin:bench(seed={seed},layers={num_layers})",
        revision=f"recipe-v{BUILD_VERSION}-seed{seed}-layers{num_layers}",
        name="bench",
    )


def write_random_checkpoint(
    config: Any,
    out: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    shard_bytes: int = 2 << 30,
    name: str = "random",
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a random-weight llava-hf directory for `config` (a `LlavaConfig`) without holding the model.

    The model is built on the meta device (names and shapes only); `peaky_values` draws each parameter in
    turn, it is cast to `dtype` and added to the current safetensors shard, which is written once it
    reaches `shard_bytes` (then `model.safetensors.index.json`). Peak memory is one shard plus one fp32
    tensor, so LLaVA-1.5-7B's config (7.06 G parameters, ~14 GB in fp16) is written on a 24 GB machine.
    The tokenizer is the tiny model's BPE padded to the config's image token id (<image> and <pad> where
    the config puts them), with LLaVA-1.5's chat template and CLIP processor config. `progress(done, total)`
    is called with parameter counts. `out` is created (it must not exist or be empty); callers that want
    the directory to appear whole stage it (`bundle.layout.staging_dir`).
    """
    from safetensors.torch import save_file

    stage = Path(out)
    stage.mkdir(parents=True, exist_ok=True)
    if any(stage.iterdir()):
        raise FileExistsError(f"{stage} is not empty; choose a new directory")

    with _quiet_transformers(), torch.device("meta"):
        meta_model = LlavaForConditionalGeneration(config)
    total = sum(p.numel() for p in meta_model.parameters())
    image_id = int(config.image_token_id)
    tokenizer = _build_tiny_tokenizer(pad_vocab_to=image_id)
    if tokenizer.convert_tokens_to_ids("<image>") != image_id:
        raise ValueError(f"the tokenizer puts <image> at {tokenizer.convert_tokens_to_ids('<image>')}, the config at {image_id}")
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    files: list[str] = []
    size = done = total_bytes = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            fname = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(stage / fname), metadata={"format": "pt"})
            files.append(fname)
            weight_map.update({k: fname for k in shard})
            shard, size = {}, 0

    for key, value in peaky_values(meta_model, gen):
        t = value.to(dtype).contiguous()
        shard[key] = t
        size += t.numel() * t.element_size()
        total_bytes += t.numel() * t.element_size()
        done += t.numel()
        if progress is not None:
            progress(done, total)
        if size >= shard_bytes:
            flush()
    flush()
    n = len(files)
    renamed = {f: f.replace(".safetensors", f"-of-{n:05d}.safetensors") for f in files}
    for old, new in renamed.items():
        (stage / old).rename(stage / new)
    index = {"metadata": {"total_size": total_bytes},
             "weight_map": {k: renamed[f] for k, f in sorted(weight_map.items())}}
    (stage / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg = config.to_dict()
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    (stage / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    write_side_files(stage, tokenizer, clip_processor_config(), LLAVA_CHAT_TEMPLATE, name=name,
                     source=f"random weights (seed {seed}) in the config of {getattr(config, '_name_or_path', '') or name}",
                     revision=f"random-v{BUILD_VERSION}-seed{seed}")
    return stage
