"""The generation loop over the four stages, shared by every backend.

PyTorch (`ficoco.reduced_llava`), the exporter's ONNX Runtime validation and the runtime's backends all
expose the same four calls on torch tensors; this loop drives them, so "the same tokens" means the same
loop, sampler and stopping rule everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from ficoco.sampling import Sampler, SamplingConfig


class DecoderStages(Protocol):
    """The three decoder-side stages: what `decode_tokens` drives."""

    def embed(self, input_ids: Tensor) -> Tensor:
        """input_ids [B, T] -> embeddings [B, T, D]."""

    def prefill(self, embeds: Tensor, visual: Tensor, image_offset: Tensor) -> tuple[Tensor, list[Tensor]]:
        """-> last-position logits [B, V] and the flat per-layer K/V list [k0, v0, k1, v1, ...]."""

    def step(self, embeds: Tensor, position: Tensor, past: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """One token [B, 1, D] at `position` [B] -> logits [B, V] and the grown K/V list."""


class StagedModel(DecoderStages, Protocol):
    """All four stages: what `generate_tokens` drives."""

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [B, 3, H, W] -> visual tokens [B, n_V, D]."""


def generate_tokens(
    model: StagedModel,
    pixel_values: Tensor,
    input_ids: Tensor,
    image_offset: Tensor | int,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    on_token: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """Run the vision tower on `pixel_values`, then `decode_tokens`: ids [B, <= max_new_tokens]."""
    return decode_tokens(model, model.encode_image(pixel_values), input_ids, image_offset, max_new_tokens,
                         sampling, eos_token_id, on_token)


def decode_tokens(
    model: DecoderStages,
    visual: Tensor,
    input_ids: Tensor,
    image_offset: Tensor | int,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    on_token: Callable[[Tensor], None] | None = None,
    prefilled: tuple[Tensor, list[Tensor]] | None = None,
    on_logits: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """Generate up to `max_new_tokens` ids [B, <= max_new_tokens] from visual tokens [B, n_V, D] that the
    vision tower already produced, for prompts without the image placeholder.

    `prefilled` (the prefill's logits and K/V for exactly these inputs) skips the prefill call, for callers
    that already ran it. The first decode token sits at position T + n_V (the unreduced prompt numbering);
    each backend's step maps it to per-layer positions. Stops once every row has produced an EOS id
    (finished rows repeat EOS). `on_token` receives each new column [B] as soon as it is chosen (streaming);
    `on_logits` the logits [B, V] each column was chosen from (greedy: the model's `forced_logits` along its
    own tokens, without running the steps again).
    """
    b = input_ids.shape[0]
    offset = torch.as_tensor(image_offset, dtype=torch.long).reshape(-1).expand(b).contiguous()
    sampler = Sampler(sampling)
    eos_ids = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    logits, past = prefilled if prefilled is not None else model.prefill(model.embed(input_ids), visual, offset)
    device = logits.device  # keep the loop's small tensors where the backend keeps its logits (GPU: no host copy)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    position = torch.full((b,), input_ids.shape[1] + visual.shape[1], dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    tokens: list[Tensor] = []
    for _ in range(max_new_tokens):
        if on_logits is not None:
            on_logits(logits)
        nxt = sampler(logits).to(device=device, dtype=torch.long)
        if eos.numel():
            nxt = torch.where(done, eos[0], nxt)
            done = done | torch.isin(nxt, eos)
        tokens.append(nxt)
        if on_token is not None:
            on_token(nxt)
        if len(tokens) == max_new_tokens or (eos.numel() and bool(done.all())):
            break
        logits, past = model.step(model.embed(nxt[:, None]), position, past)
        position = position + 1
    return torch.stack(tokens, dim=1) if tokens else input_ids.new_zeros(b, 0)


def forced_logits(
    model: DecoderStages,
    visual: Tensor,
    input_ids: Tensor,
    image_offset: Tensor | int,
    tokens: Tensor,
    prefilled: tuple[Tensor, list[Tensor]] | None = None,
) -> Tensor:
    """Teacher forcing: the next-token logits [B, n, V] before each of `tokens` [B, n], every one given the
    same prefix (the prompt, then tokens[:, :t]) whatever the model itself would have chosen.

    Row t is the distribution the model puts on position T + n_V + t. Two backends driven along one token
    path are compared position by position on equal prefixes, which free-running greedy decoding cannot
    do once the two have chosen differently (`bundle.compare.forced_agreement`). Positions and stepping are
    those of `decode_tokens`, so row t of a model's own greedy path is exactly the logits it chose from.
    """
    b, n = tokens.shape
    offset = torch.as_tensor(image_offset, dtype=torch.long).reshape(-1).expand(b).contiguous()
    logits, past = prefilled if prefilled is not None else model.prefill(model.embed(input_ids), visual, offset)
    position = torch.full((b,), input_ids.shape[1] + visual.shape[1], dtype=torch.long)
    rows = [logits.float()]
    for t in range(n - 1):
        logits, past = model.step(model.embed(tokens[:, t : t + 1].to(logits.device)), position, past)
        rows.append(logits.float())
        position = position + 1
    return torch.stack(rows, dim=1) if n else logits.float().new_zeros(b, 0, logits.shape[-1])
