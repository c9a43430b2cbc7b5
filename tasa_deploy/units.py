"""Allocation units and their Hessian-weighted output-error energies (step 4 of `tasa_deploy.profile`).

A unit is what the plan gives one width: a vLLM fused group (q/k/v, gate/up share a grid) or, for GGUF, one
module. For each unit and candidate grid c, E_k(u, c) = sum over its modules of tr(dW H_k dW^T) with
dW = W - RTN_c(W) and H_k the input second moment of objective k; `layer_unit_shares` turns them into the share
of the block's measured delta each (unit, candidate) is charged. Kept apart from the forwards in profile.py.
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

UNIT_ERROR_PROXY = "shrunk(layer_delta) * E(u,c) / sum_u' E(u',probe); E = tr(dW H_k dW^T)"


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
                      grams: dict[str, dict[str, SecondMoment]]) -> list[dict]:
    """JSON-shaped unit rows of one block with `shares`: E_k(u, c) / sum_u' E_k(u', probe spec), the part of
    the block's measured delta each (unit, candidate) is charged (see the module docstring)."""
    probe_keys = [probe_spec(unit.in_features, probe_bits).key for unit in units]
    energies = [unit_energies(block, unit, (*unit.candidates, key), grams) for unit, key in zip(units, probe_keys)]
    probe_total = {obj: sum(e[key][obj] for e, key in zip(energies, probe_keys)) for obj in grams}
    rows = []
    for unit, energy in zip(units, energies):
        shares = {key: {obj: energy[key][obj] / probe_total[obj] if probe_total[obj] > 0 else 0.0 for obj in grams}
                  for key in unit.candidates}
        rows.append({"name": unit.name, "layer": unit.layer, "modules": [f"{unit.prefix}.{m}" for m in unit.modules],
                     "n_weights": unit.n_weights, "in_features": unit.in_features, "shares": shares})
    return rows
