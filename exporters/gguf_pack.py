"""Pack a GGML-grid QuantizedTensor into the bytes llama.cpp stores (lossless: codes + stored params only).

One packer per type, each writing the block struct of llama.cpp `ggml/src/ggml-common.h` for all blocks at
once with numpy bit operations. `pack_quantized(qt)` returns uint8 [N, K / block * type_size], the byte
shape `gguf.GGUFWriter.add_tensor(..., raw_dtype=...)` expects. The inverse is `gguf.quants.dequantize`,
which the tests use as the independent reader.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from tasa_deploy import UsageError
from tasa_deploy.quant.ggml_types import ggml_type
from tasa_deploy.quant.tensor import QuantizedTensor

GGUF_QTYPE = {name: GGMLQuantizationType[name.upper()]
              for name in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")}


def _f16_bytes(values: torch.Tensor) -> np.ndarray:
    """fp16 values [n] -> their little-endian bytes [n, 2]."""
    return values.to(torch.float16).numpy().reshape(-1, 1).view(np.uint8)


def _or_shifted(parts: np.ndarray, bits: int) -> np.ndarray:
    """parts [..., P, L] of `bits`-wide fields -> bytes [..., L] holding part j at bit j * bits."""
    out = np.zeros(parts.shape[:-2] + parts.shape[-1:], dtype=np.uint8)
    for j in range(parts.shape[-2]):
        out |= (parts[..., j, :] << np.uint8(j * bits)).astype(np.uint8)
    return out


def _high_bits(codes: np.ndarray, shift: int) -> np.ndarray:
    """Bit `shift` of each of 8 x 32 codes [n, 256] packed as qh/hmask bytes [n, 32] (code j*32+l -> bit j)."""
    return _or_shifted(((codes >> shift) & 1).reshape(-1, 8, 32), 1)


def _pack_legacy(codes: np.ndarray, extra: dict, name: str) -> np.ndarray:
    """Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks from codes [n, 32]: d, (m), (qh), qs."""
    fields = [_f16_bytes(extra["d"].reshape(-1))]
    if name in ("q4_1", "q5_1"):
        fields.append(_f16_bytes(extra["m"].reshape(-1)))
    if name == "q8_0":
        fields.append((codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
        return np.concatenate(fields, axis=1)
    if name in ("q5_0", "q5_1"):
        fields.append(np.packbits((codes >> 4) & 1, axis=-1, bitorder="little"))  # uint32 qh, LE -> [n, 4]
    low = codes & 0x0F
    fields.append(low[:, :16] | (low[:, 16:] << 4))  # weight l low nibble, weight 16 + l high nibble
    return np.concatenate(fields, axis=1)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K 6-bit scales and mins [n, 8] -> the 12-byte `scales` field."""
    first = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    second = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    third = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return np.concatenate([first, second, third], axis=1).astype(np.uint8)


def _pack_q3_scales(biased: np.ndarray) -> np.ndarray:
    """Q3_K 6-bit scales (signed + 32) [n, 16] -> 12 bytes: low nibbles of 0..7 | 8..15, then 2-bit highs."""
    low = biased & 15
    high = (biased >> 4).reshape(-1, 4, 4)  # [n, j, b]: scale j * 4 + b -> byte 8 + b, bits 2j
    return np.concatenate([low[:, :8] | (low[:, 8:] << 4), _or_shifted(high, 2)], axis=1)


def _two_bit_planes(codes: np.ndarray) -> np.ndarray:
    """Low 2 bits of codes [n, 256] -> qs [n, 64]: code h*128 + j*32 + l at byte h*32 + l, bits 2j."""
    return _or_shifted((codes & 3).reshape(-1, 2, 4, 32), 2).reshape(-1, 64)


def _nibble_pairs(low: np.ndarray, span: int) -> np.ndarray:
    """Nibbles [n, 256] -> [n, 128]: in each 2*span chunk, weight l low nibble, weight span + l high nibble."""
    pairs = low.reshape(-1, 256 // (2 * span), 2, span)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)


def _pack_kquant(codes: np.ndarray, extra: dict, name: str) -> np.ndarray:
    """Q2_K..Q6_K super-blocks from codes [n, 256] and per-block params (rows of extra already per block)."""
    d = _f16_bytes(extra["d"].reshape(-1))
    sc = extra["sc"].numpy().reshape(codes.shape[0], -1)
    if name == "q2_k":
        m = extra["m"].numpy().reshape(codes.shape[0], -1)
        scales = (sc | (m << 4)).astype(np.uint8)
        return np.concatenate([scales, _two_bit_planes(codes), d, _f16_bytes(extra["dmin"].reshape(-1))], axis=1)
    if name == "q3_k":
        biased = (sc.astype(np.int16) + 32).astype(np.uint8)
        return np.concatenate([_high_bits(codes, 2), _two_bit_planes(codes), _pack_q3_scales(biased), d], axis=1)
    if name == "q6_k":
        high = _or_shifted((codes >> 4).reshape(-1, 2, 4, 32), 2).reshape(-1, 64)
        return np.concatenate([_nibble_pairs(codes & 15, 64), high, sc.view(np.uint8), d], axis=1)
    m = extra["m"].numpy().reshape(codes.shape[0], -1)
    fields = [d, _f16_bytes(extra["dmin"].reshape(-1)), _pack_k_scales(sc, m)]
    if name == "q5_k":
        fields.append(_high_bits(codes, 4))
    fields.append(_nibble_pairs(codes & 15, 32))
    return np.concatenate(fields, axis=1)


def pack_quantized(qt: QuantizedTensor) -> np.ndarray:
    """GGML bytes uint8 [N, K / block * type_size] of a tensor quantized on a GGML grid."""
    if qt.fmt not in GGUF_QTYPE:
        raise UsageError(f"cannot pack grid '{qt.fmt}' as GGML; re-round it onto a GGML type first")
    info = ggml_type(qt.fmt)
    rows, cols = qt.shape
    if cols % info.block_size:
        raise UsageError(f"{qt.fmt} needs rows that are a multiple of {info.block_size}; this tensor's are {cols}")
    n_blocks = rows * cols // info.block_size
    codes = qt.codes.numpy().reshape(n_blocks, info.block_size)  # blocks run along rows, row-major
    extra = {k: v.contiguous().reshape(n_blocks, -1) for k, v in qt.extra.items()}
    pack = _pack_kquant if info.k_quant else _pack_legacy
    blocks = pack(codes, extra, qt.fmt)  # [n_blocks, type_size]
    if blocks.shape[1] != info.type_size:
        raise AssertionError(f"{qt.fmt} packer wrote {blocks.shape[1]} bytes per block, expected {info.type_size}")
    return np.ascontiguousarray(blocks).reshape(rows, cols // info.block_size * info.type_size)
