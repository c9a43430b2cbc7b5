"""GGUF export of an int-grid artifact without losing GPTQ: quantize again, onto the GGML grids.

`tasa-deploy quantize` targets the vLLM int grid by default. Rounding such an artifact's dequantized weights
onto GGML grids stacks a second rounding on the first and throws away GPTQ's error compensation: SmolLM2
TASA-3.5 scored llama.cpp ppl 84.4 that way against 29.2 through `quantize --target gguf --plan`
(benchmarks/results/gguf_smollm2.json). So `export --format gguf` re-runs GPTQ from what the artifact records
in its tasa_plan.json: the base model (`info.request.model`, checked against the plan's fingerprint), the plan
(moved onto GGML types by `pipeline.retarget_plan`), and the calibration mixture (`info.alpha` with the same
general source, tasks, rows, row length and seed: the same sampling code picks the same rows). `--re-round`
keeps the fast lossy path.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from tasa_deploy import UsageError
from tasa_deploy.quantized_dir import QuantizedArtifact

def needs_requantize(artifact: QuantizedArtifact) -> bool:
    """True when some module is on the int grid (a GGUF export would have to re-round it)."""
    from tasa_deploy.exporters.gguf_pack import GGUF_QTYPE

    return any(qt.fmt not in GGUF_QTYPE for qt in artifact.modules.values())


def gguf_request(artifact: QuantizedArtifact, out: Path, work_dir: Path, device: str | None = None):
    """The QuantizeRequest that made `artifact`, retargeted: GGUF grids, the artifact's own plan and alpha."""
    from tasa_deploy.request import TUPLE_FIELDS, QuantizeRequest

    stored = artifact.plan.info.get("request")
    if not isinstance(stored, dict) or "model" not in stored:
        raise UsageError(f"{artifact.path}: tasa_plan.json does not record how it was quantized (info.request); "
                         "re-quantizing for GGUF needs it - export with --re-round (lossy) instead")
    known = {f.name for f in dataclasses.fields(QuantizeRequest)}
    kwargs = {k: (tuple(v) if k in TUPLE_FIELDS and v is not None else v) for k, v in stored.items() if k in known}
    plan_path = work_dir / "source_plan.json"
    artifact.plan.save(plan_path)
    alpha = artifact.plan.info.get("alpha")
    return QuantizeRequest(**{**kwargs, "target": "gguf", "plan_path": plan_path, "out": out,
                              "work_dir": work_dir / "work", "force": False, "device": device,
                              "alpha": alpha if alpha is not None else kwargs.get("alpha")})


def requantize_for_gguf(artifact: QuantizedArtifact, work_dir: Path, log: Callable[[str], None] = print,
                        on_block=None, device: str | None = None) -> tuple[Path, dict]:
    """GPTQ the (opened) artifact's base model onto the GGML grids with the artifact's plan and calibration
    mixture; returns (the new GGUF-grid artifact under work_dir, run_quantize's summary)."""
    from tasa_deploy.pipeline import run_quantize

    work_dir.mkdir(parents=True, exist_ok=True)
    request = gguf_request(artifact, work_dir / "gguf-artifact", work_dir, device)
    try:
        return run_quantize(request, log=log, on_block=on_block)
    except UsageError as exc:
        raise UsageError(f"re-quantizing {artifact.path} for GGUF failed: {exc} (or export with --re-round, lossy)",
                         ) from None
