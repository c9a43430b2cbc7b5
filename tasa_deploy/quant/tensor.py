"""QuantizedTensor: integer codes plus the grid parameters needed to rebuild the weight.

One dataclass for every grid. `codes` are unsigned integers in [0, 2**bits - 1]; what the scales mean is the
grid's business (`tasa_deploy.quant.grids`), so `dequantize()` dispatches to the grid named by `fmt`. For the
"int" grid: w = (codes - zeros) * scales, zeros = 2**(bits-1) when symmetric.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch


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
        extra_prefix = f"{prefix}.extra."
        extra = {k[len(extra_prefix):]: v for k, v in tensors.items() if k.startswith(extra_prefix)}
        return cls(fmt, bits, group_size, symmetric, tensors[f"{prefix}.codes"], tensors[f"{prefix}.scales"],
                   tensors.get(f"{prefix}.zeros"), extra)
