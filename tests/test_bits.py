"""Bits-per-weight accounting (tasa_deploy.bits) against hand-computed values, gguf-py's own block table and
real byte sizes from gguf.quants.quantize and compressed_tensors.pack_to_int32."""

from fractions import Fraction

import numpy as np
import pytest
import torch

from tasa_deploy import UsageError
from tasa_deploy.artifacts import BitPlan, ModulePlan
from tasa_deploy.bits import (bits_per_weight, exact_bits_per_weight, gguf_candidates, plan_average_bits,
                              plan_total_bits, tensor_bits)
from tasa_deploy.quant.ggml_types import GGML_TYPES
from tasa_deploy.quant.spec import QuantSpec

GGML_BPW = {"q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0, "q8_0": 8.5, "q2_k": 2.625, "q3_k": 3.4375,
            "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625}


@pytest.mark.parametrize("name, expected", sorted(GGML_BPW.items()))
def test_ggml_bpw_hand_values(name, expected):
    assert bits_per_weight(QuantSpec.for_ggml(name), 1536) == expected


def test_ggml_table_matches_gguf_py():
    gguf = pytest.importorskip("gguf")
    for name, info in GGML_TYPES.items():
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name.upper()]]
        assert (info.block_size, info.type_size) == (block, type_size), name


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_tensor_bits_equals_gguf_quantize_bytes(name):
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize

    weight = np.random.default_rng(0).standard_normal((24, 576)).astype(np.float32)  # [N, K]
    packed = quantize(weight, gguf.GGMLQuantizationType[name.upper()])  # [N, bytes per row] uint8
    assert tensor_bits(QuantSpec.for_ggml(name), weight.shape) == packed.nbytes * 8


@pytest.mark.parametrize("bits, group, symmetric, expected", [
    (4, 128, True, 4.125), (4, 64, True, 4.25), (3, 64, True, 3.25), (8, 32, True, 8.5),
    (4, 64, False, 4 + 16 / 64 + 4 / 64), (3, 128, False, 3 + 19 / 128), (2, 32, False, 2 + 18 / 32),
])
def test_int_bpw_hand_values(bits, group, symmetric, expected):
    assert bits_per_weight(QuantSpec(bits, group, symmetric), 1536) == pytest.approx(expected, abs=0)


def test_int_per_channel_uses_row_length():
    assert exact_bits_per_weight(QuantSpec(4, -1), 576) == 4 + Fraction(16, 576)


@pytest.mark.parametrize("bits, group, symmetric, shape", [
    (4, 64, True, (192, 576)), (3, 64, True, (192, 576)), (3, 64, False, (37, 576)),
    (5, 128, False, (11, 1536)), (2, 32, False, (7, 96)), (8, -1, True, (9, 576)),
])
def test_int_tensor_bits_equals_compressed_tensors_packing(bits, group, symmetric, shape):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    n_rows, in_features = shape
    n_groups = in_features // (in_features if group == -1 else group)
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(low, high + 1, shape, dtype=torch.int8)  # [N, K]
    stored = helpers.pack_to_int32(codes, bits).numel() * 32 + n_rows * n_groups * 16  # packed codes + fp16 scales
    if not symmetric:
        zeros = torch.randint(low, high + 1, (n_rows, n_groups), dtype=torch.int8)  # [N, K/g]
        stored += helpers.pack_to_int32(zeros, bits, packed_dim=0).numel() * 32
    assert tensor_bits(QuantSpec(bits, group, symmetric), shape) == stored


def test_tensor_bits_consistent_with_bpw_when_packing_is_exact():
    for key in ("int3g64", "int4g64a", "q3_k", "q6_k"):
        spec = QuantSpec.from_key(key)
        assert tensor_bits(spec, (64, 1536)) == exact_bits_per_weight(spec, 1536) * 64 * 1536


def test_gguf_candidates_by_row_length():
    assert gguf_candidates(576) == ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
    assert gguf_candidates(1536)[:3] == ["q2_k", "q3_k", "q4_0"]  # cheapest first
    assert set(gguf_candidates(1536)) == set(GGML_BPW)
    assert gguf_candidates(100) == []
    assert gguf_candidates(576, allowed=["Q3_K", "q4_0", "q8_0"]) == ["q4_0", "q8_0"]


def test_bad_inputs_raise_usage_errors():
    with pytest.raises(UsageError, match="unknown GGML type"):
        gguf_candidates(576, allowed=["q4_z"])
    with pytest.raises(UsageError, match="blocks of 256"):
        tensor_bits(QuantSpec.for_ggml("q4_k"), (8, 576))
    with pytest.raises(UsageError, match="does not divide"):
        bits_per_weight(QuantSpec(4, 128), 576)


def test_plan_average_bits_weights_by_tensor_size():
    shapes = {"a": (576, 576), "b": (1536, 576), "c": (576, 1536)}
    modules = {"a": ModulePlan(QuantSpec(3, 64)), "b": ModulePlan(QuantSpec(8, 64)),
               "c": ModulePlan(QuantSpec.for_ggml("q4_k"))}
    plan = BitPlan("fp", "gguf", modules)
    expected_bits = 576 * 576 * 3.25 + 1536 * 576 * 8.25 + 576 * 1536 * 4.5
    assert plan_total_bits(plan, shapes) == expected_bits
    assert plan_average_bits(plan, shapes) == pytest.approx(expected_bits / (576 * 576 + 2 * 1536 * 576), rel=1e-15)
    with pytest.raises(UsageError, match="no shape known"):
        plan_average_bits(plan, {"a": (576, 576)})
