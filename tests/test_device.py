"""--device / --dtype: one-line errors, block onloading, bf16 weights with fp32 accumulation, and (marked gpu)
the same stages on CUDA against the CPU."""

import pytest
import torch
from typer.testing import CliRunner

from tasa_deploy import UsageError
from tasa_deploy.cli import app
from tasa_deploy.device import onloaded, resolve_device, resolve_dtype
from tasa_deploy.model import load_model
from tasa_deploy.pipeline import QuantizeRequest, request_to_json, uniform_plan
from tasa_deploy.sequential import quantize_model

HAS_CUDA = torch.cuda.is_available()
runner = CliRunner()


def test_device_and_dtype_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if HAS_CUDA else "cpu")
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16
    for bad, message in (("tpu", "--device must be"), ("cuda:x", "--device must be")):
        with pytest.raises(UsageError, match=message):
            resolve_device(bad)
    with pytest.raises(UsageError, match="--dtype must be"):
        resolve_dtype("int8", torch.device("cpu"))


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("command", ["quantize", "mix", "profile"])
def test_cuda_without_cuda_is_a_one_line_usage_error(command, tmp_path):
    args = [command, "--device", "cuda", "--out", str(tmp_path / "x")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "CUDA is not available" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_device_is_not_part_of_the_stored_request():
    stored = request_to_json(QuantizeRequest(device="cpu"))
    assert "device" not in stored and "dtype" not in stored  # default plans keep their bytes
    assert request_to_json(QuantizeRequest(dtype="bf16"))["dtype"] == "bf16"


def test_onloading_on_the_host_moves_nothing():
    block = torch.nn.Linear(4, 4)
    weight = block.weight
    with onloaded(block, torch.device("cpu")) as inside:
        assert inside.weight is weight


def test_bf16_weights_quantize_with_fp32_hessians(tiny_model_dir):
    """GPTQ on bf16 weights (fp32 Hessians): every module's relative weight error is within 10% of the fp32 run's."""
    tokens = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    base = load_model(str(tiny_model_dir)).model
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(str(tiny_model_dir), dtype).model
        results[dtype] = quantize_model(model, uniform_plan(model, "x", 4, "vllm"), tokens)
        assert next(model.parameters()).dtype == dtype
    for name, qt in results[torch.float32].items():
        weight = base.get_submodule(name).weight.detach()
        errors = [float((r[name].dequantize() - weight).norm() / weight.norm()) for r in results.values()]
        assert results[torch.bfloat16][name].codes.device.type == "cpu"
        assert errors[1] < 1.1 * errors[0], (name, errors)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gptq_on_cuda_matches_the_cpu(tiny_model_dir):
    tokens = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    out = {}
    for device in ("cpu", "cuda"):
        model = load_model(str(tiny_model_dir)).model
        out[device] = quantize_model(model, uniform_plan(model, "x", 4, "vllm"), tokens, device=torch.device(device))
        assert next(model.model.layers[0].parameters()).device.type == "cpu"  # blocks went home
    for name, qt in out["cpu"].items():
        assert (qt.codes == out["cuda"][name].codes).float().mean() > 0.95, name


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_profile_on_cuda_matches_the_cpu(tiny_model_dir):
    from tasa_deploy.profile import measure_profile

    profiles = {}
    for device in ("cpu", "cuda"):
        loaded = load_model(str(tiny_model_dir))
        profiles[device] = measure_profile(loaded.model, loaded.tokenizer, objectives=("ppl", "kl:math"), n_probe=4,
                                           seq_len=64, partial_path=None, progress=False, device=torch.device(device))
    for obj in ("ppl", "kl:math"):
        cpu, gpu = profiles["cpu"].layer_deltas[obj], profiles["cuda"].layer_deltas[obj]
        assert gpu == pytest.approx(cpu, rel=1e-2, abs=1e-4)


def test_eval_takes_device_and_dtype(tiny_model_dir, shared_data):
    """eval --device/--dtype: bf16 weights on the host give the fp32 perplexity within bf16 rounding."""
    ppl = {}
    for dtype in ("fp32", "bf16"):
        result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--tasks", "wikitext2", "--limit", "2",
                                     "--device", "cpu", "--dtype", dtype])
        assert result.exit_code == 0, result.output
        line = next(l for l in result.output.splitlines() if "wikitext2" in l)
        ppl[dtype] = float(line.split("│")[2].strip())
    assert ppl["bf16"] == pytest.approx(ppl["fp32"], rel=0.05)
    if not HAS_CUDA:
        result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--device", "cuda"])
        assert result.exit_code == 2 and "CUDA is not available" in result.output
