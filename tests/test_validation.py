"""Every input is validated at the boundary: stage JSON files (plan, profile, mix), the quantized artifact's
index and tensors, and the plan against the model. Each case starts from a real, good input (the committed
benchmarks/results/tasa_smollm2 files, or a small artifact built here through the public API), breaks ONE
thing, and expects a one-line UsageError naming the file and the field, tensor or module."""

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tasa_deploy import UsageError
from tasa_deploy import schema
from tasa_deploy.artifacts import BitPlan, CalibrationMix, ModulePlan, SensitivityProfile, check_plan_covers, read_json
from tasa_deploy.quantized_dir import load_artifact, save_artifact
from tasa_deploy.plan import build_plan, normalized_layer_deltas
from tasa_deploy.quant.rtn import quantize_rtn
from tasa_deploy.quant.spec import QuantSpec
from tasa_deploy.quant.tensor import QuantizedTensor, tensor_layout
from tasa_deploy.weights_check import expected_parameters

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


def setitem(*keys_and_value):
    """mutate(obj): obj[k1][k2]... = value."""
    *keys, value = keys_and_value

    def mutate(obj):
        for key in keys[:-1]:
            obj = obj[key]
        obj[keys[-1]] = value
    return mutate


def delitem(*keys):
    def mutate(obj):
        for key in keys[:-1]:
            obj = obj[key]
        del obj[keys[-1]]
    return mutate


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
    assert SensitivityProfile.load(tmp_path / "se.json") == profile  # a well-shaped layer_se is accepted


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


# ----------------------------------------------------------------------------------------- the artifact
K = 256  # fits every grid (k-quants need K % 256 == 0)
SPECS = {"model.layers.0.self_attn.q_proj": QuantSpec(4, 64),
         "model.layers.0.self_attn.k_proj": QuantSpec(3, 32, False),
         "model.layers.0.self_attn.v_proj": QuantSpec(8, -1),
         "model.layers.0.mlp.up_proj": QuantSpec.for_ggml("q4_0"),
         "model.layers.0.mlp.gate_proj": QuantSpec.for_ggml("q4_k"),
         "model.layers.0.mlp.down_proj": QuantSpec.for_ggml("q3_k")}
GGML_NAMES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")


def tiny_config(layers: int = 1) -> dict:
    """A real Llama config whose q/k/v are [16, K] (one 16-wide head) and whose MLP is [K, K]."""
    return {"model_type": "llama", "hidden_size": K, "intermediate_size": K, "num_hidden_layers": layers,
            "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 32,
            "tie_word_embeddings": True}


def build_artifact(root: Path, specs=SPECS, layers: int = 1) -> Path:
    """An artifact of a `tiny_config(layers)` model: RTN-quantized random linears per `specs`, every other
    tensor the config implies dense and random, saved with save_artifact."""
    torch.manual_seed(0)
    base = root / "base"
    base.mkdir(parents=True)
    config = tiny_config(layers)
    (base / "config.json").write_text(json.dumps(config))
    shapes = expected_parameters(config)
    modules = {name: quantize_rtn(torch.randn(shapes[f"{name}.weight"]), spec) for name, spec in specs.items()}
    tensors = {name: torch.randn(shape) for name, shape in shapes.items()
               if name != "lm_head.weight" and name.removesuffix(".weight") not in modules}
    plan = BitPlan("fp-test", "gguf", {name: ModulePlan(spec, "rtn") for name, spec in specs.items()})
    return save_artifact(root / "art", base_model_dir=base, plan=plan, modules=modules, tensors=tensors)


@pytest.fixture(scope="module")
def good_artifact(tmp_path_factory) -> Path:
    return build_artifact(tmp_path_factory.mktemp("artifact"))


def test_good_artifact_loads_and_layouts_match_every_grid(good_artifact):
    artifact = load_artifact(good_artifact)
    assert set(artifact.modules) == set(SPECS)
    assert set(artifact.tensors) == {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight",
                                     "model.layers.0.post_attention_layernorm.weight", "model.layers.0.self_attn.o_proj.weight"}
    for spec in [QuantSpec(b, g, s) for b in (2, 4, 8) for g in (32, 128, -1) for s in (True, False)] + \
            [QuantSpec.for_ggml(name) for name in GGML_NAMES]:
        qt = quantize_rtn(torch.randn(8, 512), spec)  # what the grids really store == what tensor_layout says
        stored = {key[len("m."):]: (value.dtype, tuple(value.shape)) for key, value in qt.tensors("m").items()}
        assert tensor_layout(qt.fmt, qt.bits, qt.group_size, qt.symmetric, qt.shape) == stored, spec.key


QP, QK, QV = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"
UP, GATE, DOWN = "model.layers.0.mlp.up_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"


def _set(key, fn):
    def mutate(flat):
        flat[key] = fn(flat[key])
    return mutate


def _pop(key):
    return lambda flat: flat.pop(key)


def _add(key, value):
    return lambda flat: flat.update({key: value})


TENSOR_CASES = [
    ("int8 codes", _set(f"{QP}.codes", lambda t: t.to(torch.int8)), rf"tensor {QP}\.codes is int8, expected uint8"),
    ("bf16 scales", _set(f"{QP}.scales", lambda t: t.to(torch.bfloat16)),
     r"q_proj\.scales is bfloat16, expected float16"),
    ("fp32 scales", _set(f"{QV}.scales", lambda t: t.float()), r"v_proj\.scales is float32, expected float16"),
    ("scales shape", _set(f"{QP}.scales", lambda t: t[:, :-1].contiguous()),
     r"q_proj\.scales has shape \[16, 3\], expected \[16, 4\]"),
    ("codes 1-D", _set(f"{QP}.codes", lambda t: t.reshape(-1)), r"q_proj\.codes must be 2-D"),
    ("int8 zeros", _set(f"{QK}.zeros", lambda t: t.to(torch.int8)), r"k_proj\.zeros is int8, expected uint8"),
    ("zeros missing", _pop(f"{QK}.zeros"), r"k_proj\.zeros is missing \(the asymmetric int grid stores it\)"),
    ("zeros on symmetric", _add(f"{QP}.zeros", torch.zeros(16, 4, dtype=torch.uint8)),
     r"q_proj\.zeros is unexpected for the symmetric int grid"),
    ("codes missing", _pop(f"{QP}.codes"), r"tensor .*q_proj\.codes is missing"),
    ("codes beyond bits", _set(f"{QP}.codes", lambda t: t.clone().fill_(16)), r"q_proj\.codes holds 16, beyond 4 bits"),
    ("NaN scale", _set(f"{QP}.scales", lambda t: t.clone().fill_(math.nan)), r"q_proj\.scales holds NaN or infinite"),
    ("ggml d as fp32", _set(f"{UP}.extra.d", lambda t: t.float()), r"up_proj\.extra\.d is float32, expected float16"),
    ("ggml d missing", _pop(f"{UP}.extra.d"), r"up_proj\.extra\.d is missing \(the q4_0 grid stores it\)"),
    ("kquant sc unsigned", _set(f"{DOWN}.extra.sc", lambda t: t.to(torch.uint8)),
     r"down_proj\.extra\.sc is uint8, expected int8"),
    ("kquant dmin shape", _set(f"{GATE}.extra.dmin", lambda t: t.repeat(1, 2)),
     r"gate_proj\.extra\.dmin has shape \[256, 2\], expected \[256, 1\]"),
    ("unknown extra", _add(f"{GATE}.extra.x", torch.zeros(1)), r"gate_proj\.extra\.x is unexpected for the q4_k grid"),
    ("orphan codes", _add("model.layers.0.mlp.other.codes", torch.zeros(4, 4, dtype=torch.uint8)),
     r"holds quantized tensors for model\.layers\.0\.mlp\.other, which quantized\.json does not list"),
    ("dense and quantized", _add(f"{QP}.weight", torch.zeros(16, K)), r"q_proj is stored both quantized and dense"),
]


@pytest.mark.parametrize("mutate,message", [c[1:] for c in TENSOR_CASES], ids=[c[0] for c in TENSOR_CASES])
def test_bad_artifact_tensors_are_refused(tmp_path, good_artifact, mutate, message):
    art = tmp_path / "art"
    shutil.copytree(good_artifact, art)
    flat = load_file(str(art / "model.safetensors"))
    mutate(flat)
    save_file(flat, str(art / "model.safetensors"))
    with pytest.raises(UsageError, match=message) as info:
        load_artifact(art)
    assert "model.safetensors" in str(info.value) and "\n" not in str(info.value)


def _drop_module(obj):
    del obj["modules"][QV]


INDEX_CASES = [  # (file, mutation of its JSON, message)
    ("quantized.json", _drop_module, r"list different modules \(in tasa_plan\.json only: .*v_proj\)"),
    ("tasa_plan.json", _drop_module, r"list different modules \(in quantized\.json only: .*v_proj\)"),
    ("quantized.json", setitem("modules", QP, "bits", 3),
     r"quantized\.json: modules\['.*q_proj'\] is fmt=int bits=3 group_size=64 symmetric, "
     r"but tasa_plan\.json plans int4g64"),
    ("tasa_plan.json", setitem("modules", QK, "symmetric", True),
     r"is fmt=int bits=3 group_size=32 asymmetric, but .* plans int3g32"),
    ("quantized.json", setitem("modules", QV, "group_size", -1), r"v_proj'\] is .* group_size=-1 .* plans int8gc"),
    ("quantized.json", setitem("modules", QP, "symmetric", "false"),
     r"modules\['.*q_proj'\]\.symmetric must be true or false"),
    ("quantized.json", setitem("modules", QP, "bits", 4.0), r"q_proj'\]\.bits must be an integer, got 4\.0"),
    ("quantized.json", setitem("modules", QP, "shape", [16]), r"q_proj'\]\.shape must be \[N, K\], got \[16\]"),
    ("quantized.json", setitem("modules", QP, "shape", [16, 128]),
     r"module .*q_proj has shape \[16, 256\], index says \[16, 128\]"),
    ("quantized.json", setitem("modules", GATE, "shape", [16, 576]), r"does not fit the planned grid q4_k"),
    ("quantized.json", setitem("model_fingerprint", "other"), r"disagree on the model"),
    ("quantized.json", setitem("modules", {}), r"quantized\.json: modules must not be empty"),
]


@pytest.mark.parametrize("name,mutate,message", INDEX_CASES)
def test_index_and_plan_must_agree(tmp_path, good_artifact, name, mutate, message):
    art = tmp_path / "art"
    shutil.copytree(good_artifact, art)
    obj = json.loads((art / name).read_text())
    mutate(obj)
    (art / name).write_text(json.dumps(obj))
    with pytest.raises(UsageError, match=message):
        load_artifact(art)


def test_partial_plan_is_not_a_low_bit_model(tmp_path):
    """Block 0 quantized, block 1's same linears left dense: refused (a 7-of-210 plan is not a 3.5 bpw model)."""
    specs = {QP: QuantSpec(4, 64), UP: QuantSpec(4, 64)}  # o_proj etc. are planned in no block: may stay dense
    art = build_artifact(tmp_path, specs, layers=2)
    with pytest.raises(UsageError, match=r"2 block linears are dense while the same linear of other blocks is "
                                         r"quantized \(first: model\.layers\.1\.mlp\.up_proj, "
                                         r"model\.layers\.1\.self_attn\.q_proj\)"):
        load_artifact(art)


def test_from_tensors_validates_directly():
    qt = quantize_rtn(torch.randn(8, 128), QuantSpec(4, 64, False))
    flat = qt.tensors("m")
    back = QuantizedTensor.from_tensors("m", flat, "int", 4, 64, False)
    assert torch.equal(back.dequantize(), qt.dequantize())
    with pytest.raises(UsageError, match=r"tensor m\.scales is bfloat16, expected float16"):
        QuantizedTensor.from_tensors("m", {**flat, "m.scales": flat["m.scales"].bfloat16()}, "int", 4, 64, False)
    with pytest.raises(UsageError, match=r"m: int grid with 4 bits and group 48 does not fit rows of 128"):
        QuantizedTensor.from_tensors("m", flat, "int", 4, 48, False)
    with pytest.raises(UsageError, match=r"m: unknown grid 'fp8'"):
        QuantizedTensor.from_tensors("m", flat, "fp8", 4, 64, False)


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
