"""Quantization grids: how a block of weight columns is fitted, rounded and rebuilt.

A grid is the one thing RTN and GPTQ need to know about a format. Its contract, on a weight chunk w [N, C]
whose C is a multiple of `block_columns(spec)`:
  fit(w, spec) -> params           dict of tensors shaped [N, C // group, ...] (scales fixed from w)
  quantize_columns(w_cols, params, spec, col_offset) -> (codes uint8, w_hat float32)
                                   round columns col_offset.. of the fitted chunk onto the fixed grid
  assemble(spec, codes [N, K], params for all K) -> QuantizedTensor
  dequantize(qt) -> [N, K] float32 reference
GGML block grids (Q4_0 ... Q6_K) register themselves here from `tasa_deploy.exporters.ggml_grids`, so GPTQ can
round directly onto the grid that llama.cpp stores.
"""

from __future__ import annotations

from typing import Protocol

import torch

from tasa_deploy import UsageError
from tasa_deploy.quant.spec import QuantSpec
from tasa_deploy.quant.tensor import QuantizedTensor

Params = dict[str, torch.Tensor]


class Grid(Protocol):
    def block_columns(self, spec: QuantSpec, in_features: int) -> int: ...
    def fit(self, w: torch.Tensor, spec: QuantSpec) -> Params: ...
    def quantize_columns(self, w_cols: torch.Tensor, params: Params, spec: QuantSpec,
                         col_offset: int) -> tuple[torch.Tensor, torch.Tensor]: ...
    def assemble(self, spec: QuantSpec, codes: torch.Tensor, params: Params) -> QuantizedTensor: ...
    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor: ...


class IntGrid:
    """Integer group grid (GPTQ / compressed-tensors): w = (q - z) * s, s stored in float16.

    Symmetric: s = amax / ((2**b - 1) / 2), z = 2**(b-1) (compressed-tensors' convention).
    Asymmetric: s = (max - min) / (2**b - 1) over a range that includes 0, z = round(-min / s).
    """

    def block_columns(self, spec: QuantSpec, in_features: int) -> int:
        spec.groups_for(in_features)  # validates divisibility
        return spec.effective_group(in_features)

    def fit(self, w: torch.Tensor, spec: QuantSpec) -> Params:
        rows, cols = w.shape
        group = spec.effective_group(cols)
        grouped = w.float().reshape(rows, cols // group, group)  # [N, G, g]
        maxq = 2**spec.bits - 1
        if spec.symmetric:
            amax = grouped.abs().amax(dim=-1)
            scales = (amax / (maxq / 2)).clamp(min=1e-6).to(torch.float16)
            return {"scales": scales}
        wmin = grouped.amin(dim=-1).clamp(max=0)
        wmax = grouped.amax(dim=-1).clamp(min=0)
        scales = ((wmax - wmin) / maxq).clamp(min=1e-6).to(torch.float16)
        zeros = torch.round(-wmin / scales.float()).clamp(0, maxq).to(torch.uint8)
        return {"scales": scales, "zeros": zeros}

    def _column_params(self, params: Params, spec: QuantSpec, n_cols: int, col_offset: int):
        columns = torch.arange(col_offset, col_offset + n_cols, device=params["scales"].device)
        group_index = columns // spec.group_size if spec.group_size != -1 else columns * 0  # [c]
        scales = params["scales"].float()[:, group_index]  # [N, c]
        if spec.symmetric:
            zeros = torch.full_like(scales, 2 ** (spec.bits - 1))
        else:
            zeros = params["zeros"].float()[:, group_index]
        return scales, zeros

    def quantize_columns(self, w_cols, params, spec, col_offset):
        scales, zeros = self._column_params(params, spec, w_cols.shape[1], col_offset)
        codes = torch.clamp(torch.round(w_cols.float() / scales) + zeros, 0, 2**spec.bits - 1)
        return codes.to(torch.uint8), (codes - zeros) * scales

    def assemble(self, spec, codes, params):
        group = spec.effective_group(codes.shape[1])
        return QuantizedTensor("int", spec.bits, group, spec.symmetric, codes, params["scales"],
                               params.get("zeros") if not spec.symmetric else None)

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        rows, cols = qt.codes.shape
        groups = qt.scales.shape[1]
        codes = qt.codes.float().reshape(rows, groups, cols // groups)  # [N, G, g]
        zeros = qt.zeros.float() if qt.zeros is not None else torch.full((rows, groups), 2.0 ** (qt.bits - 1), device=qt.codes.device)
        return ((codes - zeros[..., None]) * qt.scales.float()[..., None]).reshape(rows, cols)


GRIDS: dict[str, Grid] = {"int": IntGrid()}


def register_grid(name: str, grid: Grid) -> None:
    GRIDS[name] = grid


def get_grid(name: str) -> Grid:
    if name not in GRIDS and name != "int":
        # GGML grids live with the GGUF exporter; importing it registers them.
        import tasa_deploy.exporters.ggml_grids  # noqa: F401
    if name not in GRIDS:
        raise UsageError(f"unknown quantization grid '{name}'; known: {', '.join(sorted(GRIDS))}")
    return GRIDS[name]
