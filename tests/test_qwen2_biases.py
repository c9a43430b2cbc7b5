"""Qwen2's q/k/v biases survive quantize and both exports (issue #14: they were dropped, and llama.cpp then
scored a WikiText-2 perplexity of ten million). A tiny random Qwen2 with large biases goes through the real
pipeline; logits are compared before and after quantize, after the vLLM export (read back by transformers)
and after the GGUF export (perplexity in the real llama.cpp against PyTorch on the same weights), each with
a control showing the comparison would catch missing biases."""

import math
from pathlib import Path

import pytest
import torch

from tasa_deploy import UsageError
from tasa_deploy.model import load_artifact_model
from tasa_deploy.pipeline import QuantizeRequest, run_quantize
from tasa_deploy.quantized_dir import load_artifact

BIAS_NAMES = ("q_proj.bias", "k_proj.bias", "v_proj.bias")


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory, smollm2, calibration_data):
    """A 2-block Qwen2 (hidden 64) whose q/k/v biases are large, saved with SmolLM2's tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(smollm2.tokenizer), max_position_embeddings=512,
                         tie_word_embeddings=False, initializer_range=0.1)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(BIAS_NAMES):
                parameter.normal_(0.0, 1.0)
    out = tmp_path_factory.mktemp("tiny-qwen2")
    model.save_pretrained(out)
    smollm2.tokenizer.save_pretrained(out)
    return out, model


def quantize(tiny_dir: Path, out: Path, target: str) -> Path:
    request = QuantizeRequest(model=str(tiny_dir), out=out, method="uniform", bits=8, target=target,
                              calib_samples=4, seq_len=64)
    return run_quantize(request, log=lambda message: None)[0]


@pytest.fixture(scope="module")
def artifacts(tiny_qwen, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-art")
    return {target: quantize(tiny_qwen[0], root / target, target) for target in ("vllm", "gguf")}


TOKENS = torch.randint(0, 4000, (2, 32), generator=torch.Generator().manual_seed(1))  # [2, 32]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits.float()  # [2, 32, V]


def without_biases(model):
    import copy

    stripped = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in stripped.named_parameters():
            if name.endswith(BIAS_NAMES):
                parameter.zero_()
    return stripped


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_quantize_keeps_biases_and_logits(tiny_qwen, artifacts):
    _, base = tiny_qwen
    reference = logits(base)
    for target, path in artifacts.items():
        artifact = load_artifact(path)
        state = base.state_dict()
        for name in (n for n in state if n.endswith(BIAS_NAMES)):
            assert torch.equal(artifact.tensors[name], state[name]), (target, name)
        error = relative_error(logits(load_artifact_model(path).model), reference)
        assert error < 0.02, (target, error)  # 8-bit weights: measured 0.0042 (vllm grid), 0.0035 (q8_0)
    control = relative_error(logits(without_biases(base)), reference)
    assert control > 0.1, control  # dropping the biases would be seen (measured 1.31)


def test_vllm_export_keeps_biases(artifacts, tmp_path):
    from transformers import AutoModelForCausalLM

    from tasa_deploy.exporters.vllm import export_vllm

    out = export_vllm(artifacts["vllm"], tmp_path / "vllm").out_dir
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    fake_quant = load_artifact_model(artifacts["vllm"]).model
    error = relative_error(logits(exported), logits(fake_quant))
    assert error < 0.01, error  # dense tensors stored fp16: measured 0.00028


def test_writers_refuse_an_artifact_without_biases(artifacts, tmp_path):
    """An artifact written before the fix (biases missing) is refused by every reader/writer in one line."""
    import shutil

    from safetensors.torch import load_file, save_file

    from tasa_deploy.exporters.gguf import export_gguf

    broken = tmp_path / "broken"
    shutil.copytree(artifacts["gguf"], broken)
    flat = load_file(str(broken / "model.safetensors"))
    save_file({k: v for k, v in flat.items() if not k.endswith(BIAS_NAMES)}, str(broken / "model.safetensors"))
    with pytest.raises(UsageError, match=r"missing 6 \(first: model\.layers\.0\.self_attn\.k_proj\.bias"):
        export_gguf(broken, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
@pytest.mark.llamacpp
def test_llamacpp_perplexity_of_the_gguf_export_matches_pytorch(tiny_qwen, artifacts, shared_data, tmp_path):
    import gguf

    from tasa_deploy.exporters.gguf import export_gguf
    from tasa_deploy.exporters.llamacpp import find_llamacpp_bin, llama_perplexity, llama_tokenize
    from test_llamacpp import llamacpp_protocol_ppl

    if find_llamacpp_bin(("llama-perplexity", "llama-tokenize"), build=False) is None:
        pytest.skip("llama.cpp tools not built (bash benchmarks/llamacpp.sh, or set LLAMACPP_BIN)")
    path = export_gguf(artifacts["gguf"], tmp_path / "qwen.gguf").path
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert {f"blk.{i}.attn_{x}.bias" for i in range(2) for x in "qkv"} <= names
    text = tmp_path / "wiki.txt"
    text.write_text((shared_data / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")[:8000])
    ppl_llamacpp = llama_perplexity(path, text, ctx=128, chunks=4)
    tokens = llama_tokenize(path, text.read_text(encoding="utf-8"))
    add_bos = bool(gguf.GGUFReader(path).fields["tokenizer.ggml.add_bos_token"].contents())
    loaded = load_artifact_model(artifacts["gguf"])
    model, bos = loaded.model, loaded.tokenizer.bos_token_id if add_bos else None
    with torch.no_grad():  # the GGUF stores embeddings as f16
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight.half().float())
        model.lm_head.weight.copy_(model.lm_head.weight.half().float())
    ppl_torch = llamacpp_protocol_ppl(model, tokens, 128, 4, bos)
    ppl_no_bias = llamacpp_protocol_ppl(without_biases(model), tokens, 128, 4, bos)
    # measured: llama.cpp 62,670.6, PyTorch 62,683.2 (0.02% apart); without biases PyTorch gives 67,929.6 (8%)
    assert abs(ppl_llamacpp - ppl_torch) / ppl_torch < 0.005, (ppl_llamacpp, ppl_torch)
    assert abs(math.log(ppl_no_bias / ppl_torch)) > 0.05, (ppl_no_bias, ppl_torch)  # 10x the tolerance
