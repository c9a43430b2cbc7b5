"""Every input is validated at the boundary: stage JSON files (plan, profile, mix) and the plan against the
model (the quantized artifact: test_artifact_validation.py). Each case starts from a real, good input (the committed
benchmarks/results/tasa_smollm2 files, or a small artifact built here through the public API), breaks ONE
thing, and expects a one-line UsageError naming the file and the field, tensor or module."""

import copy
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from tasa_deploy import UsageError
from tasa_deploy import schema
from mutate import delitem, setitem
from tasa_deploy.artifacts import BitPlan, CalibrationMix, ModulePlan, SensitivityProfile, check_plan_covers, read_json
from tasa_deploy.plan import build_plan, normalized_layer_deltas
from tasa_deploy.quant.spec import QuantSpec

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "tasa_smollm2"
LOADERS = {"tasa_plan.json": BitPlan, "profile.json": SensitivityProfile, "mix.json": CalibrationMix}
Q = "model.layers.0.self_attn.q_proj"  # first module of the committed plan


@pytest.fixture(scope="module")
def originals() -> dict[str, dict]:
    return {name: json.loads((RESULTS / name).read_text()) for name in LOADERS}


def write_mutated(tmp_path: Path, originals: dict, name: str, mutate) -> Path:
    obj = copy.deepcopy(originals[name])
    mutate(obj)
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return path


def test_committed_files_load_unchanged(tmp_path, originals):
    for name, cls in LOADERS.items():
        loaded = cls.load(RESULTS / name)
        path = tmp_path / name
        loaded.save(path)
        assert cls.load(path) == loaded  # round trip through the strict reader
    profile = SensitivityProfile.load(RESULTS / "profile.json")
    assert len(profile.units) == 120 and len(BitPlan.load(RESULTS / "tasa_plan.json").modules) == 210
    with_se = {**originals["profile.json"], "layer_se": {k: [0.01] * 30 for k in ("ppl", "math", "arc")}}
    (tmp_path / "se.json").write_text(json.dumps(with_se))
    with_se_profile = SensitivityProfile.load(tmp_path / "se.json")  # a well-shaped layer_se is accepted
    assert with_se_profile.layer_se == {k: (0.01,) * 30 for k in ("ppl", "math", "arc")}
    assert replace(with_se_profile, layer_se=None) == profile


# ----------------------------------------------------------------------------------------- the plan
PLAN_CASES = [
    ("symmetric string", setitem("modules", Q, "symmetric", "false"),
     r"plan .*tasa_plan\.json: modules\['model\.layers\.0\.self_attn\.q_proj'\]\.symmetric must be true or false, "
     r"got 'false'"),
    ("fractional bits", setitem("modules", Q, "bits", 4.7),
     r"modules\['.*q_proj'\]\.bits must be an integer, got 4\.7"),
    ("integral float bits", setitem("modules", Q, "bits", 4.0), r"\.bits must be an integer, got 4\.0"),
    ("bool bits", setitem("modules", Q, "bits", True), r"\.bits must be an integer, got True"),
    ("bits out of range", setitem("modules", Q, "bits", 9), r"q_proj'\]: bits must be in 2\.\.8, got 9"),
    ("odd group", setitem("modules", Q, "group_size", 48), r"group size must be one of 32/64/128 or -1"),
    ("zero group", setitem("modules", Q, "group_size", 0), r"group size must be one of"),
    ("unknown fmt", setitem("modules", Q, "fmt", "fp4"), r"q_proj'\]: unknown GGML type 'fp4'"),
    ("upper-case fmt", setitem("modules", Q, "fmt", "Q4_K"), r"lower-case GGML type name, got 'Q4_K'"),
    ("missing fmt", delitem("modules", Q, "fmt"), r"q_proj'\]\.fmt is missing"),
    ("missing method", delitem("modules", Q, "method"), r"q_proj'\]\.method is missing"),
    ("unknown method", setitem("modules", Q, "method", "awq"), r"\.method must be one of 'gptq', 'rtn', got 'awq'"),
    ("module not an object", setitem("modules", Q, 4), r"q_proj'\] must be a JSON object, got 4"),
    ("ggml module on vllm",
     setitem("modules", Q, {"bits": 4, "group_size": 32, "symmetric": False, "fmt": "q4_k", "method": "gptq"}),
     r"is q4_k, but target 'vllm' serves only the int grid"),
    ("unknown target", setitem("target", "tensorrt"), r"tasa_plan\.json: target must be one of 'vllm', 'gguf'"),
    ("budget as string", setitem("budget_bits", "3.5"), r"budget_bits must be a number, got '3\.5'"),
    ("negative average", setitem("average_bits", -1.0), r"average_bits must be >= 0"),
    ("no modules", setitem("modules", {}), r"modules must not be empty"),
    ("modules as list", setitem("modules", []), r"modules must be an object"),
    ("modules missing", delitem("modules"), r"modules is missing"),
    ("fingerprint not a string", setitem("model_fingerprint", 5), r"model_fingerprint must be a string"),
    ("info not an object", setitem("info", [1]), r"info must be an object"),
    ("wrong schema", setitem("schema", "tasa-plan/0"), r"has schema 'tasa-plan/0'"),
]


# ----------------------------------------------------------------------------------------- raw JSON text
def _replace_once(old, new):
    def edit(text):
        assert old in text
        return text.replace(old, new, 1)
    return edit


JSON_CASES = [  # (id, text edit of the committed tasa_plan.json, message)
    ("NaN constant", _replace_once('"budget_bits": 3.5', '"budget_bits": NaN'),
     r"NaN is not a number tasa-deploy accepts"),
    ("Infinity constant", _replace_once('"budget_bits": 3.5', '"budget_bits": -Infinity'),
     r"-Infinity is not a number"),
    ("overflowing number", _replace_once('"budget_bits": 3.5', '"budget_bits": 1e400'),
     r"number 1e400 overflows a float"),
    ("duplicate key", _replace_once('"target": "vllm"', '"target": "gguf", "target": "vllm"'),
     r"tasa_plan\.json: duplicate key 'target'"),
    ("nested duplicate key", _replace_once('"method": "gptq"', '"method": "rtn", "method": "gptq"'),
     r"duplicate key 'method'"),
    ("deep nesting", lambda text: "[" * 100000, r"tasa_plan\.json is nested too deeply"),
    ("truncated", lambda text: text[:500], r"tasa_plan\.json is not valid JSON \(.* at line \d+ column \d+\)"),
    ("huge integer", lambda text: "{\"x\": " + "9" * 5000 + "}", r"is not valid JSON"),
    ("not an object", lambda text: "[1, 2]", r"does not hold a JSON object"),
    ("empty file", lambda text: "", r"is not valid JSON"),
]


@pytest.mark.parametrize("edit,message", [c[1:] for c in JSON_CASES], ids=[c[0] for c in JSON_CASES])
def test_bad_json_text_is_refused(tmp_path, edit, message):
    path = tmp_path / "tasa_plan.json"
    path.write_text(edit((RESULTS / "tasa_plan.json").read_text()))
    with pytest.raises(UsageError, match=message) as info:
        BitPlan.load(path)
    assert "\n" not in str(info.value)


def test_json_encoding_and_size_limits(tmp_path, monkeypatch):
    path = tmp_path / "mix.json"
    path.write_bytes(b'{"schema": "tasa-mix/1", "general": "\xff\xfe"}')
    with pytest.raises(UsageError, match=r"mix\.json is not valid UTF-8 \(byte \d+\)"):
        CalibrationMix.load(path)
    shutil.copy(RESULTS / "profile.json", path)
    monkeypatch.setattr(schema, "MAX_JSON_BYTES", 1000)
    with pytest.raises(UsageError, match=r"profile .*mix\.json is over the 0\.000953674 MiB limit"):
        SensitivityProfile.load(path)
    assert read_json(path, "profile", max_bytes=10**6)["schema"] == "tasa-profile/1"
    path.write_text('{"x": NaN}')
    assert math.isnan(read_json(path, "bench row", allow_nonfinite=True)["x"])  # opt-in for callers that need it


# ----------------------------------------------------------------------------------------- the profile
def _duplicate_unit(obj):
    obj["units"].append(copy.deepcopy(obj["units"][0]))


def _module_in_two_units(obj):
    obj["units"][1]["modules"].append(obj["units"][0]["modules"][0])


PROFILE_CASES = [
    ("missing baseline", delitem("baselines", "math"), r"profile .*: baselines has no entry for 'math'"),
    ("extra baseline", setitem("baselines", "mmlu", 1.0),
     r"baselines has an entry for 'mmlu', which is not an objective"),
    ("baseline as string", setitem("baselines", "ppl", "3.9"), r"baselines\.ppl must be a number, got '3\.9'"),
    ("missing deltas", delitem("layer_deltas", "arc"), r"layer_deltas has no entry for 'arc'"),
    ("short deltas", lambda o: o["layer_deltas"]["math"].pop(),
     r"layer_deltas\.math has 29 layers, but layer_deltas\.ppl has 30"),
    ("delta as null", setitem("layer_deltas", "ppl", 3, None), r"layer_deltas\.ppl\[3\] must be a number, got None"),
    ("no layers", setitem("layer_deltas", {"ppl": [], "math": [], "arc": []}), r"layer_deltas\.ppl must not be empty"),
    ("repeated objective", setitem("objectives", ["ppl", "ppl", "math"]), r"objectives lists 'ppl' twice"),
    ("objectives string", setitem("objectives", "ppl"), r"objectives must be an array, got 'ppl'"),
    ("no objectives", setitem("objectives", []), r"objectives must not be empty"),
    ("duplicate unit", _duplicate_unit,
     r"units\[120\] repeats unit name 'model\.layers\.0\.qkv' \(a duplicate unit drops"),
    ("module in two units", _module_in_two_units,
     r"units\[1\] lists module 'model\.layers\.0\.self_attn\.q_proj', already in unit 'model\.layers\.0\.qkv'"),
    ("repeated module in unit", lambda o: o["units"][0]["modules"].append(o["units"][0]["modules"][0]),
     r"units\[0\]\.modules lists 'model\.layers\.0\.self_attn\.q_proj' twice"),
    ("layer out of range", setitem("units", 0, "layer", 30), r"units\[0\]\.layer must be in \[0, 29\], got 30"),
    ("layer as string", setitem("units", 0, "layer", "0"), r"units\[0\]\.layer must be an integer"),
    ("zero weights", setitem("units", 0, "n_weights", 0), r"units\[0\]\.n_weights must be >= 1, got 0"),
    ("float weights", setitem("units", 0, "n_weights", 552960.0), r"units\[0\]\.n_weights must be an integer"),
    ("negative in_features", setitem("units", 0, "in_features", -576), r"units\[0\]\.in_features must be >= 1"),
    ("weights not rows", setitem("units", 0, "n_weights", 552961),
     r"n_weights \(552961\) is not a multiple of in_features"),
    ("no modules", setitem("units", 0, "modules", []), r"units\[0\]\.modules must not be empty"),
    ("bad candidate key", lambda o: o["units"][0]["errors"].update(int9g64=o["units"][0]["errors"]["int3g64"]),
     r"units\[0\]\.errors\.int9g64 is not a candidate key"),
    ("candidate misses objective", delitem("units", 0, "errors", "int4g64", "math"),
     r"units\[0\]\.errors\.int4g64 has no entry for 'math'"),
    ("error as string", setitem("units", 0, "errors", "int4g64", "ppl", "0.1"),
     r"errors\.int4g64\.ppl must be a number"),
    ("no errors", setitem("units", 0, "errors", {}), r"units\[0\]\.errors must not be empty"),
    ("no units", setitem("units", []), r"units must not be empty"),
    ("layer_se wrong length", setitem("layer_se", {k: [0.1] * 29 for k in ("ppl", "math", "arc")}),
     r"layer_se\.ppl has 29 layers, but layer_deltas has 30"),
    ("layer_se negative", setitem("layer_se", {k: [-0.1] * 30 for k in ("ppl", "math", "arc")}),
     r"layer_se\.ppl\[0\] must be >= 0\.0"),
    ("row_deltas alone", setitem("row_deltas", {k: [[0.1, 0.2]] * 30 for k in ("ppl", "math", "arc")}),
     r"has row_deltas without row_weights"),
    ("row_deltas short", lambda o: o.update(row_weights={k: [1.0, 2.0] for k in ("ppl", "math", "arc")},
                                            row_deltas={k: [[0.1, 0.2]] * 29 for k in ("ppl", "math", "arc")}),
     r"row_deltas\.ppl has 29 layers, but layer_deltas has 30"),
    ("row_deltas ragged", lambda o: o.update(row_weights={k: [1.0, 2.0] for k in ("ppl", "math", "arc")},
                                             row_deltas={k: [[0.1, 0.2]] * 29 + [[0.1]] for k in ("ppl", "math", "arc")}),
     r"row_deltas\.ppl\[29\] has 1 rows, but row_weights\.ppl has 2"),
    ("row weight negative", lambda o: o.update(row_weights={k: [1.0, -2.0] for k in ("ppl", "math", "arc")},
                                               row_deltas={k: [[0.1, 0.2]] * 30 for k in ("ppl", "math", "arc")}),
     r"row_weights\.ppl\[1\] must be >= 0\.0"),
]


NONFINITE_CASES = [  # from_json on objects that never went through read_json (NaN would not survive it)
    ("profile.json", SensitivityProfile, setitem("layer_deltas", "ppl", 2, math.nan),
     r"layer_deltas\.ppl\[2\] must be a finite number"),
    ("profile.json", SensitivityProfile, setitem("baselines", "math", math.inf),
     r"baselines\.math must be a finite number"),
    ("profile.json", SensitivityProfile, setitem("units", 5, "errors", "int3g64", "ppl", math.nan),
     r"units\[5\]\.errors\.int3g64\.ppl must be a finite number"),
    ("mix.json", CalibrationMix, setitem("alpha", math.nan), r"alpha must be a finite number"),
    ("mix.json", CalibrationMix, setitem("scores", 2, "hessian_trace", math.inf),
     r"scores\[2\]\.hessian_trace must be a finite"),
    ("tasa_plan.json", BitPlan, setitem("budget_bits", math.nan), r"budget_bits must be a finite number"),
]


@pytest.mark.parametrize("name,cls,mutate,message", NONFINITE_CASES)
def test_non_finite_numbers_are_refused(originals, name, cls, mutate, message):
    obj = copy.deepcopy(originals[name])
    mutate(obj)
    with pytest.raises(UsageError, match=message):
        cls.from_json(obj)


# ----------------------------------------------------------------------------------------- the mixture
MIX_CASES = [
    ("alpha above 1", setitem("alpha", 5), r"mixture .*mix\.json: alpha must be in \[0\.0, 1\.0\], got 5"),
    ("alpha negative", setitem("alpha", -5.0), r"alpha must be in \[0\.0, 1\.0\], got -5\.0"),
    ("alpha not scored", setitem("alpha", 0.3),
     r"alpha is 0\.3, not one of the scored alphas \[0\.0, 0\.25, 0\.5, 0\.75, 1\.0\]"),
    ("alpha as string", setitem("alpha", "0.25"), r"alpha must be a number"),
    ("tasks as string", setitem("tasks", "gsm8k"), r"tasks must be an array, got 'gsm8k'"),
    ("task not a string", setitem("tasks", ["gsm8k", 1]), r"tasks\[1\] must be a string, got 1"),
    ("no tasks", setitem("tasks", []), r"tasks must not be empty"),
    ("repeated task", setitem("tasks", ["gsm8k", "gsm8k"]), r"tasks lists 'gsm8k' twice"),
    ("no scores", setitem("scores", []), r"scores must not be empty"),
    ("score alpha out of range", setitem("scores", 0, "alpha", 1.5), r"scores\[0\]\.alpha must be in \[0\.0, 1\.0\]"),
    ("score as string", setitem("scores", 1, "combined", "high"), r"scores\[1\]\.combined must be a number"),
    ("score field missing", delitem("scores", 3, "grad_alignment"), r"scores\[3\]\.grad_alignment is missing"),
    ("unknown score field", setitem("scores", 0, "loss", 1.0), r"scores\[0\]\.loss is not a score field"),
    ("repeated score alpha", setitem("scores", 1, "alpha", 0.0), r"scores scores alpha 0\.0 twice"),
    ("score not an object", setitem("scores", 0, [0.0]), r"scores\[0\] must be an object"),
    ("empty general", setitem("general", ""), r"general must not be empty"),
    ("settings as list", setitem("settings", []), r"settings must be an object"),
]



FILE_CASES = ([("tasa_plan.json", BitPlan, *c) for c in PLAN_CASES] + [("profile.json", SensitivityProfile, *c)
              for c in PROFILE_CASES] + [("mix.json", CalibrationMix, *c) for c in MIX_CASES])


@pytest.mark.parametrize("name,cls,mutate,message", [(c[0], c[1], *c[3:]) for c in FILE_CASES],
                         ids=[f"{c[0]}: {c[2]}" for c in FILE_CASES])
def test_bad_stage_file_is_refused(tmp_path, originals, name, cls, mutate, message):
    path = write_mutated(tmp_path, originals, name, mutate)
    with pytest.raises(UsageError, match=message) as info:
        cls.load(path)
    assert "\n" not in str(info.value)


def test_forced_alpha_mix_has_no_scores(tmp_path):
    """The pipeline's `--alpha A` writes a mix with no scores and request.forced_alpha = A: it must reload."""
    request = {"general": "lambada", "tasks": ["gsm8k"], "forced_alpha": 0.5}
    forced = CalibrationMix("fp", 0.5, "lambada", ("gsm8k",), (), {"request": request})
    forced.save(tmp_path / "mix.json")
    assert CalibrationMix.load(tmp_path / "mix.json") == forced
    CalibrationMix("fp", 0.75, "lambada", ("gsm8k",), (), {"request": request}).save(tmp_path / "mix.json")
    with pytest.raises(UsageError, match=r"mix\.json: scores must not be empty"):
        CalibrationMix.load(tmp_path / "mix.json")


# ----------------------------------------------------------------------------------------- quant spec
def test_quant_spec_checks_types():
    with pytest.raises(UsageError, match=r"bits must be an integer, got 4\.7"):
        QuantSpec(4.7)
    with pytest.raises(UsageError, match=r"symmetric must be true or false, got 'false'"):
        QuantSpec(4, 64, "false")
    with pytest.raises(UsageError, match=r"group_size must be an integer, got True"):
        QuantSpec(4, True)
    import numpy as np

    spec = QuantSpec(np.int64(4), np.int64(64))
    assert type(spec.bits) is int and spec == QuantSpec(4, 64)
    with pytest.raises(UsageError, match=r"spec\.bits must be an integer, got '4'"):
        QuantSpec.from_json({"bits": "4", "group_size": 64, "symmetric": True, "fmt": "int"})
    assert QuantSpec.for_ggml("q4_k").groups_for(512) == 16
    with pytest.raises(UsageError, match=r"q4_k stores rows in blocks of 256; a row of 576 does not fit"):
        QuantSpec.for_ggml("q4_k").groups_for(576)


# ----------------------------------------------------------------------------------------- plan aggregation
def _profile_with(errors_for):
    """The committed profile with unit errors rewritten by errors_for(objective, value)."""
    profile = SensitivityProfile.load(RESULTS / "profile.json")
    units = tuple(type(u)(u.name, u.layer, u.modules, u.n_weights, u.in_features,
                          {k: {o: errors_for(o, v) for o, v in errs.items()} for k, errs in u.errors.items()})
                  for u in profile.units)
    return type(profile)(profile.model_fingerprint, profile.objectives, profile.baselines, profile.layer_deltas,
                         units, profile.settings)


def test_objective_that_cannot_be_normalized_is_refused_not_silently_dropped():
    """Rule (plan.NORMALIZATION): an objective with no positive delta (S_k = 0) or a non-finite one is a
    UsageError; before, it got weight 0 in the errors while plan.info still reported its nominal weight."""
    flat = _profile_with(lambda o, v: -abs(v) if o == "math" else v)
    with pytest.raises(UsageError, match=r"objective 'math' has no positive loss increase"):
        build_plan(flat, 3.5)
    assert set(build_plan(flat, 3.5, objectives=("ppl", "arc")).info["objective_weights"]) == {"ppl", "arc"}
    poisoned = _profile_with(lambda o, v: math.nan if o == "ppl" and v > 0.01 else v)
    with pytest.raises(UsageError, match=r"objective 'ppl' has a non-finite value \(nan\) among its unit errors"):
        build_plan(poisoned, 3.5)
    profile = SensitivityProfile.load(RESULTS / "profile.json")
    bad_deltas = type(profile)(profile.model_fingerprint, profile.objectives, profile.baselines,
                               {**profile.layer_deltas, "arc": (math.inf,) * 30}, profile.units)
    with pytest.raises(UsageError, match=r"objective 'arc' has a non-finite value \(inf\) among its layer deltas"):
        normalized_layer_deltas(bad_deltas)


# ----------------------------------------------------------------------------------------- plan vs model
def test_check_plan_covers():
    plan = BitPlan.load(RESULTS / "tasa_plan.json")
    shapes = {name: (576, 576) if "self_attn" in name else (1536, 576) if "down" not in name else (576, 1536)
              for name in plan.modules}
    check_plan_covers(plan, shapes, Path("p.json"))  # the committed plan fits SmolLM2's shapes
    few = BitPlan(plan.model_fingerprint, plan.target, dict(list(plan.modules.items())[:7]))
    with pytest.raises(UsageError, match=r"plan p\.json does not match this model's quantizable linears "
                                         r"\(in the model only: model\.layers\.1\.mlp\.down_proj, .* \(\+200 more\)\)"):
        check_plan_covers(few, shapes, Path("p.json"))
    with pytest.raises(UsageError, match=r"\(in the plan only: model\.layers\.0\.mlp\.down_proj\)"):
        shapes_less = {k: v for k, v in shapes.items() if k != "model.layers.0.mlp.down_proj"}
        check_plan_covers(plan, shapes_less, Path("p.json"))
    misfit = {**shapes, Q: (576, 600)}
    with pytest.raises(UsageError, match=r"plan p\.json: modules\['.*q_proj'\] is int4g64, which does not fit its "
                                         r"\[576, 600\] weight \(group size 64 does not divide the input dim 600"):
        check_plan_covers(plan, misfit, Path("p.json"))
    ggml = BitPlan("fp", "gguf", {Q: ModulePlan(QuantSpec.for_ggml("q4_k"))})
    with pytest.raises(UsageError, match=r"is q4_k, which does not fit its \[576, 576\] weight "
                                         r"\(q4_k stores rows in blocks of 256"):
        check_plan_covers(ggml, {Q: (576, 576)}, Path("g.json"))
