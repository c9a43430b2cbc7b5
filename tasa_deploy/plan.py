"""TASA stage 3: normalize + aggregate per-objective sensitivities (MOA) and allocate bits -> `tasa_plan.json`.

From a SensitivityProfile (raw per-objective loss increases per allocation unit and candidate grid) to a
BitPlan, with no model in the loop, so re-planning for another budget takes well under a second.

  1. Normalize (NORMALIZATION): for each objective k, clip the deltas at 0 (a quantized unit that happens to
     lower a probe loss is noise, not a gain) and divide by S_k = the sum of the clipped deltas over every
     unit and every candidate of the profile. Each objective then carries the same total mass 1, so losses on
     different scales (token NLL vs a multiple-choice loss) weigh equally. S_k depends only on the profile,
     not on the candidate subset or the budget, so plans for different budgets share one scale. An
     objective with S_k = 0 (no candidate raises its loss anywhere) or a non-finite S_k cannot be normalized:
     planning with it is a UsageError naming it, never a silent weight 0 while info reports its nominal weight.
  2. Aggregate (MOA, TASA arXiv 2607.00908): error(u, c) = beta * mean over reasoning objectives (math, arc)
     + (1 - beta) * mean over general objectives (GENERAL_OBJECTIVES: ppl). If only one kind is selected it
     gets weight 1 and beta is recorded but unused.
  3. Allocate (tasa_deploy.allocate, exact multiple-choice knapsack): one candidate per unit minimizing the
     summed aggregated error under the average-bits budget (or a byte budget for the quantized linears),
     costs = TRUE bits per weight from tasa_deploy.bits (scale / zero / block overhead included).
  4. Every module of a unit gets the unit's grid (fused vLLM groups stay tied) with method "gptq".

Also the paper's diagnostics over the profile's per-layer deltas: Kendall tau-b between objectives and the
top-k most sensitive layers per objective; `plan_table` and `save_plan_plot` summarize a plan.
"""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from tasa_deploy import UsageError
from tasa_deploy.allocate import Option, allocate_average_bits, allocate_total_bits, allocate_with_time
from tasa_deploy.artifacts import PLAN_TARGETS, BitPlan, ModulePlan, SensitivityProfile, UnitSensitivity
from tasa_deploy.outputs import TAG, atomic_path
from tasa_deploy.bits import bits_per_weight, exact_bits_per_weight, gguf_candidates
from tasa_deploy.quant.spec import QuantSpec
from tasa_deploy.stats import bootstrap_tau, kendall_tau_b, reliability

GENERAL_OBJECTIVES = ("ppl",)
NORMALIZATION = "per-objective: max(delta, 0) / sum of max(delta, 0) over all units and candidates"
DEFAULT_BITS = (3, 4, 8)  # the vLLM target's int widths (the paper's 3/4/8)
# The GGUF target's default: every GGML width from 3 to 8 bits. A GGUF profile measures every type a row fits, and
# the 5/6-bit types (Q5_0, Q5_K, Q6_K) are what llama.cpp's own presets lean on where k-quants do not fit; filtering
# them out left Qwen2.5-Coder's plans without the Q5_0 its base is stored in. 2-bit (Q2_K) stays opt-in.
DEFAULT_GGUF_BITS = (3, 4, 5, 6, 8)


def default_candidates(target: str) -> tuple[int, ...]:
    """The candidate widths a plan for `target` uses when the caller names none."""
    return DEFAULT_GGUF_BITS if target == "gguf" else DEFAULT_BITS


def candidate_values(values: Iterable[int | str]) -> tuple[int | str, ...]:
    """Candidates as typed or stored ("3", 3, "Q4_K") -> widths as ints, GGML type names lower-case."""
    return tuple(int(v) if isinstance(v, int) or str(v).isdigit() else str(v).lower() for v in values)


# ----------------------------------------------------------------------------------------- normalize + MOA
def select_objectives(profile: SensitivityProfile, objectives: Sequence[str] | None) -> tuple[str, ...]:
    """The objectives to plan for (default: all of the profile's); unknown or none is a UsageError."""
    chosen = tuple(profile.objectives if objectives is None else objectives)
    if not chosen:
        raise UsageError(f"no objectives selected; choose from the profile's: {', '.join(profile.objectives)}")
    unknown = [name for name in chosen if name not in profile.objectives]
    if unknown:
        raise UsageError(f"objective '{unknown[0]}' is not in the profile (it has {', '.join(profile.objectives)}); "
                         "pick from those or rerun `tasa-deploy profile` with it")
    return tuple(dict.fromkeys(chosen))


def _check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:  # also refuses NaN
        raise UsageError(f"beta must be in [0, 1] (weight on the reasoning objectives), got {beta}")


def objective_weights(objectives: Sequence[str], beta: float) -> dict[str, float]:
    """MOA weights: beta split over reasoning objectives, 1 - beta over general ones (see module doc)."""
    _check_beta(beta)
    general = [o for o in objectives if o.removeprefix("kl:") in GENERAL_OBJECTIVES]  # kl:ppl is general too
    reasoning = [o for o in objectives if o not in general]
    if not general or not reasoning:
        return {o: 1.0 / len(objectives) for o in objectives}
    return {**{o: (1.0 - beta) / len(general) for o in general}, **{o: beta / len(reasoning) for o in reasoning}}


def objective_scales(profile: SensitivityProfile, objectives: Sequence[str]) -> dict[str, float]:
    """S_k = sum of clipped deltas over every unit and candidate; S_k = 0 or non-finite is a UsageError."""
    scales = {}
    for objective in objectives:
        values = []
        for unit in profile.units:
            for key, per_objective in unit.errors.items():
                if objective not in per_objective:
                    raise UsageError(f"profile unit {unit.name} has no '{objective}' error for {key}; "
                                     "the profile is incomplete — rerun `tasa-deploy profile`")
                values.append(per_objective[objective])
        scales[objective] = _clipped_total(values, objective, "unit errors")
        if scales[objective] == 0.0:
            raise UsageError(f"objective '{objective}' has no positive loss increase in any unit or candidate of the "
                             "profile, so it cannot be normalized or weighted; re-profile with more probe samples, "
                             "or plan without it")
    return scales


def _clipped_total(values: Iterable[float], objective: str, what: str) -> float:
    """Sum of max(value, 0); a NaN/inf value is a UsageError (max(nan, 0) is nan and would poison S_k)."""
    total = 0.0
    for value in values:
        if not math.isfinite(float(value)):
            raise UsageError(f"objective '{objective}' has a non-finite value ({value}) among its {what}; "
                             "the profile is corrupt — rerun `tasa-deploy profile`")
        total += max(float(value), 0.0)
    return total


def aggregated_errors(profile: SensitivityProfile, objectives: Sequence[str],
                      beta: float) -> dict[str, dict[str, float]]:
    """unit name -> candidate key -> normalized MOA error (the allocator's predicted error)."""
    weights = objective_weights(objectives, beta)
    scales = objective_scales(profile, objectives)
    return {unit.name: {key: sum(weights[o] * max(float(errs[o]), 0.0) / scales[o] for o in objectives)
                        for key, errs in unit.errors.items()}
            for unit in profile.units}


# ----------------------------------------------------------------------------------------- candidates
def unit_candidates(unit: UnitSensitivity, target: str, candidates: Iterable[int | str] | None) -> list[str]:
    """Candidate keys of one unit: profile keys for the target, filtered by width (int) or key/type (str)."""
    keys = [key for key in unit.errors if _is_target_key(key, target)]
    if target == "gguf":
        fitting = set(gguf_candidates(unit.in_features))
        keys = [key for key in keys if key in fitting]
    wanted = default_candidates(target) if candidates is None else tuple(candidates)
    chosen = [key for key in keys if _matches(QuantSpec.from_key(key), wanted)]
    if not chosen:
        raise UsageError(f"unit {unit.name} has no candidate among {list(wanted)} in the profile "
                         f"(it measured {', '.join(unit.errors) or 'nothing'}); widen --candidates or re-profile")
    return chosen


def _is_target_key(key: str, target: str) -> bool:
    return key.startswith("int") == (target == "vllm")


def _matches(spec: QuantSpec, wanted: Sequence[int | str]) -> bool:
    return any(spec.bits == w if isinstance(w, int) else spec.key == str(w).lower() for w in wanted)


def allocation_options(profile: SensitivityProfile, target: str, candidates, errors) -> dict[str, list[Option]]:
    """unit -> [Option(key, true bpw, n_weights, aggregated error)] for the allocator."""
    return {unit.name: [Option(key, bits_per_weight(QuantSpec.from_key(key), unit.in_features), unit.n_weights,
                               errors[unit.name][key]) for key in unit_candidates(unit, target, candidates)]
            for unit in profile.units}


# ----------------------------------------------------------------------------------------- the plan
def check_budget_args(bits: float | None, beta: float, target: str) -> None:
    """The planning arguments every caller passes (CLI `plan`, `quantize`'s request, the Python API)."""
    if target not in PLAN_TARGETS:
        raise UsageError(f"unknown target '{target}'; choose one of {', '.join(PLAN_TARGETS)}")
    if bits is not None and not math.isfinite(bits):
        raise UsageError(f"--bits must be a finite number, got {bits}")
    _check_beta(beta)


def build_plan(profile: SensitivityProfile, budget_bits: float | None, target: str = "vllm", beta: float = 0.5,
               candidates: Iterable[int | str] | None = None, objectives: Sequence[str] | None = None,
               *, budget_bytes: int | None = None, method: str = "gptq", speed=None) -> BitPlan:
    """Allocate grids for an average-bits budget (or `budget_bytes` for all quantized linears) -> BitPlan.
    speed: a callable (unit -> candidate keys, budget average bits) -> (seconds[unit][key], max seconds, info)
    that adds a decode-time budget (`tasa_deploy.speed.speed_constraint`); None: size only."""
    check_budget_args(budget_bits, beta, target)
    if (budget_bits is None) == (budget_bytes is None):
        raise UsageError("give exactly one budget: average bits per weight or a size in bytes")
    if not profile.units:
        raise UsageError("the profile has no allocation units; rerun `tasa-deploy profile`")
    chosen_objectives = select_objectives(profile, objectives)
    errors = aggregated_errors(profile, chosen_objectives, beta)
    options = allocation_options(profile, target, candidates, errors)
    speed_info = None
    if speed is not None:
        n_weights = sum(u.n_weights for u in profile.units)
        total_bits = budget_bits * n_weights if budget_bytes is None else 8 * budget_bytes
        seconds, max_seconds, speed_info = speed({u: [o.key for o in opts] for u, opts in options.items()},
                                                 total_bits / n_weights)
        allocation, predicted = allocate_with_time(options, total_bits, seconds, max_seconds, strict=False)
        speed_info = {**speed_info, "predicted_delta_s": predicted, "max_delta_s": max_seconds,
                      "met": predicted <= max_seconds}  # not met: the fastest plan within the size budget
    else:
        allocation = (allocate_average_bits(options, budget_bits) if budget_bytes is None
                      else allocate_total_bits(options, 8 * budget_bytes, at_most=True))
    modules = {module: ModulePlan(QuantSpec.from_key(allocation.choice[unit.name]), method)
               for unit in profile.units for module in unit.modules}
    info = {"beta": beta, "normalization": NORMALIZATION, "objectives": list(chosen_objectives),
            "objective_weights": objective_weights(chosen_objectives, beta), "budget_bytes": budget_bytes,
            "predicted_error": allocation.total_error, "profile_settings": dict(profile.settings),
            "units": _unit_summary(profile, allocation.choice, errors)}
    if speed_info is not None:
        info["speed"] = speed_info
    budget_average = budget_bits if budget_bytes is None else 8 * budget_bytes / allocation.n_weights
    return BitPlan(profile.model_fingerprint, target, modules, budget_average,
                   _units_average_bits(profile, allocation.choice), info)


def _units_average_bits(profile: SensitivityProfile, choice: Mapping[str, str]) -> float:
    total = sum(exact_bits_per_weight(QuantSpec.from_key(choice[u.name]), u.in_features) * u.n_weights
                for u in profile.units)
    return float(total / sum(u.n_weights for u in profile.units))


def _unit_summary(profile, choice, errors) -> dict[str, dict]:
    return {u.name: {"layer": u.layer, "key": choice[u.name], "n_weights": u.n_weights,
                     "bpw": bits_per_weight(QuantSpec.from_key(choice[u.name]), u.in_features),
                     "error": errors[u.name][choice[u.name]]} for u in profile.units}


def plan_table(plan: BitPlan) -> list[dict]:
    """One row per layer: the grid key of each unit (short names) and the layer's average bits per weight."""
    units = plan.info.get("units")
    if not units:
        raise UsageError("the plan carries no per-unit summary (a uniform plan?); nothing to tabulate")
    by_layer: dict[int, dict[str, dict]] = {}
    for name, unit in units.items():
        by_layer.setdefault(int(unit["layer"]), {})[_short_name(name)] = unit
    columns = list(dict.fromkeys(short for layer in sorted(by_layer) for short in by_layer[layer]))
    rows = []
    for layer in sorted(by_layer):
        cells = by_layer[layer]
        n_weights = sum(u["n_weights"] for u in cells.values())
        average = sum(u["bpw"] * u["n_weights"] for u in cells.values()) / n_weights
        rows.append({"layer": layer, **{c: cells[c]["key"] if c in cells else "-" for c in columns},
                     "avg bpw": average})
    return rows


def _short_name(unit_name: str) -> str:
    """'model.layers.3.qkv' -> 'qkv'; 'model.layers.3.self_attn.q_proj' -> 'q'."""
    return unit_name.rsplit(".", 1)[-1].removesuffix("_proj")


# ----------------------------------------------------------------------------------------- diagnostics
def kendall_tau_matrix(profile: SensitivityProfile) -> dict[tuple[str, str], float]:
    """Tau-b between every pair of objectives' per-layer deltas (does ppl rank layers like math does?)."""
    return {(a, b): kendall_tau_b(profile.layer_deltas[a], profile.layer_deltas[b])
            for a, b in combinations(profile.objectives, 2)}


def tau_table(profile: SensitivityProfile, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Rows {pair, tau, ci95_low, ci95_high}: tau-b with a bootstrap interval over probe rows (`stats.bootstrap_tau`;
    no interval for a profile without per-row deltas). An interval that holds 0 cannot tell the pair from chance."""
    rows = []
    for (a, b), tau in kendall_tau_matrix(profile).items():
        low = high = math.nan
        if profile.row_deltas is not None and profile.row_weights is not None:
            low, high = bootstrap_tau(profile.row_deltas[a], profile.row_weights[a], profile.row_deltas[b],
                                      profile.row_weights[b], n_boot=n_boot, seed=seed)
        rows.append({"pair": f"{a} vs {b}", "tau": tau, "ci95_low": low, "ci95_high": high})
    return rows


def reliability_table(profile: SensitivityProfile) -> list[dict]:
    """Per objective: median |delta| / SE over blocks (its signal-to-noise), the mean SE, and how many block
    deltas are negative (quantizing a block should not lower a loss; negatives are noise)."""
    return [{"objective": objective, **reliability(profile.layer_deltas[objective],
                                                    profile.layer_se[objective] if profile.layer_se else None)}
            for objective in profile.objectives]


def top_layers(profile: SensitivityProfile, k: int) -> dict[str, list[int]]:
    """The k layers with the largest delta per objective, most sensitive first (ties: lower layer first)."""
    if k < 1:
        raise UsageError(f"k must be >= 1, got {k}")
    return {o: sorted(range(len(d)), key=lambda layer: (-d[layer], layer))[:k]
            for o, d in ((o, profile.layer_deltas[o]) for o in profile.objectives)}


# ----------------------------------------------------------------------------------------- plot
def normalized_layer_deltas(profile: SensitivityProfile) -> dict[str, list[float]]:
    """Per objective: clipped per-layer deltas divided by their sum (the plot's top panel). A non-finite
    delta is a UsageError; an objective with no positive delta is drawn as 0 everywhere (it is insensitive)."""
    result = {}
    for objective in profile.objectives:
        deltas = profile.layer_deltas[objective]
        total = _clipped_total(deltas, objective, "layer deltas")
        result[objective] = [max(float(d), 0.0) / total if total else 0.0 for d in deltas]
    return result


def save_plan_plot(profile: SensitivityProfile, plan: BitPlan, png_path: Path, *, force: bool = True,
                   inputs: tuple[Path, ...] = ()) -> Path:
    """PNG: normalized sensitivity per objective per layer (top) and chosen bits per layer (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = plan_table(plan)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    try:
        _draw_plan(fig, top, bottom, profile, plan, rows)
        png_path = Path(png_path)
        with atomic_path(png_path, force=force, inputs=inputs) as tmp:
            fig.savefig(tmp, format="png", dpi=100, metadata={"Software": TAG})
    finally:
        plt.close(fig)
    return png_path


def _draw_plan(fig, top, bottom, profile: SensitivityProfile, plan: BitPlan, rows: list[dict]) -> None:
    for objective, values in normalized_layer_deltas(profile).items():
        top.plot(range(len(values)), values, marker="o", label=objective)
    top.set_ylabel("normalized block delta")
    top.legend()
    averages = [r["avg bpw"] for r in rows]
    bottom.bar([r["layer"] for r in rows], averages, color="tab:gray")
    bottom.set_ylim(max(0.0, min(averages) - 0.5), max(averages + [plan.budget_bits or 0.0]) + 0.5)
    if plan.budget_bits is not None:
        bottom.axhline(plan.budget_bits, color="tab:red", linestyle="--", label=f"budget {plan.budget_bits:g}")
        bottom.legend()
    bottom.set_xlabel("layer")
    bottom.set_ylabel("bits per weight")
    fig.suptitle(f"TASA plan ({plan.target}): {plan.average_bits:.3f} bpw, beta={plan.info.get('beta')}")
    fig.tight_layout()
