"""What every CLI module shares: the two consoles (stderr for progress and errors, stdout for results), the
results table, and the option types more than one command takes."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)
out_console = Console()


def table(title: str, rows: list[dict]) -> Table:
    """A rich table whose columns are the union of the rows' keys (first-seen order); a missing cell is blank."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    result = Table(title=title)
    for key in columns:
        result.add_column(str(key))
    for row in rows:
        result.add_row(*("" if key not in row else f"{row[key]:.4g}" if isinstance(row[key], float) else str(row[key])
                         for key in columns))
    return result


def csv(value: str) -> tuple[str, ...]:
    """'a, b,,c' -> ('a', 'b', 'c')."""
    return tuple(v.strip() for v in value.split(",") if v.strip())


TaskDataOption = Annotated[Optional[list[str]], typer.Option(
    "--task-data", help="Your own task: NAME=FILE.jsonl (rows {prompt, answer[, tests]} or {prompt, choices, label}); "
                        "repeatable; then name it in --tasks.")]
DeviceOption = Annotated[Optional[str], typer.Option(
    "--device", help="cpu | cuda | cuda:N (default: cuda when available). Weights stay on the host; one decoder "
                     "block at a time is moved to the device.")]
DtypeOption = Annotated[Optional[str], typer.Option(
    "--dtype", help="Weight dtype: bf16 | fp16 | fp32 (default: bf16 on CUDA, fp32 on the CPU). Hessians, Grams "
                    "and losses accumulate in fp32/fp64 either way.")]
WorkersOption = Annotated[Optional[str], typer.Option(
    "--workers", help="Run the profile's per-block experiments on Ray: N local workers, or a Ray address "
                      "(ray://host:10001, auto). Same results as the serial run.")]
CandidatesOption = Annotated[Optional[str], typer.Option(
    "--candidates", help="Widths the allocator may give a unit, e.g. 3,4,8 (default: 3,4,8 for --target vllm; "
                         "3,4,5,6,8 for --target gguf, i.e. every GGML type of those widths that fits the row); "
                         "with --target gguf also GGML type names, e.g. q3_k,q4_k,q6_k,q8_0.")]


def candidates_arg(value: str | None) -> tuple[int | str, ...] | None:
    """'3,4,8' -> (3, 4, 8); 'Q4_K,6' -> ('q4_k', 6); None/'' -> None (the target's default)."""
    from tasa_deploy.plan import candidate_values

    return candidate_values(csv(value)) if value else None


ObjectiveLossOption = Annotated[str, typer.Option(
    "--objective-loss", help="How the profile scores prose and each task: kl (KL divergence from the unquantized "
                             "model on the scored tokens; far less noisy) or nll (the tokens' NLL).")]
