"""A plan in other tools' formats (tasa_deploy.emit): llama-quantize applies the emitted --tensor-type-file and
stores exactly the planned types (real llama.cpp; skips without it); the llm-compressor recipe's groups
validate as compressed-tensors QuantizationSchemes and cover every module once at its planned spec; the
AutoRound layer_config round-trips; outputs follow the one output policy."""

import json
from pathlib import Path

import gguf
import pytest
import yaml
from typer.testing import CliRunner

from tasa_deploy import UsageError
from tasa_deploy.artifacts import BitPlan, ModulePlan, SensitivityProfile
from tasa_deploy.cli import app
from tasa_deploy.emit import emit, gguf_tensor_name, plan_ggml_types
from tasa_deploy.quant.spec import QuantSpec

PROFILE = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "tasa_smollm2" / "profile.json"
runner = CliRunner()


def plan_with_emit(tmp_path, fmt, *extra):
    out = tmp_path / "plan.json"
    result = runner.invoke(app, ["plan", "--profile", str(PROFILE), "--bits", "3.5", "--out", str(out),
                                 "--emit", fmt, *extra])
    assert result.exit_code == 0, result.output
    return out, BitPlan.load(out)


def test_gguf_names():
    assert gguf_tensor_name("model.layers.3.self_attn.q_proj") == "blk.3.attn_q.weight"
    assert gguf_tensor_name("model.language_model.layers.0.mlp.down_proj") == "blk.0.ffn_down.weight"
    with pytest.raises(UsageError, match="no GGUF tensor name"):
        gguf_tensor_name("lm_head")


def test_llm_compressor_recipe_validates_and_covers_the_plan(tmp_path):
    from compressed_tensors.quantization import QuantizationScheme

    out, plan = plan_with_emit(tmp_path, "llm-compressor")
    recipe = yaml.safe_load((tmp_path / "plan.recipe.yaml").read_text())
    groups = recipe["quant_stage"]["quant_modifiers"]["GPTQModifier"]["config_groups"]
    covered = {}
    for group in groups.values():
        scheme = QuantizationScheme(**group)  # the schema llm-compressor reads
        for target in scheme.targets:
            module = target[len("re:^"):-1].replace("\\.", ".").replace("\\_", "_")
            assert module not in covered
            covered[module] = (scheme.weights.num_bits, scheme.weights.group_size, scheme.weights.symmetric)
    assert covered == {m: (p.spec.bits, p.spec.group_size, p.spec.symmetric) for m, p in plan.modules.items()}
    # rerun with --force replaces our own files
    assert runner.invoke(app, ["plan", "--profile", str(PROFILE), "--out", str(out), "--emit", "llm-compressor",
                               "--force"]).exit_code == 0


def test_autoround_layer_config_round_trips(tmp_path):
    _, plan = plan_with_emit(tmp_path, "autoround")
    config = json.loads((tmp_path / "plan.layer_config.json").read_text())
    assert config == {m: {"bits": p.spec.bits, "group_size": p.spec.group_size, "sym": p.spec.symmetric}
                      for m, p in plan.modules.items()}


def test_bad_emit_requests(tmp_path):
    result = runner.invoke(app, ["plan", "--profile", str(PROFILE), "--out", str(tmp_path / "p.json"),
                                 "--emit", "nope"])
    assert result.exit_code == 2 and "choose from: llama-quantize" in result.output
    assert not (tmp_path / "p.json").exists()
    gguf_plan = BitPlan("x", "gguf", {"model.layers.0.mlp.down_proj": ModulePlan(QuantSpec.for_ggml("q4_k"))})
    for fmt in ("llm-compressor", "autoround"):
        with pytest.raises(UsageError, match="integer grid"):
            emit(gguf_plan, fmt)
    assert emit(gguf_plan, "llama-quantize") == "^blk\\.0\\.ffn_down\\.weight$=q4_k\n"
    foreign = tmp_path / "plan.tensor_types.txt"
    foreign.write_text("not ours\n")
    result = runner.invoke(app, ["plan", "--profile", str(PROFILE), "--out", str(tmp_path / "plan.json"),
                                 "--emit", "llama-quantize", "--force"])
    assert result.exit_code == 2 and foreign.read_text() == "not ours\n"


@pytest.mark.slow
@pytest.mark.llamacpp
def test_llama_quantize_applies_the_emitted_types(tmp_path, smollm2):
    from tasa_deploy.exporters.gguf import export_dense_gguf
    from tasa_deploy.exporters.llamacpp import find_llamacpp_bin, llama_quantize

    if find_llamacpp_bin(("llama-quantize",), build=False) is None:
        pytest.skip("llama-quantize not built (bash benchmarks/llamacpp.sh)")
    _, plan = plan_with_emit(tmp_path, "llama-quantize")
    type_file = tmp_path / "plan.tensor_types.txt"
    profile = SensitivityProfile.load(PROFILE)
    planned = plan_ggml_types(plan, {m: u.in_features for u in profile.units for m in u.modules})
    assert len(set(planned.values())) >= 2  # a mixed plan (3/4/8-bit -> q4_0/q4_k/q8_0 ...)
    base = export_dense_gguf(smollm2.model_dir, tmp_path / "base-f16.gguf")
    out = llama_quantize(base, tmp_path / "q.gguf", "Q4_0", tensor_type_file=type_file)
    stored = {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(out).tensors}
    assert {name: stored[name] for name in planned} == planned
