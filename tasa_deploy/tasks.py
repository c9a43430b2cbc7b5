"""Task registry: what `--tasks` names, and the user's own tasks from `--task-data NAME=PATH`.

A task is the unit a user asks TASA to protect. Each one names its calibration/probe data sources
(`tasa_deploy.data`), its profile objective (`tasa_deploy.objectives`) and its evaluations
(`tasa_deploy.eval.EVALS`):

| task            | calibration + probe rows           | objective  | evaluation                         |
|-----------------|------------------------------------|------------|------------------------------------|
| gsm8k           | GSM8K train                        | math       | gsm8k (exact match)                |
| arc             | ARC-Easy + ARC-Challenge val       | arc        | arc_easy, arc_challenge            |
| arc_easy / _challenge | that ARC split               | arc        | that split                         |
| hellaswag, piqa | validation quarters                | same name  | same name (accuracy)               |
| code            | MBPP (500 problems)                | code       | humaneval (pass@1, sandboxed)      |
| NAME            | `--task-data NAME=PATH` rows       | NAME       | NAME                               |

User task files (JSONL, a `datasets.save_to_disk` directory, or a hub id) hold rows of one kind:
  generation       {"prompt": str, "answer": str, "tests"?: str, "entry_point"?: str}
  multiple choice  {"prompt": str, "choices": [str, ...], "label": int}
Rows are split by index: i % 4 in (0, 1) evaluation, 2 calibration, 3 probe (deterministic, disjoint), so a
file needs at least 4 rows. The objective is the answer tokens' NLL given the prompt (generation) or the
choice loss (multiple choice); the evaluation is pass@1 of the tests in the sandbox (rows with "tests"),
exact match of the answer (other generation rows) or accuracy (multiple choice).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tasa_deploy import UsageError

MAX_ROW_BYTES = 1 << 20  # one JSONL line; longer rows are refused (they cannot be a prompt for a small model)
MAX_ROWS = 1_000_000
NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")


@dataclass(frozen=True)
class Task:
    name: str
    sources: tuple[str, ...]  # data registry names: calibration and probe rows
    objective: str  # objective registry name
    evals: tuple[str, ...]  # eval registry names
    description: str
    data_path: str | None = None  # set for `--task-data` tasks


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("gsm8k", ("gsm8k",), "math", ("gsm8k",), "grade-school math (GSM8K)"),
    Task("arc", ("arc_easy", "arc_challenge"), "arc", ("arc_easy", "arc_challenge"), "ARC science questions"),
    Task("arc_easy", ("arc_easy",), "arc", ("arc_easy",), "ARC-Easy"),
    Task("arc_challenge", ("arc_challenge",), "arc", ("arc_challenge",), "ARC-Challenge"),
    Task("hellaswag", ("hellaswag",), "hellaswag", ("hellaswag",), "HellaSwag commonsense endings"),
    Task("piqa", ("piqa",), "piqa", ("piqa",), "PIQA physical commonsense"),
    Task("code", ("mbpp",), "code", ("humaneval",), "Python code: MBPP for calibration, HumanEval pass@1"),
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UsageError(f"unknown task '{name}'; known: {', '.join(TASKS)} (or add your own with "
                         "--task-data NAME=FILE.jsonl)")
    return TASKS[name]


# ----------------------------------------------------------------------------------------- user task files
def parse_task_data(spec: str) -> tuple[str, str]:
    """'NAME=PATH' -> (name, path)."""
    name, sep, path = spec.partition("=")
    if not sep or not path:
        raise UsageError(f"--task-data takes NAME=PATH (a .jsonl file, a datasets directory or a hub id), got '{spec}'")
    if not NAME.fullmatch(name):
        raise UsageError(f"task name '{name}' must be lower-case letters, digits and _ (starting with a letter)")
    return name, path


def _check_row(row: object, where: str) -> tuple[str, dict]:
    """(kind, our row) of one user row, or a UsageError naming it."""
    if not isinstance(row, dict):
        raise UsageError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        raise UsageError(f"{where}: needs a non-empty string \"prompt\"")
    if "choices" in row or "label" in row:
        choices, label = row.get("choices"), row.get("label")
        if "answer" in row:
            raise UsageError(f"{where}: has both \"answer\" and \"choices\"; a row is generation or multiple choice")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise UsageError(f"{where}: \"choices\" must be a list of at least 2 non-empty strings")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise UsageError(f"{where}: \"label\" must be an integer index into its {len(choices)} choices, got {label!r}")
        return "mc", {"query": row["prompt"], "choices": list(choices), "label": label}
    if not isinstance(row.get("answer"), str) or not row["answer"].strip():
        raise UsageError(f"{where}: needs a non-empty string \"answer\" (generation) or \"choices\" + \"label\"")
    out = {"prompt": row["prompt"], "answer": row["answer"]}
    for key in ("tests", "entry_point"):
        if key in row:
            if not isinstance(row[key], str) or not row[key].strip():
                raise UsageError(f"{where}: \"{key}\" must be a non-empty string")
            out[key] = row[key]
    return "answer", out


def _jsonl_rows(path: Path) -> list[tuple[str, object]]:
    rows = []
    with open(path, "rb") as f:
        for number, line in enumerate(iter(lambda: f.readline(MAX_ROW_BYTES + 1), b""), start=1):
            where = f"{path}:{number}"
            if len(line) > MAX_ROW_BYTES:
                raise UsageError(f"{where}: row is longer than {MAX_ROW_BYTES} bytes")
            if len(rows) >= MAX_ROWS:
                raise UsageError(f"{path}: more than {MAX_ROWS} rows")
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UsageError(f"{where}: not valid UTF-8 (byte {exc.start})") from None
            if not text.strip():
                continue
            try:
                rows.append((where, json.loads(text)))
            except json.JSONDecodeError as exc:
                raise UsageError(f"{where}: not JSON ({exc.msg})") from None
    return rows


def _dataset_rows(spec: str) -> list[tuple[str, object]]:
    """Rows of a `datasets` directory (load_from_disk: arrow, never pickle) or hub id (train split)."""
    import datasets

    try:
        if Path(spec).is_dir():
            data = datasets.load_from_disk(spec)
            if isinstance(data, datasets.DatasetDict):
                data = data["train"] if "train" in data else next(iter(data.values()))
        else:
            data = datasets.load_dataset(spec, split="train")
    except Exception as exc:  # datasets raises many kinds; one line naming the source
        raise UsageError(f"cannot read task data {spec}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    return [(f"{spec} row {i}", dict(row)) for i, row in enumerate(data)]


def read_task_rows(path: str) -> tuple[str, list[dict]]:
    """(kind, rows) of a user task file; every problem is a one-line UsageError naming the row."""
    file = Path(path).expanduser()
    if file.is_file():
        raw = _jsonl_rows(file)
    elif file.is_dir() or (not file.exists() and path.count("/") == 1 and not path.startswith((".", "/", "~"))):
        raw = _dataset_rows(path)
    else:
        raise UsageError(f"task data {path} does not exist (give a .jsonl file, a datasets directory or a hub id)")
    if len(raw) < 4:
        raise UsageError(f"task data {path} has {len(raw)} rows; it needs at least 4 (split into eval / calib / probe)")
    checked = [_check_row(row, where) for where, row in raw]
    kinds = {kind for kind, _ in checked}
    if len(kinds) > 1:
        first_other = next(where for (where, _), (kind, _) in zip(raw, checked) if kind != checked[0][0])
        raise UsageError(f"{first_other}: mixes multiple-choice and generation rows; use one kind per task")
    return checked[0][0], [row for _, row in checked]


def register_task_data(spec: str) -> Task:
    """Read, validate and register `NAME=PATH` as a task with its data source, objective and evaluation
    (idempotent for the same NAME=PATH)."""
    from tasa_deploy import data, objectives
    from tasa_deploy.eval import register_task_eval

    name, path = parse_task_data(spec)
    if name in TASKS:
        if TASKS[name].data_path == path:
            return TASKS[name]
        raise UsageError(f"task '{name}' already exists; give your task data another name")
    if name in data.DATASETS or name in objectives.OBJECTIVES:
        raise UsageError(f"'{name}' is a built-in data source or objective name; give your task another name")
    kind, rows = read_task_rows(path)
    source = data.DataSource(name, kind, data.ROLES, lambda role, _path: [r for i, r in enumerate(rows)
                                                                          if i % 4 in data.QUARTERS[role]],
                             f"user task data {path}")
    data.register_source(source)
    objectives.register_task_objective(name, kind)
    register_task_eval(name, kind)
    TASKS[name] = Task(name, (name,), name, (name,), f"user task from {path}", data_path=path)
    return TASKS[name]


__all__ = ["Task", "TASKS", "get_task", "parse_task_data", "read_task_rows", "register_task_data"]
