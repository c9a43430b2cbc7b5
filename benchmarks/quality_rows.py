"""How each row of the quality tables is built (benchmarks/quality.py, quality_qwen.py): our artifacts through
`run_quantize` (uniform RTN/GPTQ, TASA budgets and ablations sharing one work dir), llama-quantize presets from
an F16 GGUF of the base (with and without an imatrix from the same calibration mixture), and GGUF-target TASA at
Q3_K_M's bits per weight (and its -nonnative control). Every build is cached under the table's root; `build_row` returns the row's model
(artifact dir, GGUF file, or None for `fp`) and its build info.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from bench_common import nonnative_quantize
from tasa_deploy.artifacts import read_json, write_json_atomic

if TYPE_CHECKING:
    from quality import QuantSettings


TASA_BUDGETS = {"tasa-3.0": 3.0, "tasa-3.5": 3.5, "tasa-4.0": 4.0}
TASA_CANDIDATES = (3, 4, 8)
ALPHA_ABLATIONS = {"tasa-3.5-taskonly": 0.0, "tasa-3.5-generalonly": 1.0}  # alpha = the GENERAL-data share


def quantize_request(name: str, model: str, quant: QuantSettings, root: Path, **fields):
    from tasa_deploy.pipeline import QuantizeRequest

    candidates = TASA_CANDIDATES if fields.get("target", "vllm") == "vllm" else None  # GGUF: every 3..8-bit type
    return QuantizeRequest(model=model, out=root / "artifacts" / quant.tasa_name(name), candidates=candidates,
                           **{**asdict(quant), "tasks": tuple(quant.tasks)}, **fields)


def run_request(request, nonnative_from: Path | None = None) -> dict:
    """Quantize (or reuse the finished artifact); returns the pipeline's stage seconds. With nonnative_from (a
    work dir with mix.json and profile.json), plan on that profile minus the base's exact grids first."""
    from tasa_deploy.pipeline import run_quantize

    seconds_file = request.out.with_name(request.out.name + ".stage_seconds.json")
    if (request.out / "quantized.json").is_file():
        return read_json(seconds_file, "stage seconds") if seconds_file.is_file() else {}
    if nonnative_from is not None:
        seconds = nonnative_quantize(request, nonnative_from)
    else:
        seconds = run_quantize(request, log=lambda m: print(f"  {m}", file=sys.stderr))[1]["stage_seconds"]
    write_json_atomic(seconds_file, seconds, foreign_ok=True)
    return seconds


def shared_work_dir(model: str, quant: QuantSettings, root: Path) -> Path:
    """The TASA work dir holding THE mix.json + profile.json every TASA row reuses (made by tasa-3.5)."""
    work = root / quant.tasa_name("work-tasa")
    if not (work / "profile.json").is_file():
        run_request(quantize_request("tasa-3.5", model, quant, root, bits=3.5, work_dir=work))
    return work


def cheapest_budget(profile_path: Path) -> float:
    """Average bpw of the all-narrowest plan (int3 + fp16 group scales): the lowest budget a plan can meet.

    A nominal 3.0 budget is below it (scales cost 16/g bits), so tasa-3.0 runs at this budget instead."""
    from fractions import Fraction

    from tasa_deploy.artifacts import SensitivityProfile
    from tasa_deploy.bits import exact_bits_per_weight
    from tasa_deploy.quant.spec import QuantSpec, default_group_size

    units = SensitivityProfile.load(profile_path).units
    narrowest = min(TASA_CANDIDATES)
    total = sum(exact_bits_per_weight(QuantSpec(narrowest, default_group_size(u.in_features)), u.in_features)
                * u.n_weights for u in units)
    return float(Fraction(total) / sum(u.n_weights for u in units)) + 1e-9


def our_row_request(name: str, model: str, quant: QuantSettings, root: Path):
    """The QuantizeRequest that builds one of our rows (uniform, TASA, or an ablation)."""
    if name.startswith("uniform"):
        bits, quantizer = name.removeprefix("uniform").split("-")
        return quantize_request(name, model, quant, root, bits=int(bits), method="uniform", quantizer=quantizer)
    work = shared_work_dir(model, quant, root)
    if name in TASA_BUDGETS:
        budget = max(TASA_BUDGETS[name], cheapest_budget(work / "profile.json"))
        return quantize_request(name, model, quant, root, bits=budget, work_dir=work)
    if name == "tasa-3.5-pplonly":
        from tasa_deploy.artifacts import SensitivityProfile
        from tasa_deploy.plan import build_plan

        plan_file = root / "plans" / f"{quant.tasa_name('tasa-3.5-pplonly')}.json"
        plan_file.parent.mkdir(parents=True, exist_ok=True)
        profile = SensitivityProfile.load(work / "profile.json")
        general = tuple(o for o in profile.objectives if o.removeprefix("kl:") == "ppl")
        build_plan(profile, 3.5, objectives=general).save(plan_file)
        return quantize_request(name, model, quant, root, bits=3.5, work_dir=work, plan_path=plan_file)
    alpha_work = root / quant.tasa_name(f"work-alpha{ALPHA_ABLATIONS[name]:g}")
    alpha_work.mkdir(parents=True, exist_ok=True)
    for stage_file in ("profile.json", "profile.partial.json"):  # same profile, other calibration mix; the
        if (work / stage_file).is_file():  # partial state lets measure_profile resume instead of re-measuring
            shutil.copy2(work / stage_file, alpha_work / stage_file)
    return quantize_request(name, model, quant, root, bits=3.5, work_dir=alpha_work, alpha=ALPHA_ABLATIONS[name])


def unit_split(work_dir: Path | None) -> str | None:
    """How the profile a TASA row planned on priced its units (`units.UNIT_ERROR_PROXY` when it was measured):
    recorded in the row, since a cached row outlives a change of method."""
    if work_dir is None or not (work_dir / "profile.json").is_file():
        return None
    return read_json(work_dir / "profile.json", "profile")["settings"].get("unit_error_proxy")


def build_our_row(name: str, model: str, quant: QuantSettings, root: Path) -> tuple[Path, dict]:
    from tasa_deploy.quantized_dir import load_artifact
    from tasa_deploy.bits import plan_average_bits

    start = time.perf_counter()
    request = our_row_request(name, model, quant, root)
    stage_seconds = run_request(request)
    artifact = load_artifact(request.out)
    shapes = {module: qt.shape for module, qt in artifact.modules.items()}
    return request.out, {"bpw": plan_average_bits(artifact.plan, shapes), "stage_seconds": stage_seconds,
                         "build_seconds": round(time.perf_counter() - start, 1),
                         "alpha": artifact.plan.info.get("alpha"), "budget_bits": artifact.plan.budget_bits,
                         "unit_error_proxy": unit_split(request.work_dir)}


def calibration_mixture_tokens(model: str, quant: QuantSettings, root: Path):
    """[n, T] rows of the TASA calibration mixture (the shared mix.json), as GPTQ sees them."""
    from tasa_deploy import pipeline
    from tasa_deploy.model import load_model, model_fingerprint

    request = quantize_request("tasa-3.5", model, quant, root, bits=3.5, work_dir=root / quant.tasa_name("work-tasa"))
    loaded = load_model(model)
    request.resolved_work_dir.mkdir(parents=True, exist_ok=True)
    mix = pipeline.stage_mix(loaded, model_fingerprint(loaded.model), request, request.resolved_work_dir,
                             lambda m: print(f"  {m}", file=sys.stderr))
    return pipeline.calibration_tokens(loaded, request, mix)


def base_gguf(model: str, root: Path) -> Path:
    """An F16 GGUF of the unquantized base (llama-quantize's input and llama.cpp's KL reference), made once."""
    from tasa_deploy.exporters.gguf import export_dense_gguf
    from tasa_deploy.model import resolve_model_dir

    base = root / "gguf" / "base-f16.gguf"
    if not base.is_file():
        base.parent.mkdir(parents=True, exist_ok=True)
        export_dense_gguf(Path(resolve_model_dir(model)), base, dtype="f16")
    return base


def build_gguf_row(name: str, model: str, quant: QuantSettings, root: Path) -> tuple[Path, dict]:
    """llama-quantize Q3_K_M / Q4_K_M (embeddings kept f16) from an F16 GGUF of the same base."""
    from tasa_deploy.artifacts import atomic_path
    from tasa_deploy.exporters.gguf import linear_bits_per_weight
    from tasa_deploy.exporters.llamacpp import imatrix_for_model, llama_quantize
    from tasa_deploy.model import resolve_model_dir

    start = time.perf_counter()
    folder = root / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{name}.gguf"
    if not out.is_file():
        base = base_gguf(model, root)
        imatrix = None
        if name.endswith("-imatrix"):
            imatrix = folder / "imatrix-mix.gguf"
            if not imatrix.is_file():
                tokens = calibration_mixture_tokens(model, quant, root)
                with atomic_path(imatrix, force=True, foreign_ok=True) as tmp:
                    imatrix_for_model(Path(resolve_model_dir(model)), tokens, tmp)
        ftype = name.removeprefix("llamacpp-").removesuffix("-imatrix").upper()
        with atomic_path(out, force=True, foreign_ok=True) as tmp:
            llama_quantize(base, tmp, ftype, imatrix=imatrix, embedding_type="f16")
    return out, {"bpw": linear_bits_per_weight(out), "build_seconds": round(time.perf_counter() - start, 1),
                 "file_bytes": out.stat().st_size}


def build_tasa_gguf_row(name: str, model: str, quant: QuantSettings, root: Path) -> tuple[Path, dict]:
    """TASA planned over GGML types (`quantize --target gguf`) at llama-quantize Q3_K_M's bits per weight over
    the same tensors, GPTQ'd onto those grids, exported losslessly: the like-for-like rival of Q3_K_M."""
    from tasa_deploy.exporters.gguf import export_gguf, linear_bits_per_weight

    start = time.perf_counter()
    q3_k_m, _ = build_gguf_row("llamacpp-q3_k_m", model, quant, root)
    budget = round(linear_bits_per_weight(q3_k_m), 4)  # 4.6344 on SmolLM2 (its 576-wide rows take block-32 types)
    work = root / quant.tasa_name("work-tasa-gguf")
    work.mkdir(parents=True, exist_ok=True)
    mix_file = shared_work_dir(model, quant, root) / "mix.json"  # same mixture as every TASA row
    if not (work / "mix.json").is_file():
        shutil.copy2(mix_file, work / "mix.json")
    if name.endswith("-nonnative"):  # the same budget and mix, planned without the base's exact grids
        build_tasa_gguf_row(name.removesuffix("-nonnative"), model, quant, root)  # its profile is the shared one
        request = quantize_request(name, model, quant, root, bits=budget, target="gguf",
                                   work_dir=root / quant.tasa_name(f"work-{name}"))
        stage_seconds = run_request(request, nonnative_from=work)
    else:
        request = quantize_request(name, model, quant, root, bits=budget, target="gguf", work_dir=work)
        stage_seconds = run_request(request)
    out = root / "gguf" / f"{name}.gguf"
    if not out.is_file():
        export_gguf(request.out, out)
    return out, {"bpw": linear_bits_per_weight(out), "budget_bits": budget, "stage_seconds": stage_seconds,
                 "build_seconds": round(time.perf_counter() - start, 1), "file_bytes": out.stat().st_size,
                 "unit_error_proxy": unit_split(work)}


# ------------------------------------------------------------------------------------------------ one row
def build_row(name: str, model: str, quant: QuantSettings, root: Path) -> tuple[Path | None, dict]:
    """The row's model (artifact dir, GGUF file, or None for `fp`) and build info (bpw, seconds)."""
    if name == "fp":
        return None, {"bpw": 16.0, "build_seconds": 0.0, "note": "dequantized base; bpw of an f16 file"}
    if name.startswith("llamacpp-"):
        return build_gguf_row(name, model, quant, root)
    if name.startswith("tasa-gguf-q3_k_m-size"):
        return build_tasa_gguf_row(name, model, quant, root)
    return build_our_row(name, model, quant, root)
