"""What the benchmark scripts share: the machine description each result JSON records, the `__main__`
wrapper that turns a bad-input UsageError into one line on stderr and exit code 2 (as the CLI does), and the
native-grid control (`nonnative_quantize`) of the GGUF-target rows."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Callable


def machine() -> dict:
    """The machine a benchmark ran on: platform, processor, CPUs, Python, torch and its thread count."""
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def write_report(out_dir: Path, stem: str, report: dict, lines: list[str]) -> None:
    """`<stem>.json` (the report) and `<stem>.md` (the table lines) written atomically into out_dir; the table
    is printed too."""
    from tasa_deploy.outputs import atomic_path, write_json_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / f"{stem}.json", report, foreign_ok=True)
    with atomic_path(out_dir / f"{stem}.md", force=True, foreign_ok=True) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


def run_main(main: Callable[[], object]) -> None:
    """Run a script's main(); a UsageError becomes `error: <message>` on stderr and exit code 2."""
    from tasa_deploy import UsageError

    try:
        main()
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def nonnative_profile(profile):
    """The profile without the (unit, GGML type) pairs that reproduce the base's weights exactly: zero predicted
    error for every objective where another candidate of the same unit errs (tr(dW H dW^T) = 0 only for dW = 0).
    Every embedded model was dequantized from a GGUF, so some types are free there (SmolLM2's q4_1, Qwen's q5_0);
    a user starting from bf16 has no such tensors. Returns (profile, {type: units dropped})."""
    import dataclasses

    units, dropped = [], {}
    for unit in profile.units:
        erring = any(v > 0 for errs in unit.errors.values() for v in errs.values())
        exact = [k for k, errs in unit.errors.items() if erring and all(v == 0 for v in errs.values())]
        for key in exact:
            dropped[key] = dropped.get(key, 0) + 1
        units.append(dataclasses.replace(unit, errors={k: v for k, v in unit.errors.items() if k not in exact}))
    return dataclasses.replace(profile, units=tuple(units)), dropped


def nonnative_quantize(request, shared_work: Path) -> dict:
    """Run a --target gguf TASA `request` (its own work_dir) on shared_work's mix and profile minus the exact
    pairs (`nonnative_profile`): plan, then GPTQ with that plan. Returns stage seconds and the dropped pairs."""
    import dataclasses
    import shutil

    from tasa_deploy.artifacts import SensitivityProfile
    from tasa_deploy.model import load_model
    from tasa_deploy.pipeline import run_quantize, stage_plan

    own = request.resolved_work_dir
    own.mkdir(parents=True, exist_ok=True)
    shutil.copy2(shared_work / "mix.json", own / "mix.json")
    profile, dropped = nonnative_profile(SensitivityProfile.load(shared_work / "profile.json"))
    print(f"{request.out.name}: planning without the exact (unit, type) pairs {dropped}", file=sys.stderr)
    loaded = load_model(request.model)
    stage_plan(profile, request, own, loaded, log=lambda m: print(m, file=sys.stderr))
    planned = dataclasses.replace(request, plan_path=own / "tasa_plan.json", size=None, max_slowdown=None)
    _, summary = run_quantize(planned, log=lambda m: print(m, file=sys.stderr), loaded=loaded)  # GPTQ: in place
    return {"stage_seconds": summary["stage_seconds"], "dropped_exact_pairs": dropped}
