"""Stage artifacts: frozen dataclasses <-> JSON, and the quantized-model directory.

Stages never import each other; they meet here. Each JSON artifact carries `schema` (a version string) and
is validated on read, so a truncated file, a wrong schema or a plan for another model is refused with a
clear error instead of a wrong result. All writes are atomic (temp file / temp dir in the same folder, then
rename): an interrupted run never leaves a partial artifact behind.

Quantized artifact directory (`tasa-deploy quantize --out DIR`):
  config.json, tokenizer files       copied from the base model
  tasa_plan.json                     the BitPlan: per-module grid (fmt/bits/group/sym) and method
  quantized.json                     {"schema", "model_fingerprint", "modules": {name: {fmt, bits, group_size,
                                     symmetric, shape}}}
  model.safetensors                  `<module>.codes/.scales/.zeros/.extra.*` for quantized modules, plus every
                                     unquantized tensor under its HF name (embeddings, norms, lm_head)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from tasa_deploy import TasaError, UsageError
from tasa_deploy.quant.spec import QuantSpec
from tasa_deploy.quant.tensor import QuantizedTensor

PLAN_SCHEMA = "tasa-plan/1"
PROFILE_SCHEMA = "tasa-profile/1"
MIX_SCHEMA = "tasa-mix/1"
ARTIFACT_SCHEMA = "tasa-quantized/1"


# ----------------------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(final: Path, *, is_dir: bool = False, force: bool = False) -> Iterator[Path]:
    """Yield a temp path beside `final`; on success rename it into place, on any error delete it."""
    final = Path(final)
    if final.exists() and not force:
        raise UsageError(f"output {final} already exists; pass --force to overwrite it")
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, (0o777 if tmp.is_dir() else 0o666) & ~umask)  # mkstemp/mkdtemp create private files
        if final.exists():
            shutil.rmtree(final) if final.is_dir() else final.unlink()
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise


def _remove_stale_temps(final: Path) -> None:
    """Delete temp files a killed earlier run left beside `final` (our own `.NAME.*.tmp` pattern only)."""
    for stale in final.parent.glob(f".{final.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj: Any, *, force: bool = True) -> None:
    with atomic_path(Path(path), force=force) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} not found: {path}")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{what} {path} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}); "
                         "it may be truncated — rerun the stage that wrote it") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{what} {path} does not hold a JSON object")
    return obj


def check_schema(obj: dict, expected: str, path: Path, what: str) -> None:
    if obj.get("schema") != expected:
        raise UsageError(f"{what} {path} has schema {obj.get('schema')!r}, expected {expected!r}; "
                         "rerun the stage that wrote it with this version of tasa-deploy")


# ----------------------------------------------------------------------------------------- the bit plan
@dataclass(frozen=True)
class ModulePlan:
    """How one linear module is quantized."""

    spec: QuantSpec
    method: str = "gptq"  # "gptq" | "rtn"

    def to_json(self) -> dict:
        return {**self.spec.to_json(), "method": self.method}

    @classmethod
    def from_json(cls, obj: dict) -> "ModulePlan":
        return cls(QuantSpec.from_json(obj), str(obj.get("method", "gptq")))


@dataclass(frozen=True)
class BitPlan:
    """Per-module quantization plan (`tasa_plan.json`), keyed by HF module name
    (e.g. `model.layers.0.self_attn.q_proj`)."""

    model_fingerprint: str
    target: str  # "vllm" (int grid) | "gguf" (GGML grids)
    modules: Mapping[str, ModulePlan]
    budget_bits: float | None = None  # the average-bits budget the allocator met (None: uniform plan)
    average_bits: float | None = None  # achieved bits per weight (from tasa_deploy.bits)
    info: Mapping[str, Any] = field(default_factory=dict)  # free-form provenance (profile path, beta, ...)

    def to_json(self) -> dict:
        return {"schema": PLAN_SCHEMA, "model_fingerprint": self.model_fingerprint, "target": self.target,
                "budget_bits": self.budget_bits, "average_bits": self.average_bits, "info": dict(self.info),
                "modules": {name: plan.to_json() for name, plan in self.modules.items()}}

    @classmethod
    def from_json(cls, obj: dict, path: Path = Path("tasa_plan.json")) -> "BitPlan":
        check_schema(obj, PLAN_SCHEMA, path, "plan")
        try:
            modules = {name: ModulePlan.from_json(m) for name, m in obj["modules"].items()}
            return cls(str(obj["model_fingerprint"]), str(obj["target"]), modules, obj.get("budget_bits"),
                       obj.get("average_bits"), obj.get("info") or {})
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"plan {path} is malformed ({exc!r}); rerun `tasa-deploy plan`") from None

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> "BitPlan":
        return cls.from_json(read_json(path, "plan"), Path(path))

    def check_model(self, fingerprint: str, path: Path) -> None:
        if self.model_fingerprint != fingerprint:
            raise UsageError(f"plan {path} was made for another model (fingerprint {self.model_fingerprint[:12]} "
                             f"!= {fingerprint[:12]}); rerun `tasa-deploy plan` for this model")


# ----------------------------------------------------------------------------------------- mix + profile
@dataclass(frozen=True)
class MixScore:
    """Scores of one candidate calibration mixture (alpha = share of GENERAL data; 1 = general only)."""

    alpha: float
    grad_alignment: float  # mean over layers of cos(grad on D_alpha, grad on the task probe set); higher = better
    hessian_trace: float  # tr(H_test H_alpha^-1) summed over linears (damped); lower = better
    combined: float  # the documented combination used to choose alpha (higher = better)


@dataclass(frozen=True)
class CalibrationMix:
    """`mix.json`: the chosen calibration mixture and every score behind the choice."""

    model_fingerprint: str
    alpha: float  # chosen share of general data
    general: str  # general data source name (data registry)
    tasks: tuple[str, ...]  # task data source names
    scores: tuple[MixScore, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)  # n samples, seq len, seed, damping, combination

    def to_json(self) -> dict:
        return {"schema": MIX_SCHEMA, **asdict(self), "tasks": list(self.tasks),
                "scores": [asdict(s) for s in self.scores]}

    @classmethod
    def from_json(cls, obj: dict, path: Path = Path("mix.json")) -> "CalibrationMix":
        check_schema(obj, MIX_SCHEMA, path, "mixture")
        try:
            scores = tuple(MixScore(**s) for s in obj["scores"])
            return cls(str(obj["model_fingerprint"]), float(obj["alpha"]), str(obj["general"]), tuple(obj["tasks"]),
                       scores, obj.get("settings") or {})
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"mixture {path} is malformed ({exc!r}); rerun `tasa-deploy mix`") from None

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> "CalibrationMix":
        return cls.from_json(read_json(path, "mixture"), Path(path))


@dataclass(frozen=True)
class UnitSensitivity:
    """One allocation unit: modules that must share one width (a vLLM fused group, or a single tensor)."""

    name: str  # e.g. "model.layers.3.gate_up"
    layer: int
    modules: tuple[str, ...]  # HF module names in the unit
    n_weights: int  # total weights in the unit
    in_features: int  # K (row length) of the unit's modules
    errors: Mapping[str, Mapping[str, float]]  # candidate key (QuantSpec.key) -> objective -> loss increase


@dataclass(frozen=True)
class SensitivityProfile:
    """`profile.json`: raw per-objective loss increases; reused for any budget by `plan`."""

    model_fingerprint: str
    objectives: tuple[str, ...]
    baselines: Mapping[str, float]  # objective -> loss of the unquantized model on its probe set
    layer_deltas: Mapping[str, tuple[float, ...]]  # objective -> per-block loss increase (whole block RTN)
    units: tuple[UnitSensitivity, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)  # probe width/group, target, data, sizes, seed

    def to_json(self) -> dict:
        return {"schema": PROFILE_SCHEMA, "model_fingerprint": self.model_fingerprint,
                "objectives": list(self.objectives), "baselines": dict(self.baselines),
                "layer_deltas": {k: list(v) for k, v in self.layer_deltas.items()},
                "units": [{**asdict(u), "modules": list(u.modules)} for u in self.units],
                "settings": dict(self.settings)}

    @classmethod
    def from_json(cls, obj: dict, path: Path = Path("profile.json")) -> "SensitivityProfile":
        check_schema(obj, PROFILE_SCHEMA, path, "profile")
        try:
            units = tuple(UnitSensitivity(u["name"], int(u["layer"]), tuple(u["modules"]), int(u["n_weights"]),
                                          int(u["in_features"]), u["errors"]) for u in obj["units"])
            return cls(str(obj["model_fingerprint"]), tuple(obj["objectives"]), obj["baselines"],
                       {k: tuple(v) for k, v in obj["layer_deltas"].items()}, units, obj.get("settings") or {})
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"profile {path} is malformed ({exc!r}); rerun `tasa-deploy profile`") from None

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> "SensitivityProfile":
        return cls.from_json(read_json(path, "profile"), Path(path))


# ----------------------------------------------------------------------------------------- quantized dir
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
                  tensors: Mapping[str, torch.Tensor], force: bool = False) -> Path:
    """Write the quantized directory atomically (temp dir + rename)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    with atomic_path(out_dir, is_dir=True, force=force) as tmp:
        for item in Path(base_model_dir).iterdir():
            if item.suffix in (".json", ".txt", ".model", ".jinja") and item.name not in ("quantized.json", "tasa_plan.json"):
                if not item.name.endswith(".index.json"):
                    shutil.copy2(item, tmp / item.name)
        flat: dict[str, torch.Tensor] = {k: v.contiguous() for k, v in tensors.items()}
        index = {}
        for name, qt in modules.items():
            flat.update({k: v.contiguous() for k, v in qt.tensors(name).items()})
            index[name] = {"fmt": qt.fmt, "bits": qt.bits, "group_size": qt.group_size,
                           "symmetric": qt.symmetric, "shape": list(qt.shape)}
        save_file(dict(sorted(flat.items())), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        plan.save(tmp / "tasa_plan.json")
        write_json_atomic(tmp / "quantized.json", {"schema": ARTIFACT_SCHEMA,
                                                    "model_fingerprint": plan.model_fingerprint,
                                                    "modules": index})
    return out_dir


def load_artifact(path: Path) -> QuantizedArtifact:
    """Open and validate a quantized directory; every problem is a one-line UsageError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"artifact directory not found: {path} (make one with `tasa-deploy quantize --out`)")
    index = read_json(path / "quantized.json", "artifact index")
    check_schema(index, ARTIFACT_SCHEMA, path / "quantized.json", "artifact index")
    plan = BitPlan.load(path / "tasa_plan.json")
    config = read_json(path / "config.json", "model config")
    if plan.model_fingerprint != index.get("model_fingerprint"):
        raise UsageError(f"{path}: tasa_plan.json and quantized.json disagree on the model; the artifact is mixed up")
    try:
        flat = load_file(str(path / "model.safetensors"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"{path / 'model.safetensors'} cannot be read ({exc}); it may be truncated") from None
    modules: dict[str, QuantizedTensor] = {}
    for name, meta in index.get("modules", {}).items():
        try:
            qt = QuantizedTensor.from_tensors(name, flat, meta["fmt"], int(meta["bits"]), int(meta["group_size"]),
                                              bool(meta["symmetric"]))
        except KeyError as exc:
            raise UsageError(f"{path}: tensor {exc} for module {name} is missing from model.safetensors") from None
        if list(qt.shape) != list(meta["shape"]):
            raise UsageError(f"{path}: module {name} has shape {list(qt.shape)}, index says {meta['shape']}")
        modules[name] = qt
    consumed = {key for name, qt in modules.items() for key in qt.tensors(name)}
    tensors = {k: v for k, v in flat.items() if k not in consumed}
    return QuantizedArtifact(path, config, plan, modules, tensors)


def dataclass_to_json(obj: Any) -> dict:
    """asdict for frozen dataclasses holding only JSON-able fields."""
    return asdict(obj)


__all__ = ["BitPlan", "ModulePlan", "CalibrationMix", "MixScore", "SensitivityProfile", "UnitSensitivity", "QuantizedArtifact", "save_artifact", "load_artifact", "atomic_path",
           "write_json_atomic", "read_json", "check_schema", "TasaError"]
