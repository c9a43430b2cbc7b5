"""GSM8K (Cobbe et al. 2021): few-shot exact match of generated answers, and the answer log-likelihood.

Exact match: an n-shot prompt of GSM8K *train* solutions ("Question: ...\\nAnswer: <steps>\\n#### N", calculator
annotations removed) followed by the test question; greedy decoding stops at a blank line or "Question:".
The prediction is the number after "####" when the model writes one, else the last number in its output;
numbers are normalized (commas, "$" and a trailing "." dropped; 18.00 == 18) before comparison.
The answer NLL (`gsm8k_answer_nll`) is the mean per-token NLL of the reference solution " <steps> #### N"
given "Question: ...\\nAnswer:" (zero-shot): a cheap, smooth proxy of GSM8K quality for sensitivity profiling.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation

import torch

from tasa_deploy import UsageError
from tasa_deploy.eval.multiple_choice import continuation_logprobs
from tasa_deploy.eval.perplexity import model_device, track

STOP_STRINGS = ("\n\n", "Question:")
NUMBER = re.compile(r"-?[\d,]*\.?\d+")


@dataclass(frozen=True)
class GSM8KResult:
    exact_match: float
    n: int
    n_shot: int

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


def truncate_at_stop(text: str) -> str:
    cut = min((text.find(s) for s in STOP_STRINGS if s in text), default=len(text))
    return text[:cut]


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy continuations of `prompts` (left-padded batches), cut at the first stop string."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    device = model_device(model)
    for start in track(range(0, len(order), batch_size), "gsm8k", total=-(-len(order) // batch_size)):
        chunk = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        ids = torch.tensor([[pad_id] * (width - len(encoded[i])) + encoded[i] for i in chunk])  # [B, width]
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in chunk])
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                   max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                   stop_strings=list(STOP_STRINGS), tokenizer=tokenizer)  # [B, width + new]
        for row, i in enumerate(chunk):
            text = tokenizer.decode(generated[row, width:], skip_special_tokens=True)
            outputs[i] = truncate_at_stop(text)
    return outputs


def evaluate_gsm8k(model, tokenizer, limit: int | None = 50, n_shot: int = 4, max_new_tokens: int = 192,
                   rows: list[dict] | None = None) -> GSM8KResult:
    """Exact match on the first `limit` GSM8K test problems (or on `rows`), n-shot, greedy."""
    if n_shot < 0 or max_new_tokens < 1:
        raise UsageError(f"need n_shot >= 0 and max_new_tokens >= 1, got {n_shot} and {max_new_tokens}")
    if rows is None:
        from tasa_deploy.data import load_rows

        rows = load_rows("gsm8k", "eval", limit)
    rows = list(rows)[:limit]
    if not rows:
        raise UsageError("no GSM8K rows to evaluate")
    prefix = few_shot_prefix(n_shot)
    generations = generate_greedy(model, tokenizer, [prefix + question_prompt(r["question"]) for r in rows],
                                  max_new_tokens)
    correct = sum(extract_answer(g) == normalize_number(r["target"]) for g, r in zip(generations, rows))
    return GSM8KResult(exact_match=correct / len(rows), n=len(rows), n_shot=n_shot)


def gsm8k_answer_nll(model, tokenizer, rows: list[dict]) -> float:
    """Mean per-token NLL of each reference solution given its question (token-weighted over all rows)."""
    if not rows:
        raise UsageError("gsm8k_answer_nll needs at least one row")
    pairs = [(tokenizer(question_prompt(r["question"]))["input_ids"],
              tokenizer(" " + r["answer"], add_special_tokens=False)["input_ids"]) for r in rows]
    logprobs = continuation_logprobs(model, pairs, batch_size=8)
    return -sum(lp.double().sum().item() for lp in logprobs) / sum(len(lp) for lp in logprobs)
