"""Triton mixed-bit (2/3/4/8) dequant-GEMM on the compressed-tensors `pack-quantized` layout.

Computes y = x @ W^T for fp16/bf16 activations x [M, K] and a symmetric int weight stored as
weight_packed int32 [N, ceil(K*b/32)] (dense little-endian bitstream of u = q + 2**(b-1) per row) and
weight_scale [N, K/G]: w[n, k] = (u - 2**(b-1)) * scale[n, k // G]. See `reference.py` for the layout and the
PyTorch reference every launch here is tested against.

One kernel, `_dequant_gemm_kernel`, with BITS and GROUP as tl.constexpr, launched two ways:
  - decode (M <= 16): split-K GEMV. Programs split N and K; each writes an fp32 partial [M, BLOCK_N] and the
    host sums the SPLIT_K partials. M == 1 reduces with multiply + row sum; 2..16 pads M to 16 for tl.dot.
  - prefill (M > 16): tiled GEMM, one program per [BLOCK_M, BLOCK_N] output tile, full K loop.
Each K tile is unpacked in registers: value k reads word (k*b) // 32 and, when b does not divide 32 and the
value straddles a word (3-bit), the next word too; the two are joined in 64 bits before the shift.
On the CPU the kernel runs under TRITON_INTERPRET=1 (set before this module is imported). Triton 3.9's
interpreter truncates fp32->bf16 casts and miscomputes bf16 tl.dot, so under it (only) bf16 launches round
with integer ops and multiply in fp32 (EMULATE_BF16): the same numbers the GPU path computes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tasa_deploy import UsageError
from tasa_deploy.kernels.reference import (ACTIVATION_DTYPES, SCALE_DTYPES, SUPPORTED_BITS, SUPPORTED_GROUPS,
                                           packed_words)

DECODE_MAX_M = 16  # batch rows served by the split-K GEMV path


class KernelInputError(UsageError, ValueError):
    """Operands the kernel cannot serve; raised before launch (a UsageError and a ValueError)."""


@triton.jit
def _dequant_tile(packed_ptr, scale_ptr, offs_n, offs_k, k_start, N, K, stride_pn, stride_sn,
                  BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """Unpack and dequantize W[offs_n, offs_k] -> fp32 [BLOCK_N, BLOCK_K] (zero outside N x K)."""
    in_bounds = (offs_n[:, None] < N) & (offs_k[None, :] < K)  # [BN, BK]
    bit = (offs_k * BITS).to(tl.uint32)  # [BK] first bit of each value in the row's bitstream
    word = (bit // 32).to(tl.int32)
    shift = bit % 32
    row_ptr = packed_ptr + offs_n[:, None].to(tl.int64) * stride_pn  # [BN, 1]
    lo = tl.load(row_ptr + word[None, :], mask=in_bounds, other=0).to(tl.uint32, bitcast=True)
    if 32 % BITS == 0:  # 2/4/8 bits: a value never leaves its word
        u = (lo >> shift[None, :]) & ((1 << BITS) - 1)
    else:  # 3 bits: join the next word for values that straddle the boundary
        straddles = in_bounds & ((shift[None, :] + BITS) > 32)
        hi = tl.load(row_ptr + word[None, :] + 1, mask=straddles, other=0).to(tl.uint32, bitcast=True)
        joined = lo.to(tl.uint64) | (hi.to(tl.uint64) << 32)  # [BN, BK]
        u = ((joined >> shift[None, :].to(tl.uint64)) & ((1 << BITS) - 1)).to(tl.uint32)
    signed = u.to(tl.int32) - (1 << (BITS - 1))  # [BN, BK]
    scale_row_ptr = scale_ptr + offs_n[:, None].to(tl.int64) * stride_sn
    if GROUP % BLOCK_K == 0:  # the whole tile shares one scale column (tiles never straddle a group)
        scale = tl.load(scale_row_ptr + k_start // GROUP, mask=offs_n[:, None] < N, other=0.0)  # [BN, 1]
    else:
        scale = tl.load(scale_row_ptr + (offs_k // GROUP)[None, :], mask=in_bounds, other=0.0)  # [BN, BK]
    return signed.to(tl.float32) * scale.to(tl.float32)


@triton.jit
def _round_to_bf16(value):
    """fp32 -> nearest bf16 (ties to even), kept in fp32: the cast done with integer ops."""
    raw = value.to(tl.uint32, bitcast=True)
    rounded = ((raw + 0x7FFF + ((raw >> 16) & 1)) >> 16) << 16  # finite values only (all a weight can be)
    return rounded.to(tl.float32, bitcast=True)


@triton.jit
def _dequant_gemm_kernel(x_ptr, packed_ptr, scale_ptr, out_ptr, M, N, K, K_PER_SPLIT,
                         stride_xm, stride_xk, stride_pn, stride_sn, stride_os, stride_om,
                         BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """out[pid_k, m, n] = sum over this program's K slice of x[m, k] * W[n, k] (an fp32 partial when split)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    k_begin = pid_k * K_PER_SPLIT  # a multiple of BLOCK_K, so tiles stay group-aligned
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(k_begin, k_end, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)  # [BK]
        x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < k_end)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=x_mask, other=0.0)
        w = _dequant_tile(packed_ptr, scale_ptr, offs_n, offs_k, k_start, N, k_end, stride_pn, stride_sn,
                          BITS, GROUP, BLOCK_K)  # [BN, BK] fp32
        if EMULATE_BF16:  # interpreter only: its fp32->bf16 cast truncates and its bf16 tl.dot is wrong
            w = _round_to_bf16(w)
            x = x.to(tl.float32)
        else:
            w = w.to(x.dtype)  # the activation dtype, as the reference rounds it
        if BLOCK_M == 1:  # GEMV: multiply and reduce along K
            acc += tl.sum(x.to(tl.float32) * w.to(tl.float32), axis=1)[None, :]
        else:
            acc = tl.dot(x, tl.trans(w), acc)  # [BM, BN]
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and split for one launch (pick_config chooses; tests and benchmarks may override)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 2


def check_operands(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bits: int,
                   group_size: int) -> None:
    """Raise KernelInputError (one line) for anything the kernel cannot serve exactly."""
    if bits not in SUPPORTED_BITS:
        raise KernelInputError(f"{bits}-bit weights are not supported; use one of {SUPPORTED_BITS}")
    if x.dim() != 2 or packed.dim() != 2 or scales.dim() != 2:
        raise KernelInputError(f"expected x [M, K], packed [N, W], scales [N, G]; got {x.dim()}-D, "
                               f"{packed.dim()}-D, {scales.dim()}-D")
    if x.dtype not in ACTIVATION_DTYPES:
        raise KernelInputError(f"activations must be float16 or bfloat16, got {x.dtype}; cast x first")
    if packed.dtype != torch.int32:
        raise KernelInputError(f"packed weights must be int32 (compressed-tensors pack-quantized), got {packed.dtype}")
    if scales.dtype not in SCALE_DTYPES:
        raise KernelInputError(f"scales must be float16/bfloat16/float32, got {scales.dtype}")
    in_features, out_features = x.shape[1], packed.shape[0]
    if group_size not in SUPPORTED_GROUPS and group_size != in_features:
        raise KernelInputError(f"group size {group_size} is not supported; use 32/64/128 or per-channel "
                               f"(group = K = {in_features})")
    if in_features % group_size:
        raise KernelInputError(f"group size {group_size} does not divide K = {in_features}")
    if packed.shape[1] != packed_words(in_features, bits):
        raise KernelInputError(f"packed weight has {packed.shape[1]} words per row; K = {in_features} at "
                               f"{bits} bits needs {packed_words(in_features, bits)}")
    if tuple(scales.shape) != (out_features, in_features // group_size):
        raise KernelInputError(f"scales are {tuple(scales.shape)}, expected "
                               f"{(out_features, in_features // group_size)} for N = {out_features}, G = {group_size}")
    if len({x.device, packed.device, scales.device}) != 1:
        raise KernelInputError(f"operands are on different devices: {x.device}, {packed.device}, {scales.device}")
    if packed.stride(1) != 1 or scales.stride(1) != 1:
        raise KernelInputError("packed weights and scales must be contiguous along K; call .contiguous()")


def _block_k_for(group_size: int, preferred: int) -> int:
    """Largest K tile <= preferred that divides the group (so a tile has one scale column), else preferred."""
    for block_k in (preferred, 64, 32, 16):
        if block_k <= preferred and group_size % block_k == 0:
            return block_k
    return preferred


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: small, but still exercises split-K


def pick_config(m: int, n: int, k: int, group_size: int, device: torch.device) -> LaunchConfig:
    """Split-K GEMV for decode (M <= 16), tiled GEMM otherwise."""
    if m <= DECODE_MAX_M:
        block_m = 1 if m == 1 else 16
        block_n, block_k = 64, _block_k_for(group_size, 128)
        n_tiles, k_tiles = triton.cdiv(n, block_n), triton.cdiv(k, block_k)
        wanted = triton.cdiv(2 * _multiprocessors(device), n_tiles)  # ~2 programs per SM
        split_k = max(1, min(wanted, k_tiles, 16))
        return LaunchConfig(block_m, block_n, block_k, split_k, num_warps=4, num_stages=3)
    block_k = _block_k_for(group_size, 64)
    return LaunchConfig(64, 64, block_k, 1, num_warps=4, num_stages=3)


def mixed_gemm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
               config: LaunchConfig | None = None) -> torch.Tensor:
    """y = x @ W^T, x [M, K] fp16/bf16 -> [M, N] in x's dtype; W in pack-quantized form (module docstring)."""
    check_operands(x, packed, scales, bits, group_size)
    (m, k), n = x.shape, packed.shape[0]
    config = config or pick_config(m, n, k, group_size, x.device)
    if config.block_m == 1 and m != 1:
        raise KernelInputError(f"block_m = 1 serves M = 1 only, got M = {m}")
    tiles_per_split = triton.cdiv(triton.cdiv(k, config.block_k), config.split_k)
    k_per_split = tiles_per_split * config.block_k
    split_k = triton.cdiv(k, k_per_split)  # drop empty splits
    emulate_bf16 = _interpreting() and x.dtype == torch.bfloat16
    partial_dtype = torch.float32 if split_k > 1 or emulate_bf16 else x.dtype
    out = torch.empty((split_k, m, n), dtype=partial_dtype, device=x.device)  # [S, M, N]
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), split_k)
    _dequant_gemm_kernel[grid](
        x, packed, scales, out, m, n, k, k_per_split,
        x.stride(0), x.stride(1), packed.stride(0), scales.stride(0), out.stride(0), out.stride(1),
        BITS=bits, GROUP=group_size, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        EMULATE_BF16=emulate_bf16, num_warps=config.num_warps, num_stages=config.num_stages)
    return out[0].to(x.dtype) if split_k == 1 else out.sum(dim=0).to(x.dtype)  # [M, N]


__all__ = ["mixed_gemm", "check_operands", "pick_config", "LaunchConfig", "KernelInputError", "DECODE_MAX_M"]
