"""`tasa-deploy inspect`: summarize any artifact we write (quantized dir, plan/profile/mix JSON, GGUF file)
as titled rows for rich tables. Every reader validates, so a corrupt file is a one-line error here too."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tasa_deploy import UsageError
from tasa_deploy.artifacts import BitPlan, CalibrationMix, SensitivityProfile, read_json
from tasa_deploy.quantized_dir import load_artifact

Section = tuple[str, list[dict]]


def describe(path: Path) -> list[Section]:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"nothing to inspect at {path}")
    if path.is_dir():
        return _describe_artifact(path)
    if path.suffix == ".gguf":
        return _describe_gguf(path)
    if path.suffix == ".json":
        schema = str(read_json(path, "artifact").get("schema", ""))
        if schema.startswith("tasa-plan"):
            return _describe_plan(BitPlan.load(path))
        if schema.startswith("tasa-profile"):
            return _describe_profile(SensitivityProfile.load(path))
        if schema.startswith("tasa-mix"):
            return _describe_mix(CalibrationMix.load(path))
        raise UsageError(f"{path}: unknown schema {schema!r} (expected a tasa plan, profile or mix)")
    raise UsageError(f"{path}: expected an artifact directory, a .json stage file or a .gguf file")


def _describe_plan(plan: BitPlan) -> list[Section]:
    counts = Counter(m.spec.key for m in plan.modules.values())
    rows = [{"grid": k, "modules": v} for k, v in sorted(counts.items())]
    head = [{"target": plan.target, "modules": len(plan.modules), "budget_bits": plan.budget_bits,
             "average_bits": plan.average_bits, "model": plan.model_fingerprint[:12]}]
    return [("plan", head), ("modules per grid", rows)]


def _describe_artifact(path: Path) -> list[Section]:
    artifact = load_artifact(path)
    n_quant = sum(qt.codes.numel() for qt in artifact.modules.values())
    n_other = sum(t.numel() for t in artifact.tensors.values())
    head = [{"path": str(path), "architecture": artifact.config.get("model_type"),
             "quantized weights": n_quant, "other weights": n_other}]
    return [("quantized artifact", head), *_describe_plan(artifact.plan)]


def _describe_profile(profile: SensitivityProfile) -> list[Section]:
    rows = [{"objective": k, "baseline": profile.baselines[k], "layers": len(v),
             "max delta": max(v), "argmax layer": int(max(range(len(v)), key=v.__getitem__))}
            for k, v in profile.layer_deltas.items()]
    return [("sensitivity profile", rows)]


def _describe_mix(mix: CalibrationMix) -> list[Section]:
    rows = [{"alpha": s.alpha, "grad_alignment": s.grad_alignment, "hessian_trace": s.hessian_trace,
             "combined": s.combined, "chosen": "*" if s.alpha == mix.alpha else ""} for s in mix.scores]
    return [(f"calibration mixture (general={mix.general}, tasks={','.join(mix.tasks)})", rows)]


def _describe_gguf(path: Path) -> list[Section]:
    from gguf import GGUFReader

    from tasa_deploy.exporters.gguf_check import check_gguf_header

    check_gguf_header(path)  # bounded-memory validation first: GGUFReader trusts the header's claimed counts
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # GGUFReader raises assorted errors on truncated/corrupt files
        raise UsageError(f"{path} is not a readable GGUF file ({exc}); it may be truncated") from None
    counts = Counter(t.tensor_type.name for t in reader.tensors)
    arch = reader.fields.get("general.architecture")
    head = [{"path": str(path), "tensors": len(reader.tensors), "bytes": path.stat().st_size,
             "architecture": bytes(arch.parts[-1]).decode() if arch else "?"}]
    return [("GGUF file", head), ("tensors per type", [{"type": k, "tensors": v} for k, v in sorted(counts.items())])]
