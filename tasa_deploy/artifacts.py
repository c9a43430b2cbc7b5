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

import json
import math
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import torch

from tasa_deploy import TasaError, UsageError
from tasa_deploy.outputs import atomic_path, write_json_atomic
from tasa_deploy.quant.spec import QuantSpec
from tasa_deploy.quant.tensor import QuantizedTensor

PLAN_SCHEMA = "tasa-plan/1"
PROFILE_SCHEMA = "tasa-profile/1"
MIX_SCHEMA = "tasa-mix/1"
ARTIFACT_SCHEMA = "tasa-quantized/1"
MAX_JSON_BYTES = 256 * 2**20  # no stage file comes near this (a 7B profile is a few MB); bigger is not ours
PLAN_TARGETS = ("vllm", "gguf")  # vllm: int grid only; gguf: GGML grids (int modules are mapped on export)
PLAN_METHODS = ("gptq", "rtn")


# ----------------------------------------------------------------------------------------- reading JSON
class _JsonRejected(ValueError):
    """Raised by read_json's parser hooks (duplicate key, non-finite number); becomes a UsageError."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    obj: dict = {}
    for key, value in pairs:
        if key in obj:
            raise _JsonRejected(f"duplicate key {key!r} in one JSON object (JSON would silently keep the last)")
        obj[key] = value
    return obj


def _reject_constant(name: str) -> float:
    raise _JsonRejected(f"{name} is not a number tasa-deploy accepts (NaN and Infinity are refused)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _JsonRejected(f"number {text[:30]} overflows a float")
    return value


def _read_bounded(path: Path, what: str, max_bytes: int) -> bytes:
    too_big = f"{what} {path} is over the {max_bytes / 2**20:g} MiB limit for a JSON stage file; it is not one we wrote"
    try:
        if path.stat().st_size > max_bytes:
            raise UsageError(too_big)
        with open(path, "rb") as handle:
            raw = handle.read(max_bytes + 1)  # bounded even if the file grew since stat
    except OSError as exc:
        raise UsageError(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
    if len(raw) > max_bytes:
        raise UsageError(too_big)
    return raw


def read_json(path: Path, what: str, *, max_bytes: int | None = None, allow_nonfinite: bool = False) -> dict:
    """The JSON object in `path`; every failure is a one-line UsageError naming the file: missing, over
    `max_bytes` (default MAX_JSON_BYTES), not UTF-8, not JSON (truncated), nested too deeply, a duplicate key
    in one object, NaN/Infinity or a number overflowing a float (unless `allow_nonfinite`), not an object."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} not found: {path}")
    raw = _read_bounded(path, what, MAX_JSON_BYTES if max_bytes is None else max_bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} {path} is not valid UTF-8 (byte {exc.start}); it is not a JSON stage file") from None
    hooks = {} if allow_nonfinite else {"parse_constant": _reject_constant, "parse_float": _finite_float}
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys, **hooks)
    except _JsonRejected as exc:
        raise UsageError(f"{what} {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                         "it may be truncated — rerun the stage that wrote it") from None
    except RecursionError:
        raise UsageError(f"{what} {path} is nested too deeply to be a JSON stage file") from None
    except (ValueError, OverflowError) as exc:  # e.g. an integer beyond Python's 4300-digit limit
        raise UsageError(f"{what} {path} is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{what} {path} does not hold a JSON object")
    return obj


def check_schema(obj: dict, expected: str, path: Path, what: str) -> None:
    if obj.get("schema") != expected:
        raise UsageError(f"{what} {path} has schema {_show(obj.get('schema'))}, expected {expected!r}; "
                         "rerun the stage that wrote it with this version of tasa-deploy")


# ----------------------------------------------------------------------------------------- field checks
@dataclass(frozen=True)
class _Loc:
    """Where a JSON value sits, for one-line errors: "plan p.json: modules['x'].bits"."""

    text: str
    root: bool = False  # the file itself: its fields read "plan p.json: modules", not "plan p.json.modules"

    def key(self, key: str) -> "_Loc":
        return _Loc(f"{self.text}: {key}" if self.root else f"{self.text}.{key}")

    def item(self, index: int | str) -> "_Loc":
        return _Loc(f"{self.text}[{index!r}]")

    def fail(self, message: str) -> UsageError:
        return UsageError(f"{self.text} {message}")


# JSON kind -> (Python types json.loads gives it, how errors name it); bool is never an integer or a number.
_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "string": ((str,), "a string"), "integer": ((int,), "an integer"), "number": ((int, float), "a number"),
    "boolean": ((bool,), "true or false"), "object": ((dict,), "an object"), "array": ((list,), "an array")}


def _show(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _value(value: Any, loc: _Loc, kind: str, *, choices: tuple | None = None, lo: float | None = None,
           hi: float | None = None, nonempty: bool = True) -> Any:
    """`value` checked to be of JSON `kind`, finite (numbers), within [lo, hi], among `choices`, non-empty
    (strings, arrays, objects unless nonempty=False); returns it unchanged."""
    types, name = _KINDS[kind]
    if not isinstance(value, types) or (isinstance(value, bool) and kind != "boolean"):
        raise loc.fail(f"must be {name}, got {_show(value)}")
    if kind == "number" and not math.isfinite(value):
        raise loc.fail(f"must be a finite number, got {value}")
    if choices is not None and value not in choices:
        raise loc.fail(f"must be one of {', '.join(map(repr, choices))}, got {_show(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = (f"in [{lo}, {hi}]" if lo is not None and hi is not None
                  else f">= {lo}" if lo is not None else f"<= {hi}")
        raise loc.fail(f"must be {bounds}, got {value}")
    if nonempty and kind in ("string", "array", "object") and not value:
        raise loc.fail("must not be empty")
    return value


def _field(obj: Mapping, key: str, loc: _Loc, kind: str, *, optional: bool = False, nullable: bool = False,
           **limits: Any) -> Any:
    """obj[key] checked by `_value`; a missing key is an error unless `optional` (-> None), null only if
    `nullable`."""
    if key not in obj:
        if optional:
            return None
        raise loc.key(key).fail("is missing")
    if obj[key] is None and nullable:
        return None
    return _value(obj[key], loc.key(key), kind, **limits)


def _items(obj: Mapping, key: str, loc: _Loc, kind: str, *, distinct: bool = False, **limits: Any) -> list:
    """obj[key] as a non-empty array whose items are each checked by `_value`; `distinct` refuses repeats."""
    values = _field(obj, key, loc, "array")
    items = [_value(value, loc.key(key).item(i), kind, **limits) for i, value in enumerate(values)]
    if distinct and len(set(items)) != len(items):
        repeated = next(item for i, item in enumerate(items) if item in items[:i])
        raise loc.key(key).fail(f"lists {_show(repeated)} twice")
    return items


def _keyed(obj: Mapping, key: str, loc: _Loc, names: tuple[str, ...]) -> dict:
    """obj[key] as an object whose keys are exactly `names` (one entry per objective, no more, no less)."""
    entries = _field(obj, key, loc, "object")
    missing = [name for name in names if name not in entries]
    if missing:
        raise loc.key(key).fail(f"has no entry for {missing[0]!r} (expected one per objective: {', '.join(names)})")
    extra = [name for name in entries if name not in names]
    if extra:
        raise loc.key(key).fail(f"has an entry for {extra[0]!r}, which is not an objective ({', '.join(names)})")
    return entries


def _name_mismatch(expected: Any, actual: Any, expected_what: str, actual_what: str) -> str | None:
    """None when the two name sets are equal, else 'missing from A: x, y, z (+N more); not in B: ...'."""
    missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
    parts = [f"{what}: {', '.join(names[:3])}{f' (+{len(names) - 3} more)' if len(names) > 3 else ''}"
             for what, names in ((f"in {expected_what} only", missing), (f"in {actual_what} only", extra)) if names]
    return "; ".join(parts) or None


# ----------------------------------------------------------------------------------------- the bit plan
@dataclass(frozen=True)
class ModulePlan:
    """How one linear module is quantized."""

    spec: QuantSpec
    method: str = "gptq"  # "gptq" | "rtn"

    def to_json(self) -> dict:
        return {**self.spec.to_json(), "method": self.method}

    @classmethod
    def from_json(cls, obj: dict, where: str = "module plan") -> "ModulePlan":
        """Strict: the spec fields (QuantSpec.from_json) and `method` in PLAN_METHODS, all required."""
        spec = QuantSpec.from_json(obj, where)
        return cls(spec, _field(obj, "method", _Loc(where), "string", choices=PLAN_METHODS))


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
        """Strict read (see `_field`): fingerprint, target in PLAN_TARGETS, a non-empty `modules` object of
        ModulePlans (int grid only for target vllm), budget/average bits finite >= 0 or null, info an object."""
        check_schema(obj, PLAN_SCHEMA, path, "plan")
        loc = _Loc(f"plan {path}", root=True)
        fingerprint = _field(obj, "model_fingerprint", loc, "string")
        target = _field(obj, "target", loc, "string", choices=PLAN_TARGETS)
        entries = _field(obj, "modules", loc, "object")
        modules = {name: ModulePlan.from_json(entry, loc.key("modules").item(name).text)
                   for name, entry in entries.items()}
        if "" in modules:
            raise loc.key("modules").fail("has a module with an empty name")
        off_grid = [name for name, module in modules.items() if target == "vllm" and module.spec.fmt != "int"]
        if off_grid:
            raise loc.key("modules").item(off_grid[0]).fail(
                f"is {modules[off_grid[0]].spec.fmt}, but target 'vllm' serves only the int grid")
        budget, average = (_field(obj, key, loc, "number", optional=True, nullable=True, lo=0)
                           for key in ("budget_bits", "average_bits"))
        info = _field(obj, "info", loc, "object", optional=True, nullable=True, nonempty=False) or {}
        return cls(fingerprint, target, modules, budget, average, info)

    def save(self, path: Path, *, force: bool = True, inputs: tuple[Path, ...] = ()) -> None:
        write_json_atomic(path, self.to_json(), force=force, inputs=inputs)

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
        """Strict read: alpha finite in [0, 1] and one of the scored alphas; tasks a list of distinct names;
        scores a non-empty list of MixScores with finite numbers and distinct alphas in [0, 1] — empty only
        when the alpha was forced, not searched (settings.request.forced_alpha == alpha, as the pipeline
        records `--alpha`)."""
        check_schema(obj, MIX_SCHEMA, path, "mixture")
        loc = _Loc(f"mixture {path}", root=True)
        alpha = float(_field(obj, "alpha", loc, "number", lo=0.0, hi=1.0))
        settings = _field(obj, "settings", loc, "object", optional=True, nullable=True, nonempty=False) or {}
        request = settings.get("request")
        forced = isinstance(request, dict) and request.get("forced_alpha") == alpha
        entries = _field(obj, "scores", loc, "array", nonempty=not forced)
        scores = tuple(_mix_score(entry, loc.key("scores").item(i)) for i, entry in enumerate(entries))
        alphas = [score.alpha for score in scores]
        repeated = [a for i, a in enumerate(alphas) if a in alphas[:i]]
        if repeated:
            raise loc.key("scores").fail(f"scores alpha {repeated[0]} twice")
        if scores and alpha not in alphas:
            raise loc.key("alpha").fail(f"is {alpha}, not one of the scored alphas {alphas}")
        return cls(_field(obj, "model_fingerprint", loc, "string"), alpha, _field(obj, "general", loc, "string"),
                   tuple(_items(obj, "tasks", loc, "string", distinct=True)), scores, settings)

    def save(self, path: Path, *, force: bool = True, inputs: tuple[Path, ...] = ()) -> None:
        write_json_atomic(path, self.to_json(), force=force, inputs=inputs)

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
        """Strict read: objectives distinct names; one finite baseline and one layer_deltas vector per objective,
        all of one length (the layer count; an optional `layer_se` must match it); units via `_profile_units`."""
        check_schema(obj, PROFILE_SCHEMA, path, "profile")
        loc = _Loc(f"profile {path}", root=True)
        objectives = tuple(_items(obj, "objectives", loc, "string", distinct=True))
        baselines = {name: float(_value(value, loc.key("baselines").key(name), "number"))
                     for name, value in _keyed(obj, "baselines", loc, objectives).items()}
        deltas = _layer_vectors(obj, "layer_deltas", loc, objectives)
        n_layers = len(deltas[objectives[0]])
        if "layer_se" in obj:  # standard errors of the deltas: same shape, >= 0 (accepted, not yet used)
            _layer_vectors(obj, "layer_se", loc, objectives, n_layers=n_layers, lo=0.0)
        units = _profile_units(obj, loc, objectives, n_layers)
        return cls(_field(obj, "model_fingerprint", loc, "string"), objectives, baselines, deltas, units,
                   _field(obj, "settings", loc, "object", optional=True, nullable=True, nonempty=False) or {})

    def save(self, path: Path, *, force: bool = True, inputs: tuple[Path, ...] = ()) -> None:
        write_json_atomic(path, self.to_json(), force=force, inputs=inputs)

    @classmethod
    def load(cls, path: Path) -> "SensitivityProfile":
        return cls.from_json(read_json(path, "profile"), Path(path))


def _mix_score(obj: Any, loc: _Loc) -> MixScore:
    """One MixScore: exactly its fields, each a finite number; alpha in [0, 1]."""
    names = tuple(f.name for f in fields(MixScore))
    _value(obj, loc, "object")
    unknown = [key for key in obj if key not in names]
    if unknown:
        raise loc.key(unknown[0]).fail(f"is not a score field ({', '.join(names)})")
    values = {name: float(_field(obj, name, loc, "number")) for name in names}
    _value(values["alpha"], loc.key("alpha"), "number", lo=0.0, hi=1.0)
    return MixScore(**values)


def _layer_vectors(obj: Mapping, key: str, loc: _Loc, objectives: tuple[str, ...], *, n_layers: int | None = None,
                   **limits: Any) -> dict[str, tuple[float, ...]]:
    """objective -> per-layer finite numbers; every vector non-empty and of one length (`n_layers` if given)."""
    entries = _keyed(obj, key, loc, objectives)
    vectors = {name: tuple(float(v) for v in _items(entries, name, loc.key(key), "number", **limits))
               for name in objectives}
    expected = len(vectors[objectives[0]]) if n_layers is None else n_layers
    reference = f"{key}.{objectives[0]}" if n_layers is None else "layer_deltas"
    for name, vector in vectors.items():
        if len(vector) != expected:
            raise loc.key(key).key(name).fail(f"has {len(vector)} layers, but {reference} has {expected}")
    return vectors


def _profile_units(obj: Mapping, loc: _Loc, objectives: tuple[str, ...],
                   n_layers: int) -> tuple[UnitSensitivity, ...]:
    """Every unit strict (`_profile_unit`); unit names unique, and no module in two units (a duplicate unit or
    module would be silently collapsed when the plan maps module -> grid, dropping one of them)."""
    units = tuple(_profile_unit(entry, loc.key("units").item(i), objectives, n_layers)
                  for i, entry in enumerate(_field(obj, "units", loc, "array")))
    names: set[str] = set()
    unit_of: dict[str, str] = {}
    for i, unit in enumerate(units):
        if unit.name in names:
            raise loc.key("units").item(i).fail(f"repeats unit name {unit.name!r} (a duplicate unit drops a module "
                                                "from the plan)")
        for module in unit.modules:
            if module in unit_of:
                raise loc.key("units").item(i).fail(f"lists module {module!r}, already in unit {unit_of[module]!r} "
                                                    "(a module in two units gets one of two grids)")
            unit_of[module] = unit.name
        names.add(unit.name)
    return units


def _profile_unit(obj: Any, loc: _Loc, objectives: tuple[str, ...], n_layers: int) -> UnitSensitivity:
    """One unit: layer in range, distinct module names, positive sizes, and for every candidate key (a valid
    QuantSpec key) one finite error per objective."""
    _value(obj, loc, "object")
    n_weights = _field(obj, "n_weights", loc, "integer", lo=1)
    in_features = _field(obj, "in_features", loc, "integer", lo=1)
    if n_weights % in_features:
        raise loc.key("n_weights").fail(f"({n_weights}) is not a multiple of in_features ({in_features})")
    errors = {}
    for key in _field(obj, "errors", loc, "object"):
        try:
            valid = QuantSpec.from_key(key).key == key
        except (UsageError, ValueError):
            valid = False
        if not valid:
            raise loc.key("errors").key(key).fail("is not a candidate key (e.g. 'int4g64', 'int3g128a', 'q4_k')")
        errors[key] = {name: float(_value(value, loc.key("errors").key(key).key(name), "number"))
                       for name, value in _keyed(obj["errors"], key, loc.key("errors"), objectives).items()}
    name = _field(obj, "name", loc, "string")
    layer = _field(obj, "layer", loc, "integer", lo=0, hi=n_layers - 1)
    modules = tuple(_items(obj, "modules", loc, "string", distinct=True))
    return UnitSensitivity(name, layer, modules, n_weights, in_features, errors)


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
                  tensors: Mapping[str, torch.Tensor], force: bool = False, inputs: tuple[Path, ...] = (),
                  extra_files: tuple[Path, ...] = ()) -> Path:
    """Write the quantized directory atomically (temp dir + rename); `extra_files` are copied in too."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    with atomic_path(out_dir, is_dir=True, force=force, inputs=inputs) as tmp:
        for item in extra_files:
            shutil.copy2(item, tmp / Path(item).name)
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
    return QuantizedArtifact(path, config, plan, modules, _dense_tensors(flat, modules, weights))


def _index_entries(index: dict, plan: BitPlan, path: Path) -> dict[str, dict]:
    """quantized.json's modules, each strict and equal to the plan's grid for it; same module set as the plan."""
    loc = _Loc(f"artifact index {path / 'quantized.json'}", root=True)
    if _field(index, "model_fingerprint", loc, "string") != plan.model_fingerprint:
        raise UsageError(f"{path}: tasa_plan.json and quantized.json disagree on the model; the artifact is mixed up")
    entries = _field(index, "modules", loc, "object")
    mismatch = _name_mismatch(plan.modules, entries, "tasa_plan.json", "quantized.json")
    if mismatch:
        raise UsageError(f"{path}: tasa_plan.json and quantized.json list different modules ({mismatch}); "
                         "the artifact is mixed up — rerun `tasa-deploy quantize`")
    return {name: _index_entry(meta, loc.key("modules").item(name), plan.modules[name].spec)
            for name, meta in entries.items()}


def _index_entry(meta: Any, loc: _Loc, spec: QuantSpec) -> dict:
    """One module entry {fmt, bits, group_size, symmetric, shape [N, K]}: exact types, and the grid the plan
    gives the module (the stored group of a per-channel int grid is K)."""
    _value(meta, loc, "object")
    entry = {key: _field(meta, key, loc, kind) for key, kind in
             (("fmt", "string"), ("bits", "integer"), ("group_size", "integer"), ("symmetric", "boolean"))}
    entry["shape"] = _items(meta, "shape", loc, "integer", lo=1)
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


def check_plan_covers(plan: BitPlan, module_shapes: Mapping[str, tuple[int, int]], path: Path) -> None:
    """Refuse a plan whose modules are not exactly the model's quantizable linears (`module_shapes`: HF name
    -> (N, K)), or whose grid for a module does not fit its row length K (QuantSpec.groups_for)."""
    mismatch = _name_mismatch(module_shapes, plan.modules, "the model", "the plan")
    if mismatch:
        raise UsageError(f"plan {path} does not match this model's quantizable linears ({mismatch}); "
                         "rerun `tasa-deploy plan` for this model")
    for name, module in plan.modules.items():
        rows, cols = (int(size) for size in module_shapes[name])
        try:
            module.spec.groups_for(cols)
        except UsageError as exc:
            raise UsageError(f"plan {path}: modules[{name!r}] is {module.spec.key}, which does not fit its "
                             f"[{rows}, {cols}] weight ({exc})") from None


def dataclass_to_json(obj: Any) -> dict:
    """asdict for frozen dataclasses holding only JSON-able fields."""
    return asdict(obj)


__all__ = ["BitPlan", "ModulePlan", "CalibrationMix", "MixScore", "SensitivityProfile", "UnitSensitivity", "QuantizedArtifact", "save_artifact", "load_artifact", "atomic_path",
           "write_json_atomic", "read_json", "check_schema", "TasaError"]
