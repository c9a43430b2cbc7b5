"""Bits-per-weight accounting: the ONE place that says how many bits a quantized tensor costs on disk.

Every figure the allocator optimizes and the CLI prints comes from here, so the budget a plan claims to meet
is the budget the exported file really has (scale and zero-point overhead included).

Integer group grid (`fmt="int"`, served by vLLM through compressed-tensors' `pack-quantized` format):
  - codes: `weight_packed` int32, packed DENSELY along the input dim (compressed_tensors
    `pack_to_int32`: ceil(K * b / 32) words per row, elements may straddle words) -> b bits per weight;
  - scales: `weight_scale` [N, K/g] in the checkpoint dtype (fp16/bf16) -> 16/g bits per weight;
  - zero points (asymmetric only): `weight_zero_point` [N, K/g] int8 packed densely along the OUTPUT dim
    (`pack_to_int32(..., packed_dim=0)`: ceil(N * b / 32) words per group column) -> b/g bits per weight.
  bpw = b + 16/g (+ b/g if asymmetric); per-channel (g = -1) uses g = K.

GGML types (llama.cpp `ggml-common.h`, table in `tasa_deploy.quant.ggml_types`): a row of K weights is
K / block_size blocks of type_size bytes -> bpw = type_size * 8 / block_size (scales, mins and super-block
scales are inside the block): Q4_0 4.5, Q4_1 5.0, Q5_0 5.5, Q5_1 6.0, Q8_0 8.5, Q2_K 2.625, Q3_K 3.4375,
Q4_K 4.5, Q5_K 5.5, Q6_K 6.5625.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Iterable, Mapping

from tasa_deploy import UsageError
from tasa_deploy.quant.ggml_types import GGML_TYPES, ggml_type
from tasa_deploy.quant.spec import QuantSpec

SCALE_BITS = 16  # compressed-tensors stores weight_scale in the checkpoint dtype (fp16 / bf16)
PACK_WORD_BITS = 32  # compressed-tensors packs codes and zero points into int32 words


def exact_bits_per_weight(spec: QuantSpec, in_features: int) -> Fraction:
    """Bits per weight of `spec` on rows of `in_features` weights, as an exact fraction (see module doc)."""
    if spec.fmt != "int":
        info = ggml_type(spec.fmt)
        _check_ggml_row(info.name, in_features)
        return Fraction(info.type_size * 8, info.block_size)
    spec.groups_for(in_features)  # raises UsageError when the group does not divide K
    group = spec.effective_group(in_features)
    zero_bits = 0 if spec.symmetric else spec.bits
    return spec.bits + Fraction(SCALE_BITS + zero_bits, group)


def bits_per_weight(spec: QuantSpec, in_features: int) -> float:
    """Bits per weight of `spec` on rows of `in_features` weights (codes + scales + zeros), e.g. int4g64 -> 4.25."""
    return float(exact_bits_per_weight(spec, in_features))


def tensor_bits(spec: QuantSpec, shape: tuple[int, int]) -> int:
    """Exact storage bits of one [N, K] weight stored with `spec`, including int32 packing padding."""
    n_rows, in_features = int(shape[0]), int(shape[1])
    if spec.fmt != "int":
        info = ggml_type(spec.fmt)
        _check_ggml_row(info.name, in_features)
        return n_rows * (in_features // info.block_size) * info.type_size * 8
    n_groups = spec.groups_for(in_features)
    code_bits = n_rows * _packed_words(in_features, spec.bits) * PACK_WORD_BITS  # weight_packed [N, ceil(K*b/32)]
    scale_bits = n_rows * n_groups * SCALE_BITS  # weight_scale [N, K/g]
    zero_bits = 0 if spec.symmetric else n_groups * _packed_words(n_rows, spec.bits) * PACK_WORD_BITS
    return code_bits + scale_bits + zero_bits


def plan_total_bits(plan, shapes: Mapping[str, tuple[int, int]]) -> int:
    """Exact storage bits of every quantized module of a BitPlan; `shapes` maps module name -> (N, K)."""
    missing = [name for name in plan.modules if name not in shapes]
    if missing:
        raise UsageError(f"no shape known for planned module {missing[0]} ({len(missing)} missing); "
                         "the plan does not match this model — rerun `tasa-deploy plan`")
    return sum(tensor_bits(module.spec, tuple(shapes[name])) for name, module in plan.modules.items())


def plan_average_bits(plan, shapes: Mapping[str, tuple[int, int]]) -> float:
    """Average storage bits per weight over the plan's modules (total bits / total weights)."""
    if not plan.modules:
        raise UsageError("the plan has no modules; there is nothing to average")
    n_weights = sum(int(shapes[name][0]) * int(shapes[name][1]) for name in plan.modules if name in shapes)
    return plan_total_bits(plan, shapes) / n_weights


def gguf_candidates(in_features: int, allowed: Iterable[str] | None = None) -> list[str]:
    """GGML type names whose block fits a row of `in_features` weights, cheapest first.

    k-quants need K % 256 == 0, the block-32 types K % 32 == 0. `allowed` restricts the set (unknown names
    are a UsageError, so a typo is never silently dropped)."""
    names = list(GGML_TYPES) if allowed is None else [ggml_type(name).name for name in allowed]
    fitting = [name for name in dict.fromkeys(names) if in_features % GGML_TYPES[name].block_size == 0]
    return sorted(fitting, key=lambda name: (exact_bits_per_weight(QuantSpec.for_ggml(name), in_features), name))


def _packed_words(n_values: int, bits: int) -> int:
    return math.ceil(n_values * bits / PACK_WORD_BITS)


def _check_ggml_row(type_name: str, in_features: int) -> None:
    block = GGML_TYPES[type_name].block_size
    if in_features % block:
        raise UsageError(f"{type_name} stores blocks of {block} weights but the row has {in_features}; "
                         f"choose a type from {gguf_candidates(in_features) or 'none (K not a multiple of 32)'}")
