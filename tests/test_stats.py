"""Statistics the plan relies on (tasa_deploy.stats), on synthetic data where the truth is known.

References: Monte Carlo over redrawn probe rows for the paired ratio standard error; the true per-block
sensitivities for the shrinkage rule (squared error and the plan's regret); the true tau for the bootstrap
interval's coverage.
"""

from __future__ import annotations

import math
import random

import pytest

from tasa_deploy.stats import (bootstrap_tau, kendall_tau_b, layer_deltas_from_rows, paired_ratio_delta, shrink,
                               signal_to_noise, spearman_rho)


def _population_draw(rng: random.Random, n_rows: int) -> tuple[list[float], list[float], list[float]]:
    """Rows of a token-mean objective: (base numerators, quantized numerators, token counts)."""
    den = [float(rng.randint(5, 60)) for _ in range(n_rows)]
    base = [w * rng.gauss(2.0, 0.3) for w in den]
    new = [b + w * rng.gauss(0.05, 0.2) for b, w in zip(base, den)]  # per-token increase 0.05 +- 0.2
    return base, new, den


def test_paired_ratio_se_matches_the_spread_over_redrawn_probe_sets():
    rng = random.Random(0)
    deltas, ses = [], []
    for _ in range(2000):
        delta, se = paired_ratio_delta(*_population_draw(rng, 24))
        deltas.append(delta)
        ses.append(se)
    mean = sum(deltas) / len(deltas)
    spread = math.sqrt(sum((d - mean) ** 2 for d in deltas) / (len(deltas) - 1))
    assert mean == pytest.approx(0.05, abs=0.003)
    assert sum(ses) / len(ses) == pytest.approx(spread, rel=0.08)  # the SE is the sampling std of the delta


def test_paired_ratio_delta_is_the_loss_difference_and_pairs_rows():
    base, new, den = [10.0, 20.0, 5.0], [11.0, 21.0, 6.0], [5.0, 10.0, 2.0]
    delta, se = paired_ratio_delta(base, new, den)
    assert delta == pytest.approx(sum(new) / sum(den) - sum(base) / sum(den))
    z = [(n - b) - delta * w for n, b, w in zip(new, base, den)]
    assert se == pytest.approx(math.sqrt(3 / 2 * sum(v * v for v in z)) / sum(den))
    # a shift common to every row's baseline is paired away: the SE ignores between-row loss differences
    assert paired_ratio_delta([b + 100 * w for b, w in zip(base, den)], [n + 100 * w for n, w in zip(new, den)],
                              den) == pytest.approx((delta, se))
    assert paired_ratio_delta([1.0], [2.0], [1.0]) == (1.0, 0.0)  # one row: no spread to measure
    with pytest.raises(ValueError):
        paired_ratio_delta([1.0], [1.0, 2.0], [1.0])


def _noisy_profile(rng: random.Random, truth: list[float], ses: list[float]) -> list[float]:
    return [t + rng.gauss(0.0, s) for t, s in zip(truth, ses)]


def test_shrinkage_beats_clipping_on_synthetic_profiles():
    """Blocks with a structured true sensitivity, measured with mixed noise: the shrunk deltas are closer to
    the truth than the raw clipped ones on average, and never worse where the noise is zero."""
    rng = random.Random(1)
    truth = [0.02 + 0.3 * math.exp(-((layer - 20) / 4) ** 2) for layer in range(30)]
    ses = [0.02 + 0.2 * rng.random() for _ in truth]
    mse_shrunk = mse_clipped = 0.0
    for _ in range(500):
        measured = _noisy_profile(rng, truth, ses)
        mse_shrunk += sum((s - t) ** 2 for s, t in zip(shrink(measured, ses), truth))
        mse_clipped += sum((max(m, 0.0) - t) ** 2 for m, t in zip(measured, truth))
    assert mse_shrunk < 0.7 * mse_clipped
    assert shrink(truth, [0.0] * 30) == pytest.approx(truth)  # exact measurements are kept as they are


def test_shrinkage_flattens_an_objective_that_is_all_noise():
    rng = random.Random(2)
    ses = [0.2] * 30
    measured = _noisy_profile(rng, [0.05] * 30, ses)  # every block equally sensitive; the noise dominates
    shrunk = shrink(measured, ses)
    assert max(shrunk) - min(shrunk) < 0.2 * (max(measured) - min(measured))
    negative = shrink([-0.1, -0.3, 0.05, -0.2], [0.2] * 4)  # mean < 0: no block shows harm
    assert negative == [0.2] * 4  # flat at the measurement's resolution, not all zero


def _normalized(values: list[float]) -> list[float]:
    total = sum(values)
    return [v / total for v in values]


def _true_cost_of_plan(estimates: list[list[float]], truths: list[list[float]], n_upgraded: int) -> float:
    """Two objectives, 30 equal-size blocks, 3 or 4 bits, `n_upgraded` blocks at 4 bits (4 bits removes 70% of
    a block's error). The plan minimizing the aggregate of the normalized estimates upgrades the blocks with
    the largest aggregated estimate (the exact knapsack optimum for equal sizes); its cost is measured on the
    normalized truths, the same MOA aggregate plan.py uses (mean of per-objective normalized errors)."""
    aggregate = [sum(values) for values in zip(*(_normalized(e) for e in estimates))]
    upgraded = set(sorted(range(len(aggregate)), key=lambda b: -aggregate[b])[:n_upgraded])
    true_aggregate = [sum(values) for values in zip(*(_normalized(t) for t in truths))]
    return sum(v * (0.3 if b in upgraded else 1.0) for b, v in enumerate(true_aggregate))


def test_shrinkage_keeps_a_noise_only_objective_from_steering_the_plan():
    """The issue's case: a precisely measured objective with structure (like ppl) and one whose deltas are
    noise around a flat truth (like arc at 16 probe rows). Planning on the shrunk deltas costs less true
    aggregate error than planning on clipped ones, and comes close to the plan made from the truth."""
    rng = random.Random(3)
    structured = [0.02 + 0.3 * math.exp(-((b - 24) / 3) ** 2) + 0.1 * (b < 2) for b in range(30)]
    flat = [0.05] * 30
    se_structured, se_flat = [0.01] * 30, [0.25] * 30
    cost = {"shrunk": 0.0, "clipped": 0.0}
    best = _true_cost_of_plan([structured, flat], [structured, flat], 10)
    for _ in range(300):
        measured = [_noisy_profile(rng, structured, se_structured), _noisy_profile(rng, flat, se_flat)]
        shrunk = [shrink(m, s) for m, s in zip(measured, (se_structured, se_flat))]
        clipped = [[max(v, 1e-9) for v in m] for m in measured]
        cost["shrunk"] += _true_cost_of_plan(shrunk, [structured, flat], 10) / 300
        cost["clipped"] += _true_cost_of_plan(clipped, [structured, flat], 10) / 300
    assert cost["shrunk"] - best < 0.5 * (cost["clipped"] - best)  # measured: 0.028 vs 0.098 above the best


def test_signal_to_noise_is_the_median_ratio():
    assert signal_to_noise([1.0, -2.0, 3.0], [1.0, 1.0, 1.0]) == 2.0
    assert signal_to_noise([1.0, 4.0], [1.0, 1.0]) == 2.5
    assert signal_to_noise([1.0, 0.0, 3.0], [0.0, 0.0, 1.0]) == 3.0  # inf, 0 and 3 -> median 3


def _row_matrix(rng: random.Random, layer_truth: list[float], n_rows: int, noise: float) -> tuple[list, list]:
    weights = [1.0] * n_rows
    rows = [[t + rng.gauss(0.0, noise) for _ in range(n_rows)] for t in layer_truth]
    return rows, weights


def test_bootstrap_tau_separates_related_from_unrelated_objectives():
    rng = random.Random(4)
    signal = [rng.random() for _ in range(20)]
    rows_a, w_a = _row_matrix(rng, signal, 32, 0.3)
    rows_b, w_b = _row_matrix(rng, signal, 32, 0.3)  # the same layer ranking, independent probe rows
    rows_c, w_c = _row_matrix(rng, [rng.random() for _ in range(20)], 32, 0.3)  # an unrelated ranking
    low, high = bootstrap_tau(rows_a, w_a, rows_b, w_b, n_boot=300)
    point = kendall_tau_b(layer_deltas_from_rows(rows_a, w_a), layer_deltas_from_rows(rows_b, w_b))
    assert 0.3 < low <= point <= high
    pure_noise_a, w_na = _row_matrix(rng, [0.0] * 20, 32, 0.3)
    pure_noise_b, w_nb = _row_matrix(rng, [0.0] * 20, 32, 0.3)
    low, high = bootstrap_tau(pure_noise_a, w_na, pure_noise_b, w_nb, n_boot=300)
    assert low < 0 < high  # noise against noise: tau is not told apart from 0
    low_c, high_c = bootstrap_tau(rows_a, w_a, rows_c, w_c, n_boot=300)
    assert high_c - low_c > 0.1 and low_c < 0.5


def test_layer_deltas_from_rows_weights_and_resamples():
    rows, weights = [[1.0, 3.0], [2.0, 0.0]], [1.0, 3.0]
    assert layer_deltas_from_rows(rows, weights) == [1.0, 0.5]
    assert layer_deltas_from_rows(rows, weights, [1, 1]) == [1.0, 0.0]


def test_spearman_rho_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(5)
    for _ in range(50):
        x = [rng.choice([0.0, 1.0, 2.0, rng.random()]) for _ in range(12)]
        y = [v + rng.gauss(0, 0.5) if rng.random() < 0.8 else 1.0 for v in x]
        assert spearman_rho(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert math.isnan(spearman_rho([1.0, 1.0], [1.0, 2.0]))
