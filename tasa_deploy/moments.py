"""Second moments of linear-layer inputs, H = E[x x^T], kept in the cheaper of two exact forms.

The profile charges each unit tr(dW H dW^T) for its rounding error dW [N, K] (`output_error_energy`). With the
full Gram H [K, K] that costs 2 N K^2 flops and K^2 floats per input and objective: at Llama-3-8B's 14336-wide
down_proj input 0.8 GB and 1.7 TFLOP per candidate width, whatever the probe size. A profile sees few probe
tokens (n of a few thousand, often < K), so while n <= K the moment is kept as its scaled rows R = X / sqrt(n)
(H = R^T R, n K floats) and tr(dW H dW^T) = ||dW R^T||_F^2 costs N K n; past K rows it folds into the Gram.
Both forms give the same number (tested).
"""

from __future__ import annotations

import torch


class SecondMoment:
    """E[x x^T] over the rows added so far (float32 accumulation, float64 results)."""

    def __init__(self, in_features: int):
        self.in_features = in_features
        self.rows: list[torch.Tensor] = []  # raw rows [n_i, K] while their total is <= K
        self.gram: torch.Tensor | None = None  # sum of x x^T [K, K] once it is not
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Fold input rows x [n, K] in."""
        x = x.reshape(-1, self.in_features).float()
        if self.gram is None and self.count + x.shape[0] <= self.in_features:
            self.rows.append(x)
        else:
            if self.gram is None:
                self.gram = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=x.device)
                for r in self.rows:
                    self.gram += r.T @ r
                self.rows = []
            self.gram += x.T @ x
        self.count += x.shape[0]

    def matrix(self) -> torch.Tensor:
        """H [K, K] itself (tests, small inputs)."""
        if self.gram is not None:
            return self.gram / max(self.count, 1)
        rows = torch.cat(self.rows) if self.rows else torch.zeros(0, self.in_features)
        return rows.T @ rows / max(self.count, 1)

    def energy(self, delta: torch.Tensor, outer: torch.Tensor | None = None) -> float:
        """tr(delta H delta^T) for delta [N, K]; `outer` = delta^T delta may be passed in when shared."""
        if self.count == 0:
            return 0.0
        if self.gram is None:
            projected = delta.float() @ torch.cat(self.rows).T  # [N, n]
            return float((projected.double() ** 2).sum()) / self.count
        outer = delta.float().T @ delta.float() if outer is None else outer
        return float((self.gram * outer).sum(dtype=torch.float64)) / self.count


class InputHessian:
    """GPTQ's H = 2/n sum x x^T of one linear input (`quant.gptq.accumulate_hessian`), held as the raw rows
    while they number at most K and folded into the K x K matrix past that. The mixture search sees few tokens
    per source (8 x 256 by default) against widths of 4096-28672 at 8B-70B, where the rows are a fraction of
    the matrix (`mix.trace_spectrum_rows` works from them directly). Once folded, the accumulation is the same
    sequence of `accumulate_hessian` calls as without the rows stage, so the matrix is bit-identical."""

    def __init__(self, in_features: int):
        self.in_features = in_features
        self.rows: list[torch.Tensor] = []  # float32 [n_i, K] batches while their total is <= K
        self.hessian: torch.Tensor | None = None  # [K, K] float32 once it is not
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        from tasa_deploy.quant.gptq import accumulate_hessian

        x = x.detach().reshape(-1, self.in_features).float()  # [n, K]
        if self.hessian is None and self.count + x.shape[0] <= self.in_features:
            self.rows.append(x)
            self.count += x.shape[0]
            return
        if self.hessian is None:
            self.hessian, self.count = self._fold()
        self.hessian, self.count = accumulate_hessian(self.hessian, self.count, x)

    def _fold(self) -> tuple[torch.Tensor, int]:
        from tasa_deploy.quant.gptq import accumulate_hessian, make_empty_hessian

        hessian, seen = make_empty_hessian(self.in_features, self.rows[0].device if self.rows else None), 0
        for rows in self.rows:
            hessian, seen = accumulate_hessian(hessian, seen, rows)
        self.rows = []
        return hessian, seen

    @property
    def is_rows(self) -> bool:
        return self.hessian is None

    def matrix(self) -> torch.Tensor:
        """H [K, K] (folding the rows, if still held)."""
        if self.hessian is None:
            self.hessian, self.count = self._fold()
        return self.hessian

    def scaled_rows(self) -> torch.Tensor:
        """R [n, K] with R^T R = H (rows form only)."""
        if self.hessian is not None:
            raise ValueError("the rows were folded into the matrix")
        rows = torch.cat(self.rows) if self.rows else torch.zeros(0, self.in_features)
        return rows * (2.0 / max(self.count, 1)) ** 0.5
