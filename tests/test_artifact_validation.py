"""The quantized artifact is validated when opened: its index and plan agree, every tensor has the dtype and
shape its grid implies, and the tensor set is what config.json implies. Each case builds a small real artifact
through the public API, breaks ONE thing, and expects a one-line UsageError naming the file and the tensor or
module."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mutate import setitem
from tasa_deploy import UsageError
from tasa_deploy.artifacts import BitPlan, ModulePlan
from tasa_deploy.quant.rtn import quantize_rtn
from tasa_deploy.quant.spec import QuantSpec
from tasa_deploy.quant.tensor import QuantizedTensor, tensor_layout
from tasa_deploy.quantized_dir import load_artifact, save_artifact
from tasa_deploy.weights_check import expected_parameters


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
