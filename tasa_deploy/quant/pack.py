"""Dense little-endian bit packing of unsigned codes into int32 words (compressed-tensors' layout).

Code k of a row occupies bits [k*b, k*b + b) of that row's bitstream; word = bit // 32. With b = 3 a code may
straddle two words. Rows are packed independently: [N, K] uint8 -> [N, ceil(K*b/32)] int32.
"""

from __future__ import annotations

import torch


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, K] codes in [0, 2**bits) -> [N, ceil(K*bits/32)] int32."""
    rows, cols = codes.shape
    if int(codes.max()) >= 2**bits:
        raise ValueError(f"codes exceed {bits} bits")
    bit_index = torch.arange(cols * bits).reshape(cols, bits)  # [K, b] absolute bit position of each code bit
    code_bits = (codes.to(torch.int64)[:, :, None] >> torch.arange(bits)) & 1  # [N, K, b]
    n_words = -(-cols * bits // 32)
    stream = torch.zeros(rows, n_words * 32, dtype=torch.int64)
    stream[:, bit_index.reshape(-1)] = code_bits.reshape(rows, -1)
    weights = (1 << torch.arange(32, dtype=torch.int64))  # [32]
    words = (stream.reshape(rows, n_words, 32) * weights).sum(-1)  # [N, W] in [0, 2**32)
    return (words - (words >= 2**31).to(torch.int64) * 2**32).to(torch.int32)


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of pack_codes: [N, W] int32 -> [N, cols] uint8."""
    rows, n_words = packed.shape
    words = packed.to(torch.int64) & 0xFFFFFFFF  # [N, W] unsigned
    stream = (words[:, :, None] >> torch.arange(32)) & 1  # [N, W, 32]
    stream = stream.reshape(rows, n_words * 32)[:, : cols * bits].reshape(rows, cols, bits)
    return (stream << torch.arange(bits)).sum(-1).to(torch.uint8)
