"""Evaluation: WikiText-2 perplexity, zero-shot multiple choice, GSM8K; one registry `EVALS` for the CLI.

EVALS[name](model, tokenizer, limit) -> a JSON-ready dict. `limit` caps the work: windows of 512 tokens for
"wikitext2", problems / rows for the others (None: the whole eval split).
"""

from __future__ import annotations

from typing import Callable

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
    def run(model, tokenizer, limit: int | None) -> dict:
        return evaluate_multiple_choice(model, tokenizer, task, limit=limit).to_json()
    return run


EVALS: dict[str, EvalFn] = {"wikitext2": eval_wikitext2, "gsm8k": eval_gsm8k, "gsm8k_ll": eval_gsm8k_ll,
                            **{task: _mc_eval(task) for task in MC_TASKS}}

__all__ = ["EVALS", "GSM8KResult", "MCResult", "PerplexityResult", "choice_nll", "evaluate_gsm8k",
           "evaluate_multiple_choice", "evaluate_perplexity", "gsm8k_answer_nll", "token_nll"]
