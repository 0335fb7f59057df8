"""The numpy logits processors and sampler against transformers' own processors (same names, same semantics)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ficoco.sampling import Sampler, SamplingConfig, process_logits, read_generation_config, sampling_defaults

EOS = 3


def _transformers_scores(logits: np.ndarray, prompt: np.ndarray, generated: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    procs = LogitsProcessorList()
    if cfg.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty))
    if cfg.min_new_tokens:
        procs.append(MinNewTokensLengthLogitsProcessor(prompt.shape[1], cfg.min_new_tokens, EOS))
    if cfg.do_sample:
        if cfg.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k:
            procs.append(TopKLogitsWarper(cfg.top_k))
        if cfg.top_p < 1.0:
            procs.append(TopPLogitsWarper(cfg.top_p))
    ids = torch.from_numpy(np.concatenate([prompt, generated], axis=1))
    return procs(ids, torch.from_numpy(logits.copy())).numpy()


CONFIGS = [
    SamplingConfig(repetition_penalty=1.3),
    SamplingConfig(min_new_tokens=4),
    SamplingConfig(do_sample=True, temperature=0.7, top_k=7),
    SamplingConfig(do_sample=True, top_p=0.8),
    SamplingConfig(do_sample=True, temperature=1.4, top_k=12, top_p=0.9, repetition_penalty=0.8, min_new_tokens=2),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in vars(c).items() if k != "_"))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_processors_equal_transformers(cfg: SamplingConfig, seed: int) -> None:
    rng = np.random.default_rng(seed)
    vocab, b = 40, 3
    logits = (rng.standard_normal((b, vocab)) * 3).astype(np.float32)
    prompt = rng.integers(0, vocab, (b, 6))
    for n_generated in (0, 3, 5):
        generated = rng.integers(0, vocab, (b, n_generated))
        history = [np.concatenate([p, g]) for p, g in zip(prompt, generated, strict=True)]
        ours = process_logits(logits, cfg, history, n_generated, [EOS])
        theirs = _transformers_scores(logits, prompt, generated, cfg)
        assert np.array_equal(np.isinf(ours), np.isinf(theirs)), (n_generated, ours, theirs)
        finite = np.isfinite(theirs)
        np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6, atol=1e-6)
        # greedy picks the same token from the processed scores (first index on ties)
        assert np.array_equal(np.argmax(ours, axis=-1), torch.argmax(torch.from_numpy(theirs), dim=-1).numpy())


def test_min_new_tokens_holds_eos_back_then_releases_it() -> None:
    logits = np.zeros((1, 8), dtype=np.float32)
    logits[0, EOS] = 10.0
    sampler = Sampler(SamplingConfig(min_new_tokens=2), [EOS])
    assert int(sampler(logits, generated=0)[0]) != EOS
    assert int(sampler(logits, generated=1)[0]) != EOS
    assert int(sampler(logits, generated=2)[0]) == EOS


def test_sampler_draws_only_kept_tokens_with_their_probabilities() -> None:
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))
    cfg = SamplingConfig(do_sample=True, top_k=3, seed=11)
    sampler = Sampler(cfg)
    draws = np.array([int(sampler(logits)[0]) for _ in range(6000)])
    assert 3 not in set(draws.tolist())  # top_k=3 removed the least likely token
    freq = np.bincount(draws, minlength=4)[:3] / len(draws)
    np.testing.assert_allclose(freq, np.array([0.5, 0.3, 0.15]) / 0.95, atol=0.025)
    again = Sampler(cfg)
    assert [int(again(logits)[0]) for _ in range(50)] == draws[:50].tolist()  # a seed reproduces the stream


def test_generation_config_defaults(tmp_path) -> None:
    path = tmp_path / "generation_config.json"
    assert sampling_defaults(read_generation_config(path)) == SamplingConfig()  # absent file: greedy
    path.write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": 2}))
    cfg = sampling_defaults(read_generation_config(path))
    assert (cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k) == (True, 0.6, 0.9, 50)  # transformers' top_k default
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_generation_config(path)


@pytest.mark.parametrize("kw, match", [
    ({"top_k": -1}, "top_k"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"min_new_tokens": -2}, "min_new_tokens"), ({"top_p": 1.5}, "top_p"), ({"temperature": 0.0}, "temperature"),
])
def test_bad_controls_are_refused(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kw)
