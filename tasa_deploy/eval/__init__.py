"""Evaluation: WikiText-2 perplexity, zero-shot multiple choice, GSM8K, code pass@1 (HumanEval, MBPP) and
user tasks (`--task-data`); one registry `EVALS` for the CLI. Accuracies carry `<metric>_se`.

EVALS[name](model, tokenizer, limit) -> a JSON-ready dict. `limit` caps the work: windows of 512 tokens for
"wikitext2", problems / rows for the others (None: the whole eval split).
"""

from __future__ import annotations

from typing import Callable

from tasa_deploy import UsageError
from tasa_deploy.eval.gsm8k import GSM8KResult, evaluate_gsm8k, gsm8k_answer_nll
from tasa_deploy.eval.multiple_choice import MC_TASKS, MCResult, choice_nll, evaluate_multiple_choice
from tasa_deploy.eval.perplexity import PerplexityResult, evaluate_perplexity, token_nll

EvalFn = Callable[[object, object, "int | None"], dict]


def eval_wikitext2(model, tokenizer, limit: int | None) -> dict:
    from tasa_deploy.data import wikitext2_test_text

    return evaluate_perplexity(model, tokenizer, wikitext2_test_text(), seq_len=512, max_windows=limit).to_json()


def eval_gsm8k(model, tokenizer, limit: int | None) -> dict:
    return evaluate_gsm8k(model, tokenizer, limit=limit).to_json()


def eval_gsm8k_ll(model, tokenizer, limit: int | None) -> dict:
    from tasa_deploy.data import load_rows

    rows = load_rows("gsm8k", "eval", limit)
    return {"answer_nll": gsm8k_answer_nll(model, tokenizer, rows), "n": len(rows)}


def _mc_eval(task: str) -> EvalFn:
    """Accuracy on a multiple-choice source's eval rows (built-in or `--task-data`)."""
    def run(model, tokenizer, limit: int | None) -> dict:
        from tasa_deploy.data import load_rows

        return evaluate_multiple_choice(model, tokenizer, task, rows=load_rows(task, "eval", limit)).to_json()
    return run


def eval_mbpp(model, tokenizer, limit: int | None) -> dict:
    """MBPP pass@1 on its probe half (MBPP's other half calibrates the `code` task): a diagnostic only."""
    from tasa_deploy.data import load_rows
    from tasa_deploy.eval.code import evaluate_code

    return evaluate_code(model, tokenizer, "mbpp", rows=load_rows("mbpp", "probe", limit)).to_json()


def _answer_eval(task: str) -> EvalFn:
    """A generation source (HumanEval, a user task): pass@1 when its rows carry tests, else exact match."""
    def run(model, tokenizer, limit: int | None) -> dict:
        from tasa_deploy.data import load_rows
        from tasa_deploy.eval.code import evaluate_code
        from tasa_deploy.eval.exact import evaluate_exact_match

        rows = load_rows(task, "eval", limit)
        if all("tests" in row for row in rows):
            return evaluate_code(model, tokenizer, task, rows=rows).to_json()
        return evaluate_exact_match(model, tokenizer, task, rows).to_json()
    return run


EVALS: dict[str, EvalFn] = {"wikitext2": eval_wikitext2, "gsm8k": eval_gsm8k, "gsm8k_ll": eval_gsm8k_ll,
                            **{task: _mc_eval(task) for task in MC_TASKS},
                            "humaneval": _answer_eval("humaneval"), "mbpp": eval_mbpp}


def evaluate_kld(loaded, reference, tasks: list[str], limit: int | None) -> dict:
    """{"kld:wikitext2": ..., "kld:<task>": ...}: KL and top-1 agreement of `loaded` against `reference`
    (`eval.kld`) on WikiText-2 (first `limit` windows, default 40) and the eval rows of each task."""
    from tasa_deploy.data import load_rows, wikitext2_test_text
    from tasa_deploy.eval.kld import kl_on_rows, kl_on_text

    if len(loaded.tokenizer) != len(reference.tokenizer):
        raise UsageError(f"--kld-base has a vocabulary of {len(reference.tokenizer)} tokens, the model "
                         f"{len(loaded.tokenizer)}: KL needs the same tokenizer")
    model, ref, tokenizer = loaded.model, reference.model, loaded.tokenizer
    results = {"kld:wikitext2": kl_on_text(model, ref, tokenizer, wikitext2_test_text(), max_windows=limit or 40).to_json()}
    for task in tasks:
        if task == "wikitext2":
            continue
        source, role = {"gsm8k_ll": ("gsm8k", "eval"), "mbpp": ("mbpp", "probe")}.get(task, (task, "eval"))
        results[f"kld:{task}"] = kl_on_rows(model, ref, tokenizer, load_rows(source, role, limit)).to_json()
    return results


def register_task_eval(name: str, kind: str) -> None:
    """The evaluation of a user task (`--task-data`): by row kind, see `tasa_deploy.tasks`."""
    if name in EVALS:
        raise UsageError(f"evaluation '{name}' already exists")
    EVALS[name] = _answer_eval(name) if kind == "answer" else _mc_eval(name)

__all__ = ["EVALS", "evaluate_kld", "GSM8KResult", "MCResult", "PerplexityResult", "choice_nll", "evaluate_gsm8k",
           "evaluate_multiple_choice", "evaluate_perplexity", "gsm8k_answer_nll", "token_nll"]
