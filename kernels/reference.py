"""Pure-PyTorch reference for the mixed-bit dequant-GEMM: unpack, dequantize, matmul.

The layout is compressed-tensors' `pack-quantized` (symmetric int), the one our vLLM exporter writes:
  weight_packed int32 [N, ceil(K*b/32)]: each row is a dense little-endian bitstream of u = q + 2**(b-1);
                                         value k occupies bits [k*b, k*b + b), word = bit // 32
                                         (3-bit values straddle int32 words);
  weight_scale  fp16/bf16 [N, K/G]:      w[n, k] = (u - 2**(b-1)) * scale[n, k // G].
The Triton kernels in `mixed_gemm.py` are tested against these functions, and `QuantLinear` runs them on the CPU.
Bit packing itself lives in `tasa_deploy.quant.pack` (shared with the vLLM exporter); it is re-exported here
and checked bit for bit against compressed-tensors' own `pack_to_int32` in tests/test_kernels.py.
"""

from __future__ import annotations

import torch

from tasa_deploy.quant.pack import pack_codes, unpack_codes

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUPS = (32, 64, 128)  # plus per-channel: group_size == in_features
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def packed_words(in_features: int, bits: int) -> int:
    """int32 words per packed row: ceil(K * b / 32)."""
    return -(-in_features * bits // 32)


def dequantize_packed(packed: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                      in_features: int) -> torch.Tensor:
    """The weight [N, K] in float32 that `packed` and `scales` stand for."""
    codes = unpack_codes(packed.cpu(), bits, in_features).to(device=packed.device)  # [N, K] uint8
    signed = codes.to(torch.float32) - 2 ** (bits - 1)  # [N, K]
    scale_per_column = scales.to(torch.float32).repeat_interleave(group_size, dim=1)  # [N, K]
    return signed * scale_per_column


def mixed_gemm_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bits: int,
                         group_size: int) -> torch.Tensor:
    """y = x @ W^T for x [M, K] -> [M, N] in x's dtype.

    W is rounded to x's dtype before the fp32 matmul, exactly as the kernels dequantize a tile to the
    activation dtype before accumulating in fp32, so the two differ only by summation order.
    """
    in_features = x.shape[-1]
    weight = dequantize_packed(packed, scales, bits, group_size, in_features)  # [N, K] fp32
    weight = weight.to(x.dtype).to(torch.float32)
    return (x.to(torch.float32) @ weight.T).to(x.dtype)  # [M, N]


__all__ = ["pack_codes", "unpack_codes", "packed_words", "dequantize_packed", "mixed_gemm_reference",
           "SUPPORTED_BITS", "SUPPORTED_GROUPS", "ACTIVATION_DTYPES", "SCALE_DTYPES"]
