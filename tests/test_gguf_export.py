"""GGUF export of a tiny mixed-type artifact, read back with gguf-py's GGUFReader (the runtime's format
reader): per-tensor types exactly as planned, tensor bytes decode to our weights, metadata and tokenizer."""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tasa_deploy import UsageError
from tasa_deploy.artifacts import BitPlan, ModulePlan
from tasa_deploy.quantized_dir import load_artifact, save_artifact
from tasa_deploy.exporters.gguf import choose_ggml_type, export_gguf, permute_rows, rotary_row_order
from tasa_deploy.exporters.gguf_vocab import detect_pre_tokenizer
from tasa_deploy.model import quantizable_modules
from tasa_deploy.quant.ggml_types import DEFAULT_TYPE_FOR_BITS
from tasa_deploy.quant.rtn import quantize_rtn
from tasa_deploy.quant.spec import QuantSpec

# One spec per linear of a block, repeated per layer: k-quants, legacy, and one vLLM int module.
BLOCK_PLAN = {"self_attn.q_proj": "q4_k", "self_attn.k_proj": "q3_k", "self_attn.v_proj": "q8_0",
              "self_attn.o_proj": "int3g64", "mlp.gate_proj": "q2_k", "mlp.up_proj": "q5_k", "mlp.down_proj": "q6_k"}
EXPECTED_TYPE = {"q4_k": "Q4_K", "q3_k": "Q3_K", "q8_0": "Q8_0", "int3g64": "Q3_K", "q2_k": "Q2_K",
                 "q5_k": "Q5_K", "q6_k": "Q6_K"}
GGUF_LEAF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}


def _write_tokenizer(out: Path) -> int:
    """A small byte-level BPE tokenizer (trained here, offline) saved as tokenizer.json; returns its size."""
    from tokenizers import ByteLevelBPETokenizer

    tokenizer = ByteLevelBPETokenizer()
    corpus = ["the quick brown fox jumps over the lazy dog"] * 20 + ["quantization of language models"] * 20
    tokenizer.train_from_iterator(corpus, vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>"])
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|endoftext|>",
                                                            "add_bos_token": False}))
    return tokenizer.get_vocab_size()


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    base = tmp_path_factory.mktemp("base")
    vocab = _write_tokenizer(base)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=0, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    model.config.save_pretrained(base)
    modules, plan = {}, {}
    for name, linear in quantizable_modules(model).items():
        spec = QuantSpec.from_key(BLOCK_PLAN[name.split(".", 3)[3]])
        modules[name] = quantize_rtn(linear.weight.detach(), spec)
        plan[name] = ModulePlan(spec, "rtn")
    quantized = {f"{n}.weight" for n in modules} | {"lm_head.weight"}
    dense = {k: v for k, v in model.state_dict().items() if k not in quantized}
    out = tmp_path_factory.mktemp("artifact") / "tiny"
    save_artifact(out, base_model_dir=base, plan=BitPlan("tiny", "gguf", plan), modules=modules, tensors=dense)
    return out


@pytest.fixture(scope="module")
def exported(tiny_artifact, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    report = export_gguf(tiny_artifact, path)
    return report, gguf.GGUFReader(path)


def test_tensor_types_follow_the_plan(exported):
    report, reader = exported
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    for layer in range(2):
        for leaf, key in BLOCK_PLAN.items():
            assert types[f"blk.{layer}.{GGUF_LEAF[leaf]}.weight"] == EXPECTED_TYPE[key]
    assert types["token_embd.weight"] == "F16" and types["output_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied embeddings
    assert report.tensor_types["blk.0.attn_output.weight"] == "q3_k"
    assert any("o_proj" in w and "re-rounded" in w for w in report.warnings)
    assert report.file_bytes == Path(report.path).stat().st_size


def test_tensor_data_decodes_to_our_weights(exported, tiny_artifact):
    _, reader = exported
    artifact = load_artifact(tiny_artifact)
    tensors = {t.name: t for t in reader.tensors}
    for name, qt in artifact.modules.items():
        layer, leaf = name.split(".")[2], name.split(".", 3)[3]
        if qt.fmt == "int":  # exported by re-rounding its dequantized weight onto the mapped type
            qt = quantize_rtn(qt.dequantize(), QuantSpec.for_ggml("q3_k"))
        heads = {"self_attn.q_proj": 4, "self_attn.k_proj": 2}.get(leaf)
        expected = qt.dequantize()
        if heads:  # llama.cpp's rotary row order
            expected = expected[rotary_row_order(expected.shape[0], heads)]
        stored = tensors[f"blk.{layer}.{GGUF_LEAF[leaf]}.weight"]
        decoded = gguf.quants.dequantize(stored.data, stored.tensor_type)
        assert np.array_equal(decoded, expected.numpy()), name
    norm = tensors["blk.1.ffn_norm.weight"].data
    assert np.array_equal(norm, artifact.tensors["model.layers.1.post_attention_layernorm.weight"].numpy())
    embedding = tensors["token_embd.weight"].data
    assert np.array_equal(embedding, artifact.tensors["model.embed_tokens.weight"].half().numpy())


def test_metadata_and_tokenizer(exported, tiny_artifact):
    _, reader = exported
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.block_count"].contents() == 2
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["llama.rope.dimension_count"].contents() == 64
    tokenizer = json.loads((tiny_artifact / "tokenizer.json").read_text())
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert all(tokens[i] == t for t, i in tokenizer["model"]["vocab"].items())
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "default"  # unknown vocabulary (warned)
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 1
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert len(fields["tokenizer.ggml.merges"].contents()) == len(tokenizer["model"]["merges"])


def test_rotary_permutation_matches_convert_hf_to_gguf():
    n_heads, head_dim, cols = 3, 8, 32
    w = torch.randn(n_heads * head_dim, cols)
    reference = w.reshape(n_heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(n_heads * head_dim, cols)
    assert torch.equal(w[rotary_row_order(w.shape[0], n_heads)], reference)
    qt = quantize_rtn(w, QuantSpec.for_ggml("q4_0"))
    permuted = permute_rows(qt, rotary_row_order(w.shape[0], n_heads))
    assert torch.equal(permuted.dequantize(), qt.dequantize()[rotary_row_order(w.shape[0], n_heads)])


@pytest.mark.parametrize("bits, cols, expected", [(4, 1536, "q4_k"), (4, 576, "q4_0"), (3, 576, "q4_0"),
                                                  (5, 576, "q5_0"), (6, 576, "q8_0"), (8, 576, "q8_0"),
                                                  (2, 512, "q2_k"), (6, 512, "q6_k")])
def test_choose_ggml_type_falls_back_by_shape(bits, cols, expected):
    chosen, note = choose_ggml_type(bits, cols)
    assert chosen == expected
    assert (note is None) == (expected == DEFAULT_TYPE_FOR_BITS[bits])  # a warning exactly when it fell back


def test_bad_inputs_are_usage_errors(tiny_artifact, exported, tmp_path):
    report, _ = exported
    with pytest.raises(UsageError, match="already exists"):
        export_gguf(tiny_artifact, report.path)
    with pytest.raises(UsageError, match="no type for 3-bit"):
        export_gguf(tiny_artifact, tmp_path / "x.gguf", type_map={4: "q4_k"})
    with pytest.raises(UsageError, match="rows of 100"):
        choose_ggml_type(4, 100)
    config_path = tiny_artifact / "config.json"
    original = config_path.read_text()
    config_path.write_text(original.replace('"model_type": "llama"', '"model_type": "gpt2"'))
    try:
        with pytest.raises(UsageError, match="GGUF export supports"):
            export_gguf(tiny_artifact, tmp_path / "y.gguf")
    finally:
        config_path.write_text(original)
    assert not list(tmp_path.iterdir())  # no partial outputs


def test_pre_tokenizer_detection():
    smollm = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + tuple(f"t{i}" for i in range(49149))
    assert detect_pre_tokenizer(smollm) == "smollm"
    assert detect_pre_tokenizer(("a", "b", "<|begin_of_text|>")) == "llama-bpe"
    assert detect_pre_tokenizer(("a", "b")) is None
