"""Round-to-nearest quantization: fit each group's scale from the weights, round every weight to the grid.

RTN is what TASA's sensitivity profile uses (cheap, and the paper's choice) and the baseline GPTQ must beat.
"""

from __future__ import annotations

import torch

from tasa_deploy.quant.grids import get_grid
from tasa_deploy.quant.spec import QuantSpec
from tasa_deploy.quant.tensor import QuantizedTensor


def quantize_rtn(weight: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """RTN-quantize a weight [N, K] onto `spec`'s grid."""
    grid = get_grid(spec.fmt)
    grid.block_columns(spec, weight.shape[1])  # validates the shape for this grid
    params = grid.fit(weight, spec)
    codes, _ = grid.quantize_columns(weight, params, spec, col_offset=0)
    return grid.assemble(spec, codes, params)


def fake_quantize_rtn(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """quantize_rtn then dequantize, in the weight's dtype (for sensitivity probes)."""
    return quantize_rtn(weight, spec).dequantize(weight.dtype)
