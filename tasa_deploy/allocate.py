"""Budgeted bit allocation: an exact multiple-choice knapsack over allocation units.

Each unit (a vLLM fused group or a single GGUF tensor) must take exactly one Option (a grid key with its
true bits per weight, the unit's weight count and a predicted error). We minimize the summed error subject to
    sum(bpw * n_weights) <= budget,   budget = average bits per weight * total weights (or total bits given).

Exactness. Costs are made integers without rounding: every bpw is a small rational (bit counts over block or
group sizes, e.g. 3.4375 = 55/16, 4 + 16/576 = 145/36) recovered exactly from its float with
`Fraction.limit_denominator(2**16)`; a float that is no such rational within float rounding is taken as its
exact binary value, so a budget like 4.2499999 is never rounded up to 4.25. A unit's cost is bpw * n_weights;
all costs are scaled by the LCM of their denominators. Each unit's cheapest option is subtracted first, so
the DP runs over the SLACK above the cheapest plan, in steps of the GCD of all those integer slacks; the
budget's slack is floored to whole steps, which loses nothing because every reachable slack is a whole
number of steps. Cost: O(units x slack steps x candidates), vectorized over steps with numpy (SmolLM2, 210
GGUF units at 4.8 bits: ~1100 steps). When the dense table would exceed `max_dense_cells` (units x steps),
an equally exact sparse DP keeps only the Pareto front of (cost, error) states instead. Either way the
budget is never exceeded.

Budget outside the feasible range is a UsageError naming the bound: below the cheapest combination nothing
fits; above the most expensive one every unit would simply take its widest option, which almost always
means the budget or the candidate set is a mistake (TASA's issue treats it as an error, so do we).
Ties in error are broken toward the cheaper plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import reduce
from typing import Mapping, Sequence

import numpy as np

from tasa_deploy import UsageError

MAX_DENOMINATOR = 1 << 16
MAX_DENSE_CELLS = 50_000_000  # units x slack steps of the int16 back-pointer table; beyond it: sparse DP


@dataclass(frozen=True)
class Option:
    """One candidate for one unit: grid key, TRUE bits per weight (tasa_deploy.bits), weights, predicted error."""

    key: str
    bpw: float
    n_weights: int
    error: float

    def __post_init__(self) -> None:
        if not (self.bpw > 0 and self.n_weights > 0 and math.isfinite(self.error)):
            raise UsageError(f"option {self.key!r} needs bpw > 0, n_weights > 0 and a finite error, "
                             f"got bpw={self.bpw}, n_weights={self.n_weights}, error={self.error}")


@dataclass(frozen=True)
class Allocation:
    """The chosen option per unit and what it costs."""

    choice: Mapping[str, str]  # unit -> option key
    total_bits: float
    n_weights: int
    total_error: float

    @property
    def average_bits(self) -> float:
        return self.total_bits / self.n_weights


def allocate_average_bits(units: Mapping[str, Sequence[Option]], budget_bits: float,
                          max_dense_cells: int = MAX_DENSE_CELLS) -> Allocation:
    """Minimum-error choice with average bits per weight <= `budget_bits`."""
    n_total = _check_units(units)
    return _allocate(units, _exact(budget_bits) * n_total, f"{budget_bits:g} bits/weight", n_total, max_dense_cells)


def allocate_total_bits(units: Mapping[str, Sequence[Option]], budget_total_bits: float,
                        max_dense_cells: int = MAX_DENSE_CELLS, *, at_most: bool = False) -> Allocation:
    """Minimum-error choice with total bits <= `budget_total_bits` (e.g. 8 * a target file size in bytes).
    at_most: a budget above the most expensive plan gets that plan (a file-size cap, not a target)."""
    n_total = _check_units(units)
    budget = Fraction(budget_total_bits)
    if at_most:
        budget = min(budget, sum(max(_exact(o.bpw) * o.n_weights for o in options) for options in units.values()))
    return _allocate(units, budget, f"{budget_total_bits:.0f} bits", n_total, max_dense_cells)


def allocate_with_time(units: Mapping[str, Sequence[Option]], budget_total_bits: float,
                       seconds: Mapping[str, Mapping[str, float]], max_seconds: float,
                       iterations: int = 40, strict: bool = True) -> tuple[Allocation, float]:
    """Minimum-error choice with total bits <= `budget_total_bits` AND predicted time <= `max_seconds`, where
    seconds[unit][key] is the option's predicted time (speed-aware plans, `tasa_deploy.speed`).

    Lagrangian relaxation of the time constraint: the exact bits knapsack is solved for error + lam * seconds,
    lam found by bisection (the smallest lam tried whose plan meets the time); returns (allocation with the
    true errors, its predicted seconds). Exact in the bits budget; within the time budget whenever any lam
    reaches it (else a UsageError naming the fastest time found, or with strict=False the fastest plan found,
    whose time the caller compares with the limit); the error is that of the best multiplier,
    which can miss the true two-constraint optimum by the duality gap (small when there are many units)."""
    def solve(lam: float) -> tuple[Allocation, float]:
        weighted = {u: [Option(o.key, o.bpw, o.n_weights, o.error + lam * seconds[u][o.key]) for o in options]
                    for u, options in units.items()}
        allocation = allocate_total_bits(weighted, budget_total_bits, at_most=True)
        return allocation, sum(seconds[u][key] for u, key in allocation.choice.items())

    best, best_time = solve(0.0)
    if best_time > max_seconds:
        errors = [o.error for options in units.values() for o in options]
        times = [t for per in seconds.values() for t in per.values()]
        high = max(max(errors) - min(errors), 1e-12) / max(max(times) - min(times), 1e-30)
        fastest, fastest_time = solve(high)
        for _ in range(60):
            if fastest_time <= max_seconds:
                break
            high *= 4
            fastest, fastest_time = solve(high)
        if fastest_time > max_seconds and not strict:
            return _with_true_errors(units, fastest), fastest_time
        if fastest_time > max_seconds:
            raise UsageError(f"no plan within the size budget is fast enough: the fastest predicted is "
                             f"{fastest_time:.4g} s per token against the limit {max_seconds:.4g}; relax "
                             "--max-slowdown or raise the budget")
        low, best, best_time = 0.0, fastest, fastest_time
        for _ in range(iterations):
            middle = (low + high) / 2
            allocation, elapsed = solve(middle)
            if elapsed <= max_seconds:
                high, best, best_time = middle, allocation, elapsed
            else:
                low = middle
    return _with_true_errors(units, best), best_time


def _with_true_errors(units: Mapping[str, Sequence[Option]], allocation: Allocation) -> Allocation:
    error = sum(next(o.error for o in units[u] if o.key == key) for u, key in allocation.choice.items())
    return Allocation(allocation.choice, allocation.total_bits, allocation.n_weights, error)


def _allocate(units, budget: Fraction, budget_text: str, n_total: int, max_dense_cells: int) -> Allocation:
    names = list(units)
    costs = [[_exact(o.bpw) * o.n_weights for o in units[name]] for name in names]  # exact bits per option
    low = sum(min(c) for c in costs)
    high = sum(max(c) for c in costs)
    if budget < low:
        raise UsageError(f"budget {budget_text} is below the cheapest plan ({float(low) / n_total:.4f} bits/weight, "
                         f"{float(low):.0f} bits); raise the budget or add narrower candidates")
    if budget > high:
        raise UsageError(f"budget {budget_text} is above the most expensive plan ({float(high) / n_total:.4f} "
                         f"bits/weight, {float(high):.0f} bits); lower the budget or add wider candidates")
    slack, capacity = _integer_slack(costs, budget - low)
    errors = [[float(o.error) for o in units[name]] for name in names]
    if len(names) * (capacity + 1) <= max_dense_cells:
        picks = _solve_dense(slack, errors, capacity)
    else:
        picks = _solve_sparse(slack, errors, capacity)
    choice = {name: units[name][pick].key for name, pick in zip(names, picks)}
    total_bits = sum(costs[u][pick] for u, pick in enumerate(picks))
    total_error = sum(errors[u][pick] for u, pick in enumerate(picks))
    return Allocation(choice, float(total_bits), n_total, total_error)


def _check_units(units: Mapping[str, Sequence[Option]]) -> int:
    if not units:
        raise UsageError("no allocation units given; the profile has no units to plan")
    empty = [name for name, options in units.items() if not options]
    if empty:
        raise UsageError(f"unit {empty[0]} has no candidate options; widen the candidate set")
    for name, options in units.items():
        if len({o.n_weights for o in options}) != 1:
            raise UsageError(f"options of unit {name} disagree on its weight count")
    return sum(options[0].n_weights for options in units.values())


def _exact(value: float) -> Fraction:
    """The small rational a float bpw / budget stands for (3.4375 -> 55/16, 4.02777.. -> 145/36); a float
    that is no such rational (farther than float rounding) is taken as its exact binary value."""
    binary = Fraction(value)
    small = binary.limit_denominator(MAX_DENOMINATOR)
    return small if abs(small - binary) <= abs(binary) * Fraction(1, 1 << 50) else binary


def _integer_slack(costs: list[list[Fraction]], budget_slack: Fraction) -> tuple[list[list[int]], int]:
    """Costs above each unit's cheapest option, as integers in the largest exact common step; floored budget."""
    slack = [[c - min(unit) for c in unit] for unit in costs]
    denominator = reduce(math.lcm, (c.denominator for unit in slack for c in unit), 1)
    scaled = [[int(c * denominator) for c in unit] for unit in slack]
    step = reduce(math.gcd, (c for unit in scaled for c in unit), 0) or 1
    capacity = math.floor(budget_slack * denominator / step)  # any feasible slack is a multiple of step
    return [[c // step for c in unit] for unit in scaled], capacity


def _solve_dense(slack: list[list[int]], errors: list[list[float]], capacity: int) -> list[int]:
    """best[c] = least error with exactly c slack steps; argmin table for backtracking. [units, capacity+1]"""
    best = np.full(capacity + 1, np.inf)  # [C+1]
    best[0] = 0.0
    picks_table = np.zeros((len(slack), capacity + 1), dtype=np.int16)  # [U, C+1]
    for u, (unit_costs, unit_errors) in enumerate(zip(slack, errors)):
        new = np.full(capacity + 1, np.inf)
        for index, (cost, error) in enumerate(zip(unit_costs, unit_errors)):
            if cost > capacity:
                continue
            candidate = best[: capacity + 1 - cost] + error  # [C+1-cost]
            better = candidate < new[cost:]
            new[cost:][better] = candidate[better]
            picks_table[u, cost:][better] = index
        best = new
    c = int(np.argmin(best))  # first minimum = the cheapest among equal-error plans
    picks = []
    for u in range(len(slack) - 1, -1, -1):
        pick = int(picks_table[u, c])
        picks.append(pick)
        c -= slack[u][pick]
    return picks[::-1]


def _solve_sparse(slack: list[list[int]], errors: list[list[float]], capacity: int) -> list[int]:
    """Exact DP over the Pareto front of (slack, error) states; back-pointers per unit."""
    front_cost, front_error = np.zeros(1, dtype=np.int64), np.zeros(1)  # [S]
    history = []  # per unit: (parent state index [S'], option index [S'])
    for unit_costs, unit_errors in zip(slack, errors):
        cost = (front_cost[:, None] + np.asarray(unit_costs, dtype=np.int64)[None, :]).ravel()  # [S*O]
        error = (front_error[:, None] + np.asarray(unit_errors)[None, :]).ravel()  # [S*O]
        parent, option = np.divmod(np.arange(cost.size), len(unit_costs))
        keep = cost <= capacity
        cost, error, parent, option = cost[keep], error[keep], parent[keep], option[keep]
        order = np.lexsort((error, cost))  # by cost, then error
        cost, error, parent, option = cost[order], error[order], parent[order], option[order]
        prior_best = np.minimum.accumulate(np.concatenate(([np.inf], error[:-1])))
        pareto = error < prior_best  # strictly better than every cheaper state
        front_cost, front_error = cost[pareto], error[pareto]
        history.append((parent[pareto], option[pareto]))
    state = int(np.argmin(front_error))  # first minimum = cheapest (front sorted by cost)
    picks = []
    for parent, option in reversed(history):
        picks.append(int(option[state]))
        state = int(parent[state])
    return picks[::-1]
