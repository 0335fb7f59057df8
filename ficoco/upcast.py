"""fp32 arithmetic over weights stored in fp16 / bf16, one layer at a time (`fp32_compute`).

The fp32 reference of a half-precision checkpoint is the same weights computed in fp32. Converting the whole
model doubles its memory (LLaVA-1.5-7B: 14 GB in fp16, 28 GB in fp32), which a 24 GB machine does not have.
`fp32_compute(model)` instead upcasts each parameter-holding leaf module (Linear, Conv2d, Embedding,
LayerNorm, RMSNorm, ...) just before it runs and casts it back right after: its floating inputs are cast
to fp32 and its outputs stay fp32, so every operation between the layers (attention, RoPE, the reduction
statistics) also runs in fp32. The largest extra allocation is one module's fp32 weights (the 7B's
lm_head: 0.5 GB). The original half-precision tensors are put back after each call (not re-cast), so the
weights are unchanged and a memory-mapped checkpoint stays one mapped copy. `after_module` is called
with each leaf module once it has run and its weights are back (the export's low-memory validation hands
that module's mapped pages back to the kernel there, so the reference holds about one layer's weights
at a time instead of the whole checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


def _to_fp32(x: Any) -> Any:
    if isinstance(x, Tensor) and x.is_floating_point() and x.dtype != torch.float32:
        return x.float()
    if isinstance(x, tuple):
        return tuple(_to_fp32(v) for v in x)
    if isinstance(x, list):
        return [_to_fp32(v) for v in x]
    return x


@contextmanager
def fp32_compute(model: nn.Module, after_module: Callable[[nn.Module], object] | None = None) -> Iterator[nn.Module]:
    """Within the context, `model`'s forward passes compute in fp32 while its weights stay in their dtype
    (see the module docstring); `after_module(leaf)` runs after each parameter-holding module. A model
    already in fp32 computes as it is."""
    def is_leaf(m: nn.Module) -> bool:  # with a hook every parameter-holding module is one, fp32 ones too
        own = list(m.parameters(recurse=False))
        return bool(own) if after_module is not None else any(p.is_floating_point() and p.dtype != torch.float32 for p in own)

    leaves = [m for m in model.modules() if is_leaf(m)]
    if not leaves:
        yield model
        return
    handles = []
    stored: dict[int, dict[str, Tensor]] = {}

    def before(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        originals = {}
        for name, p in mod.named_parameters(recurse=False):
            if p.is_floating_point() and p.dtype != torch.float32:
                originals[name] = p.data
                p.data = p.data.float()
        stored[id(mod)] = originals
        return _to_fp32(args), {k: _to_fp32(v) for k, v in kwargs.items()}

    def restore(mod: nn.Module) -> None:
        # the original tensors go back, not a new cast of the fp32 copy: a checkpoint memory-mapped from
        # safetensors stays mapped instead of gaining a second, anonymous copy of every weight
        for name, original in stored.pop(id(mod), {}).items():
            mod.get_parameter(name).data = original

    def after(mod: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        restore(mod)
        if after_module is not None:
            after_module(mod)
        return output

    try:
        for m in leaves:
            handles.append(m.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(m.register_forward_hook(after))
        yield model
    finally:
        for h in handles:
            h.remove()
        for m in leaves:  # a forward interrupted by an error leaves a module upcast: restore it
            restore(m)
