"""The multiple-choice knapsack (tasa_deploy.allocate) against brute force over every combination."""

import itertools
import random
import time
from fractions import Fraction

import pytest

from tasa_deploy import UsageError
from tasa_deploy.allocate import Option, allocate_average_bits, allocate_total_bits

BPW_POOL = (2.625, 3.25, 3.4375, 4.125, 4.25, 4.5, 5.0, 5.5, 6.5625, 8.25, 8.5, 4 + 16 / 576)


def random_instance(rng: random.Random, n_units: int) -> dict[str, list[Option]]:
    """Units with unequal weight counts and per-unit different candidate sets."""
    units = {}
    for u in range(n_units):
        n_weights = rng.choice([1, 3, 7, 32, 96, 100, 576])
        bpws = rng.sample(BPW_POOL, rng.randint(1, 4))
        units[f"unit{u}"] = [Option(f"c{b}", b, n_weights, rng.choice([0.0, rng.random()])) for b in bpws]
    return units


def brute_force(units: dict[str, list[Option]], budget_total: Fraction) -> float | None:
    """Least total error over all combinations meeting the budget (exact rational costs); None if infeasible."""
    best = None
    for combo in itertools.product(*units.values()):
        cost = sum(Fraction(o.bpw).limit_denominator(1 << 16) * o.n_weights for o in combo)
        if cost <= budget_total:
            error = sum(o.error for o in combo)
            best = error if best is None else min(best, error)
    return best


def exact_cost(units, choice) -> Fraction:
    options = {name: {o.key: o for o in opts} for name, opts in units.items()}
    return sum(Fraction(options[n][k].bpw).limit_denominator(1 << 16) * options[n][k].n_weights
               for n, k in choice.items())


@pytest.mark.parametrize("dense_cells", [50_000_000, 0])  # dense table, and the sparse Pareto DP
def test_matches_brute_force_on_random_instances(dense_cells):
    rng = random.Random(1234)
    checked = 0
    for _ in range(150):
        units = random_instance(rng, rng.randint(1, 5))
        n_total = sum(opts[0].n_weights for opts in units.values())
        lo = sum(min(o.bpw * o.n_weights for o in opts) for opts in units.values()) / n_total
        hi = sum(max(o.bpw * o.n_weights for o in opts) for opts in units.values()) / n_total
        budget = round(rng.uniform(lo, hi), 3)
        if not lo <= budget <= hi:
            continue
        expected = brute_force(units, Fraction(repr(budget)) * n_total)
        if expected is None:  # rounding the budget can land just below the cheapest plan
            continue
        result = allocate_average_bits(units, budget, max_dense_cells=dense_cells)
        assert result.total_error == pytest.approx(expected, abs=1e-9)
        assert exact_cost(units, result.choice) <= Fraction(repr(budget)) * n_total
        assert result.average_bits <= budget + 1e-12
        checked += 1
    assert checked > 100


def test_budget_equal_to_an_exact_plan_is_feasible():
    units = {"a": [Option("q3_k", 3.4375, 256, 1.0), Option("q4_k", 4.5, 256, 0.2)],
             "b": [Option("q3_k", 3.4375, 512, 1.0), Option("q6_k", 6.5625, 512, 0.1)]}
    exact_average = (4.5 * 256 + 3.4375 * 512) / 768  # a repeating decimal 3.791666...
    result = allocate_average_bits(units, exact_average)
    assert result.choice == {"a": "q4_k", "b": "q3_k"}


def test_budget_just_below_a_plan_is_not_rounded_up():
    units = {"a": [Option("int3g64", 3.25, 64, 1.0), Option("int4g64", 4.25, 64, 0.0)]}
    assert allocate_average_bits(units, 4.25).choice == {"a": "int4g64"}
    assert allocate_average_bits(units, 4.2499999).choice == {"a": "int3g64"}


def test_picks_least_error_and_breaks_ties_toward_cheaper():
    units = {"x": [Option("int3", 3.25, 100, 0.5), Option("int4", 4.25, 100, 0.5), Option("int8", 8.25, 100, 0.0)]}
    assert allocate_average_bits(units, 4.25).choice == {"x": "int3"}
    assert allocate_average_bits(units, 8.25).choice == {"x": "int8"}


def test_total_bits_budget():
    units = {"a": [Option("lo", 4.5, 32, 1.0), Option("hi", 8.5, 32, 0.0)],
             "b": [Option("lo", 4.5, 64, 3.0), Option("hi", 8.5, 64, 0.0)]}
    assert allocate_total_bits(units, 4.5 * 32 + 8.5 * 64).choice == {"a": "lo", "b": "hi"}
    assert allocate_total_bits(units, 4.5 * 32 + 8.5 * 64 - 1).choice == {"a": "hi", "b": "lo"}


def test_infeasible_budgets_name_the_bound():
    units = {"a": [Option("int3g64", 3.25, 64, 1.0), Option("int8g64", 8.25, 64, 0.0)]}
    with pytest.raises(UsageError, match=r"below the cheapest plan \(3\.2500 bits/weight"):
        allocate_average_bits(units, 3.0)
    with pytest.raises(UsageError, match=r"above the most expensive plan \(8\.2500 bits/weight"):
        allocate_average_bits(units, 9.0)


def test_bad_units_are_usage_errors():
    with pytest.raises(UsageError, match="no allocation units"):
        allocate_average_bits({}, 4.0)
    with pytest.raises(UsageError, match="has no candidate"):
        allocate_average_bits({"a": []}, 4.0)
    with pytest.raises(UsageError, match="finite error"):
        Option("int4", 4.25, 10, float("nan"))


def smollm2_like_units(n_layers: int, n_candidates: int, per_module: bool) -> dict[str, list[Option]]:
    """SmolLM2-135M shapes: 30 layers x (7 modules or 4 fused groups)."""
    rng = random.Random(0)
    sizes = ({"q": 331776, "k": 110592, "v": 110592, "o": 331776, "gate": 884736, "up": 884736, "down": 884736}
             if per_module else {"qkv": 552960, "o": 331776, "gate_up": 1769472, "down": 884736})
    bpws = (3.25, 4.25, 8.25, 5.25, 6.25)[:n_candidates]
    return {f"l{layer}.{m}": [Option(f"b{b}", b, n, rng.random() / b) for b in bpws]
            for layer in range(n_layers) for m, n in sizes.items()}


def test_timing_210_units_3_candidates():
    units = smollm2_like_units(30, 3, per_module=True)
    start = time.perf_counter()
    result = allocate_average_bits(units, 3.5)
    elapsed = time.perf_counter() - start
    assert len(units) == 210 and result.average_bits <= 3.5
    assert elapsed < 1.0, f"allocation took {elapsed:.2f} s"


def test_sparse_and_dense_agree_on_a_large_instance():
    units = smollm2_like_units(8, 3, per_module=False)
    dense = allocate_average_bits(units, 4.0)
    sparse = allocate_average_bits(units, 4.0, max_dense_cells=0)
    assert sparse.total_error == pytest.approx(dense.total_error, abs=1e-9)
    assert sparse.total_bits <= 4.0 * dense.n_weights


@pytest.mark.parametrize("seed", range(12))
def test_time_budget_against_brute_force(seed):
    """Speed-aware allocation (`allocate_with_time`): both budgets are met; the error is the two-constraint
    brute-force optimum up to the Lagrangian's duality gap (at most one unit's error spread); with a time
    budget that does not bind it equals the bits-only optimum."""
    from tasa_deploy.allocate import allocate_with_time

    rng = random.Random(seed)
    keys = {"a": 3.4375, "b": 4.5, "c": 5.0, "d": 8.5}
    units = {f"u{i}": [Option(k, bpw, 64 * rng.randint(1, 4), rng.random()) for k, bpw in keys.items()]
             for i in range(6)}
    units = {u: [Option(o.key, o.bpw, opts[0].n_weights, o.error * (8.5 - o.bpw + 0.1)) for o in opts]
             for u, opts in units.items()}
    speed = {"a": 3.0, "b": 0.5, "c": 2.0, "d": 1.0}  # "a" small but slow, "b" fast
    seconds = {u: {o.key: o.n_weights * speed[o.key] * 1e-3 for o in opts} for u, opts in units.items()}
    total_bits = 4.8 * sum(opts[0].n_weights for opts in units.values())
    combos = []
    for picks in itertools.product(*(range(len(keys)) for _ in units)):
        chosen = [opts[p] for opts, p in zip(units.values(), picks)]
        bits = sum(o.bpw * o.n_weights for o in chosen)
        time_s = sum(seconds[u][o.key] for u, o in zip(units, chosen))
        combos.append((bits, time_s, sum(o.error for o in chosen)))
    fastest_feasible = min(t for b, t, e in combos if b <= total_bits)
    unconstrained = allocate_total_bits(units, total_bits)
    loose = sum(seconds[u][k] for u, k in unconstrained.choice.items())
    for limit in (loose * 10, (loose + fastest_feasible) / 2, fastest_feasible * 1.02):
        allocation, predicted = allocate_with_time(units, total_bits, seconds, limit)
        assert allocation.total_bits <= total_bits + 1e-9 and predicted <= limit + 1e-12
        assert predicted == pytest.approx(sum(seconds[u][k] for u, k in allocation.choice.items()))
        optimum = min(e for b, t, e in combos if b <= total_bits and t <= limit)
        gap = max(max(o.error for o in opts) - min(o.error for o in opts) for opts in units.values())
        assert optimum - 1e-9 <= allocation.total_error <= optimum + gap
        if limit == loose * 10:
            assert allocation.choice == unconstrained.choice
    with pytest.raises(UsageError, match="fast enough"):
        allocate_with_time(units, total_bits, seconds, fastest_feasible * 0.5)
    fastest, predicted = allocate_with_time(units, total_bits, seconds, fastest_feasible * 0.5, strict=False)
    assert predicted == pytest.approx(fastest_feasible) and fastest.total_bits <= total_bits + 1e-9  # the fastest plan
