"""GSM8K (Cobbe et al. 2021): few-shot exact match of generated answers, and the answer log-likelihood.

Exact match, instruct models (a chat template): zero-shot, the question in one user turn asking for the
answer after "####"; base models: an n-shot prompt of GSM8K *train* solutions ("Question: ...\\nAnswer: <steps>\\n#### N", calculator
annotations removed) followed by the test question; greedy decoding stops at a blank line or "Question:".
The prediction is the number after "####" when the model writes one, else in its last \\boxed{}, else the
last number in its output;
numbers are normalized (commas, "$" and a trailing "." dropped; 18.00 == 18) before comparison.
The answer NLL (`gsm8k_answer_nll`) is the mean per-token NLL of the reference solution " <steps> #### N"
given "Question: ...\\nAnswer:" (zero-shot): a cheap, smooth proxy of GSM8K quality for sensitivity profiling.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from functools import partial
from decimal import Decimal, InvalidOperation

from tasa_deploy import UsageError
from tasa_deploy.eval.generate import GenerationJob, binomial_se, generate_greedy, has_chat_template
from tasa_deploy.eval.multiple_choice import continuation_logprobs

STOP_STRINGS = ("\n\n", "Question:")
CHAT_INSTRUCTION = "Solve the problem step by step, then give the final answer on the last line as: #### <number>"
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
NUMBER = re.compile(r"-?[\d,]*\.?\d+")


@dataclass(frozen=True)
class GSM8KResult:
    exact_match: float
    n: int
    n_shot: int
    exact_match_se: float = 0.0
    chat: bool = False

    def to_json(self) -> dict:
        return asdict(self)


def normalize_number(text: str) -> str | None:
    """Canonical form of a number string ("1,234.50" -> "1234.5", "$18." -> "18"), None if not a number."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(generation: str) -> str | None:
    """The normalized number after the last "####", else the last number in the text; None if there is none."""
    if "####" in generation:
        after = NUMBER.findall(generation.split("####")[-1])
        if after:
            return normalize_number(after[0])
    boxed = BOXED.findall(generation)  # instruct models often answer in \boxed{...} anyway
    if boxed and NUMBER.findall(boxed[-1]):
        return normalize_number(NUMBER.findall(boxed[-1])[-1])
    numbers = NUMBER.findall(generation)
    return normalize_number(numbers[-1]) if numbers else None


def question_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def few_shot_prefix(n_shot: int) -> str:
    """n worked train examples (the first n of the calibration part of GSM8K train), blank-line separated."""
    from tasa_deploy.data import load_rows

    if n_shot == 0:
        return ""
    shots = load_rows("gsm8k", "calib", limit=n_shot)
    return "".join(f"{question_prompt(s['question'])} {s['answer']}\n\n" for s in shots)


def chat_prompt(question: str) -> str:
    return f"{question}\n{CHAT_INSTRUCTION}"


def evaluate_gsm8k(model, tokenizer, limit: int | None = 50, n_shot: int = 4, max_new_tokens: int | None = None,
                   rows: list[dict] | None = None, chat: bool | None = None, batch_size: int = 8) -> GSM8KResult:
    """Exact match on the first `limit` GSM8K test problems (or on `rows`), greedy.

    chat (default: whether the tokenizer has a chat template): zero-shot, the question in one user turn with
    CHAT_INSTRUCTION, up to 384 new tokens (step-by-step answers are long); otherwise n-shot plain-text
    prompts, up to 192 new tokens."""
    job = gsm8k_job(tokenizer, limit, n_shot, max_new_tokens, rows, chat)
    generations = generate_greedy(model, tokenizer, job.prompts, job.max_new_tokens, chat=job.chat,
                                  stop_strings=job.stops, batch_size=batch_size, description="gsm8k")
    return job.score(generations)


def _score(rows, generations: list[str], n_shot: int, chat: bool) -> GSM8KResult:
    correct = sum(extract_answer(g) == normalize_number(r["target"]) for g, r in zip(generations, rows))
    return GSM8KResult(exact_match=correct / len(rows), n=len(rows), n_shot=n_shot,
                       exact_match_se=binomial_se(correct, len(rows)), chat=chat)


def gsm8k_job(tokenizer, limit: int | None = 50, n_shot: int = 4, max_new_tokens: int | None = None,
              rows: list[dict] | None = None, chat: bool | None = None) -> GenerationJob:
    """The GSM8K exact-match job (see `evaluate_gsm8k`)."""
    chat = has_chat_template(tokenizer) if chat is None else chat
    max_new_tokens = max_new_tokens if max_new_tokens is not None else (384 if chat else 192)
    if n_shot < 0 or max_new_tokens < 1:
        raise UsageError(f"need n_shot >= 0 and max_new_tokens >= 1, got {n_shot} and {max_new_tokens}")
    if rows is None:
        from tasa_deploy.data import load_rows

        rows = load_rows("gsm8k", "eval", limit)
    rows = list(rows)[:limit]
    if not rows:
        raise UsageError("no GSM8K rows to evaluate")
    if chat:
        return GenerationJob("gsm8k", tuple(rows), tuple(chat_prompt(r["question"]) for r in rows), (),
                             max_new_tokens, True, partial(_score, n_shot=0, chat=True))
    prefix = few_shot_prefix(n_shot)
    return GenerationJob("gsm8k", tuple(rows), tuple(prefix + question_prompt(r["question"]) for r in rows),
                         STOP_STRINGS, max_new_tokens, False, partial(_score, n_shot=n_shot, chat=False))


def gsm8k_answer_nll(model, tokenizer, rows: list[dict]) -> float:
    """Mean per-token NLL of each reference solution given its question (token-weighted over all rows)."""
    if not rows:
        raise UsageError("gsm8k_answer_nll needs at least one row")
    pairs = [(tokenizer(question_prompt(r["question"]))["input_ids"],
              tokenizer(" " + r["answer"], add_special_tokens=False)["input_ids"]) for r in rows]
    logprobs = continuation_logprobs(model, pairs, batch_size=8)
    return -sum(lp.double().sum().item() for lp in logprobs) / sum(len(lp) for lp in logprobs)
