"""Code evaluation: greedy pass@1 of generated Python against the problems' tests, run in the sandbox.

HumanEval (164 problems) is the `code` task's evaluation; MBPP rows and user rows with "tests" use the same
scorer. The prompt asks the model (through its chat template when it has one) for the function in one
```python block; the program run is
  HumanEval-style rows (with "entry_point"): the problem's prompt (header + docstring), then the generated
      code when it defines the entry point itself, else the generation as the function body; then the tests;
  other rows: the generated code, then the tests.
The first fenced block of the answer is taken (the whole answer when there is none). Generated code never
runs in this process: `tasa_deploy.sandbox.run_python` runs each program in a contained child process.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from tasa_deploy import UsageError
from tasa_deploy.eval.generate import GenerationJob, binomial_se, generate_greedy, has_chat_template
from tasa_deploy.sandbox import SandboxLimits, run_python

FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


@dataclass(frozen=True)
class CodeResult:
    task: str
    pass_at_1: float
    pass_at_1_se: float
    n: int
    passed: int
    statuses: dict  # sandbox status -> count ("passed", "failed", "timeout", "killed")
    isolation: tuple[str, ...]

    def to_json(self) -> dict:
        return asdict(self)


def instruction(row: dict) -> str:
    """What the model is asked for one problem."""
    if "entry_point" in row:
        return ("Complete the following Python function. Reply with the complete function in one ```python "
                f"code block.\n```python\n{row['prompt']}```")
    return f"{row['prompt'].rstrip()}\nReply with the Python code in one ```python code block."


def extract_code(generation: str) -> str:
    """The first fenced code block of a generation (the generation itself when it has no fence)."""
    match = FENCE.search(generation)
    return (match.group(1) if match else generation).rstrip() + "\n"


def program(row: dict, generation: str) -> str:
    """The program whose exit status scores one generation (see the module docstring)."""
    code = extract_code(generation)
    if "entry_point" in row:
        defines = re.search(rf"^\s*def\s+{re.escape(row['entry_point'])}\s*\(", code, re.MULTILINE)
        body = ("\n" + code) if defines else code
        return f"{row['prompt']}{body}\n\n{row['tests']}\n"
    return f"{code}\n\n{row['tests']}\n"


def score_programs(task: str, programs: list[str], limits: SandboxLimits = SandboxLimits()) -> CodeResult:
    """pass@1 of programs run one by one in the sandbox."""
    statuses: dict[str, int] = {}
    isolation: tuple[str, ...] = ()
    for source in programs:
        result = run_python(source, limits)
        statuses[result.status] = statuses.get(result.status, 0) + 1
        isolation = result.isolation
    passed = statuses.get("passed", 0)
    return CodeResult(task, passed / len(programs), binomial_se(passed, len(programs)), len(programs), passed,
                      dict(sorted(statuses.items())), isolation)


def evaluate_code(model, tokenizer, task: str = "humaneval", limit: int | None = None, rows=None,
                  max_new_tokens: int = 384, batch_size: int = 8) -> CodeResult:
    """Greedy pass@1 on the first `limit` eval rows of `task` (or on `rows`), tests run in the sandbox."""
    job = code_job(tokenizer, task, limit, rows, max_new_tokens)
    generations = generate_greedy(model, tokenizer, list(job.prompts), job.max_new_tokens, chat=job.chat,
                                  stop_strings=job.stops, batch_size=batch_size, description=task)
    return job.score(generations)


def code_job(tokenizer, task: str = "humaneval", limit: int | None = None, rows=None,
             max_new_tokens: int = 384) -> GenerationJob:
    """The pass@1 job of `evaluate_code`: instructions in, programs run in the sandbox out."""
    if rows is None:
        from tasa_deploy.data import load_rows

        rows = load_rows(task, "eval", limit)
    rows = list(rows)[:limit]
    if not rows or not all("tests" in row for row in rows):
        raise UsageError(f"code evaluation of {task} needs rows with tests")
    return GenerationJob(task, tuple(rows), tuple(instruction(r) for r in rows), ("\n```\n",), max_new_tokens,
                         has_chat_template(tokenizer),
                         lambda rows, generations: score_programs(task, [program(r, g) for r, g in zip(rows, generations)]))


__all__ = ["CodeResult", "code_job", "evaluate_code", "extract_code", "instruction", "program", "score_programs"]
