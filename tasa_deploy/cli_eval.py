"""`tasa-deploy eval`: perplexity, task accuracy (with standard errors) and KL against a reference, for a model or
a quantized artifact (registered on the main app in `cli.py`). Thin: the evaluators live in `tasa_deploy.eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tasa_deploy import UsageError
from tasa_deploy.cli_common import DeviceOption, DtypeOption, TaskDataOption, csv as _csv, out_console, table as _table
from tasa_deploy.outputs import check_output, write_json_atomic


def evaluate(
    model: Annotated[str, typer.Option(help="Model (as for quantize) or a quantized artifact directory.")] = "smollm2-135m",
    tasks: Annotated[str, typer.Option(help="wikitext2, gsm8k, gsm8k_ll, arc_easy, arc_challenge, hellaswag, piqa, humaneval, mbpp, or a --task-data NAME")] = "wikitext2",
    task_data: TaskDataOption = None,
    limit: Annotated[Optional[int], typer.Option(help="Items per task (windows for wikitext2).")] = None,
    backend: Annotated[str, typer.Option(help="torch (dequantized weights) | triton (packed kernels, CUDA).")] = "torch",
    data_dir: Annotated[Optional[Path], typer.Option(help="Folder holding wikitext-2-raw/ and gsm8k/ (default: ../shared/data).")] = None,
    kld_base: Annotated[Optional[str], typer.Option("--kld-base", help="Reference model (e.g. the unquantized base): also report mean KL divergence and top-1 agreement against it on WikiText-2 and each task's answers.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write results as JSON.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a results file written by tasa-deploy.")] = False,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
) -> None:
    """Evaluate a model or a quantized artifact on perplexity and task accuracy."""
    import os

    from tasa_deploy.eval import EVALS
    from tasa_deploy.model import load_any
    from tasa_deploy.tasks import register_task_data

    if data_dir is not None:
        if not data_dir.is_dir():
            raise UsageError(f"--data-dir {data_dir} does not exist; point it at a folder with wikitext-2-raw/ and gsm8k/")
        os.environ["TASA_DATA_DIR"] = str(data_dir)

    for spec in task_data or ():
        register_task_data(spec)
    unknown = [t for t in _csv(tasks) if t not in EVALS]
    if unknown:
        raise UsageError(f"unknown eval task '{unknown[0]}'; known: {', '.join(EVALS)}")
    if backend not in ("torch", "triton"):
        raise UsageError(f"--backend must be torch or triton, got {backend}")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    if out is not None:
        check_output(out, force=force, inputs=(Path(model),))
    from tasa_deploy.device import resolve_device, resolve_dtype

    place = resolve_device(device)
    weights = resolve_dtype(dtype, place)
    loaded = load_any(model, backend=backend)
    if backend == "torch":  # the triton backend places its kernels itself
        loaded.model.to(device=place, dtype=weights)
    results = {}
    for task in _csv(tasks):
        results[task] = EVALS[task](loaded.model, loaded.tokenizer, limit)
    if kld_base is not None:
        from tasa_deploy.eval import evaluate_kld

        base = load_any(kld_base)
        base.model.to(device=place, dtype=weights)
        results.update(evaluate_kld(loaded, base, _csv(tasks), limit))
    rows = [{"task": k, **{m: v for m, v in r.items() if isinstance(v, (int, float))}} for k, r in results.items()]
    for columns in dict.fromkeys(tuple(row) for row in rows):  # one table per kind of result (ppl, accuracy, KL)
        out_console.print(_table(f"eval: {model}", [row for row in rows if tuple(row) == columns]))
    if out:
        write_json_atomic(out, {"schema": "tasa-eval/1", "model": model, "results": results}, force=force,
                          inputs=(Path(model),))
