"""GPTQ (Frantar et al., 2022, arXiv 2210.17323) as three pure functions, after llm-compressor's split.

  make_empty_hessian(K)                       -> H [K, K] zeros
  accumulate_hessian(H, n_seen, x)            -> (H', n_seen')   running mean of 2 x^T x over tokens
  quantize_weight(w, H, spec, ...)            -> (QuantizedTensor, weighted squared error)

The rounding grid comes from `tasa_deploy.quant.grids`, so the same loop rounds onto the int g128 grid (vLLM)
or a GGML block grid (llama.cpp). Group parameters are fitted when the sweep reaches a group, from the
already-updated weights (standard GPTQ); with act-order they are fitted up front from the original weights
("static groups") so the stored group layout stays in input order.
"""

from __future__ import annotations

import warnings

import torch

from tasa_deploy import TasaError
from tasa_deploy.quant.grids import get_grid
from tasa_deploy.quant.spec import QuantSpec
from tasa_deploy.quant.tensor import QuantizedTensor


def make_empty_hessian(in_features: int, device: torch.device | str | None = None) -> torch.Tensor:
    """H accumulates in float32 whatever the weight dtype (bf16 sums of x x^T lose the small directions)."""
    return torch.zeros(in_features, in_features, dtype=torch.float32, device=device)


def accumulate_hessian(hessian: torch.Tensor, n_seen: int, inputs: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Fold a batch of layer inputs [..., K] into the running H = 2/n * sum x x^T."""
    x = inputs.reshape(-1, inputs.shape[-1]).float()  # [T, K]
    n_new = n_seen + x.shape[0]
    x = x * (2.0 / n_new) ** 0.5
    return hessian * (n_seen / n_new) + x.T @ x, n_new


def _inverse_hessian_cholesky(hessian: torch.Tensor, damp: float, attempts: int = 5) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after dampening H by `damp` times its mean diagonal.

    An ill-conditioned H (too few calibration tokens, duplicated inputs) gets more damping per failed attempt
    (damp x mean diagonal x 1, 10, 100, ... added), with a warning; after `attempts` failures the module cannot
    be GPTQ-quantized and TasaError says so. A factor that failed is never used."""
    h = hessian.clone()
    h.diagonal().add_(damp * torch.mean(torch.diag(hessian)))  # H + damp mean(diag) I, float32, no K x K identity
    for attempt in range(attempts):
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            h_inv = torch.cholesky_inverse(chol)
            del chol
            chol_inv, info = torch.linalg.cholesky_ex(h_inv, upper=True)
            if int(info) == 0:
                if attempt:
                    warnings.warn(f"GPTQ: the Hessian needed {attempt} extra damping step(s) (x10 each) beyond "
                                  f"damp={damp:g} to factor; more calibration tokens would help", RuntimeWarning,
                                  stacklevel=3)
                return chol_inv
        h.diagonal().add_(damp * torch.mean(torch.diag(h)) * 10**attempt)  # ill-conditioned: damp more
    raise TasaError(f"GPTQ: the Hessian is not positive definite after {attempts} damping steps from damp={damp:g} "
                    f"(mean diagonal {float(torch.mean(torch.diag(hessian))):.3g}); the calibration data may be "
                    "degenerate (too few tokens or constant inputs); add calibration samples or use --quantizer rtn")


def quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, *, damp: float = 0.01,
                    act_order: bool = False, block_size: int = 128) -> tuple[QuantizedTensor, float]:
    """GPTQ-quantize `weight` [N, K] given the input Hessian [K, K]; returns the tensor and sum of squared
    (H-weighted) rounding errors, the quantity GPTQ minimizes greedily."""
    grid = get_grid(spec.fmt)
    rows, cols = weight.shape
    fit_cols = grid.block_columns(spec, cols)
    block_size = max(block_size, fit_cols) // fit_cols * fit_cols  # fitted chunks never straddle blocks
    w = weight.detach().float().clone()  # [N, K]
    h = hessian.detach().float().clone()  # [K, K]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols, device=h.device)
    static_params = grid.fit(w, spec) if act_order else None
    if act_order:
        w, h = w[:, perm], h[perm][:, perm]
    h_inv = _inverse_hessian_cholesky(h, damp)  # [K, K] upper
    del h
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=w.device)
    fitted: list = []
    total_error = 0.0
    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        w_block = w[:, start:stop].clone()  # [N, B]
        err_block = torch.zeros_like(w_block)
        h_inv_block = h_inv[start:stop, start:stop]
        params, param_start = None, 0
        for i in range(stop - start):
            col = start + i
            if static_params is not None:
                params, offset = static_params, int(perm[col])
            else:
                if col % fit_cols == 0:
                    params, param_start = grid.fit(w_block[:, i:i + fit_cols], spec), col
                    fitted.append(params)
                offset = col - param_start
            q, w_hat = grid.quantize_columns(w_block[:, i:i + 1], params, spec, offset)
            codes[:, col] = q[:, 0]
            d = h_inv_block[i, i]
            err = (w_block[:, i] - w_hat[:, 0]) / d  # [N]
            total_error += float((err**2).sum())
            w_block[:, i:] -= err[:, None] * h_inv_block[i, i:][None, :]
            err_block[:, i] = err
        w[:, stop:] -= err_block @ h_inv[start:stop, stop:]
    codes = codes[:, torch.argsort(perm)]
    params = static_params if static_params is not None else _concat_params(fitted)
    return grid.assemble(spec, codes, params), total_error


def _concat_params(chunks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([chunk[key] for chunk in chunks], dim=1) for key in chunks[0]}
