"""TASA planning (tasa_deploy.plan) on hand-made SensitivityProfiles: no model needed."""

import itertools
import random

import pytest

from tasa_deploy import UsageError
from tasa_deploy.artifacts import BitPlan, SensitivityProfile, UnitSensitivity
from tasa_deploy.bits import plan_average_bits, plan_total_bits
from tasa_deploy.request import QuantizeRequest
from tasa_deploy.plan import (aggregated_errors, build_plan, kendall_tau_b, kendall_tau_matrix, plan_table,
                              save_plan_plot, top_layers)

HIDDEN, INTER = 64, 128
# group -> (modules, {module: (N, K)})
VLLM_GROUPS = {"qkv": {"self_attn.q_proj": (64, HIDDEN), "self_attn.k_proj": (32, HIDDEN),
                       "self_attn.v_proj": (32, HIDDEN)},
               "o": {"self_attn.o_proj": (HIDDEN, HIDDEN)},
               "gate_up": {"mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN)},
               "down": {"mlp.down_proj": (HIDDEN, INTER)}}


def make_profile(sensitivity: dict[tuple[int, str], dict[str, float]], n_layers: int = 3,
                 bits=(2, 3, 4, 8), objectives=("ppl", "math", "arc")) -> SensitivityProfile:
    """vLLM-style profile: error_k(unit, b) = s_k(unit) * 4 ** (3 - b), base sensitivity 1 unless overridden."""
    units = []
    for layer in range(n_layers):
        for group, modules in VLLM_GROUPS.items():
            names = tuple(f"model.layers.{layer}.{m}" for m in modules)
            n_weights = sum(n * k for n, k in modules.values())
            in_features = next(iter(modules.values()))[1]
            base = sensitivity.get((layer, group), {})
            errors = {f"int{b}g32": {o: base.get(o, 1.0) * 4.0 ** (3 - b) for o in objectives} for b in bits}
            units.append(UnitSensitivity(f"model.layers.{layer}.{group}", layer, names, n_weights, in_features,
                                         errors))
    deltas = {o: tuple(sum(u.errors["int3g32"][o] for u in units if u.layer == layer) for layer in range(n_layers))
              for o in objectives}
    profile = SensitivityProfile("fp-synthetic", tuple(objectives), {o: 2.0 for o in objectives}, deltas,
                                 tuple(units), {"target": "vllm", "probe_bits": 3})
    return profile


def module_shapes(profile: SensitivityProfile) -> dict[str, tuple[int, int]]:
    """HF module name -> (N, K) of the synthetic model behind `make_profile`."""
    return {f"model.layers.{u.layer}.{m}": shape for u in profile.units for g, modules in VLLM_GROUPS.items()
            if u.name.endswith(f".{g}") for m, shape in modules.items()}


def units_of(profile, plan):
    return {u.name: plan.modules[u.modules[0]].spec for u in profile.units}


def test_plan_meets_budget_and_ties_fused_modules():
    profile = make_profile({(1, "down"): {"ppl": 50.0, "math": 50.0, "arc": 50.0}})
    plan = build_plan(profile, 3.5, candidates=(3, 4, 8))
    assert set(plan.modules) == set(module_shapes(profile))
    for unit in profile.units:  # every module of a unit shares the unit's grid
        assert len({plan.modules[m].spec for m in unit.modules}) == 1
    assert plan.average_bits <= 3.5
    assert plan.average_bits == pytest.approx(plan_average_bits(plan, module_shapes(profile)), abs=1e-12)
    assert plan_total_bits(plan, module_shapes(profile)) <= 3.5 * sum(n * k for n, k in module_shapes(profile).values())
    assert {m.method for m in plan.modules.values()} == {"gptq"}
    chosen = units_of(profile, plan)
    assert chosen["model.layers.1.down"].bits == max(spec.bits for spec in chosen.values())
    assert plan.info["beta"] == 0.5 and plan.info["objectives"] == ["ppl", "math", "arc"]


def test_plan_is_the_brute_force_optimum_at_4_bits():
    rng = random.Random(7)
    profile = make_profile({(layer, g): {o: rng.uniform(0.1, 5) for o in ("ppl", "math", "arc")}
                            for layer in range(2) for g in VLLM_GROUPS}, n_layers=2)
    plan = build_plan(profile, 4.0, candidates=(3, 4, 8))
    errors = aggregated_errors(profile, profile.objectives, 0.5)
    best = None
    for combo in itertools.product(("int3g32", "int4g32", "int8g32"), repeat=len(profile.units)):
        bits = sum((int(key[3]) + 0.5) * u.n_weights for key, u in zip(combo, profile.units))
        if bits <= 4.0 * sum(u.n_weights for u in profile.units):
            error = sum(errors[u.name][key] for key, u in zip(combo, profile.units))
            best = error if best is None else min(best, error)
    assert plan.info["predicted_error"] == pytest.approx(best, rel=1e-12)
    assert plan.average_bits <= 4.0


def test_replan_from_saved_profile_without_a_model(tmp_path):
    profile = make_profile({(0, "qkv"): {"math": 20.0}, (2, "gate_up"): {"ppl": 20.0}})
    profile.save(tmp_path / "profile.json")
    loaded = SensitivityProfile.load(tmp_path / "profile.json")
    plans = [build_plan(loaded, budget) for budget in (3.5, 4.5, 6.0)]
    assert [p.average_bits <= b for p, b in zip(plans, (3.5, 4.5, 6.0))] == [True] * 3
    errors = [p.info["predicted_error"] for p in plans]
    assert errors[0] > errors[1] > errors[2]
    plans[1].save(tmp_path / "tasa_plan.json")
    assert BitPlan.load(tmp_path / "tasa_plan.json").modules == plans[1].modules


def test_normalization_makes_objective_scale_irrelevant():
    rng = random.Random(11)
    sens = {(layer, g): {o: rng.uniform(0.5, 10) for o in ("ppl", "math", "arc")}
            for layer in range(3) for g in VLLM_GROUPS}
    rescaled = {unit: {**s, "math": 1000.0 * s["math"]} for unit, s in sens.items()}
    for budget in (3.65, 4.2, 5.0):
        assert build_plan(make_profile(sens), budget).modules == build_plan(make_profile(rescaled), budget).modules


def test_beta_moves_bits_between_objectives():
    profile = make_profile({(0, "gate_up"): {"ppl": 40.0}, (2, "gate_up"): {"math": 40.0, "arc": 40.0}})
    budget = 3.65  # one gate_up (16384 weights) can leave 3 bits, not two
    general = units_of(profile, build_plan(profile, budget, beta=0.0))
    reasoning = units_of(profile, build_plan(profile, budget, beta=1.0))
    assert general["model.layers.0.gate_up"].bits > general["model.layers.2.gate_up"].bits
    assert reasoning["model.layers.2.gate_up"].bits > reasoning["model.layers.0.gate_up"].bits
    only_math = units_of(profile, build_plan(profile, budget, objectives=["math"]))
    assert only_math["model.layers.2.gate_up"].bits > 3


def test_gguf_target_filters_types_by_row_length():
    units = []
    for layer in range(2):
        for module, k, types in (("self_attn.q_proj", 64, ("q4_0", "q4_1", "q8_0")),
                                 ("mlp.down_proj", 256, ("q3_k", "q4_0", "q4_k", "q6_k", "q8_0"))):
            name = f"model.layers.{layer}.{module}"
            errors = {t: {"ppl": 8.0 / int(t[1]) ** 2, "math": 4.0 / int(t[1])} for t in types}
            errors["int4g32"] = {"ppl": 0.0, "math": 0.0}  # an int key must never leak into a GGUF plan
            units.append(UnitSensitivity(name, layer, (name,), 64 * k, k, errors))
    profile = SensitivityProfile("fp", ("ppl", "math"), {"ppl": 1.0, "math": 1.0},
                                 {"ppl": (1.0, 2.0), "math": (2.0, 1.0)}, tuple(units))
    plan = build_plan(profile, 4.6, target="gguf", candidates=(3, 4, 8))
    assert {m.spec.fmt for m in plan.modules.values()} <= {"q3_k", "q4_0", "q4_1", "q4_k", "q8_0"}
    assert plan.modules["model.layers.0.self_attn.q_proj"].spec.fmt in ("q4_0", "q4_1", "q8_0")
    assert plan.average_bits <= 4.6
    with pytest.raises(UsageError, match="no candidate among"):
        build_plan(profile, 4.6, target="gguf", candidates=(3,))  # q_proj (K=64) cannot take a 3-bit type


def test_default_candidates_depend_on_the_target():
    """GGUF plans draw from every GGML width 3..8 by default (Q5_0/Q6_K included), vLLM plans from 3/4/8."""
    from tasa_deploy.plan import unit_candidates

    types = ("q2_k", "q3_k", "q4_0", "q4_k", "q5_0", "q5_k", "q6_k", "q8_0")
    errors = {t: {"ppl": 1.0} for t in types} | {f"int{b}g128": {"ppl": 1.0} for b in (2, 3, 4, 5, 8)}
    unit = UnitSensitivity("model.layers.0.mlp.down_proj", 0, ("model.layers.0.mlp.down_proj",), 256 * 256, 256,
                           errors)
    assert unit_candidates(unit, "gguf", None) == ["q3_k", "q4_0", "q4_k", "q5_0", "q5_k", "q6_k", "q8_0"]
    assert unit_candidates(unit, "gguf", (2, 3)) == ["q2_k", "q3_k"]
    assert unit_candidates(unit, "vllm", None) == ["int3g128", "int4g128", "int8g128"]
    assert QuantizeRequest(target="gguf").widths == (3, 4, 5, 6, 8)
    assert QuantizeRequest(target="vllm").widths == (3, 4, 8)
    assert QuantizeRequest(target="gguf", candidates=(4, 8), bits=5.0).widths == (4, 8)
    # GGML type names pick exact types (e.g. a plan that avoids the base's own grids); widths count nominally
    named = QuantizeRequest(target="gguf", candidates=("3", "Q4_K", "q6_k"))
    assert named.plan_candidates == (3, "q4_k", "q6_k") and named.widths == (3, 4, 6)
    assert unit_candidates(unit, "gguf", named.plan_candidates) == ["q3_k", "q4_k", "q6_k"]
    with pytest.raises(UsageError, match="need --target gguf"):
        QuantizeRequest(target="vllm", candidates=("q4_k",), bits=4.0)
    with pytest.raises(UsageError, match="unknown GGML type"):
        QuantizeRequest(target="gguf", candidates=("q4_z",))


def test_byte_budget():
    profile = make_profile({})
    n_weights = sum(n * k for n, k in module_shapes(profile).values())
    plan = build_plan(profile, None, budget_bytes=int(4.5 * n_weights / 8))
    assert plan_total_bits(plan, module_shapes(profile)) <= 4.5 * n_weights


def test_bad_inputs_are_one_line_usage_errors():
    profile = make_profile({})
    with pytest.raises(UsageError, match=r"below the cheapest plan \(3\.5000 bits/weight"):
        build_plan(profile, 3.0, candidates=(3, 4, 8))  # int3g32 costs 3.5 bpw
    with pytest.raises(UsageError, match="no objectives selected"):
        build_plan(profile, 4.0, objectives=[])
    with pytest.raises(UsageError, match="objective 'mmlu' is not in the profile"):
        build_plan(profile, 4.0, objectives=["ppl", "mmlu"])
    with pytest.raises(UsageError, match="beta must be in"):
        build_plan(profile, 4.0, beta=1.5)
    with pytest.raises(UsageError, match="unknown target"):
        build_plan(profile, 4.0, target="onnx")
    with pytest.raises(UsageError, match="no candidate among"):
        build_plan(profile, 4.0, candidates=(5,))


def test_kendall_tau_b_against_brute_force_and_scipy():
    rng = random.Random(3)
    for _ in range(20):
        x = [rng.choice([0.0, 1.0, 2.0, rng.random()]) for _ in range(12)]
        y = [rng.choice([0.0, 1.0, rng.random()]) for _ in range(12)]
        pairs = list(itertools.combinations(range(12), 2))
        conc = sum((x[i] - x[j]) * (y[i] - y[j]) > 0 for i, j in pairs)
        disc = sum((x[i] - x[j]) * (y[i] - y[j]) < 0 for i, j in pairs)
        untied_x = sum(x[i] != x[j] for i, j in pairs)
        untied_y = sum(y[i] != y[j] for i, j in pairs)
        assert kendall_tau_b(x, y) == pytest.approx((conc - disc) / (untied_x * untied_y) ** 0.5, abs=1e-12)
        stats = pytest.importorskip("scipy.stats")
        assert kendall_tau_b(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)


def test_tau_matrix_and_top_layers():
    deltas = {"ppl": (0.1, 0.5, 0.3, 0.9), "math": (0.2, 0.6, 0.4, 1.0), "arc": (0.9, 0.3, 0.5, 0.1)}
    profile = SensitivityProfile("fp", ("ppl", "math", "arc"), {}, deltas, ())
    taus = kendall_tau_matrix(profile)
    assert taus == {("ppl", "math"): 1.0, ("ppl", "arc"): -1.0, ("math", "arc"): -1.0}
    assert top_layers(profile, 2) == {"ppl": [3, 1], "math": [3, 1], "arc": [0, 2]}


def test_plan_table_and_plot(tmp_path):
    profile = make_profile({(1, "down"): {"ppl": 50.0}})
    plan = build_plan(profile, 4.0)
    rows = plan_table(plan)
    assert [r["layer"] for r in rows] == [0, 1, 2]
    assert list(rows[0]) == ["layer", "qkv", "o", "gate_up", "down", "avg bpw"]
    weights = {g: sum(n * k for n, k in VLLM_GROUPS[g].values()) for g in VLLM_GROUPS}
    expected = sum((int(rows[1][g][3]) + 0.5) * weights[g] for g in VLLM_GROUPS) / sum(weights.values())
    assert rows[1]["avg bpw"] == pytest.approx(expected)
    png = save_plan_plot(profile, plan, tmp_path / "plan.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.png"]  # no temp file left behind
