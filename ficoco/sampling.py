"""Next-token selection shared by the PyTorch reference and the runtime, so a seed means the same thing in both."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingConfig:
    """Greedy when `do_sample` is False; otherwise temperature + nucleus (top-p) sampling with `seed`."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0 (got {self.temperature}); use greedy decoding instead")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")


class Sampler:
    """Picks the next token from last-position logits [B, V]; holds its own seeded generator."""

    def __init__(self, config: SamplingConfig | None = None) -> None:
        self.config = config or SamplingConfig()
        self.generator = torch.Generator().manual_seed(self.config.seed)

    def __call__(self, logits: Tensor) -> Tensor:
        if not self.config.do_sample:
            return torch.argmax(logits, dim=-1)
        # sampling draws from this CPU generator, so the same seed gives the same tokens on every backend
        logits = logits.float().cpu()
        probs = torch.softmax(logits / self.config.temperature, dim=-1)
        if self.config.top_p < 1.0:
            sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
            before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly before each token
            sorted_p = torch.where(before < self.config.top_p, sorted_p, torch.zeros_like(sorted_p))
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]
