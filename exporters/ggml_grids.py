"""GGML block grids (llama.cpp's Q4_0 ... Q8_0 and Q2_K ... Q6_K) as `tasa_deploy.quant.grids.Grid`s.

Registering them lets RTN and GPTQ (quant/rtn.py, quant/gptq.py, unchanged) round straight onto the grid
llama.cpp stores, so packing into a GGUF is lossless. Every grid keeps in `QuantizedTensor.extra` the exact
stored parameters (fp16 `d`/`m`, fp16 `d`/`dmin` plus integer sub-scales `sc`/`m` for k-quants), and
`dequantize` repeats `gguf.quants.dequantize`'s float32 arithmetic operation by operation, so the two agree
bit for bit. Codes are unsigned: the signed value is code - zero (zero = 8, 16, 128, 4, 32 for the
symmetric types) and the affine types decode as scale * code - min.

Legacy types round exactly like gguf-py's reference quantizers (`gguf/quants.py`, which match
ggml-quants.c), so our RTN bytes equal `gguf.quants.quantize`'s. k-quant scales come from
`exporters.kquants` (a vectorized llama.cpp-style search). Layouts: llama.cpp `ggml/src/ggml-common.h`.
"""

from __future__ import annotations

import torch

from tasa_deploy import UsageError
from tasa_deploy.exporters.kquants import (KQUANT_SEARCH, SUPER_BLOCK, quantize_scales_signed,
                                           quantize_scales_unsigned, search_sub_block_scales)
from tasa_deploy.quant.ggml_types import GGML_TYPES, GgmlType
from tasa_deploy.quant.grids import Params, register_grid
from tasa_deploy.quant.spec import QuantSpec
from tasa_deploy.quant.tensor import QuantizedTensor

# Signed-code offset of the symmetric types (code = signed value + zero).
ZERO_POINT = {"q4_0": 8, "q5_0": 16, "q8_0": 128, "q3_k": 4, "q6_k": 32}


def _round_half_away(values: torch.Tensor) -> torch.Tensor:
    """C roundf, computed the way gguf-py's np_roundf does (exact in float32, unlike floor(x + 0.5))."""
    magnitude = values.abs()
    floored = torch.floor(magnitude)
    return torch.sign(values) * (floored + torch.floor(2 * (magnitude - floored)))


def _expand(per_group: torch.Tensor, group: int, col_offset: int, n_cols: int) -> torch.Tensor:
    """Per-group values [N, G] -> per-column values [N, n_cols] for columns col_offset.. of the chunk."""
    group_index = torch.arange(col_offset, col_offset + n_cols, device=per_group.device) // group  # [c]
    return per_group[:, group_index]


class _GgmlGrid:
    """Shared shape checks and dequantization (scale * (code - zero), or scale * code - min)."""

    def __init__(self, info: GgmlType):
        self.info = info
        self.zero = ZERO_POINT.get(info.name, 0)

    def block_columns(self, spec: QuantSpec, in_features: int) -> int:
        if in_features % self.info.block_size:
            raise UsageError(f"{self.info.name} stores rows in blocks of {self.info.block_size}; a row of "
                             f"{in_features} does not fit (use a block-32 type such as q4_0/q5_0/q8_0)")
        return self.info.block_size

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        rows, cols = qt.codes.shape
        scale, low = self.stored_scales(qt.extra)  # [N, G] float32 each (low: added constant or None)
        codes = qt.codes.reshape(rows, -1, self.info.sub_block)  # [N, G, g]
        if low is None:
            values = (codes.to(torch.int16) - self.zero).float()
            return (scale[..., None] * values).reshape(rows, cols)
        return (scale[..., None] * codes.float() + low[..., None]).reshape(rows, cols)

    def _w_hat(self, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor | None) -> torch.Tensor:
        if low is None:
            return scale * (codes - self.zero)
        return scale * codes + low

    def assemble(self, spec: QuantSpec, codes: torch.Tensor, params: Params) -> QuantizedTensor:
        extra = {k: v for k, v in params.items() if k in self.stored_keys}
        scale, _ = self.stored_scales(extra)
        return QuantizedTensor(self.info.name, self.info.nominal_bits, self.info.sub_block,
                               not self.info.has_min, codes, scale, None, extra)


class LegacyGrid(_GgmlGrid):
    """Q4_0/Q4_1/Q5_0/Q5_1/Q8_0: one fp16 scale (and fp16 min for *_1) per block of 32.

    Decode: symmetric d * (code - zero); affine d * code + m. Params: `d` (and `m`) fp16 [N, G] as stored,
    plus the float32 rounding constants gguf-py uses (`inv` = 1/d before fp16 rounding, `lo` = f32 min)."""

    @property
    def stored_keys(self) -> tuple[str, ...]:
        return ("d", "m") if self.info.has_min else ("d",)

    def stored_scales(self, extra) -> tuple[torch.Tensor, torch.Tensor | None]:
        return extra["d"].float(), (extra["m"].float() if self.info.has_min else None)

    def fit(self, w: torch.Tensor, spec: QuantSpec) -> Params:
        rows, cols = w.shape
        blocks = w.float().reshape(rows, cols // 32, 32)  # [N, G, 32]
        if self.info.has_min:
            hi, lo = blocks.amax(dim=-1), blocks.amin(dim=-1)  # [N, G]
            d = (hi - lo) / (2**self.info.nominal_bits - 1)
        elif self.info.name == "q8_0":
            lo, d = None, blocks.abs().amax(dim=-1) / 127
        else:  # q4_0 / q5_0: the extreme value maps to -zero
            lo = None
            d = blocks.gather(-1, blocks.abs().argmax(dim=-1, keepdim=True))[..., 0] / -self.zero
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))
        params = {"d": d.to(torch.float16), "inv": inv}
        if lo is not None:
            params.update(m=lo.to(torch.float16), lo=lo)
        return params

    def quantize_columns(self, w_cols, params, spec, col_offset):
        n_cols = w_cols.shape[1]
        inv = _expand(params["inv"], 32, col_offset, n_cols)  # [N, c]
        x = w_cols.float()
        top = 2**self.info.nominal_bits - 1
        if self.info.has_min:
            codes = torch.floor((x - _expand(params["lo"], 32, col_offset, n_cols)) * inv + 0.5)
        elif self.info.name == "q8_0":
            codes = _round_half_away(x * inv) + self.zero
        else:
            codes = torch.floor(x * inv + (self.zero + 0.5))
        codes = codes.clamp(0, top)
        scale = _expand(params["d"].float(), 32, col_offset, n_cols)
        low = _expand(params["m"].float(), 32, col_offset, n_cols) if self.info.has_min else None
        return codes.to(torch.uint8), self._w_hat(codes, scale, low)


class KQuantGrid(_GgmlGrid):
    """Q2_K..Q6_K: 256-weight super-blocks with fp16 `d` (and `dmin`) [N, K/256] and integer sub-scales
    `sc` (and sub-mins `m`) [N, K/sub]. Decode: symmetric d*sc * (code - zero); affine d*sc * code - dmin*m."""

    @property
    def stored_keys(self) -> tuple[str, ...]:
        return ("d", "sc", "dmin", "m") if self.info.has_min else ("d", "sc")

    def stored_scales(self, extra) -> tuple[torch.Tensor, torch.Tensor | None]:
        per_super = SUPER_BLOCK // self.info.sub_block
        scale = extra["d"].float().repeat_interleave(per_super, dim=1) * extra["sc"].float()  # [N, S]
        if not self.info.has_min:
            return scale, None
        neg_min = extra["dmin"].float().repeat_interleave(per_super, dim=1) * extra["m"].float()
        return scale, -neg_min  # adding -x is bit-identical to gguf's "- x"

    def fit(self, w: torch.Tensor, spec: QuantSpec) -> Params:
        cfg = KQUANT_SEARCH[self.info.name]
        per_super = SUPER_BLOCK // cfg.sub
        scales, neg_mins = search_sub_block_scales(w, self.info.name)  # [N, S] each
        if not cfg.affine:
            d, sc = quantize_scales_signed(scales, cfg.scale_levels, per_super)
            return {"d": d, "sc": sc}
        d, sc = quantize_scales_unsigned(scales, cfg.scale_levels, per_super)
        dmin, m = quantize_scales_unsigned(neg_mins, cfg.scale_levels, per_super)
        return {"d": d, "sc": sc, "dmin": dmin, "m": m}

    def quantize_columns(self, w_cols, params, spec, col_offset):
        n_cols, sub = w_cols.shape[1], self.info.sub_block
        scale, low = self.stored_scales(params)  # [N, S]
        scale = _expand(scale, sub, col_offset, n_cols)  # [N, c]
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        x = w_cols.float()
        if low is None:
            codes = torch.where(scale == 0, 0.0, torch.round(x / safe)) + self.zero
            codes = codes.clamp(0, 2**self.info.nominal_bits - 1)
            return codes.to(torch.uint8), self._w_hat(codes, scale, None)
        low = _expand(low, sub, col_offset, n_cols)
        codes = torch.where(scale == 0, 0.0, torch.round((x - low) / safe)).clamp(0, 2**self.info.nominal_bits - 1)
        return codes.to(torch.uint8), self._w_hat(codes, scale, low)


def _make_grid(info: GgmlType) -> _GgmlGrid:
    return KQuantGrid(info) if info.k_quant else LegacyGrid(info)


GGML_GRIDS: dict[str, _GgmlGrid] = {name: _make_grid(info) for name, info in GGML_TYPES.items()}
for _name, _grid in GGML_GRIDS.items():
    register_grid(_name, _grid)
