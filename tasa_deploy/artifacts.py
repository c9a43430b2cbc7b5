"""Stage artifacts: frozen dataclasses <-> JSON (`mix.json`, `profile.json`, `tasa_plan.json`).

Stages never import each other; they meet here. Each JSON artifact carries `schema` (a version string) and
is validated on read (`tasa_deploy.schema`), so a truncated file, a wrong schema or a plan for another model is
refused with a clear error instead of a wrong result. All writes are atomic (`tasa_deploy.outputs`): an
interrupted run never leaves a partial artifact behind. The quantized-model directory that holds a plan and its
tensors is `tasa_deploy.quantized_dir`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from tasa_deploy import TasaError, UsageError
from tasa_deploy.outputs import atomic_path, write_json_atomic
from tasa_deploy.schema import (Loc, check_schema, check_value, get_field, get_items, get_keyed, name_mismatch,
                                read_json)
from tasa_deploy.quant.spec import QuantSpec

PLAN_SCHEMA = "tasa-plan/1"
PROFILE_SCHEMA = "tasa-profile/1"
MIX_SCHEMA = "tasa-mix/1"
PLAN_TARGETS = ("vllm", "gguf")  # vllm: int grid only; gguf: GGML grids (int modules are mapped on export)
PLAN_METHODS = ("gptq", "rtn")


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
        return cls(spec, get_field(obj, "method", Loc(where), "string", choices=PLAN_METHODS))


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
        """Strict read (see `get_field`): fingerprint, target in PLAN_TARGETS, a non-empty `modules` object of
        ModulePlans (int grid only for target vllm), budget/average bits finite >= 0 or null, info an object."""
        check_schema(obj, PLAN_SCHEMA, path, "plan")
        loc = Loc(f"plan {path}", root=True)
        fingerprint = get_field(obj, "model_fingerprint", loc, "string")
        target = get_field(obj, "target", loc, "string", choices=PLAN_TARGETS)
        entries = get_field(obj, "modules", loc, "object")
        modules = {name: ModulePlan.from_json(entry, loc.key("modules").item(name).text)
                   for name, entry in entries.items()}
        if "" in modules:
            raise loc.key("modules").fail("has a module with an empty name")
        off_grid = [name for name, module in modules.items() if target == "vllm" and module.spec.fmt != "int"]
        if off_grid:
            raise loc.key("modules").item(off_grid[0]).fail(
                f"is {modules[off_grid[0]].spec.fmt}, but target 'vllm' serves only the int grid")
        budget, average = (get_field(obj, key, loc, "number", optional=True, nullable=True, lo=0)
                           for key in ("budget_bits", "average_bits"))
        info = get_field(obj, "info", loc, "object", optional=True, nullable=True, nonempty=False) or {}
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
        loc = Loc(f"mixture {path}", root=True)
        alpha = float(get_field(obj, "alpha", loc, "number", lo=0.0, hi=1.0))
        settings = get_field(obj, "settings", loc, "object", optional=True, nullable=True, nonempty=False) or {}
        request = settings.get("request")
        forced = isinstance(request, dict) and request.get("forced_alpha") == alpha
        entries = get_field(obj, "scores", loc, "array", nonempty=not forced)
        scores = tuple(_mix_score(entry, loc.key("scores").item(i)) for i, entry in enumerate(entries))
        alphas = [score.alpha for score in scores]
        repeated = [a for i, a in enumerate(alphas) if a in alphas[:i]]
        if repeated:
            raise loc.key("scores").fail(f"scores alpha {repeated[0]} twice")
        if scores and alpha not in alphas:
            raise loc.key("alpha").fail(f"is {alpha}, not one of the scored alphas {alphas}")
        return cls(get_field(obj, "model_fingerprint", loc, "string"), alpha, get_field(obj, "general", loc, "string"),
                   tuple(get_items(obj, "tasks", loc, "string", distinct=True)), scores, settings)

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
    layer_se: Mapping[str, tuple[float, ...]] | None = None  # objective -> standard error of each layer delta
    row_deltas: Mapping[str, tuple[tuple[float, ...], ...]] | None = None  # objective -> [layer][probe row]:
    #   the paired change of the row's loss numerator (layer delta = sum over rows / sum of row_weights)
    row_weights: Mapping[str, tuple[float, ...]] | None = None  # objective -> [probe row]: scored tokens, or 1

    def to_json(self) -> dict:
        out = {"schema": PROFILE_SCHEMA, "model_fingerprint": self.model_fingerprint,
               "objectives": list(self.objectives), "baselines": dict(self.baselines),
               "layer_deltas": {k: list(v) for k, v in self.layer_deltas.items()},
               "units": [{**asdict(u), "modules": list(u.modules)} for u in self.units],
               "settings": dict(self.settings)}
        if self.layer_se is not None:
            out["layer_se"] = {k: list(v) for k, v in self.layer_se.items()}
        if self.row_deltas is not None and self.row_weights is not None:
            out["row_deltas"] = {k: [list(layer) for layer in v] for k, v in self.row_deltas.items()}
            out["row_weights"] = {k: list(v) for k, v in self.row_weights.items()}
        return out

    @classmethod
    def from_json(cls, obj: dict, path: Path = Path("profile.json")) -> "SensitivityProfile":
        """Strict read: objectives distinct names; one finite baseline and one layer_deltas vector per objective,
        all of one length (the layer count; an optional `layer_se` must match it); units via `_profile_units`."""
        check_schema(obj, PROFILE_SCHEMA, path, "profile")
        loc = Loc(f"profile {path}", root=True)
        objectives = tuple(get_items(obj, "objectives", loc, "string", distinct=True))
        baselines = {name: float(check_value(value, loc.key("baselines").key(name), "number"))
                     for name, value in get_keyed(obj, "baselines", loc, objectives).items()}
        deltas = _layer_vectors(obj, "layer_deltas", loc, objectives)
        n_layers = len(deltas[objectives[0]])
        ses = _layer_vectors(obj, "layer_se", loc, objectives, n_layers=n_layers, lo=0.0) if "layer_se" in obj else None
        rows, weights = _row_deltas(obj, loc, objectives, n_layers)
        units = _profile_units(obj, loc, objectives, n_layers)
        return cls(get_field(obj, "model_fingerprint", loc, "string"), objectives, baselines, deltas, units,
                   get_field(obj, "settings", loc, "object", optional=True, nullable=True, nonempty=False) or {},
                   ses, rows, weights)

    def save(self, path: Path, *, force: bool = True, inputs: tuple[Path, ...] = ()) -> None:
        write_json_atomic(path, self.to_json(), force=force, inputs=inputs)

    @classmethod
    def load(cls, path: Path) -> "SensitivityProfile":
        return cls.from_json(read_json(path, "profile"), Path(path))


def _mix_score(obj: Any, loc: Loc) -> MixScore:
    """One MixScore: exactly its fields, each a finite number; alpha in [0, 1]."""
    names = tuple(f.name for f in fields(MixScore))
    check_value(obj, loc, "object")
    unknown = [key for key in obj if key not in names]
    if unknown:
        raise loc.key(unknown[0]).fail(f"is not a score field ({', '.join(names)})")
    values = {name: float(get_field(obj, name, loc, "number")) for name in names}
    check_value(values["alpha"], loc.key("alpha"), "number", lo=0.0, hi=1.0)
    return MixScore(**values)


def _layer_vectors(obj: Mapping, key: str, loc: Loc, objectives: tuple[str, ...], *, n_layers: int | None = None,
                   **limits: Any) -> dict[str, tuple[float, ...]]:
    """objective -> per-layer finite numbers; every vector non-empty and of one length (`n_layers` if given)."""
    entries = get_keyed(obj, key, loc, objectives)
    vectors = {name: tuple(float(v) for v in get_items(entries, name, loc.key(key), "number", **limits))
               for name in objectives}
    expected = len(vectors[objectives[0]]) if n_layers is None else n_layers
    reference = f"{key}.{objectives[0]}" if n_layers is None else "layer_deltas"
    for name, vector in vectors.items():
        if len(vector) != expected:
            raise loc.key(key).key(name).fail(f"has {len(vector)} layers, but {reference} has {expected}")
    return vectors


def _row_deltas(obj: Mapping, loc: Loc, objectives: tuple[str, ...], n_layers: int) -> tuple[dict | None, dict | None]:
    """Optional per-row deltas [layer][row] and row weights [row] (>= 0, one per row); both or neither."""
    if "row_deltas" not in obj and "row_weights" not in obj:
        return None, None
    for key in ("row_deltas", "row_weights"):
        if key not in obj:
            raise loc.fail(f"has {'row_weights' if key == 'row_deltas' else 'row_deltas'} without {key}")
    weights = {name: tuple(float(v) for v in get_items(get_keyed(obj, "row_weights", loc, objectives), name,
                                                       loc.key("row_weights"), "number", lo=0.0))
               for name in objectives}
    entries, rows = get_keyed(obj, "row_deltas", loc, objectives), {}
    for name in objectives:
        layers = get_items(entries, name, loc.key("row_deltas"), "array")
        if len(layers) != n_layers:
            raise loc.key("row_deltas").key(name).fail(f"has {len(layers)} layers, but layer_deltas has {n_layers}")
        rows[name] = tuple(tuple(float(check_value(v, loc.key("row_deltas").key(name).item(i).item(j), "number"))
                                 for j, v in enumerate(layer)) for i, layer in enumerate(layers))
        bad = [i for i, layer in enumerate(rows[name]) if len(layer) != len(weights[name])]
        if bad:
            raise loc.key("row_deltas").key(name).item(bad[0]).fail(
                f"has {len(rows[name][bad[0]])} rows, but row_weights.{name} has {len(weights[name])}")
    return rows, weights


def _profile_units(obj: Mapping, loc: Loc, objectives: tuple[str, ...],
                   n_layers: int) -> tuple[UnitSensitivity, ...]:
    """Every unit strict (`_profile_unit`); unit names unique, and no module in two units (a duplicate unit or
    module would be silently collapsed when the plan maps module -> grid, dropping one of them)."""
    units = tuple(_profile_unit(entry, loc.key("units").item(i), objectives, n_layers)
                  for i, entry in enumerate(get_field(obj, "units", loc, "array")))
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


def _profile_unit(obj: Any, loc: Loc, objectives: tuple[str, ...], n_layers: int) -> UnitSensitivity:
    """One unit: layer in range, distinct module names, positive sizes, and for every candidate key (a valid
    QuantSpec key) one finite error per objective."""
    check_value(obj, loc, "object")
    n_weights = get_field(obj, "n_weights", loc, "integer", lo=1)
    in_features = get_field(obj, "in_features", loc, "integer", lo=1)
    if n_weights % in_features:
        raise loc.key("n_weights").fail(f"({n_weights}) is not a multiple of in_features ({in_features})")
    errors = {}
    for key in get_field(obj, "errors", loc, "object"):
        try:
            valid = QuantSpec.from_key(key).key == key
        except (UsageError, ValueError):
            valid = False
        if not valid:
            raise loc.key("errors").key(key).fail("is not a candidate key (e.g. 'int4g64', 'int3g128a', 'q4_k')")
        errors[key] = {name: float(check_value(value, loc.key("errors").key(key).key(name), "number"))
                       for name, value in get_keyed(obj["errors"], key, loc.key("errors"), objectives).items()}
    name = get_field(obj, "name", loc, "string")
    layer = get_field(obj, "layer", loc, "integer", lo=0, hi=n_layers - 1)
    modules = tuple(get_items(obj, "modules", loc, "string", distinct=True))
    return UnitSensitivity(name, layer, modules, n_weights, in_features, errors)


def check_plan_covers(plan: BitPlan, module_shapes: Mapping[str, tuple[int, int]], path: Path) -> None:
    """Refuse a plan whose modules are not exactly the model's quantizable linears (`module_shapes`: HF name
    -> (N, K)), or whose grid for a module does not fit its row length K (QuantSpec.groups_for)."""
    mismatch = name_mismatch(module_shapes, plan.modules, "the model", "the plan")
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


__all__ = ["BitPlan", "ModulePlan", "CalibrationMix", "MixScore", "SensitivityProfile", "UnitSensitivity",
           "check_plan_covers", "atomic_path", "write_json_atomic", "read_json", "check_schema", "TasaError"]
