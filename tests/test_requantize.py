"""`export --format gguf` of an int-grid artifact re-runs GPTQ onto the GGML grids (tasa_deploy.requantize):
the GGUF equals the one `quantize --target gguf --plan` makes from the same plan and calibration data, and
`--re-round` keeps the lossy path with one summary warning."""

import json

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

from tasa_deploy.cli import app

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=True)


def tensors(path):
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def int_artifact(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("int") / "q4"
    result = invoke("quantize", "--model", tiny_model_dir, "--method", "uniform", "--bits", "4",
                    "--calib-samples", "4", "--seq-len", "64", "--alpha", "0.5", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_gguf_export_of_an_int_artifact_reruns_gptq(int_artifact, tiny_model_dir, tmp_path):
    exported = tmp_path / "re.gguf"
    result = invoke("export", int_artifact, "--format", "gguf", "--out", exported)
    assert result.exit_code == 0, result.output
    assert "re-quantized 28 modules with GPTQ onto GGML types" in result.output
    assert "warning" not in result.output
    assert not list(tmp_path.glob(".tasa-regguf-*"))  # the temporary artifact is gone
    # the reference: the documented GGUF-target route with the same plan and mixture
    reference_dir = tmp_path / "ref"
    result = invoke("quantize", "--model", tiny_model_dir, "--method", "uniform", "--bits", "4", "--target", "gguf",
                    "--plan", int_artifact / "tasa_plan.json", "--alpha", "0.5", "--calib-samples", "4",
                    "--seq-len", "64", "--out", reference_dir)
    assert result.exit_code == 0, result.output
    assert invoke("export", reference_dir, "--format", "gguf", "--out", tmp_path / "ref.gguf").exit_code == 0
    ours, reference = tensors(exported), tensors(tmp_path / "ref.gguf")
    assert ours == reference
    # and it is not what re-rounding gives
    result = invoke("export", int_artifact, "--format", "gguf", "--re-round", "--out", tmp_path / "rr.gguf")
    assert result.exit_code == 0, result.output
    assert result.output.count("warning") == 1 and "re-rounded 28 int-grid modules" in result.output
    rerounded = tensors(tmp_path / "rr.gguf")
    assert rerounded.keys() == ours.keys()
    assert sum(rerounded[k] != ours[k] for k in ours) >= 20  # the quantized weights differ


def test_requantize_needs_the_recorded_request(int_artifact, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(int_artifact, broken)
    plan = json.loads((broken / "tasa_plan.json").read_text())
    del plan["info"]["request"]
    (broken / "tasa_plan.json").write_text(json.dumps(plan))
    result = invoke("export", broken, "--format", "gguf", "--out", tmp_path / "x.gguf")
    assert result.exit_code == 2 and "--re-round" in result.output, result.output
    assert not (tmp_path / "x.gguf").exists()
