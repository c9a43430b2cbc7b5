"""Vectorized scale search for llama.cpp's k-quants (Q2_K ... Q6_K), in PyTorch.

A k-quant super-block holds 256 weights split into sub-blocks of 16 or 32, each with its own small integer
scale (6-bit, or 4-bit for Q2_K; int8 for Q6_K) times one fp16 super-block scale `d`; the affine types
(Q2_K, Q4_K, Q5_K) add a sub-block min times an fp16 `dmin` (w = d*sc*q - dmin*m). Layouts:
llama.cpp `ggml/src/ggml-common.h` (block_q2_K ... block_q6_K).

The search follows the idea of llama.cpp's `make_qkx2_quants` (affine) and `make_qx_quants` (symmetric):
try a fan of candidate inverse scales around the naive one, round, refit scale (and min) by weighted least
squares, keep the candidate with the lowest weighted error. Here it runs on all sub-blocks at once:
candidates are a leading tensor dimension instead of a loop. Then the sub-block scales are themselves
quantized against the super-block maximum. The result fixes the grid; rounding onto it is the caller's job
(`ggml_grids.KQuantGrid.quantize_columns`), so RTN and GPTQ share it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPER_BLOCK = 256
_CHUNK_SUB_BLOCKS = 4096  # sub-blocks searched per step (bounds memory: candidates x chunk x sub)


@dataclass(frozen=True)
class KQuantSearch:
    """Search settings of one k-quant type (values after llama.cpp's quantize_row_*_ref)."""

    nmax: int  # affine: codes 0..nmax; symmetric: codes -nmax..nmax-1
    sub: int  # weights per sub-block
    scale_levels: int  # max integer sub-scale (63 for 6-bit, 15 for Q2_K's 4-bit, 127/128 for Q6_K's int8)
    affine: bool
    rmin: float = -1.0  # affine candidate fan: iscale = (nmax + rmin + rdelta * i) / range, i = 0..nstep
    rdelta: float = 0.1
    nstep: int = 20


KQUANT_SEARCH = {
    "q2_k": KQuantSearch(nmax=3, sub=16, scale_levels=15, affine=True, rmin=-0.5, rdelta=0.1, nstep=15),
    "q3_k": KQuantSearch(nmax=4, sub=16, scale_levels=32, affine=False),
    "q4_k": KQuantSearch(nmax=15, sub=32, scale_levels=63, affine=True, rmin=-1.0, rdelta=0.1, nstep=20),
    "q5_k": KQuantSearch(nmax=31, sub=32, scale_levels=63, affine=True, rmin=-0.5, rdelta=0.1, nstep=15),
    "q6_k": KQuantSearch(nmax=32, sub=16, scale_levels=128, affine=False),
}


def _search_affine(x: torch.Tensor, weights: torch.Tensor, cfg: KQuantSearch) -> tuple[torch.Tensor, torch.Tensor]:
    """Best (scale >= 0, neg_min >= 0) per sub-block x [M, g] so that x ~ scale * q - neg_min, q in 0..nmax."""
    xmin = x.amin(dim=-1).clamp(max=0)  # [M]
    span = x.amax(dim=-1) - xmin  # [M]
    steps = cfg.nmax + cfg.rmin + cfg.rdelta * torch.arange(cfg.nstep + 1, dtype=torch.float32, device=x.device)  # [S]
    iscale = steps[:, None] / span.clamp(min=1e-30)[None, :]  # [S, M]
    levels = iscale[..., None] * (x - xmin[:, None])[None]  # [S, M, g], rounded in place below
    levels.round_().clamp_(0, cfg.nmax)
    w = weights[None]  # [1, M, g]
    w_levels = w * levels  # [S, M, g]
    sum_w, sum_x, sum_x2 = w.sum(-1), (w * x).sum(-1), (w * x * x).sum(-1)  # [1, M]
    sum_l = w_levels.sum(-1)  # [S, M]
    sum_l2 = torch.linalg.vecdot(w_levels, levels)  # [S, M]
    sum_xl = torch.linalg.vecdot(w_levels, x[None].expand_as(levels))
    det = sum_w * sum_l2 - sum_l**2
    safe_det = torch.where(det > 0, det, torch.ones_like(det))
    scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
    offset = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det  # the fitted min (<= 0 wanted)
    clipped = offset > 0  # a positive min cannot be stored: refit the scale alone with min = 0
    scale = torch.where(clipped, sum_xl / sum_l2.clamp(min=1e-30), scale).clamp(min=0)
    offset = torch.where(clipped, torch.zeros_like(offset), offset)
    # sum w (scale*L + offset - x)^2, expanded so no [S, M, g] temporary is needed
    err = (scale**2 * sum_l2 + offset**2 * sum_w + sum_x2 + 2 * scale * offset * sum_l
           - 2 * scale * sum_xl - 2 * offset * sum_x)
    err = torch.where(det > 0, err, torch.full_like(err, float("inf")))
    best = err.argmin(dim=0, keepdim=True)  # [1, M]
    scale, offset = scale.gather(0, best)[0], offset.gather(0, best)[0]
    flat = span <= 0  # constant sub-block: all codes 0, w = -neg_min
    return torch.where(flat, 0.0, scale), torch.where(flat, -xmin, -offset)


def _search_symmetric(x: torch.Tensor, weights: torch.Tensor, cfg: KQuantSearch) -> torch.Tensor:
    """Best signed scale per sub-block x [M, g] so that x ~ scale * q, q in -nmax..nmax-1."""
    extreme = x.gather(-1, x.abs().argmax(dim=-1, keepdim=True))[:, 0]  # [M] signed value of max |x|
    steps = cfg.nmax + 0.1 * torch.arange(-9, 10, dtype=torch.float32, device=x.device)  # [S]
    safe_extreme = torch.where(extreme == 0, torch.ones_like(extreme), extreme)
    iscale = -steps[:, None] / safe_extreme[None, :]  # [S, M]
    levels = iscale[..., None] * x[None]  # [S, M, g], rounded in place below
    levels.round_().clamp_(-cfg.nmax, cfg.nmax - 1)
    w_levels = weights[None] * levels
    sum_xl = torch.linalg.vecdot(w_levels, x[None].expand_as(levels))  # [S, M]
    sum_l2 = torch.linalg.vecdot(w_levels, levels)
    gain = torch.where(sum_l2 > 0, sum_xl**2 / sum_l2.clamp(min=1e-30), torch.zeros_like(sum_l2))
    best = gain.argmax(dim=0, keepdim=True)  # max gain = min weighted error
    scale = (sum_xl / sum_l2.clamp(min=1e-30)).gather(0, best)[0]
    return torch.where(extreme == 0, 0.0, scale)


def _sub_block_weights(x: torch.Tensor, type_name: str) -> torch.Tensor:
    """Importance of each weight in the scale search (llama.cpp's choices for the reference quantizers)."""
    if type_name in ("q4_k", "q5_k"):
        return x.abs() + x.pow(2).mean(dim=-1, keepdim=True).sqrt()
    if type_name == "q2_k":
        return x.abs()
    return x.pow(2)  # q3_k, q6_k: rmse weighting


def search_sub_block_scales(w: torch.Tensor, type_name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float sub-block scales [N, C // sub] (and affine neg-mins) for a weight chunk w [N, C], C % 256 == 0."""
    cfg = KQUANT_SEARCH[type_name]
    rows, cols = w.shape
    x = w.float().reshape(-1, cfg.sub)  # [M, g], M = N * C / sub
    scales, mins = [], []
    for start in range(0, x.shape[0], _CHUNK_SUB_BLOCKS):
        chunk = x[start:start + _CHUNK_SUB_BLOCKS]
        weights = _sub_block_weights(chunk, type_name)
        if cfg.affine:
            scale, neg_min = _search_affine(chunk, weights, cfg)
            mins.append(neg_min)
        else:
            scale = _search_symmetric(chunk, weights, cfg)
        scales.append(scale)
    shape = (rows, cols // cfg.sub)
    return torch.cat(scales).reshape(shape), (torch.cat(mins).reshape(shape) if cfg.affine else None)


def quantize_scales_unsigned(values: torch.Tensor, levels: int,
                             per_super: int) -> tuple[torch.Tensor, torch.Tensor]:
    """values [N, S] >= 0, `per_super` per super-block -> (fp16 super scale [N, B], uint8 ints [N, S]).

    The super scale is max / levels rounded to fp16; each value becomes round(v / d) in 0..levels."""
    rows, n_sub = values.shape
    grouped = values.reshape(rows, -1, per_super)  # [N, B, s]
    d = (grouped.amax(dim=-1) / levels).to(torch.float16)  # [N, B]
    d32 = d.float()[..., None]
    ints = torch.where(d32 > 0, torch.round(grouped / torch.where(d32 > 0, d32, 1.0)), 0.0)
    return d, ints.clamp(0, levels).reshape(rows, n_sub).to(torch.uint8)


def quantize_scales_signed(values: torch.Tensor, levels: int,
                           per_super: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed values [N, S] -> (fp16 super scale [N, B], int8 ints in -levels..levels-1 [N, S]).

    As in llama.cpp, the value of largest magnitude maps to -levels (the wider end of the int range)."""
    rows, n_sub = values.shape
    grouped = values.reshape(rows, -1, per_super)  # [N, B, s]
    extreme = grouped.gather(-1, grouped.abs().argmax(dim=-1, keepdim=True))[..., 0]  # [N, B]
    d = (-extreme / levels).to(torch.float16)  # [N, B]
    d32 = d.float()[..., None]
    ints = torch.where(d32 != 0, torch.round(grouped / torch.where(d32 != 0, d32, 1.0)), 0.0)
    return d, ints.clamp(-levels, levels - 1).reshape(rows, n_sub).to(torch.int8)
