"""Allocation units and the share of their block's measured delta each (unit, width) is charged (step 4 of
`tasa_deploy.profile`).

A unit is what the plan gives one width: a vLLM fused group (q/k/v, gate/up share a grid) or, for GGUF, one
module. Two measurements price a unit, both from the profile's own forwards:
  B_k(u)    = the block-OUTPUT error with only u RTN-quantized at the probe width (profile.unit_output_errors):
              sum over objective k's real tokens of ||dy_t||^2 / ||y_t||^2, in the residual stream every unit
              writes to, so units of different kinds (q/k/v, o, gate/up, down) are on one scale;
  E_k(u, c) = sum over u's modules of tr(dW H_k dW^T), dW = W - RTN_c(W), H_k objective k's input second
              moment: the module-OUTPUT error, used only for the ratio between widths of the same unit.
share_k(u, c) = B_k(u) / sum_u' B_k(u') * E_k(u, c) / E_k(u, probe). Splitting the block by E_k alone (before
2026-11-30) priced o/down 20-40x too low and gate/up 2x too high against single-unit measurements
(benchmarks/unit_costs.py): their module outputs live in different spaces. Kept apart from the forwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from tasa_deploy import UsageError
from tasa_deploy.model import BLOCK_LINEARS, FUSED_GROUPS, SHARED_INPUT, block_linears, block_prefix, decoder_blocks
from tasa_deploy.moments import SecondMoment
from tasa_deploy.quant.rtn import fake_quantize_rtn
from tasa_deploy.quant.spec import QuantSpec, default_group_size

UNIT_ERROR_PROXY = ("shrunk(layer_delta) * B(u) / sum_u' B(u') * E(u,c) / E(u,probe); "
                    "B = sum_t |dy_t|^2/|y_t|^2 at the block output, u alone at the probe width; E = tr(dW H_k dW^T)")


@dataclass(frozen=True)
class UnitLayout:
    """One allocation unit of one block: the modules that share a width and their candidate grids."""

    name: str
    layer: int
    prefix: str  # the block's HF name, e.g. "model.layers.3"
    modules: tuple[str, ...]  # names relative to the block, e.g. "self_attn.q_proj"
    n_weights: int
    in_features: int
    candidates: tuple[str, ...]  # QuantSpec keys


def probe_spec(in_features: int, probe_bits: int) -> QuantSpec:
    return QuantSpec(probe_bits, default_group_size(in_features))


def candidate_keys(in_features: int, settings: dict) -> tuple[str, ...]:
    if settings["target"] == "vllm":
        group = default_group_size(in_features)
        return tuple(QuantSpec(b, group).key for b in settings["candidate_bits"])
    from tasa_deploy.bits import gguf_candidates

    keys = tuple(gguf_candidates(in_features, settings["gguf_types"]))
    if not keys:
        raise UsageError(f"no GGML type fits rows of {in_features} weights; allowed {settings['gguf_types']}")
    return keys


def block_units(model: nn.Module, layer: int, settings: dict) -> list[UnitLayout]:
    """Allocation units of block `layer` for the settings' target (fused groups for vLLM, modules for GGUF)."""
    linears = block_linears(decoder_blocks(model)[layer])
    prefix = block_prefix(model, layer)
    if settings["target"] == "vllm":
        groups = [(f"{prefix}.{group}", members) for group, members in FUSED_GROUPS.items()]
    else:
        groups = [(f"{prefix}.{name}", (name,)) for name in BLOCK_LINEARS]
    units = []
    for unit_name, members in groups:
        in_features = {linears[m].in_features for m in members}
        if len(in_features) != 1:
            raise UsageError(f"fused unit {unit_name} mixes input dims {sorted(in_features)}; cannot share a grid")
        k = in_features.pop()
        n_weights = sum(linears[m].weight.numel() for m in members)
        units.append(UnitLayout(unit_name, layer, prefix, tuple(members), n_weights, k, candidate_keys(k, settings)))
    return units


def output_error_energies(weight: torch.Tensor, specs: dict[str, QuantSpec],
                          grams: dict[str, SecondMoment]) -> dict[str, dict[str, float]]:
    """E[key][objective] = tr(dW H dW^T) for dW = W - RTN_spec(W) (weight [N, K]; H of each objective)."""
    energies = {}
    for key, spec in specs.items():
        delta = weight.float() - fake_quantize_rtn(weight, spec).float()  # [N, K]
        outer = delta.T @ delta if any(g.gram is not None for g in grams.values()) else None  # [K, K], shared
        energies[key] = {obj: gram.energy(delta, outer) for obj, gram in grams.items()}
    return energies


def unit_energies(block: nn.Module, unit: UnitLayout, keys: Iterable[str],
                  grams: dict[str, dict[str, SecondMoment]]) -> dict[str, dict[str, float]]:
    """E_k(unit, key) summed over the unit's modules: key -> objective -> energy."""
    linears = block_linears(block)
    specs = {key: QuantSpec.from_key(key) for key in sorted(set(keys))}
    summed = {key: dict.fromkeys(grams, 0.0) for key in specs}
    for module in unit.modules:
        by_objective = {obj: per[SHARED_INPUT.get(module, module)] for obj, per in grams.items()}
        for key, per_obj in output_error_energies(linears[module].weight.data, specs, by_objective).items():
            for obj, value in per_obj.items():
                summed[key][obj] += value
    return summed


def layer_unit_shares(block: nn.Module, units: Sequence[UnitLayout], probe_bits: int,
                      grams: dict[str, dict[str, SecondMoment]], output_errors: Sequence[dict[str, float]]) -> list[dict]:
    """JSON-shaped unit rows of one block with `shares` (module docstring): output_errors[i][k] is B_k of units[i]."""
    probe_keys = [probe_spec(unit.in_features, probe_bits).key for unit in units]
    energies = [unit_energies(block, unit, (*unit.candidates, key), grams) for unit, key in zip(units, probe_keys)]
    block_total = {obj: sum(errors[obj] for errors in output_errors) for obj in grams}
    rows = []
    for unit, energy, probe_key, errors in zip(units, energies, probe_keys, output_errors, strict=True):
        def share(key: str, obj: str) -> float:
            if block_total[obj] <= 0 or energy[probe_key][obj] <= 0:
                return 0.0
            return errors[obj] / block_total[obj] * energy[key][obj] / energy[probe_key][obj]

        shares = {key: {obj: share(key, obj) for obj in grams} for key in unit.candidates}
        rows.append({"name": unit.name, "layer": unit.layer, "modules": [f"{unit.prefix}.{m}" for m in unit.modules],
                     "n_weights": unit.n_weights, "in_features": unit.in_features, "shares": shares,
                     "output_errors": dict(errors)})
    return rows
