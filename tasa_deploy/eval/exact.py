"""Exact-match evaluation of a user generation task (`--task-data` rows with "prompt" and "answer", no tests).

The model answers each prompt greedily (one user turn of its chat template when it has one); the answer
counts when, after normalization (case folded, whitespace collapsed, surrounding punctuation and quotes
stripped), the generation's first non-empty line or the whole generation equals the reference answer.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from tasa_deploy import UsageError
from tasa_deploy.eval.generate import binomial_se, generate_greedy, has_chat_template


@dataclass(frozen=True)
class ExactMatchResult:
    task: str
    exact_match: float
    exact_match_se: float
    n: int

    def to_json(self) -> dict:
        return asdict(self)


def normalize_answer(text: str) -> str:
    text = re.sub(r"\s+", " ", text.casefold()).strip()
    return text.strip(" .,;:!?\"'`")


def matches(generation: str, answer: str) -> bool:
    lines = [line for line in generation.splitlines() if line.strip()]
    candidates = {normalize_answer(generation)} | ({normalize_answer(lines[0])} if lines else set())
    return normalize_answer(answer) in candidates


def evaluate_exact_match(model, tokenizer, task: str, rows: list[dict], max_new_tokens: int = 64,
                         batch_size: int = 8) -> ExactMatchResult:
    rows = list(rows)
    if not rows:
        raise UsageError(f"no rows to evaluate for {task}")
    generations = generate_greedy(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens,
                                  chat=has_chat_template(tokenizer), batch_size=batch_size, description=task)
    correct = sum(matches(g, r["answer"]) for g, r in zip(generations, rows))
    return ExactMatchResult(task, correct / len(rows), binomial_se(correct, len(rows)), len(rows))


__all__ = ["ExactMatchResult", "evaluate_exact_match", "matches", "normalize_answer"]
