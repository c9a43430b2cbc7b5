"""Plans the allocator does not choose: one width for every module (`uniform_plan`), and an int-grid plan moved
onto GGML grids (`retarget_plan`, through `gguf_type_for`). Used by the pipeline, the forecast (`--dry-run`, on
a meta-device model) and the GGUF re-quantization of an int artifact.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from tasa_deploy import UsageError
from tasa_deploy.artifacts import BitPlan, ModulePlan
from tasa_deploy.model import quantizable_modules
from tasa_deploy.quant.ggml_types import DEFAULT_TYPE_FOR_BITS, GGML_TYPES, fits_row
from tasa_deploy.quant.spec import QuantSpec, default_group_size

Log = Callable[[str], None]


def uniform_plan(model: torch.nn.Module, fingerprint: str, bits: int, target: str, *, group_size: int | None = None,
                 symmetric: bool = True, method: str = "gptq") -> BitPlan:
    """Every quantizable module at `bits` (GGUF target: the GGML type for that width the row fits)."""
    modules = {}
    for name, linear in quantizable_modules(model).items():
        in_features = linear.in_features
        if target == "gguf":
            spec = QuantSpec.for_ggml(gguf_type_for(bits, in_features))
        else:
            spec = QuantSpec(bits, group_size or default_group_size(in_features), symmetric)
            spec.groups_for(in_features)
        modules[name] = ModulePlan(spec, method)
    return BitPlan(fingerprint, target, modules, None, None, {"kind": f"uniform{bits}"})


def retarget_plan(plan: BitPlan, model: torch.nn.Module, target: str, log: Log) -> BitPlan:
    """An int-grid (vLLM) plan moved onto GGML grids: each module's width -> `gguf_type_for(bits, K)`.

    This is how a plan made in nominal widths (e.g. TASA at 3.5 nominal bits over {3,4,8}) becomes a GGUF
    plan whose GPTQ rounds straight onto the stored grids; the true bits per weight go up where a row cannot
    take the k-quant of its width (576-wide rows: int3 -> q4_0). Only vllm -> gguf is supported."""
    if plan.target == target:
        return plan
    if (plan.target, target) != ("vllm", "gguf"):
        raise UsageError(f"cannot move a {plan.target} plan to target {target}; re-plan for {target} instead")
    from tasa_deploy.bits import plan_average_bits

    linears = quantizable_modules(model)
    modules = {name: ModulePlan(QuantSpec.for_ggml(gguf_type_for(module.spec.bits, linears[name].in_features)),
                                module.method) for name, module in plan.modules.items()}
    moved = BitPlan(plan.model_fingerprint, target, modules, None, None,
                    {**plan.info, "retargeted_from": {"target": plan.target, "average_bits": plan.average_bits}})
    moved = replace(moved, average_bits=plan_average_bits(moved, {n: tuple(linears[n].weight.shape) for n in modules}))
    log(f"plan moved from {plan.target} to {target}: {plan.average_bits or 0:.3f} nominal -> "
        f"{moved.average_bits:.3f} true bpw")
    return moved


def gguf_type_for(bits: int, in_features: int) -> str:
    """The GGML type for a width: the k-quant where the row fits, else the smallest block-32 type with >= bits."""
    preferred = DEFAULT_TYPE_FOR_BITS.get(bits)
    if preferred and fits_row(preferred, in_features):
        return preferred
    legacy = sorted((t for t in GGML_TYPES.values() if not t.k_quant and t.nominal_bits >= bits and not t.has_min),
                    key=lambda t: t.nominal_bits)
    for info in legacy:
        if fits_row(info.name, in_features):
            return info.name
    raise UsageError(f"no GGML type holds {bits}-bit rows of {in_features}; row length must be a multiple of 32")
