"""The memory estimator (tasa_deploy.resources): its shape arithmetic against a real model's parameter count,
each stage's parts following the settings that should move them, and the one-line refusal naming the knob."""

import pytest
from transformers import LlamaConfig

from tasa_deploy import TasaError
from tasa_deploy.resources import GIB, Shapes, check_memory, estimate_stages, weights_bytes

LLAMA3_8B = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)


def test_shapes_count_the_parameters_of_a_real_model(smollm2):
    model = smollm2.model
    counted = sum(p.numel() for name, p in model.named_parameters() if "norm" not in name)
    assert Shapes.of(model.config).params == counted  # 135M: linears + tied embedding, norms aside


def test_llama3_8b_sizes():
    assert Shapes.of(LLAMA3_8B).params == pytest.approx(8.03e9, rel=0.01)
    assert weights_bytes(LLAMA3_8B, 2) / GIB == pytest.approx(14.96, rel=0.01)


def test_parts_follow_their_settings():
    small = estimate_stages(LLAMA3_8B, calib_rows=32, seq_len=512)
    more_calibration = estimate_stages(LLAMA3_8B, calib_rows=128, seq_len=2048)
    assert more_calibration["gptq"].parts["activations"] == 16 * small["gptq"].parts["activations"]
    assert more_calibration["gptq"].parts["hessians"] == small["gptq"].parts["hessians"]
    # one Hessian per shared input: 3 x 4096^2 + 14336^2 floats
    assert small["gptq"].parts["hessians"] == 4 * (3 * 4096**2 + 14336**2)
    # fewer mix tokens than the width: rows, never a K x K matrix (stacked rows + basis K x r, float64 r x r)
    few = estimate_stages(LLAMA3_8B, calib_rows=32, seq_len=512, mix_rows=2, mix_seq_len=256)
    many = estimate_stages(LLAMA3_8B, calib_rows=32, seq_len=512, mix_rows=64, mix_seq_len=256)
    assert few["mix"].parts["spectrum"] == 2 * 8 * 14336 * 1024 + 64 * 1024**2
    assert few["mix"].parts["grams"] == 3 * 4 * 512 * (3 * 4096 + 14336)  # each source's 512 rows per input
    assert many["mix"].parts["grams"] == 3 * 4 * (3 * 4096**2 + 14336**2)  # 16k tokens: the matrices
    assert many["mix"].parts["spectrum"] == 64 * 14336**2  # 32k tokens: full rank, float64 work
    # boundary states spill to disk past 2 GiB, so they never exceed it
    assert many["mix"].parts["boundary"] <= 2 * GIB


def test_refusal_names_the_stage_part_and_knob():
    stages = estimate_stages(LLAMA3_8B, calib_rows=4096, seq_len=4096)
    with pytest.raises(TasaError, match=r"gptq .* mostly activations .* lower --calib-samples/--seq-len"):
        check_memory(weights_bytes(LLAMA3_8B, 2), stages, available=64 * GIB)
    check_memory(0, {"gptq": estimate_stages(LLAMA3_8B, calib_rows=1, seq_len=8)["gptq"]}, available=64 * GIB)
