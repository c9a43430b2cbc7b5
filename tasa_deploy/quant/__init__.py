"""Pure quantizers: grids (int / GGML), RTN, GPTQ, and bit packing. No hooks, no model code here."""

from tasa_deploy.quant.spec import QuantSpec, default_group_size
from tasa_deploy.quant.tensor import QuantizedTensor
from tasa_deploy.quant.rtn import quantize_rtn
from tasa_deploy.quant.gptq import make_empty_hessian, accumulate_hessian, quantize_weight

__all__ = [
    "QuantSpec", "QuantizedTensor", "default_group_size", "quantize_rtn",
    "make_empty_hessian", "accumulate_hessian", "quantize_weight",
]
