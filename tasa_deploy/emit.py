"""A plan in other tools' own formats, so it can leave tasa-deploy (one registry: EMITTERS).

  llama-quantize  `--tensor-type-file`: one `^blk\\.N\\.attn_q\\.weight$=q4_k` line per planned tensor
                  (llama-quantize applies the first matching regex). GGUF-grid plans give their types as planned;
                  int-grid plans map each width to a GGML type the row fits (`exporters.gguf.choose_ggml_type`),
                  which needs each module's row length K (`in_features`, from the profile's units).
  llm-compressor  a recipe YAML with one GPTQModifier config group per distinct int spec (bits, group size,
                  symmetry), targets as `re:` patterns of the module names; each group validates as a
                  compressed-tensors `QuantizationScheme` (the schema llm-compressor reads). Int grid only.
  autoround       AutoRound's `layer_config` JSON: module name -> {"bits", "group_size", "sym"}. Int grid only.
"""

from __future__ import annotations

import json
import re
from typing import Callable, Mapping

from tasa_deploy import UsageError
from tasa_deploy.artifacts import BitPlan

# HF module leaf -> GGUF tensor leaf; identical for every architecture the GGUF writer supports
GGUF_LEAF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
_MODULE = re.compile(r"^(?:model\.(?:language_model\.)?)?layers\.(\d+)\.(.+)$")


def gguf_tensor_name(module: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'blk.3.attn_q.weight'."""
    match = _MODULE.match(module)
    if match is None or match.group(2) not in GGUF_LEAF:
        raise UsageError(f"module {module} has no GGUF tensor name (expected model.layers.N.<{'|'.join(GGUF_LEAF)}>)")
    return f"blk.{match.group(1)}.{GGUF_LEAF[match.group(2)]}.weight"


def plan_ggml_types(plan: BitPlan, in_features: Mapping[str, int] | None = None) -> dict[str, str]:
    """GGUF tensor name -> GGML type of every planned module."""
    from tasa_deploy.exporters.gguf import choose_ggml_type

    types = {}
    for module, module_plan in plan.modules.items():
        spec = module_plan.spec
        if spec.fmt != "int":
            types[gguf_tensor_name(module)] = spec.fmt
            continue
        if in_features is None or module not in in_features:
            raise UsageError(f"an int-grid plan needs each module's row length to pick GGML types ({module} "
                             "unknown); emit from `plan --profile` or re-plan with --target gguf")
        types[gguf_tensor_name(module)] = choose_ggml_type(spec.bits, in_features[module])[0]
    return types


def emit_llama_quantize(plan: BitPlan, in_features: Mapping[str, int] | None = None) -> str:
    return "".join(f"^{re.escape(name)}$={t}\n" for name, t in plan_ggml_types(plan, in_features).items())


def _int_specs(plan: BitPlan, tool: str) -> dict[str, tuple[int, int, bool]]:
    specs = {}
    for module, module_plan in plan.modules.items():
        spec = module_plan.spec
        if spec.fmt != "int":
            raise UsageError(f"{tool} quantizes onto an integer grid; this plan puts {module} on {spec.fmt} "
                             "(a GGUF plan); re-plan with --target vllm")
        specs[module] = (spec.bits, spec.group_size, spec.symmetric)
    return specs


def emit_llm_compressor(plan: BitPlan, in_features: Mapping[str, int] | None = None) -> str:
    """An llm-compressor recipe (YAML) quantizing each module with GPTQ at its planned int spec."""
    import yaml

    groups: dict[tuple, list[str]] = {}
    for module, key in _int_specs(plan, "llm-compressor").items():
        groups.setdefault(key, []).append(f"re:^{re.escape(module)}$")
    config_groups = {}
    for index, ((bits, group, sym), targets) in enumerate(sorted(groups.items())):
        weights = {"num_bits": bits, "type": "int", "symmetric": sym,
                   "strategy": "channel" if group == -1 else "group", "dynamic": False}
        if group != -1:
            weights["group_size"] = group
        config_groups[f"group_{index}"] = {"targets": targets, "weights": weights}
    recipe = {"quant_stage": {"quant_modifiers": {"GPTQModifier": {"ignore": ["lm_head"],
                                                                    "config_groups": config_groups}}}}
    return "# llm-compressor recipe written by tasa-deploy from a TASA plan\n" + yaml.safe_dump(recipe, sort_keys=False)


def emit_autoround(plan: BitPlan, in_features: Mapping[str, int] | None = None) -> str:
    """AutoRound's layer_config: {module: {"bits", "group_size", "sym"}} (JSON)."""
    config = {module: {"bits": bits, "group_size": group, "sym": sym}
              for module, (bits, group, sym) in _int_specs(plan, "AutoRound").items()}
    return json.dumps(config, indent=1, sort_keys=True) + "\n"


EMITTERS: dict[str, tuple[Callable[..., str], str]] = {
    "llama-quantize": (emit_llama_quantize, ".tensor_types.txt"),
    "llm-compressor": (emit_llm_compressor, ".recipe.yaml"),
    "autoround": (emit_autoround, ".layer_config.json"),
}


def emit(plan: BitPlan, fmt: str, in_features: Mapping[str, int] | None = None) -> str:
    if fmt not in EMITTERS:
        raise UsageError(f"unknown --emit format '{fmt}'; choose from: {', '.join(EMITTERS)}")
    return EMITTERS[fmt][0](plan, in_features)
