"""The Python API (tasa_deploy.quantize / tasa_deploy.export): an in-memory model gives the same artifact as
the CLI on its directory; user task data as rows; the README's example runs as written (slow: real SmolLM2)."""

import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tasa_deploy
from tasa_deploy.cli import app
from tasa_deploy.model import load_model
from tasa_deploy.quantized_dir import load_artifact

README = Path(__file__).resolve().parents[1] / "README.md"
SMALL = dict(calib_samples=4, seq_len=64)


def test_in_memory_model_gives_the_cli_artifact(tiny_model_dir, tmp_path):
    loaded = load_model(str(tiny_model_dir))
    artifact = tasa_deploy.quantize(loaded.model, tokenizer=loaded.tokenizer, out=tmp_path / "api", method="uniform",
                                    bits=4, **SMALL)
    result = CliRunner().invoke(app, ["quantize", "--model", str(tiny_model_dir), "--method", "uniform", "--bits", "4",
                                      "--calib-samples", "4", "--seq-len", "64", "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    cli = load_artifact(tmp_path / "cli")
    assert artifact.modules.keys() == cli.modules.keys() and len(artifact.modules) == 28
    for name, qt in artifact.modules.items():
        assert torch.equal(qt.codes, cli.modules[name].codes) and torch.equal(qt.scales, cli.modules[name].scales)
    assert artifact.plan.info["request"]["model"] == str(tiny_model_dir)  # named after its directory
    report = tasa_deploy.export(artifact, tmp_path / "api-vllm", format="vllm")
    assert (tmp_path / "api-vllm" / "config.json").is_file() and report is not None


def test_task_rows_become_a_task(tiny_model_dir, tmp_path, calibration_data):
    rows = [{"prompt": f"Question {i}: a farmer has {i} sheep and buys {i + 3} more at the market on Monday. "
                       "How many sheep does the farmer have now?", "answer": f"{i} + {i + 3} = {2 * i + 3}"}
            for i in range(200)]
    loaded = load_model(str(tiny_model_dir))
    artifact = tasa_deploy.quantize(loaded.model, tokenizer=loaded.tokenizer, out=tmp_path / "t", tasks=["mine"],
                                    task_data={"mine": rows}, bits=3.5, probe_samples=4, mix_samples=2,
                                    probe_seq_len=32, **SMALL)
    written = tmp_path / "t.work" / "task_data" / "mine.jsonl"
    assert artifact.plan.info["request"]["task_data"] == [f"mine={written}"]
    assert written.is_file() and len(written.read_text().splitlines()) == 200
    assert 3.0 <= artifact.plan.average_bits <= 3.5 + 1e-9
    with pytest.raises(tasa_deploy.UsageError, match="tokenizer"):
        tasa_deploy.quantize(loaded.model, out=tmp_path / "x")


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch, calibration_data):
    block = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert block, "README lost its Python API example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)  # our own README, not untrusted input
    assert Path("out/api-u4.gguf").is_file() and Path("out/api-u4/quantized.json").is_file()


def test_quantize_mix_draws_reach_the_mixture_search(tiny_model_dir, tmp_path, calibration_data):
    import json

    artifact = tasa_deploy.quantize(str(tiny_model_dir), out=tmp_path / "d", tasks=["gsm8k"], bits=3.5,
                                    mix_draws=2, mix_samples=2, probe_samples=4, probe_seq_len=32, **SMALL)
    mix = json.loads((tmp_path / "d.work" / "mix.json").read_text())
    assert len(mix["settings"]["draws"]["per_draw"]) == 2 and mix["settings"]["request"]["draws"] == 2
    assert artifact.plan.info["request"]["mix_draws"] == 2
    with pytest.raises(tasa_deploy.UsageError, match="mix-draws"):
        tasa_deploy.quantize(str(tiny_model_dir), out=tmp_path / "e", mix_draws=0)
