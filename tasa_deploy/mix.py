"""Training-free search for the calibration mixture (TASA stage 1, arXiv 2607.00908).

A candidate mixture D_alpha draws a share `alpha` of its calibration samples from general data D_g
(default: LAMBADA prose; never the WikiText-2 test text used for perplexity) and 1 - alpha from task data
D_t (default: GSM8K train + ARC validation). Each candidate on the grid is scored without any training:

(a) Gradient-trace alignment. For every decoder block, the cosine between the gradient of the loss on D_alpha
    and the gradient of the loss on a held-out task probe set (data role "probe", disjoint from "calib"),
    taken over the block's linear weights; averaged over blocks. Higher is better.
    We define the loss on D_alpha as the alpha-weighted mix of the two per-source mean losses,
    L_alpha = alpha L_gen + (1 - alpha) L_task, i.e. the expected loss under the mixture distribution.
    Gradients are linear in the loss, so g_alpha = alpha g_gen + (1 - alpha) g_task exactly: one backward
    walk over D_g, D_t and the probe set (`stream.stream_block_stats`, a block at a time) serves the whole
    grid, and each cosine follows from six per-block dot products (see `alignment_from_dots`). The
    full-model autograd reference the streamed statistics are tested against is tests/mix_reference.py.

(b) The Hessian-trace proxy f(alpha) = sum over linear inputs of tr(H_test H_alpha^-1), with
    H_alpha = alpha H_gen + (1 - alpha) H_task the layer-input Gram matrices (GPTQ's H = 2/n X^T X) and
    H_test the probe set's. Damping adds `damp` times the mean diagonal to H_gen and H_task before mixing,
    so H_alpha stays affine in alpha and f stays convex (the matrix inverse is operator convex; the paper
    proves strict convexity: a bias-variance trade-off between task match and sample diversity).
    q/k/v and gate/up read the same input, so one Gram per vLLM fused group input (qkv, o, gate_up, down)
    is collected, during the same block recomputations as (a). Lower is better. Each term is scale-free (it is
    K when the distributions match), so terms of different layers add up without normalization.
    When the calibration tokens are fewer than K (large hidden sizes, few rows) the Gram matrices are
    rank-deficient and the trace is taken inside the span of the data (see `trace_spectrum`).

Choice of alpha*: the two scores live on incomparable scales (a cosine vs. a trace in [K, inf)), so each is
standardized over the grid and combined = z(alignment) - z(log f); alpha* = argmax combined (ties: the first
candidate in grid order). log f because f is a ratio of curvatures that grows multiplicatively toward a
mismatched endpoint. Every score is kept in the returned `CalibrationMix`, so the choice is auditable.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Iterable, Sequence

import torch

from tasa_deploy import TasaError, UsageError
from tasa_deploy.artifacts import CalibrationMix, MixScore
from tasa_deploy.model import decoder_blocks, model_fingerprint
from tasa_deploy.stream import stream_block_stats

DEFAULT_TASKS = ("gsm8k", "arc_easy", "arc_challenge")
DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
DOT_CHUNK = 1 << 22  # gradient entries per float64 chunk in block_dots
COMBINATION = "z(grad_alignment) - z(log hessian_trace), argmax; ties -> first in grid order"


# ----------------------------------------------------------------------------------------- validation
def check_mix_inputs(general: str, tasks: Sequence[str], alphas: Sequence[float], n_samples: int = 1,
                     seq_len: int = 2, known: Iterable[str] | None = None) -> None:
    """Raise UsageError (one line) for an unusable mixture search request."""
    if known is None:
        from tasa_deploy.data import DATASETS
        known = DATASETS
    known = sorted(known)
    if not tasks:
        raise UsageError(f"no task data given; pass at least one task source (one of: {', '.join(known)})")
    for name in (general, *tasks):
        if name not in known:
            raise UsageError(f"unknown data source '{name}'; choose from: {', '.join(known)}")
    if len(set(tasks)) != len(tasks):
        raise UsageError(f"task sources are repeated in {list(tasks)}; list each task once")
    if not alphas:
        raise UsageError("the alpha grid is empty; pass at least one alpha in [0, 1]")
    bad = [a for a in alphas if not (isinstance(a, (int, float)) and 0.0 <= a <= 1.0)]
    if bad:
        raise UsageError(f"alphas must lie in [0, 1] (alpha = share of general data); got {bad}")
    if len(set(alphas)) != len(alphas):
        raise UsageError(f"the alpha grid {list(alphas)} repeats a value; list each alpha once")
    if n_samples < 1 or seq_len < 2:
        raise UsageError(f"need n_samples >= 1 and seq_len >= 2 (got {n_samples}, {seq_len})")


# ----------------------------------------------------------------------------------------- (a) alignment
def block_dots(g: torch.Tensor, t: torch.Tensor, p: torch.Tensor) -> tuple[float, ...]:
    """The six dot products of one block's general, task and probe gradients [P_b] that every cosine on the
    alpha grid needs: (<g,g>, <t,t>, <g,t>, <g,p>, <t,p>, <p,p>), in float64."""
    sums = [0.0] * 6
    for start in range(0, g.numel(), DOT_CHUNK):  # float64 a chunk at a time: no float64 copy of a whole block
        a, b, c = (v[start:start + DOT_CHUNK].double() for v in (g, t, p))
        for i, value in enumerate((a @ a, b @ b, a @ b, a @ c, b @ c, c @ c)):
            sums[i] += float(value)
    return tuple(sums)


def alignment_from_dots(dots: Sequence[tuple[float, ...]], alphas: Sequence[float]) -> list[float]:
    """Mean over blocks of cos(g_alpha, g_probe) for each alpha, from each block's `block_dots`:
    <g_alpha, p> = a<g,p> + b<t,p>,  |g_alpha|^2 = a^2<g,g> + 2ab<g,t> + b^2<t,t>   (a = alpha, b = 1 - alpha)."""
    scores = []
    for a in alphas:
        b = 1.0 - a
        cosines = []
        for gg, tt, gt, gp, tp, pp in dots:
            norm_sq = a * a * gg + 2 * a * b * gt + b * b * tt
            if norm_sq <= 0 or pp <= 0:
                raise TasaError(f"zero gradient at alpha={a}: the model's linear weights get no gradient; "
                                "check that the model is trainable in float32")
            cosines.append((a * gp + b * tp) / math.sqrt(norm_sq * pp))
        scores.append(sum(cosines) / len(cosines))
    return scores


def alignment_over_grid(gen: Sequence[torch.Tensor], task: Sequence[torch.Tensor], probe: Sequence[torch.Tensor],
                        alphas: Sequence[float]) -> list[float]:
    """`alignment_from_dots` over per-block gradient lists."""
    return alignment_from_dots([block_dots(g, t, p) for g, t, p in zip(gen, task, probe)], alphas)


# ----------------------------------------------------------------------------------------- (b) Hessian trace
def damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp * mean(diag H) * I in float64 (GPTQ's relative damping)."""
    h = hessian.double()  # [K, K]
    return h + damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=torch.float64)


def trace_of_inverse_product(h_test: torch.Tensor, h_alpha: torch.Tensor, alpha: float) -> float:
    """tr(H_test H_alpha^-1) via a Cholesky solve (float64; cheaper than forming the inverse)."""
    chol, info = torch.linalg.cholesky_ex(h_alpha)  # [K, K] lower
    if int(info) != 0:
        raise TasaError(f"the mixed Hessian at alpha={alpha} is not positive definite; raise damp")
    return float(torch.diagonal(torch.cholesky_solve(h_test, chol)).sum())


def hessian_trace_proxy(h_test: torch.Tensor, h_gen: torch.Tensor, h_task: torch.Tensor, alpha: float,
                        damp: float) -> float:
    """tr(H_test H_alpha^-1) for one linear input, H_alpha = alpha damped(H_gen) + (1-alpha) damped(H_task)."""
    h_alpha = alpha * damped(h_gen, damp) + (1.0 - alpha) * damped(h_task, damp)  # [K, K]
    return trace_of_inverse_product(h_test.double(), h_alpha, alpha)


def data_span(h_gen: torch.Tensor, h_task: torch.Tensor, rel_tol: float = 1e-8,
              rank_bound: int | None = None) -> torch.Tensor:
    """Orthonormal basis [K, r] of range(H_gen + H_task): the input directions either calibration source
    reaches (r <= tokens of both sources together).

    With `rank_bound` (the token count) well below K, a randomized range finder replaces the K x K eigh:
    Q = orth((H_gen + H_task) Omega) for a seeded Gaussian Omega [K, rank_bound + 16] spans the range exactly
    (the rank is at most rank_bound; checked: tr(Q'HQ) must equal tr(H), else the full eigh runs), then the
    small eigh of Q' H Q (float64) drops the rounding-noise directions with the same threshold. The K x K work
    stays in the Grams' dtype (float32 from the model), so no float64 copy of a K x K matrix is made. Cost K^2 r instead of ~9 K^3: at K = 14336 (Llama-3-8B's down_proj input) seconds,
    not minutes."""
    h = h_gen + h_task  # [K, K] in the Grams' own dtype: no float64 copy of a K x K matrix
    size = h.shape[0]
    if rank_bound is not None and rank_bound + 16 < size:
        generator = torch.Generator(device=h.device).manual_seed(0)
        omega = torch.randn(size, rank_bound + 16, generator=generator, dtype=h.dtype, device=h.device)
        q, _ = torch.linalg.qr(h @ omega)  # [K, m]
        values, vectors = torch.linalg.eigh((q.T @ h @ q).double())  # [m], ascending
        if float(values.clamp(min=0).sum()) >= (1 - 1e-6) * float(torch.trace(h.double())):  # PSD: all captured
            return q @ vectors[:, _kept(values, rel_tol, rank_bound)].to(h.dtype)
        # the rank exceeded the bound (not from `rank_bound` tokens): fall back to the full eigendecomposition,
        # where the bound, wrong, does not apply
    values, vectors = torch.linalg.eigh(h.double())  # ascending
    return vectors[:, _kept(values, rel_tol, None)].to(h.dtype)


def _kept(values: torch.Tensor, rel_tol: float, rank_bound: int | None) -> torch.Tensor:
    """Eigen-directions (ascending `values`) of the data span: above the relative threshold and, the rank being
    at most the token count, the top `rank_bound` only: a float32 Gram's rounding leaves eigenvalues near 1e-7
    of the largest on directions no token reaches, which the threshold alone would keep."""
    keep = values > rel_tol * values[-1].clamp(min=1e-300)
    if rank_bound is not None and int(keep.sum()) > rank_bound:
        keep[: len(values) - rank_bound] = False
    return keep


def trace_spectrum(h_test: torch.Tensor, h_gen: torch.Tensor, h_task: torch.Tensor, damp: float,
                   data_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One factorization of a linear input that serves every alpha: (c, lam) [r] with
    f(alpha) = tr(H_test H_alpha^-1) = sum_i c_i / (alpha lam_i + 1 - alpha)   (`traces_from_spectrum`).

    With A = damped(H_task) = L L^T and B = damped(H_gen): H_alpha = alpha B + (1 - alpha) A
    = L V (alpha Lam + (1 - alpha) I) V^T L^T, where L^-1 B L^-T = V Lam V^T (a generalized symmetric
    eigenproblem of (B, A); Lam > 0 since B is positive definite). So H_alpha^-1 = W (alpha Lam + 1 - alpha)^-1
    W^T with W = L^-T V, and c = diag(W^T H_test W). One Cholesky + one eigh per input, however fine the grid.

    Rank-deficient inputs (data_tokens, the calibration tokens of both sources, below K): H_gen and H_task
    then vanish on every direction outside the data span S, so there H_alpha is only its damping and the
    full-space trace adds tr(P_perp H_test) / damping(alpha), a term set by the damping constant, not by the
    data, that would swamp the rest. The proxy is therefore taken inside S: every matrix is projected onto an
    orthonormal basis U of S (`data_span`), damping relative to the projected diagonals. With full-rank data
    S is the whole space and the result is the full-space trace exactly."""
    if damp <= 0:
        raise UsageError(f"damp must be > 0 (got {damp}); H_gen or H_task alone may be singular")
    if data_tokens is not None and data_tokens < h_test.shape[0]:  # project first, in the Grams' dtype
        basis = data_span(h_gen, h_task, rank_bound=data_tokens)  # [K, r]
        h_test, h_gen, h_task = (basis.T @ h @ basis for h in (h_test, h_gen, h_task))  # [r, r]
    h_test, h_gen, h_task = h_test.double(), h_gen.double(), h_task.double()
    chol, info = torch.linalg.cholesky_ex(damped(h_task, damp))  # A = L L^T
    if int(info) != 0:
        raise TasaError("the damped task Gram matrix is not positive definite; raise damp")
    inv_l = torch.linalg.solve_triangular(chol, torch.eye(chol.shape[0], dtype=chol.dtype, device=chol.device),
                                          upper=False)  # L^-1
    lam, vectors = torch.linalg.eigh(inv_l @ damped(h_gen, damp) @ inv_l.T)
    if float(lam.min()) <= 0:
        raise TasaError("the damped general Gram matrix is not positive definite; raise damp")
    w = inv_l.T @ vectors  # [r, r]
    c = torch.einsum("ki,kl,li->i", w, h_test, w)  # diag(W^T H_test W)
    return c, lam


def input_spectrum(test, gen, task, damp: float, data_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`trace_spectrum` of one input given as `moments.InputHessian`s: from the rows when every source still
    holds them and the data span is narrower than K (no K x K matrix is ever formed), else from the matrices."""
    in_features = test.in_features
    if test.is_rows and gen.is_rows and task.is_rows and gen.count + task.count < in_features:
        return trace_spectrum_rows(test.scaled_rows(), gen.scaled_rows(), task.scaled_rows(), damp)
    return trace_spectrum(test.matrix(), gen.matrix(), task.matrix(), damp, data_tokens)


def trace_spectrum_rows(r_test: torch.Tensor, r_gen: torch.Tensor, r_task: torch.Tensor, damp: float,
                        rel_tol: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """`trace_spectrum` from rows R [n, K] with H = R^T R, for data narrower than K: the span of the data is
    the row space of M = [R_gen; R_task], whose orthonormal basis U = M^T V S^-1/2 comes from the small eigh
    of M M^T = V S V^T (m x m, float64; the same relative threshold as `data_span`); the projected matrices are
    (R U)^T (R U). Equal to the matrix path up to rounding (tested): the projected trace does not depend on
    the basis chosen for the span, and the damping is relative to the projected diagonal's mean."""
    stacked = torch.cat([r_gen, r_task])  # [m, K]
    values, vectors = torch.linalg.eigh((stacked @ stacked.T).double())  # [m], ascending
    keep = _kept(values, rel_tol, None)
    basis = (stacked.T.double() @ (vectors[:, keep] / values[keep].sqrt())).to(stacked.dtype)  # [K, r]
    h_test, h_gen, h_task = ((r @ basis).double() for r in (r_test, r_gen, r_task))  # [n, r]
    return trace_spectrum(h_test.T @ h_test, h_gen.T @ h_gen, h_task.T @ h_task, damp)


def traces_from_spectrum(c: torch.Tensor, lam: torch.Tensor, alphas: Sequence[float]) -> list[float]:
    return [float((c / (a * lam + (1.0 - a))).sum()) for a in alphas]


def hessian_trace_over_grid(test: dict[str, torch.Tensor], gen: dict[str, torch.Tensor],
                            task: dict[str, torch.Tensor], alphas: Sequence[float], damp: float,
                            data_tokens: int | None = None) -> list[float]:
    """f(alpha) = sum over linear inputs of tr(H_test H_alpha^-1), for each alpha (`trace_spectrum` per input,
    one input at a time, so only one set of float64 copies is alive)."""
    if damp <= 0:
        raise UsageError(f"damp must be > 0 (got {damp}); H_gen or H_task alone may be singular")
    missing = sorted(set(test) ^ set(gen) | set(test) ^ set(task))
    if missing:
        raise TasaError(f"Gram matrices do not cover the same linear inputs: {missing[:3]}")
    totals = [0.0] * len(alphas)
    for name in test:
        c, lam = trace_spectrum(test[name], gen[name], task[name], damp, data_tokens)
        totals = [t + f for t, f in zip(totals, traces_from_spectrum(c, lam, alphas))]
    return totals


# ----------------------------------------------------------------------------------------- combination
def zscores(values: Sequence[float]) -> list[float]:
    """(v - mean) / std over the grid (population std); all zeros when the values do not vary."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    if std <= 1e-12 * max(1.0, abs(mean)):
        return [0.0] * len(values)
    return [(v - mean) / std for v in values]


def combine_scores(alignments: Sequence[float], traces: Sequence[float]) -> list[float]:
    """combined = z(alignment) - z(log f) over the grid (higher = better)."""
    return [za - zf for za, zf in zip(zscores(alignments), zscores([math.log(f) for f in traces]))]


def score_grid(alphas: Sequence[float], alignments: Sequence[float], traces: Sequence[float]) -> tuple[MixScore, ...]:
    combined = combine_scores(alignments, traces)
    return tuple(MixScore(float(a), float(al), float(f), float(c))
                 for a, al, f, c in zip(alphas, alignments, traces, combined))


def choose_alpha(scores: Sequence[MixScore]) -> float:
    """alpha with the highest combined score; ties go to the first in grid order."""
    best = max(range(len(scores)), key=lambda i: (scores[i].combined, -i))
    return scores[best].alpha


# ----------------------------------------------------------------------------------------- data + search
def task_texts(tasks: Sequence[str], role: str) -> list[str]:
    """The pooled texts of several task sources (data.token_batches shuffles them, seeded). Pooled as the
    pipeline pools its GPTQ calibration set, so the search scores the D_t that GPTQ will see; tasks weigh
    by their token counts (GSM8K's train half dominates ARC's validation quarter)."""
    from tasa_deploy.data import calibration_texts

    pooled = []
    for task in tasks:
        texts = calibration_texts(task, role)
        if not texts:
            raise UsageError(f"task source '{task}' has no '{role}' texts; pick another task")
        pooled.extend(texts)
    return pooled


def general_texts(general: str) -> list[str]:
    from tasa_deploy.data import calibration_texts

    texts = calibration_texts(general, "calib")
    if not texts:
        raise UsageError(f"general source '{general}' has no calibration texts; pick another --general")
    return texts


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[mix] {message}", file=sys.stderr, flush=True)


def search_mixture(model, tokenizer, *, general: str = "lambada", tasks: tuple[str, ...] = DEFAULT_TASKS,
                   alphas=DEFAULT_ALPHAS, n_samples: int = 16, seq_len: int = 256, seed: int = 0,
                   damp: float = 0.01, progress: bool = True, draws: int = 1,
                   device: torch.device | None = None) -> CalibrationMix:
    """Score every alpha on the grid by gradient alignment and the Hessian-trace proxy; pick alpha*.

    Three token sets of `n_samples` x `seq_len` tokens (general calib, task calib, task probe) serve the whole
    grid: `stream.stream_block_stats` walks the blocks one at a time, and each block's gradients and Gram
    matrices are reduced to six dot products and one `trace_spectrum` per input before the next block. With `draws` > 1 the search repeats on
    independent data draws (seeds seed, seed + 2, ...): alpha* comes from the scores averaged over draws, and
    mix.json keeps every draw's scores with their standard deviation over draws (`settings["draws"]`)."""
    alphas = tuple(alphas)
    tasks = tuple(tasks)
    check_mix_inputs(general, tasks, alphas, n_samples, seq_len)
    if damp <= 0:
        raise UsageError(f"damp must be > 0 (got {damp}); H_gen or H_task alone may be singular")
    if draws < 1:
        raise UsageError(f"draws must be >= 1, got {draws}")
    per_draw = [_score_one_draw(model, tokenizer, general, tasks, alphas, n_samples, seq_len, seed + 2 * d, damp,
                                progress, device) for d in range(draws)]
    alignments = [sum(d["alignments"][i] for d in per_draw) / draws for i in range(len(alphas))]
    traces = [sum(d["traces"][i] for d in per_draw) / draws for i in range(len(alphas))]
    scores = score_grid(alphas, alignments, traces)
    chosen = choose_alpha(scores)
    _say(progress, f"alpha* = {chosen} (share of general data)")
    settings = {"n_samples": n_samples, "seq_len": seq_len, "seed": seed, "damp": damp,
                "combination": COMBINATION, "losses": per_draw[0]["losses"], "seconds": per_draw[0]["seconds"],
                "linear_inputs": per_draw[0]["linear_inputs"]}
    if draws > 1:
        settings["draws"] = {"per_draw": [{k: d[k] for k in ("seed", "alignments", "traces", "alpha_star")}
                                          for d in per_draw],
                             "alignment_sd": [_sd([d["alignments"][i] for d in per_draw]) for i in range(len(alphas))],
                             "trace_sd": [_sd([d["traces"][i] for d in per_draw]) for i in range(len(alphas))]}
    return CalibrationMix(model_fingerprint(model), chosen, general, tasks, scores, settings)


def _sd(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _score_one_draw(model, tokenizer, general: str, tasks: tuple[str, ...], alphas: tuple[float, ...],
                    n_samples: int, seq_len: int, seed: int, damp: float, progress: bool,
                    device: torch.device | None) -> dict:
    """Alignment and trace over the grid from one draw of general, task and probe rows (seeds seed, seed + 1)."""
    from tasa_deploy.data import token_batches

    sets = {"general": token_batches(tokenizer, general_texts(general), n_samples, seq_len, seed),
            "task": token_batches(tokenizer, task_texts(tasks, "calib"), n_samples, seq_len, seed),
            "probe": token_batches(tokenizer, task_texts(tasks, "probe"), n_samples, seq_len, seed + 1)}
    start = time.perf_counter()
    losses: dict[str, float] = {}
    dots, traces, units = [], [0.0] * len(alphas), 0
    data_tokens = sets["general"].numel() + sets["task"].numel()
    for block in stream_block_stats(model, sets, device=device, losses=losses):
        if block.index == len(decoder_blocks(model)) - 1:
            _say(progress, "forward done: losses " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        dots.append(block_dots(block.grads["general"], block.grads["task"], block.grads["probe"]))
        for group in block.grams["probe"]:
            c, lam = input_spectrum(block.grams["probe"][group], block.grams["general"][group],
                                    block.grams["task"][group], damp, data_tokens)
            traces = [t + f for t, f in zip(traces, traces_from_spectrum(c, lam, alphas))]
            units += 1
        del block  # one block's gradients and Grams at a time
    alignments = alignment_from_dots(dots[::-1], alphas)
    seconds = {"streamed": round(time.perf_counter() - start, 2)}
    _say(progress, f"scored {len(dots)} blocks, {units} linear inputs in {seconds['streamed']} s")
    return {"seed": seed, "alignments": alignments, "traces": traces, "seconds": seconds,
            "alpha_star": choose_alpha(score_grid(alphas, alignments, traces)),
            "losses": losses, "linear_inputs": units}


def mixture_token_batches(mix: CalibrationMix, tokenizer, n_samples: int, seq_len: int,
                          seed: int = 0) -> torch.Tensor:
    """The calibration set [n, T] GPTQ uses: round(alpha n) general rows first, the rest task rows."""
    from tasa_deploy.data import mixture_batches

    if n_samples < 1 or seq_len < 2:
        raise UsageError(f"need n_samples >= 1 and seq_len >= 2 (got {n_samples}, {seq_len})")
    return mixture_batches(tokenizer, general_texts(mix.general), task_texts(mix.tasks, "calib"), mix.alpha,
                           n_samples, seq_len, seed)


def mix_table_rows(mix: CalibrationMix) -> list[dict]:
    """One row per candidate alpha for the CLI's table; `chosen` marks alpha*."""
    return [{"alpha": f"{s.alpha:.2f}", "grad_alignment": f"{s.grad_alignment:.4f}",
             "hessian_trace": f"{s.hessian_trace:.1f}", "combined": f"{s.combined:+.3f}",
             "chosen": "*" if s.alpha == mix.alpha else ""} for s in mix.scores]
