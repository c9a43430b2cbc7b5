"""The quantized-model directory (`tasa-deploy quantize --out DIR`): write it, open it, validate it.

  config.json, tokenizer files       copied from the base model
  tasa_plan.json                     the BitPlan: per-module grid (fmt/bits/group/sym) and method
  quantized.json                     {"schema", "model_fingerprint", "modules": {name: {fmt, bits, group_size,
                                     symmetric, shape}}}
  model.safetensors                  `<module>.codes/.scales/.zeros/.extra.*` for quantized modules, plus every
                                     unquantized tensor under its HF name (embeddings, norms, lm_head)

Opening checks everything before anything is used: the index and the plan list the same modules with the same
grids, every stored tensor has the dtype and shape its grid implies (`QuantizedTensor.from_tensors`), and the
whole set is what config.json implies (`weights_check`: no bias or norm left out). Writing checks the last.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from tasa_deploy import UsageError
from tasa_deploy.artifacts import BitPlan
from tasa_deploy.outputs import atomic_path, write_json_atomic
from tasa_deploy.quant.spec import QuantSpec
from tasa_deploy.quant.tensor import QuantizedTensor
from tasa_deploy.safetensors_io import LazyTensor, write_safetensors
from tasa_deploy.schema import Loc, check_schema, check_value, get_field, get_items, name_mismatch, read_json
from tasa_deploy.weights_check import check_weights

ARTIFACT_SCHEMA = "tasa-quantized/1"


@dataclass(frozen=True)
class QuantizedArtifact:
    """An opened quantized-model directory (see module docstring)."""

    path: Path
    config: Mapping[str, Any]  # HF config.json
    plan: BitPlan
    modules: Mapping[str, QuantizedTensor]  # HF module name -> quantized weight
    tensors: Mapping[str, torch.Tensor]  # unquantized tensors by HF parameter name

    def dense_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Every parameter as a dense tensor (quantized modules dequantized) — the fake-quant model."""
        state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in self.tensors.items()}
        for name, qt in self.modules.items():
            state[f"{name}.weight"] = qt.dequantize(dtype)
        return state


def save_artifact(out_dir: Path, *, base_model_dir: Path, plan: BitPlan, modules: Mapping[str, QuantizedTensor],
                  tensors: Mapping[str, torch.Tensor], force: bool = False, inputs: tuple[Path, ...] = (),
                  extra_files: tuple[Path, ...] = ()) -> Path:
    """Write the quantized directory atomically (temp dir + rename); `extra_files` are copied in too.
    model.safetensors is streamed one tensor at a time (`safetensors_io`): `modules` may be GPTQ's `BlockFiles`,
    read back from disk module by module, so saving does not hold the quantized model in memory."""
    out_dir = Path(out_dir)
    config = read_json(Path(base_model_dir) / "config.json", "model config", allow_nonfinite=True)
    index, flat_modules = _stored_modules(modules)
    check_weights(config, _stored_shapes({n: meta["shape"] for n, meta in index.items()}, tensors), str(out_dir))
    with atomic_path(out_dir, is_dir=True, force=force, inputs=inputs) as tmp:
        for item in extra_files:
            shutil.copy2(item, tmp / Path(item).name)
        for item in Path(base_model_dir).iterdir():
            if item.suffix in (".json", ".txt", ".model", ".jinja") and item.name not in ("quantized.json", "tasa_plan.json"):
                if not item.name.endswith(".index.json"):
                    shutil.copy2(item, tmp / item.name)
        flat = {k: LazyTensor.of(v) for k, v in tensors.items()}
        flat.update(flat_modules)
        write_safetensors(tmp / "model.safetensors", flat, metadata={"format": "pt"})
        plan.save(tmp / "tasa_plan.json")
        write_json_atomic(tmp / "quantized.json", {"schema": ARTIFACT_SCHEMA,
                                                    "model_fingerprint": plan.model_fingerprint,
                                                    "modules": index})
    return out_dir


def _stored_modules(modules: Mapping[str, QuantizedTensor]) -> tuple[dict[str, dict], dict[str, LazyTensor]]:
    """(quantized.json entries, stored tensors) of the quantized modules; from GPTQ's `BlockFiles` without
    reading any tensor data, which is then streamed from disk as it is written."""
    if hasattr(modules, "flat_tensors"):
        return modules.index(), modules.flat_tensors()
    return ({name: qt.index_entry() for name, qt in modules.items()},
            {key: LazyTensor.of(value) for name, qt in modules.items() for key, value in qt.tensors(name).items()})


def load_artifact(path: Path) -> QuantizedArtifact:
    """Open and validate a quantized directory; every problem is a one-line UsageError.

    Checked before anything is used: quantized.json (strict entries) and tasa_plan.json agree on the model and
    list exactly the same modules with the same grid; every module's tensors have the names, dtypes and shapes
    its grid implies (QuantizedTensor.from_tensors); no quantized tensors are left without an index entry, no
    module is stored both quantized and dense, and no block linear is dense while the same linear of another
    block is quantized (a plan covering only some modules must not pass for a low-bit model)."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"artifact directory not found: {path} (make one with `tasa-deploy quantize --out`)")
    index = read_json(path / "quantized.json", "artifact index")
    check_schema(index, ARTIFACT_SCHEMA, path / "quantized.json", "artifact index")
    plan = BitPlan.load(path / "tasa_plan.json")
    config = read_json(path / "config.json", "model config", allow_nonfinite=True)  # HF's file, not ours to judge
    entries = _index_entries(index, plan, path)
    weights = path / "model.safetensors"
    flat = _read_safetensors(weights)
    modules: dict[str, QuantizedTensor] = {}
    for name, meta in entries.items():
        try:
            qt = QuantizedTensor.from_tensors(name, flat, meta["fmt"], meta["bits"], meta["group_size"],
                                              meta["symmetric"])
        except UsageError as exc:
            raise UsageError(f"{weights}: {exc}") from None
        if list(qt.shape) != meta["shape"]:
            raise UsageError(f"{path}: module {name} has shape {list(qt.shape)}, index says {meta['shape']}")
        modules[name] = qt
    dense = _dense_tensors(flat, modules, weights)
    check_weights(config, _stored_shapes({n: qt.shape for n, qt in modules.items()}, dense), str(path),
                  "the artifact is incomplete (made by an older tasa-deploy?) — rerun `tasa-deploy quantize`")
    return QuantizedArtifact(path, config, plan, modules, dense)


def _stored_shapes(module_shapes: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict:
    """{HF parameter name: shape} of what an artifact holds: quantized weights by their module's shape."""
    return {**{name: tuple(t.shape) for name, t in tensors.items()},
            **{f"{name}.weight": tuple(shape) for name, shape in module_shapes.items()}}


def _index_entries(index: dict, plan: BitPlan, path: Path) -> dict[str, dict]:
    """quantized.json's modules, each strict and equal to the plan's grid for it; same module set as the plan."""
    loc = Loc(f"artifact index {path / 'quantized.json'}", root=True)
    if get_field(index, "model_fingerprint", loc, "string") != plan.model_fingerprint:
        raise UsageError(f"{path}: tasa_plan.json and quantized.json disagree on the model; the artifact is mixed up")
    entries = get_field(index, "modules", loc, "object")
    mismatch = name_mismatch(plan.modules, entries, "tasa_plan.json", "quantized.json")
    if mismatch:
        raise UsageError(f"{path}: tasa_plan.json and quantized.json list different modules ({mismatch}); "
                         "the artifact is mixed up — rerun `tasa-deploy quantize`")
    return {name: _index_entry(meta, loc.key("modules").item(name), plan.modules[name].spec)
            for name, meta in entries.items()}


def _index_entry(meta: Any, loc: Loc, spec: QuantSpec) -> dict:
    """One module entry {fmt, bits, group_size, symmetric, shape [N, K]}: exact types, and the grid the plan
    gives the module (the stored group of a per-channel int grid is K)."""
    check_value(meta, loc, "object")
    entry = {key: get_field(meta, key, loc, kind) for key, kind in
             (("fmt", "string"), ("bits", "integer"), ("group_size", "integer"), ("symmetric", "boolean"))}
    entry["shape"] = get_items(meta, "shape", loc, "integer", lo=1)
    if len(entry["shape"]) != 2:
        raise loc.key("shape").fail(f"must be [N, K], got {entry['shape']}")
    in_features = entry["shape"][1]
    try:
        spec.groups_for(in_features)
    except UsageError as exc:
        raise loc.fail(f"does not fit the planned grid {spec.key} ({exc})") from None
    planned = (spec.fmt, spec.bits, spec.effective_group(in_features), spec.symmetric)
    if tuple(entry[key] for key in ("fmt", "bits", "group_size", "symmetric")) != planned:
        raise loc.fail(f"is fmt={entry['fmt']} bits={entry['bits']} group_size={entry['group_size']} "
                       f"{'symmetric' if entry['symmetric'] else 'asymmetric'}, but tasa_plan.json plans {spec.key}")
    return entry


def _read_safetensors(weights: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UsageError(f"{weights} cannot be read ({exc}); it may be truncated") from None


_BLOCK_NAME = re.compile(r"(.+?\.)\d+(\..+)")  # "model.layers.3.mlp.up_proj" -> ("model.layers.", ".mlp.up_proj")


def _dense_tensors(flat: Mapping[str, torch.Tensor], modules: Mapping[str, QuantizedTensor],
                   weights: Path) -> dict[str, torch.Tensor]:
    """The tensors no quantized module claimed, refused when they show a mixed-up or partial artifact."""
    claimed = {key for name, qt in modules.items() for key in qt.tensors(name)}
    dense = {key: value for key, value in flat.items() if key not in claimed}
    planned = {match.groups() for match in map(_BLOCK_NAME.fullmatch, modules) if match}
    uncovered = []
    for key, value in dense.items():
        if key.endswith(".codes"):
            raise UsageError(f"{weights}: holds quantized tensors for {key.removesuffix('.codes')}, which "
                             "quantized.json does not list; the artifact is mixed up")
        module = key.removesuffix(".weight")
        if module in modules:
            raise UsageError(f"{weights}: module {module} is stored both quantized and dense ({key})")
        match = _BLOCK_NAME.fullmatch(module) if key.endswith(".weight") and value.dim() == 2 else None
        if match and match.groups() in planned:
            uncovered.append(module)
    if uncovered:
        raise UsageError(f"{weights}: {len(uncovered)} block linears are dense while the same linear of other blocks "
                         f"is quantized (first: {', '.join(sorted(uncovered)[:3])}); the plan covers only part of "
                         "the model — rerun `tasa-deploy quantize` with a complete plan")
    return dense


__all__ = ["QuantizedArtifact", "save_artifact", "load_artifact", "ARTIFACT_SCHEMA"]
