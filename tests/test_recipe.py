"""`quantize --config recipe.yaml` (tasa_deploy.recipe): every artifact carries the recipe of its run, the recipe
repeats the run byte for byte, command-line options override it, and a bad recipe is a one-line error."""

import hashlib

import pytest
import yaml
from typer.testing import CliRunner

from tasa_deploy.cli import app
from tasa_deploy.quantized_dir import load_artifact

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def first_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "u4"
    result = invoke("quantize", "--model", tiny_model_dir, "--method", "uniform", "--bits", "4", "--calib-samples", "4",
                    "--seq-len", "64", "--alpha", "0.5", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_the_recipe_repeats_the_run(first_run, tmp_path):
    recipe = first_run / "recipe.yaml"
    fields = yaml.safe_load(recipe.read_text())
    assert fields["bits"] == 4 and fields["calib_samples"] == 4 and fields["alpha"] == 0.5
    again = tmp_path / "again"
    result = invoke("quantize", "--config", recipe, "--out", again)
    assert result.exit_code == 0, result.output
    assert digest(again) == digest(first_run)
    changed = tmp_path / "three"
    result = invoke("quantize", "--config", recipe, "--bits", "3", "--out", changed)  # the command line wins
    assert result.exit_code == 0, result.output
    assert {m.spec.bits for m in load_artifact(changed).plan.modules.values()} == {3}
    assert yaml.safe_load((changed / "recipe.yaml").read_text())["calib_samples"] == 4  # the rest from the file


@pytest.mark.parametrize("text,message", [
    ("bits: 4\nnope: 1\n", "unknown option 'nope'"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("bits: [1\n", "not valid UTF-8 YAML"),
    ("tasks: 3\n", "must be a list"),
    ("method: sideways\n", "--method must be tasa or uniform"),
    ("target: gguf\ncandidates: [4, q4_z]\n", "unknown GGML type 'q4_z'"),
])
def test_bad_recipes_are_one_line_errors(tmp_path, text, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    result = invoke("quantize", "--config", recipe, "--out", tmp_path / "x")
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
