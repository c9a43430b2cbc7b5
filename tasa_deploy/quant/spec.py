"""QuantSpec: what grid one weight matrix is quantized onto (validated on construction).

`fmt` names a grid in `tasa_deploy.quant.grids.GRIDS`:
  - "int": the integer group grid served by vLLM / compressed-tensors (bits 2..8, group 32/64/128 or
    per-channel = -1, symmetric or asymmetric);
  - a GGML type name ("q4_0", "q3_k", ...): the block grid llama.cpp stores (bits and group fixed by the type).

Construction checks types as well as values (bits 4.7, symmetric "false" or fmt "Q4_K" are refused), and
`from_json` reads a spec from JSON with exact JSON types (SPEC_JSON_KINDS), because `int(4.7)` and
`bool("false")` would otherwise turn a corrupt file into a silently different grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

from tasa_deploy import UsageError

INT_GROUP_SIZES = (128, 64, 32)
INT_BITS = range(2, 9)
# JSON field -> its JSON kind (tasa_deploy.schema: bool is not an integer there, 4.0 is not an integer).
SPEC_JSON_KINDS = {"bits": "integer", "group_size": "integer", "symmetric": "boolean", "fmt": "string"}


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int = 128  # columns (input dim) sharing one scale; -1 = one scale per output row
    symmetric: bool = True
    fmt: str = "int"

    def __post_init__(self) -> None:
        for name in ("bits", "group_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral):
                raise UsageError(f"{name} must be an integer, got {value!r}")
            object.__setattr__(self, name, int(value))  # numpy ints -> int, so specs stay JSON-able
        if not isinstance(self.symmetric, bool):
            raise UsageError(f"symmetric must be true or false, got {self.symmetric!r}")
        if not isinstance(self.fmt, str):
            raise UsageError(f"fmt must be a string, got {self.fmt!r}")
        if self.bits not in INT_BITS:
            raise UsageError(f"bits must be in 2..8, got {self.bits}")
        if self.fmt == "int" and self.group_size not in (*INT_GROUP_SIZES, -1):
            raise UsageError(f"group size must be one of 32/64/128 or -1 (per-channel), got {self.group_size}")
        if self.fmt != "int":
            from tasa_deploy.quant.ggml_types import ggml_type

            info = ggml_type(self.fmt)
            if self.fmt != info.name:
                raise UsageError(f"fmt must be 'int' or a lower-case GGML type name, got {self.fmt!r}")
            if (self.bits, self.group_size, self.symmetric) != (info.nominal_bits, info.sub_block, not info.has_min):
                raise UsageError(f"{self.fmt} is {info.nominal_bits}-bit, sub-block {info.sub_block}; "
                                 f"use QuantSpec.for_ggml('{self.fmt}')")

    @classmethod
    def for_ggml(cls, type_name: str) -> "QuantSpec":
        from tasa_deploy.quant.ggml_types import ggml_type

        info = ggml_type(type_name)
        return cls(info.nominal_bits, info.sub_block, not info.has_min, info.name)

    @property
    def key(self) -> str:
        """Compact candidate name used in profiles and plans: 'int3g64', 'int4g128a' (asym), 'q4_k'."""
        if self.fmt != "int":
            return self.fmt
        return f"int{self.bits}g{self.group_size if self.group_size != -1 else 'c'}{'' if self.symmetric else 'a'}"

    @classmethod
    def from_key(cls, key: str) -> "QuantSpec":
        if not key.startswith("int"):
            return cls.for_ggml(key)
        body = key[3:]
        symmetric = not body.endswith("a")
        bits, group = body.rstrip("a").split("g")
        return cls(int(bits), -1 if group == "c" else int(group), symmetric)

    def groups_for(self, in_features: int) -> int:
        """Number of scale groups along the input dim; raises if the spec does not fit a row of that length
        (int: the group must divide it; GGML: the type's storage block must)."""
        if self.fmt != "int":
            from tasa_deploy.quant.ggml_types import ggml_type

            block = ggml_type(self.fmt).block_size
            if in_features % block:
                raise UsageError(f"{self.fmt} stores rows in blocks of {block}; a row of {in_features} does not fit")
            return in_features // self.group_size
        group = in_features if self.group_size == -1 else self.group_size
        if in_features % group:
            fitting = [str(g) for g in INT_GROUP_SIZES if in_features % g == 0] or ["-1 (per-channel)"]
            raise UsageError(f"group size {group} does not divide the input dim {in_features}; "
                             f"use --group-size {fitting[0]} or 'auto'")
        return in_features // group

    def effective_group(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def to_json(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric, "fmt": self.fmt}

    @classmethod
    def from_json(cls, obj: dict, where: str = "spec") -> "QuantSpec":
        """A spec from its JSON object; every field required with its exact JSON type. Errors name `where`
        (e.g. "plan p.json: modules['x']") and the field, on one line."""
        from tasa_deploy.schema import Loc, get_field, show

        if not isinstance(obj, dict):
            raise UsageError(f"{where} must be a JSON object, got {show(obj)}")
        loc = Loc(where)
        fields = {key: get_field(obj, key, loc, kind, nonempty=False) for key, kind in SPEC_JSON_KINDS.items()}
        try:
            return cls(**fields)
        except UsageError as exc:
            raise UsageError(f"{where}: {exc}") from None


def default_group_size(in_features: int) -> int:
    """The largest of 128/64/32 that divides `in_features` (SmolLM2's 576 -> 64)."""
    for group in INT_GROUP_SIZES:
        if in_features % group == 0:
            return group
    raise UsageError(f"input dim {in_features} is not a multiple of 32; no int group size fits (use -1)")
