"""Write a safetensors file one tensor at a time, byte-identical to `safetensors.torch.save_file`.

Why: `save_file` turns every tensor into a Python `bytes` copy before writing, so saving an artifact held the whole
quantized model twice, and GPTQ kept every module's codes in memory until that save. Here a tensor is a
`LazyTensor` (dtype, shape, and a function that loads it); the header is built from dtypes and shapes alone and
each tensor is loaded, written and dropped in turn, so peak memory is the largest single tensor. GPTQ's per-block
files (`sequential`) are read back this way (`lazy_tensors`), which makes the GPTQ + save stages flat in depth.

The layout follows the safetensors format (u64 little-endian header length, a JSON header padded with spaces to
a multiple of 8 bytes, then the data) and its writer's order: tensors sorted by dtype, larger dtypes first in
the format's own dtype order (`DTYPE_ORDER`), then by name; `__metadata__` first in the header. A test compares
the bytes with `save_file` on every dtype the artifacts use.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from tasa_deploy import UsageError

# The safetensors Dtype enum, in declaration order (its derived ordering sorts the data section, descending).
DTYPE_ORDER = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16",
               "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64")
DTYPE_NAMES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
               torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64",
               torch.int64: "I64"}
_COPY_BYTES = 64 << 20  # a tensor is written in slices of at most this many bytes (no second full-size copy)


@dataclass(frozen=True)
class LazyTensor:
    """A tensor described by dtype and shape, loaded only when written."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "LazyTensor":
        return cls(tensor.dtype, tuple(tensor.shape), lambda: tensor)


def write_safetensors(path: Path, tensors: Mapping[str, LazyTensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` to `path` in the safetensors layout, loading one tensor at a time. The caller makes the
    write atomic (`outputs.atomic_path`)."""
    names = sorted(tensors, key=lambda n: (-DTYPE_ORDER.index(_dtype_name(tensors[n].dtype, n)), n))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in names:
        entry = tensors[name]
        header[name] = {"dtype": _dtype_name(entry.dtype, name), "shape": list(entry.shape),
                        "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in names:
            _write_tensor(f, name, tensors[name])


def _write_tensor(f, name: str, entry: LazyTensor) -> None:
    tensor = entry.load()
    if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
        raise UsageError(f"tensor {name} loaded as {tensor.dtype} {list(tensor.shape)}, but was declared "
                         f"{entry.dtype} {list(entry.shape)}")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)  # little-endian hosts only
    for start in range(0, flat.numel(), _COPY_BYTES):
        f.write(flat[start:start + _COPY_BYTES].numpy().tobytes())


def _dtype_name(dtype: torch.dtype, name: str) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise UsageError(f"tensor {name} has dtype {dtype}, which this writer does not store") from None


def lazy_tensors(path: Path, names: Iterable[str] | None = None) -> dict[str, LazyTensor]:
    """The tensors of a safetensors file as LazyTensors (read from the header; each `load` opens the file and
    reads just that tensor). `names`: a subset (default: all)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys()) if names is None else list(names)
        specs = {}
        for key in keys:
            piece = f.get_slice(key)
            specs[key] = (_torch_dtype(piece.get_dtype(), key), tuple(piece.get_shape()))
    return {key: LazyTensor(dtype, shape, _loader(path, key)) for key, (dtype, shape) in specs.items()}


def _loader(path: Path, key: str) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return f.get_tensor(key)
    return load


def _torch_dtype(name: str, key: str) -> torch.dtype:
    for dtype, known in DTYPE_NAMES.items():
        if known == name:
            return dtype
    raise UsageError(f"tensor {key} has safetensors dtype {name}, which tasa-deploy does not read")
