"""End-to-end CLI/pipeline tests on a tiny random Llama: quantize -> artifact -> inspect/eval, resume, bad input."""

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tasa_deploy.artifacts import BitPlan, load_artifact
from tasa_deploy.cli import app
from tasa_deploy.model import load_artifact_model, load_model, model_fingerprint
from tasa_deploy.pipeline import QuantizeRequest, run_quantize, uniform_plan
from tasa_deploy.quant import QuantSpec, quantize_rtn
from tasa_deploy.quantize import quantize_model

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
