"""Statistics over probe rows: paired loss deltas with standard errors, shrinkage of noisy sensitivities, and
rank correlations with bootstrap intervals. Pure functions on numbers (no model, no torch), so the rules the
plan relies on are tested on synthetic profiles where the truth is known.

Why: a per-layer sensitivity is measured on a few dozen probe rows. Its noise can be as large as its signal
(an arc delta of -0.47 around a baseline of 4.07 is noise), and a plan built on noise gives free 3-bit
layers to whatever happened to score low. Every delta therefore carries its standard error, and the unit
costs use the shrunk deltas below instead of clipped raw ones.

Paired ratio deltas. An objective's loss is L = sum_r num_r / sum_r den_r over probe rows r (token-mean NLL:
num = the row's summed NLL, den = its scored tokens; a per-row loss: den = 1). Quantizing a block changes
only the numerators, so the delta is D = sum_r d_r / sum_r den_r with d_r the paired change of row r. Its
standard error is the ratio estimator's (linearized over rows sampled i.i.d.):
    z_r = d_r - D den_r,   SE(D) = sqrt(R / (R - 1) * sum_r z_r^2) / sum_r den_r   (R rows with den_r > 0).

Shrinkage (SHRINKAGE_RULE). Per objective, over the L blocks: the measured d_l = t_l + e_l with
e_l ~ N(0, s_l^2). Empirical Bayes with a normal prior t_l ~ N(m, tau^2), tau^2 by the DerSimonian-Laird
moment estimator (precision-weighted, so a few precise blocks are not drowned by many noisy ones) and m the
mean weighted by 1 / (tau^2 + s_l^2), gives the posterior mean
    shrunk_l = m + w_l (d_l - m),   w_l = tau^2 / (tau^2 + s_l^2),
so a precisely measured block keeps its own value, a noisy one moves to the objective's mean, and an
objective that is all noise (tau^2 = 0) becomes flat: it spreads its weight evenly instead of steering the
plan. A block with s_l = 0 keeps d_l. The result is floored at 0 (expected loss does not fall when a block
is quantized); that floor binds only where the objective's mean itself is negative. If it leaves every block
at 0 while the deltas were measured with noise, the objective could not tell the blocks apart: every block gets
the mean standard error (a flat vector at the measurement's resolution; only its shape matters once the plan
normalizes each objective), so it spreads its weight evenly instead of vanishing.
"""

from __future__ import annotations

import math
import random
from itertools import combinations
from typing import Sequence

SHRINKAGE_RULE = ("per objective over blocks: m + w (d - m), w = tau^2 / (tau^2 + se^2), tau^2 DerSimonian-Laird, "
                  "m weighted by 1 / (tau^2 + se^2); floored at 0; all 0 -> every block = mean se")


def paired_ratio_delta(base_num: Sequence[float], new_num: Sequence[float], den: Sequence[float]) -> tuple[float, float]:
    """(delta, standard error) of sum(new_num) / sum(den) - sum(base_num) / sum(den), paired over rows."""
    if not len(base_num) == len(new_num) == len(den):
        raise ValueError(f"row vectors differ in length: {len(base_num)}, {len(new_num)}, {len(den)}")
    diffs = [n - b for n, b in zip(new_num, base_num)]
    return ratio_mean_se(diffs, den)


def ratio_mean_se(diffs: Sequence[float], den: Sequence[float]) -> tuple[float, float]:
    """(sum d / sum den, its ratio-estimator SE) over rows with den > 0; SE 0 for fewer than two rows."""
    rows = [(d, w) for d, w in zip(diffs, den) if w > 0]
    total = sum(w for _, w in rows)
    if not rows or total <= 0:
        return 0.0, 0.0
    delta = sum(d for d, _ in rows) / total
    if len(rows) < 2:
        return delta, 0.0
    spread = sum((d - delta * w) ** 2 for d, w in rows)
    return delta, math.sqrt(len(rows) / (len(rows) - 1) * spread) / total


def shrink(deltas: Sequence[float], ses: Sequence[float]) -> list[float]:
    """SHRINKAGE_RULE: posterior means of the per-block deltas under a normal prior fitted to them."""
    if len(deltas) != len(ses):
        raise ValueError(f"{len(deltas)} deltas but {len(ses)} standard errors")
    if not deltas:
        return []
    if all(s == 0 for s in ses):
        return [max(0.0, d) for d in deltas]
    tau2 = between_block_variance(deltas, ses)
    floor = min(s for s in ses if s > 0) * 1e-3  # an SE of 0 (one row) counts as a very precise measurement
    precision = [1.0 / (tau2 + max(s, floor) ** 2) for s in ses]
    mean = sum(p * d for p, d in zip(precision, deltas)) / sum(precision)
    out = [max(0.0, mean + tau2 * p * (d - mean)) for d, p in zip(deltas, precision)]  # w = tau2 / (tau2 + s^2)
    if not any(out):
        return [sum(ses) / len(ses)] * len(ses)
    return out


def between_block_variance(deltas: Sequence[float], ses: Sequence[float]) -> float:
    """tau^2, the spread of the true deltas beyond their noise: the DerSimonian-Laird moment estimator, which
    weights each block by its precision 1 / se^2 (a few precise blocks are not drowned by many noisy ones)."""
    floor = min((s for s in ses if s > 0), default=1.0) * 1e-3
    weights = [1.0 / max(s, floor) ** 2 for s in ses]
    total = sum(weights)
    mean = sum(w * d for w, d in zip(weights, deltas)) / total
    q = sum(w * (d - mean) ** 2 for w, d in zip(weights, deltas))
    scale = total - sum(w * w for w in weights) / total
    return max(0.0, (q - (len(deltas) - 1)) / scale) if scale > 0 else 0.0


def signal_to_noise(deltas: Sequence[float], ses: Sequence[float]) -> float:
    """Median over blocks of |delta| / SE (inf where an SE is 0 and its delta is not)."""
    ratios = sorted(abs(d) / s if s > 0 else (math.inf if d else 0.0) for d, s in zip(deltas, ses))
    if not ratios:
        return math.nan
    middle = len(ratios) // 2
    return ratios[middle] if len(ratios) % 2 else (ratios[middle - 1] + ratios[middle]) / 2


def reliability(deltas: Sequence[float], ses: Sequence[float] | None) -> dict:
    """One objective's noise summary: signal-to-noise, mean SE (nan without SEs), negative and total blocks."""
    return {"snr": signal_to_noise(deltas, ses) if ses else math.nan,
            "mean_se": sum(ses) / len(ses) if ses else math.nan,
            "negative_blocks": sum(d < 0 for d in deltas), "blocks": len(deltas)}


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (tie-corrected) by pair counting; nan when either sequence is constant."""
    if len(x) != len(y):
        raise ValueError(f"tau needs sequences of one length, got {len(x)} and {len(y)}")
    concordant_minus_discordant, ties_x, ties_y, n_pairs = 0, 0, 0, 0
    for i, j in combinations(range(len(x)), 2):
        dx, dy = _sign(x[i] - x[j]), _sign(y[i] - y[j])
        concordant_minus_discordant += dx * dy
        ties_x += dx == 0
        ties_y += dy == 0
        n_pairs += 1
    denominator = math.sqrt((n_pairs - ties_x) * (n_pairs - ties_y))
    return concordant_minus_discordant / denominator if denominator else math.nan


def _sign(value: float) -> int:
    return (value > 0) - (value < 0)


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start:end + 1]:
            out[i] = (start + end) / 2 + 1
        start = end + 1
    return out


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's r of the tie-averaged ranks); nan when either is constant."""
    if len(x) != len(y):
        raise ValueError(f"rho needs sequences of one length, got {len(x)} and {len(y)}")
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def layer_deltas_from_rows(row_deltas: Sequence[Sequence[float]], weights: Sequence[float],
                           rows: Sequence[int] | None = None) -> list[float]:
    """Per-layer deltas sum_r d[l][r] / sum_r w[r] over `rows` (default all; repeats count, as in a bootstrap)."""
    picked = range(len(weights)) if rows is None else rows
    total = sum(weights[r] for r in picked)
    return [sum(layer[r] for r in picked) / total if total else 0.0 for layer in row_deltas]


def bootstrap_tau(rows_a: Sequence[Sequence[float]], weights_a: Sequence[float], rows_b: Sequence[Sequence[float]],
                  weights_b: Sequence[float], n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of Kendall's tau-b between two objectives' per-layer deltas, resampling each
    objective's probe rows with replacement (the same rows for all its layers: rows are paired across blocks)."""
    rng = random.Random(seed)
    taus = []
    for _ in range(n_boot):
        pick_a = [rng.randrange(len(weights_a)) for _ in weights_a]
        pick_b = [rng.randrange(len(weights_b)) for _ in weights_b]
        tau = kendall_tau_b(layer_deltas_from_rows(rows_a, weights_a, pick_a),
                            layer_deltas_from_rows(rows_b, weights_b, pick_b))
        if not math.isnan(tau):
            taus.append(tau)
    if not taus:
        return math.nan, math.nan
    taus.sort()
    low = taus[int(math.floor((1 - level) / 2 * (len(taus) - 1)))]
    high = taus[int(math.ceil((1 + level) / 2 * (len(taus) - 1)))]
    return low, high


__all__ = ["SHRINKAGE_RULE", "between_block_variance", "bootstrap_tau", "kendall_tau_b", "layer_deltas_from_rows", "paired_ratio_delta",
           "ranks", "ratio_mean_se", "reliability", "shrink", "signal_to_noise", "spearman_rho"]
