"""Facts about the GGML storage types we target (llama.cpp `ggml-common.h`), in one table.

Each type stores `block_size` weights along a row in `type_size` bytes. k-quants (Q2_K..Q6_K) use super-blocks
of 256, so a tensor can take them only if its row length (input dim K) is a multiple of 256 — on SmolLM2-135M
(hidden 576) only ffn_down (K=1536) can. `nominal_bits` is the integer width of one code; `sub_block` the
number of weights sharing one (effective) scale. Bits-per-weight accounting lives in `tasa_deploy.bits`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GgmlType:
    name: str  # lower-case llama.cpp name, e.g. "q4_k"
    nominal_bits: int  # width of one code
    block_size: int  # weights per stored block (32 or 256)
    type_size: int  # bytes per stored block
    sub_block: int  # weights per effective scale
    has_min: bool  # affine (scale + min) rather than symmetric
    k_quant: bool


GGML_TYPES: dict[str, GgmlType] = {t.name: t for t in (
    GgmlType("q4_0", 4, 32, 18, 32, False, False),
    GgmlType("q4_1", 4, 32, 20, 32, True, False),
    GgmlType("q5_0", 5, 32, 22, 32, False, False),
    GgmlType("q5_1", 5, 32, 24, 32, True, False),
    GgmlType("q8_0", 8, 32, 34, 32, False, False),
    GgmlType("q2_k", 2, 256, 84, 16, True, True),
    GgmlType("q3_k", 3, 256, 110, 16, False, True),
    GgmlType("q4_k", 4, 256, 144, 32, True, True),
    GgmlType("q5_k", 5, 256, 176, 32, True, True),
    GgmlType("q6_k", 6, 256, 210, 16, False, True),
)}

# Planned width -> GGML type (issue default; configurable in the exporter).
DEFAULT_TYPE_FOR_BITS = {2: "q2_k", 3: "q3_k", 4: "q4_k", 5: "q5_k", 6: "q6_k", 8: "q8_0"}


def ggml_type(name: str) -> GgmlType:
    from tasa_deploy import UsageError

    if name.lower() not in GGML_TYPES:
        raise UsageError(f"unknown GGML type '{name}'; known: {', '.join(GGML_TYPES)}")
    return GGML_TYPES[name.lower()]


def fits_row(type_name: str, in_features: int) -> bool:
    """Whether a row of `in_features` weights can be stored in this type."""
    return in_features % ggml_type(type_name).block_size == 0
