"""End-to-end CLI/pipeline tests on a tiny random Llama: quantize -> artifact -> inspect/eval, resume, bad input."""

import pytest
import torch
from typer.testing import CliRunner

from tasa_deploy.artifacts import BitPlan
from tasa_deploy.quantized_dir import load_artifact
from tasa_deploy.cli import app
from tasa_deploy.model import load_artifact_model, load_model, model_fingerprint
from tasa_deploy.pipeline import uniform_plan
from tasa_deploy.quant import QuantSpec, quantize_rtn
from tasa_deploy.sequential import quantize_model

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args), catch_exceptions=True)


def test_uniform_rtn_artifact_matches_reference(tiny_model_dir, tmp_path):
    out = tmp_path / "q4"
    result = invoke("quantize", "--model", str(tiny_model_dir), "--method", "uniform", "--bits", "4",
                    "--quantizer", "rtn", "--calib-samples", "4", "--seq-len", "64", "--out", str(out))
    assert result.exit_code == 0, result.output
    artifact = load_artifact(out)
    base = load_model(str(tiny_model_dir)).model
    assert len(artifact.modules) == 4 * 7
    for name, qt in artifact.modules.items():
        weight = base.get_submodule(name).weight.detach()
        expected = quantize_rtn(weight, QuantSpec(4, 64 if weight.shape[1] == 64 else 128))
        assert torch.equal(qt.codes, expected.codes) and torch.equal(qt.scales, expected.scales), name
    model = load_artifact_model(out).model
    ids = torch.randint(0, 1000, (1, 16))
    assert torch.isfinite(model(ids).logits).all()
    assert invoke("inspect", str(out)).exit_code == 0


def test_gptq_resume_is_byte_identical(tiny_model_dir, tmp_path):
    loaded = load_model(str(tiny_model_dir))
    plan = uniform_plan(loaded.model, model_fingerprint(loaded.model), 3, "vllm")
    tokens = torch.randint(0, 1000, (8, 64), generator=torch.Generator().manual_seed(0))
    reference = quantize_model(load_model(str(tiny_model_dir)).model, plan, tokens)

    class Interrupt(Exception):
        pass

    def stop_after_block_1(index, total, resumed):
        if index == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        quantize_model(load_model(str(tiny_model_dir)).model, plan, tokens, resume_dir=tmp_path / "gptq",
                       on_block=stop_after_block_1)
    resumed_flags = []
    resumed = quantize_model(load_model(str(tiny_model_dir)).model, plan, tokens, resume_dir=tmp_path / "gptq",
                             on_block=lambda i, n, r: resumed_flags.append(r))
    assert resumed_flags == [True, True, False, False]
    for name, qt in reference.items():
        assert torch.equal(qt.codes, resumed[name].codes) and torch.equal(qt.scales, resumed[name].scales), name


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model"], "model not found"),
    (["--bits", "9", "--method", "uniform"], "bits"),
    (["--bits", "4", "--method", "uniform", "--group-size", "48"], "group size"),
    (["--tasks", "nosuchtask"], "unknown task"),
    (["--tasks", ""], "--tasks is empty"),
])
def test_quantize_bad_input(args, message, tmp_path):
    out = tmp_path / "out"
    result = invoke("quantize", "--out", str(out), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists()


def test_existing_output_needs_force(tiny_model_dir, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    result = invoke("quantize", "--model", str(tiny_model_dir), "--method", "uniform", "--bits", "4", "--out", str(out))
    assert result.exit_code == 2 and "--force" in result.output


def test_vllm_plan_moves_onto_gguf_grids(tiny_model_dir, tmp_path):
    """`quantize --target gguf --plan P` with an int plan: each width -> the GGML type its row can take,
    GPTQ rounds onto that grid, and the artifact is a GGUF-target plan at the true bits per weight."""
    from tasa_deploy.artifacts import ModulePlan
    from tasa_deploy.bits import plan_average_bits

    loaded = load_model(str(tiny_model_dir))
    base = uniform_plan(loaded.model, model_fingerprint(loaded.model), 3, "vllm")
    widths = {name: (8 if "down" in name else 4 if ".0." in name else 3) for name in base.modules}
    modules = {name: ModulePlan(QuantSpec(widths[name], m.spec.group_size), "gptq") for name, m in base.modules.items()}
    plan_path = tmp_path / "plan.json"
    BitPlan(base.model_fingerprint, "vllm", modules, 3.6, 3.6).save(plan_path)
    out = tmp_path / "moved"
    result = invoke("quantize", "--model", str(tiny_model_dir), "--target", "gguf", "--plan", str(plan_path),
                    "--calib-samples", "4", "--seq-len", "64", "--out", str(out))
    assert result.exit_code == 0, result.output
    artifact = load_artifact(out)
    assert artifact.plan.target == "gguf"
    # rows of 64 / 128 fit no k-quant: 3- and 4-bit -> q4_0 (4.5 bpw), 8-bit -> q8_0 (8.5 bpw)
    for name, module in artifact.plan.modules.items():
        assert module.spec.key == ("q8_0" if widths[name] == 8 else "q4_0"), name
        assert artifact.modules[name].fmt == module.spec.fmt, name
    shapes = {name: tuple(loaded.model.get_submodule(name).weight.shape) for name in modules}
    assert artifact.plan.average_bits == pytest.approx(plan_average_bits(artifact.plan, shapes))
    assert 4.5 < artifact.plan.average_bits < 8.5
