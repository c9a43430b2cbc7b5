"""Whole-file budgets (--size), the dry-run forecast and model cards, against the files the exporters really write.

References: the byte sizes of real vLLM and GGUF exports of the tiny Llama (predicted = measured for a uniform
plan, whose linear bits are exact), the allocator's own budget for --size, YAML parsing of the card's front
matter, and huggingface_hub itself refusing to reach the network in offline mode."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from tasa_deploy import UsageError
from tasa_deploy.cli import app
from tasa_deploy.sizes import parse_size

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL = ["--calib-samples", "2", "--seq-len", "32", "--probe-samples", "2",
         "--mix-samples", "2"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("text, expected", [("120MB", 120 * 10**6), ("4GB", 4 * 10**9), ("3.5GiB", int(3.5 * 2**30)),
                                            ("512kib", 512 * 1024), ("1.5g", 1_500_000_000), ("100", 100)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "-1GB", "0MB", "12 parsecs", "1e9"])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(UsageError, match="--size"):
        parse_size(text)


def _forecast_bytes(output: str) -> int:
    line = next(line for line in output.splitlines() if " bytes:" in line)
    return int(line.split(" bytes:")[0].split("│")[-1].strip().replace(",", ""))


@pytest.mark.parametrize("target, fmt", [("vllm", "vllm"), ("gguf", "gguf")])
def test_dry_run_predicts_the_exported_file(tiny_model_dir, tmp_path, target, fmt):
    """A uniform plan's linear bits are exact, so the forecast must equal the real export within 0.5% (the rest
    is header estimates); the dry run writes nothing."""
    args = ["quantize", "--model", tiny_model_dir, "--method", "uniform", "--bits", "4", "--quantizer", "rtn",
            "--target", target, *SMALL, "--out", tmp_path / "q"]
    dry = invoke(*args, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.work").exists()
    predicted = _forecast_bytes(dry.output)
    assert invoke(*args).exit_code == 0
    out = tmp_path / ("m.gguf" if fmt == "gguf" else "vllm")
    assert invoke("export", tmp_path / "q", "--format", fmt, "--out", out).exit_code == 0
    measured = (out if fmt == "gguf" else out / "model.safetensors").stat().st_size
    assert abs(predicted - measured) / measured < 0.005, (predicted, measured)


def test_size_budget_is_met_by_the_export(tiny_model_dir, tmp_path):
    """TASA with --size: the vLLM export is at most that size and uses most of it (the 28 units of the tiny
    model at 3/4/8 bits are a coarse knapsack: >= 90%)."""
    from tasa_deploy.model import load_config
    from tasa_deploy.sizes import file_layout

    layout = file_layout(tiny_model_dir, load_config(tiny_model_dir, "tiny"), "vllm")
    size = layout.fixed_bytes + layout.linear_weights * 4 // 8  # 4 bits per weight for the linear layers
    result = invoke("quantize", "--model", tiny_model_dir, "--size", f"{size}B", *SMALL, "--out", tmp_path / "q")
    assert result.exit_code == 0, result.output
    assert "the vllm export will be" in result.output
    assert invoke("export", tmp_path / "q", "--format", "vllm", "--out", tmp_path / "v").exit_code == 0
    measured = (tmp_path / "v" / "model.safetensors").stat().st_size
    assert 0.9 * size <= measured <= size, (measured, size)


def test_a_size_below_the_fixed_parts_is_one_line(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(app, ["quantize", "--model", str(tiny_model_dir), "--size", "1MB", "--out",
                                      str(tmp_path / "q")])
    assert result.exit_code == 2 and "below what the vllm file holds" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "q").exists()


@pytest.fixture(scope="module")
def uniform_artifact(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "q"
    assert invoke("quantize", "--model", tiny_model_dir, "--method", "uniform", "--bits", "4", "--quantizer", "rtn",
                  *SMALL, "--out", out).exit_code == 0
    return out


def test_vllm_export_carries_a_model_card_with_results(uniform_artifact, tmp_path):
    import json

    results = tmp_path / "results.json"
    results.write_text(json.dumps({"schema": "tasa-eval/1", "model": "x",
                                   "results": {"wikitext2": {"ppl": 31.25, "n": 8}}}))
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"schema": "tasa-bench/1", "target": "x", "tasks": {},
                                 "load": [{"clients": 4, "output_tok_per_s": 371.6, "ttft_s": {"p50": 0.02},
                                           "tpot_s": {"p50": 0.0096}}]}))
    assert invoke("export", uniform_artifact, "--format", "vllm", "--out", tmp_path / "v",
                  "--results", results, "--results", bench).exit_code == 0
    card = (tmp_path / "v" / "README.md").read_text()
    assert "| load, 4 clients | output tok/s | 371.6 |" in card and "| load, 4 clients | TPOT p50 (ms) | 9.6 |" in card
    front = yaml.safe_load(card.split("---")[1])
    assert front["quantized_by"] == "tasa-deploy" and "compressed-tensors" in front["tags"]
    assert front["pipeline_tag"] == "text-generation" and front["base_model"]
    assert "| wikitext2 | ppl | 31.25 |" in card and "vllm serve" in card
    size = (tmp_path / "v" / "model.safetensors").stat().st_size
    assert f"{size:,} bytes" in card


def test_a_bad_results_file_is_refused_before_export(uniform_artifact, tmp_path):
    bad = tmp_path / "r.json"
    bad.write_text('{"schema": "tasa-plan/1"}')
    result = CliRunner().invoke(app, ["export", str(uniform_artifact), "--format", "vllm", "--out", str(tmp_path / "v"),
                                      "--results", str(bad)])
    assert result.exit_code == 2 and not (tmp_path / "v").exists()


def test_push_to_hub_offline_is_one_line_and_keeps_the_export(uniform_artifact, tmp_path):
    """huggingface_hub in offline mode (and an endpoint nothing listens on): the push fails with one line, the
    export stays; no network is reached."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_fake"}
    result = subprocess.run([sys.executable, "-m", "tasa_deploy.cli", "export", str(uniform_artifact), "--format",
                             "vllm", "--out", str(tmp_path / "v"), "--push-to-hub", "someone/tiny-tasa"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode != 0
    assert "push to the hub (someone/tiny-tasa) failed" in result.stderr + result.stdout
    assert (tmp_path / "v" / "model.safetensors").is_file() and (tmp_path / "v" / "README.md").is_file()


def test_push_to_hub_uploads_the_gguf_and_its_card(uniform_artifact, tmp_path, monkeypatch):
    """The upload calls huggingface_hub makes for a GGUF export (recorded, not sent): the file and README.md."""
    import huggingface_hub

    calls = []

    class Recorder:
        def create_repo(self, repo, **kwargs):
            calls.append(("create_repo", repo))
            return f"https://huggingface.co/{repo}"

        def upload_file(self, *, path_or_fileobj, path_in_repo, repo_id):
            text = open(path_or_fileobj, "rb").read()
            calls.append(("upload_file", path_in_repo, repo_id, text[:4] if path_in_repo.endswith(".gguf") else text))

    monkeypatch.setattr(huggingface_hub, "HfApi", Recorder)
    result = invoke("export", uniform_artifact, "--format", "gguf", "--re-round", "--out", tmp_path / "m.gguf",
                    "--push-to-hub", "someone/tiny-gguf")
    assert result.exit_code == 0, result.output
    assert calls[0] == ("create_repo", "someone/tiny-gguf")
    assert calls[1] == ("upload_file", "m.gguf", "someone/tiny-gguf", b"GGUF")
    assert calls[2][:3] == ("upload_file", "README.md", "someone/tiny-gguf")
    front = yaml.safe_load(calls[2][3].decode().split("---")[1])
    assert front["library_name"] == "gguf" and front["quantized_by"] == "tasa-deploy"
    assert b"llama-server -m m.gguf" in calls[2][3]
