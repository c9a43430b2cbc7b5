"""QuantizedTensor: integer codes plus the grid parameters needed to rebuild the weight.

One dataclass for every grid. `codes` are unsigned integers in [0, 2**bits - 1]; what the scales mean is the
grid's business (`tasa_deploy.quant.grids`), so `dequantize()` dispatches to the grid named by `fmt`. For the
"int" grid: w = (codes - zeros) * scales, zeros = 2**(bits-1) when symmetric.

`tensor_layout` is the one statement of what a stored grid holds (every tensor's name, dtype and shape), and
`from_tensors` checks a loaded tensor set against it: a file whose codes were written as int8 or whose scales
were written as bfloat16 decodes to garbage without any error, so it is refused when read instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping

import torch

from tasa_deploy import UsageError
from tasa_deploy.quant.ggml_types import GGML_TYPES
from tasa_deploy.quant.spec import INT_BITS

Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]  # tensor suffix ("codes", "extra.d", ...) -> dtype, shape


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    fmt: str  # grid name in tasa_deploy.quant.grids.GRIDS
    bits: int
    group_size: int  # columns per scale (the grid's sub-block for GGML types)
    symmetric: bool
    codes: torch.Tensor  # uint8 [N, K]
    scales: torch.Tensor  # [N, K // group_size]; float16 for "int"
    zeros: torch.Tensor | None = None  # [N, K // group_size] uint8 for asymmetric "int"; None when symmetric
    extra: Mapping[str, torch.Tensor] = field(default_factory=dict)  # format-specific tensors (GGML)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this tensor stands for, [N, K] — the reference every packer/kernel is tested against."""
        from tasa_deploy.quant.grids import get_grid

        return get_grid(self.fmt).dequantize(self).to(dtype)

    def to(self, device: torch.device | str) -> "QuantizedTensor":
        """The same tensor with every component on `device` (GPTQ works on the compute device; the host keeps
        the results)."""
        return replace(self, codes=self.codes.to(device), scales=self.scales.to(device),
                       zeros=None if self.zeros is None else self.zeros.to(device),
                       extra={k: v.to(device) for k, v in self.extra.items()})

    def index_entry(self) -> dict:
        """The grid and shape an artifact's quantized.json records for this tensor."""
        return {"fmt": self.fmt, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "shape": list(self.shape)}

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Flat tensor dict for safetensors: `{prefix}.codes`, `.scales`, `.zeros`, `.extra.<name>`."""
        out = {f"{prefix}.codes": self.codes, f"{prefix}.scales": self.scales}
        if self.zeros is not None:
            out[f"{prefix}.zeros"] = self.zeros
        for name, tensor in self.extra.items():
            out[f"{prefix}.extra.{name}"] = tensor
        return out

    @classmethod
    def from_tensors(cls, prefix: str, tensors: Mapping[str, torch.Tensor], fmt: str, bits: int,
                     group_size: int, symmetric: bool) -> "QuantizedTensor":
        """The tensor stored under `prefix`, checked against `tensor_layout` (names, dtypes, shapes, code range,
        finite scales); any mismatch is a one-line UsageError naming the tensor."""
        codes = tensors.get(f"{prefix}.codes")
        if codes is None:
            raise UsageError(f"tensor {prefix}.codes is missing")
        if codes.dim() != 2:
            raise UsageError(f"tensor {prefix}.codes must be 2-D [N, K], got shape {list(codes.shape)}")
        layout = tensor_layout(fmt, bits, group_size, symmetric, tuple(codes.shape), prefix)
        found = _own_tensors(prefix, tensors)
        for suffix in sorted(set(layout) | set(found)):
            if suffix not in found:
                raise UsageError(f"tensor {prefix}.{suffix} is missing (the {_grid_name(fmt, symmetric)} stores it)")
            if suffix not in layout:
                raise UsageError(f"tensor {prefix}.{suffix} is unexpected for the {_grid_name(fmt, symmetric)}")
            _check_tensor(f"{prefix}.{suffix}", found[suffix], *layout[suffix])
        _check_values(prefix, found, bits)
        extra = {k[len("extra."):]: v for k, v in found.items() if k.startswith("extra.")}
        return cls(fmt, bits, group_size, symmetric, found["codes"], found["scales"], found.get("zeros"), extra)


def tensor_layout(fmt: str, bits: int, group_size: int, symmetric: bool, shape: tuple[int, int],
                  prefix: str = "tensor") -> Layout:
    """Every tensor a stored [N, K] grid holds -> (dtype, shape); raises if the parameters do not fit.

    "int": codes uint8 [N, K], scales float16 [N, K/g], zeros uint8 [N, K/g] iff asymmetric (g = the stored
    group, K for per-channel). GGML types (as `exporters/ggml_grids.py` assembles them): codes uint8 [N, K],
    scales float32 [N, K/sub] (the effective per-sub-block scale), and the stored parameters in `extra`:
    legacy d (and m) float16 [N, K/32]; k-quants d (and dmin) float16 [N, K/256] plus sub-scales sc [N, K/sub]
    (int8 for the symmetric q3_k/q6_k, uint8 otherwise) and sub-mins m uint8 [N, K/sub] for the affine ones."""
    rows, cols = shape
    if fmt == "int":
        if bits not in INT_BITS or group_size <= 0 or cols % group_size:
            raise UsageError(f"{prefix}: int grid with {bits} bits and group {group_size} does not fit rows of {cols}")
        groups = (rows, cols // group_size)
        layout = {"codes": (torch.uint8, shape), "scales": (torch.float16, groups)}
        return layout if symmetric else {**layout, "zeros": (torch.uint8, groups)}
    info = GGML_TYPES.get(fmt)
    if info is None:
        raise UsageError(f"{prefix}: unknown grid {fmt!r}; known: int, {', '.join(GGML_TYPES)}")
    if (bits, group_size, symmetric) != (info.nominal_bits, info.sub_block, not info.has_min) or cols % info.block_size:
        raise UsageError(f"{prefix}: {fmt} is {info.nominal_bits}-bit, sub-block {info.sub_block}, blocks of "
                         f"{info.block_size}; got bits {bits}, group {group_size}, symmetric {symmetric}, "
                         f"rows of {cols}")
    subs = (rows, cols // info.sub_block)
    layout = {"codes": (torch.uint8, shape), "scales": (torch.float32, subs)}
    if not info.k_quant:
        names = ("extra.d", "extra.m") if info.has_min else ("extra.d",)
        return {**layout, **{name: (torch.float16, subs) for name in names}}
    supers = (rows, cols // info.block_size)  # k-quant storage block = one 256-weight super-block
    layout.update({"extra.d": (torch.float16, supers), "extra.sc": (torch.uint8 if info.has_min else torch.int8, subs)})
    if info.has_min:
        layout.update({"extra.dmin": (torch.float16, supers), "extra.m": (torch.uint8, subs)})
    return layout


def _own_tensors(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """suffix -> tensor for `{prefix}.codes/.scales/.zeros/.extra.*` (not another module's `{prefix}.x.*`)."""
    cut = len(prefix) + 1
    return {key[cut:]: value for key, value in tensors.items() if key.startswith(f"{prefix}.")
            and (key[cut:] in ("codes", "scales", "zeros") or key[cut:].startswith("extra."))}


def _grid_name(fmt: str, symmetric: bool) -> str:
    return f"{fmt} grid" if fmt != "int" else f"{'symmetric' if symmetric else 'asymmetric'} int grid"


def _check_tensor(name: str, tensor: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if tensor.dtype != dtype:
        raise UsageError(f"tensor {name} is {str(tensor.dtype).removeprefix('torch.')}, expected "
                         f"{str(dtype).removeprefix('torch.')}")
    if tuple(tensor.shape) != tuple(shape):
        raise UsageError(f"tensor {name} has shape {list(tensor.shape)}, expected {list(shape)}")


def _check_values(prefix: str, found: Mapping[str, torch.Tensor], bits: int) -> None:
    """Codes and zero points within `bits`, every float tensor finite."""
    for suffix in ("codes", "zeros"):
        if suffix in found and found[suffix].numel() and int(found[suffix].max()) >= 2**bits:
            raise UsageError(f"tensor {prefix}.{suffix} holds {int(found[suffix].max())}, beyond {bits} bits")
    for suffix, tensor in found.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UsageError(f"tensor {prefix}.{suffix} holds NaN or infinite values")
