"""Where a session's tensors live, and the few array operations the stage adapter needs there.

A graph session keeps its inputs and outputs in one kind of array: numpy arrays on the host (ONNX
Runtime on CPU, the torch-free runtime) or torch tensors on a device (TensorRT, ONNX Runtime's CUDA
provider, where the KV cache must stay in GPU memory). `ArrayOps` is that choice, made once per session;
`bundle.session.SessionStages` moves every feed through it, so the same adapter code runs on both.
dtypes are named as numpy names them ("float32", "float16", "int64", ...; "bfloat16" too, which only
torch arrays hold). Only `TorchOps` imports torch, when it is built.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import numpy as np

#: the element types a bundle graph may use, by name
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool", "float8_e4m3fn")


class ArrayOps(abc.ABC):
    """The array operations of one kind of tensor storage (a host or a device)."""

    #: "cpu" or a device such as "cuda:0"
    device: str

    @abc.abstractmethod
    def to(self, x: Any, dtype: str) -> Any:
        """`x` (a numpy array or a torch tensor) on this storage, in `dtype`, contiguous."""

    @abc.abstractmethod
    def zeros(self, shape: Sequence[int], dtype: str) -> Any:
        """A zero-filled array (used for empty K/V caches: one axis of length 0)."""

    @abc.abstractmethod
    def positions(self, batch: int, length: int) -> Any:
        """position ids [batch, length] (int64): 0 .. length - 1 in each row."""

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on the host)."""
        return None


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a graph element type name; bfloat16 has none (ValueError with the fix)."""
    if name == "bfloat16":
        raise ValueError("bfloat16 graphs cannot run on numpy arrays; use the TensorRT backend or an fp16/fp32 bundle")
    return np.dtype(name)


def to_numpy(x: Any) -> np.ndarray:
    """A numpy view of `x` (a numpy array, or a torch tensor on any device: copied to the host)."""
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        return x.detach().cpu().numpy()
    return np.asarray(x)


class NumpyOps(ArrayOps):
    """Host numpy arrays (ONNX Runtime on CPU): nothing here imports torch."""

    device = "cpu"

    def to(self, x: Any, dtype: str) -> np.ndarray:
        return np.ascontiguousarray(to_numpy(x), dtype=numpy_dtype(dtype))

    def zeros(self, shape: Sequence[int], dtype: str) -> np.ndarray:
        return np.zeros(tuple(shape), dtype=numpy_dtype(dtype))

    def positions(self, batch: int, length: int) -> np.ndarray:
        return np.ascontiguousarray(np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)))


class TorchOps(ArrayOps):
    """torch tensors on `device` (a CUDA device for TensorRT and ONNX Runtime's CUDA provider; the CPU in tests)."""

    def __init__(self, device: Any) -> None:
        import torch

        self._torch = torch
        self.torch_device = torch.device(device)
        self.device = str(self.torch_device)

    def dtype(self, name: str) -> Any:
        """The torch dtype of a graph element type name."""
        if name not in DTYPE_NAMES:
            raise ValueError(f"unknown element type {name!r} (known: {', '.join(DTYPE_NAMES)})")
        return getattr(self._torch, name)

    def to(self, x: Any, dtype: str) -> Any:
        if isinstance(x, self._torch.Tensor):
            t = x
        else:
            a = np.ascontiguousarray(x)
            t = self._torch.from_numpy(a if a.flags.writeable else a.copy())
        return t.to(device=self.torch_device, dtype=self.dtype(dtype), non_blocking=True).contiguous()

    def zeros(self, shape: Sequence[int], dtype: str) -> Any:
        return self._torch.zeros(tuple(shape), dtype=self.dtype(dtype), device=self.torch_device)

    def positions(self, batch: int, length: int) -> Any:
        return self._torch.arange(length, device=self.torch_device).unsqueeze(0).expand(batch, -1)

    def synchronize(self) -> None:
        if self.torch_device.type == "cuda":
            self._torch.cuda.synchronize(self.torch_device)
