"""Serving with llama-server and benchmarking through its OpenAI API (tasa_deploy.serve, tasa_deploy.bench).

References: PyTorch's greedy generation on the same dequantized weights (the server, sent the same token ids,
must write the same text, and GSM8K scored both ways must agree within noise), and the request's own contract
(ignore_eos gives exactly the asked output tokens). Skipped without a llama-server build."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tasa_deploy import UsageError
from tasa_deploy.cli import app

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def llama_server():
    from tasa_deploy.exporters.llamacpp import find_llamacpp_bin

    if find_llamacpp_bin(("llama-server",), build=False) is None:
        pytest.skip("llama-server not built (bash benchmarks/llamacpp.sh)")


@pytest.fixture(scope="module")
def smol_q8(smollm2, tmp_path_factory, llama_server):
    """SmolLM2 with every linear RTN-quantized to q8_0 (an artifact, and its GGUF (f16 embeddings))."""
    from tasa_deploy.api import export

    root = tmp_path_factory.mktemp("serve")
    result = CliRunner().invoke(app, ["quantize", "--model", "smollm2-135m", "--method", "uniform", "--bits", "8",
                                      "--quantizer", "rtn", "--target", "gguf", "--calib-samples", "1",
                                      "--seq-len", "16", "--out", str(root / "q8")])
    assert result.exit_code == 0, result.output
    export(root / "q8", root / "q8.gguf", format="gguf")
    return root / "q8", root / "q8.gguf"


def test_server_writes_what_pytorch_writes(smol_q8):
    """Greedy continuations of 6 GSM8K prompts (chat template, as token ids): llama-server and PyTorch on the
    same weights (embeddings rounded to f16 as in the file) agree on the first 12 tokens' text for at least 5 of
    6 (llama.cpp's q8_0 dot products also round the activations to 8 bits, so a near-tie can flip later: at 24
    tokens 4 of 6 agreed), and GSM8K exact match scored from each agrees within two standard errors."""
    from tasa_deploy.bench import complete, run_tasks
    from tasa_deploy.eval.generate import generate_greedy, prompt_ids
    from tasa_deploy.eval.gsm8k import evaluate_gsm8k, gsm8k_job
    from tasa_deploy.model import load_artifact_model
    from tasa_deploy.serve import start_server

    artifact, gguf = smol_q8
    loaded = load_artifact_model(artifact)
    embed = loaded.model.get_input_embeddings()
    embed.weight.data = embed.weight.data.half().float()
    job = gsm8k_job(loaded.tokenizer, limit=6)
    torch_text = generate_greedy(loaded.model, loaded.tokenizer, list(job.prompts), 12, chat=job.chat)
    with start_server(gguf, parallel=2) as server:
        served = [complete(server.url, prompt_ids(loaded.tokenizer, p, job.chat), 12).text for p in job.prompts]
        remote = run_tasks(server.url, loaded.tokenizer, ("gsm8k",), limit=6, parallel=2)["gsm8k"]
        peak = server.peak_rss_mib()
    same = sum(a.strip() == b.strip() for a, b in zip(torch_text, served))
    assert same >= 5, list(zip(torch_text, served))
    local = evaluate_gsm8k(loaded.model, loaded.tokenizer, limit=6)
    assert remote["n"] == local.n == 6
    assert abs(remote["exact_match"] - local.exact_match) <= 2 * max(remote["exact_match_se"], local.exact_match_se, 1 / 6)
    assert peak > 50  # the server's own high-water mark, MiB


def test_load_test_counts_tokens_and_latency(smol_q8):
    from tasa_deploy.bench import load_test
    from tasa_deploy.serve import start_server

    with start_server(smol_q8[1], parallel=2) as server:
        result = load_test(server.url, list(range(100, 164)), clients=2, requests=4, output_tokens=8)
    assert result["mean_output_tokens"] == 8  # ignore_eos: exactly the asked tokens
    assert 0 < result["ttft_s"]["p50"] <= result["ttft_s"]["p99"] < result["wall_s"]
    assert result["tpot_s"]["p50"] > 0 and result["requests_per_s"] > 0


def test_bench_cli_writes_json(smol_q8, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", str(smol_q8[1]), "--tokenizer", str(smol_q8[0]), "--clients", "1",
                                      "--requests", "2", "--output-tokens", "4", "--prompt-tokens", "32",
                                      "--parallel", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["schema"] == "tasa-bench/1" and report["load"][0]["clients"] == 1
    assert report["server_peak_rss_mib"] > 0


def test_serve_refuses_what_it_cannot_serve(tmp_path, llama_server):
    from tasa_deploy.serve import start_server

    (tmp_path / "x.txt").write_text("not a model")
    for path in (tmp_path / "x.txt", tmp_path):
        with pytest.raises(UsageError):
            start_server(path)


def test_vllm_route_refuses_clearly_without_its_environment(tmp_path, monkeypatch):
    """A compressed-tensors export goes to vLLM; without a vLLM environment that is a one-line usage error naming
    the script that builds one, and a runtime that cannot read the input is refused before anything starts."""
    from tasa_deploy.serve import is_vllm_export, start_server

    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "compressed-tensors"}}))
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert is_vllm_export(export) and not is_vllm_export(plain)
    monkeypatch.setenv("TASA_VLLM_PYTHON", str(tmp_path / "no-venv" / "bin" / "python"))
    with pytest.raises(UsageError, match="vllm_cpu_env.sh"):
        start_server(export)
    with pytest.raises(UsageError, match="runtime vllm"):
        start_server(export, runtime="llamacpp")
    with pytest.raises(UsageError, match="unknown runtime"):
        start_server(export, runtime="tgi")
    with pytest.raises(UsageError, match="neither"):
        start_server(plain)
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(UsageError, match="runtime llamacpp"):
        start_server(gguf, runtime="vllm")
    result = CliRunner().invoke(app, ["serve", str(export), "--runtime", "vllm"])
    assert result.exit_code == 2 and "vllm_cpu_env.sh" in result.output
