"""Zero-shot multiple-choice accuracy by log-likelihood (ARC-Easy, ARC-Challenge, HellaSwag, PIQA).

Each choice is scored as the continuation " " + choice after the row's query (lm-eval-harness convention):
context ids = tokenizer(query) with the tokenizer's default special tokens, continuation ids =
tokenizer(" " + choice) without them, so the scored tokens are exactly the choice's.
acc picks the choice with the largest summed log-likelihood; acc_norm divides each sum by the number of
characters of its continuation (" " + choice), as lm-eval's acc_norm does, which removes the bias toward
short answers. acc_tokavg is llama.cpp's own multiple-choice rule (`llama-perplexity --multiple-choice`):
the choices' tokens past their common prefix are scored and averaged per token, and the best average wins —
computed here from the same forward, so a GGUF row scored by the real llama.cpp and a PyTorch row compare
like for like. The forwards are batched over (row, choice) pairs sorted by length.
`choice_nll` turns the same log-likelihoods into a loss (softmax over choices) for sensitivity profiling.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from tasa_deploy import UsageError
from tasa_deploy.eval.perplexity import model_device, track

MC_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa")


@dataclass(frozen=True)
class MCResult:
    task: str
    acc: float  # by summed log-likelihood
    acc_norm: float  # by log-likelihood per character of the continuation
    n: int
    acc_tokavg: float | None = None  # llama.cpp's rule: mean log-prob per token past the choices' common prefix
    acc_se: float | None = None  # standard errors of acc and acc_norm (binomial)
    acc_norm_se: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


def _pad_right(sequences: list[list[int]]) -> torch.Tensor:
    """Right-pad with id 0: causal attention never lets a real position see the padding after it."""
    width = max(len(s) for s in sequences)
    return torch.tensor([s + [0] * (width - len(s)) for s in sequences], dtype=torch.int64)  # [B, width]


@torch.no_grad()
def continuation_logprobs(model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 16) -> list[torch.Tensor]:
    """Per-token log-probabilities of each continuation given its context: one 1-D tensor per (ctx, cont).

    Contexts must be non-empty (the first continuation token needs a predecessor).
    """
    if any(len(ctx) == 0 or len(cont) == 0 for ctx, cont in pairs):
        raise UsageError("every context and continuation must hold at least one token")
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    results: list[torch.Tensor | None] = [None] * len(pairs)
    device = model_device(model)
    for start in track(range(0, len(order), batch_size), "log-likelihood", total=-(-len(order) // batch_size)):
        chunk = order[start:start + batch_size]
        inputs = _pad_right([(pairs[i][0] + pairs[i][1])[:-1] for i in chunk]).to(device)  # [B, width]
        logits = model(input_ids=inputs).logits  # [B, width, V]
        for row, i in enumerate(chunk):
            ctx, cont = pairs[i]
            positions = slice(len(ctx) - 1, len(ctx) - 1 + len(cont))
            logprobs = F.log_softmax(logits[row, positions].float(), dim=-1)  # [len(cont), V]
            target = torch.tensor(cont, device=device)
            results[i] = logprobs.gather(1, target[:, None])[:, 0].cpu()  # [len(cont)]
    return results


def choice_pairs(tokenizer, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) for every choice of every row, rows in order, choices in order."""
    pairs = []
    for row in rows:
        ctx = tokenizer(row["query"])["input_ids"]
        pairs += [(ctx, tokenizer(" " + choice, add_special_tokens=False)["input_ids"]) for choice in row["choices"]]
    return pairs


def _per_row(rows: list[dict], per_choice: list) -> list[list]:
    """Split a flat per-choice list (rows in order, choices in order) into one list per row."""
    grouped, k = [], 0
    for row in rows:
        grouped.append(per_choice[k:k + len(row["choices"])])
        k += len(row["choices"])
    return grouped


def choice_token_logprobs(model, tokenizer, rows: list[dict],
                          batch_size: int = 16) -> tuple[list[list[list[int]]], list[list[torch.Tensor]]]:
    """(token ids, per-token log-probabilities) of every choice's continuation, one list per row."""
    pairs = choice_pairs(tokenizer, rows)
    return (_per_row(rows, [continuation for _, continuation in pairs]),
            _per_row(rows, continuation_logprobs(model, pairs, batch_size)))


def _summed(token_logprobs: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Summed log-likelihood of each choice: one [n_choices] float64 tensor per row."""
    return [torch.tensor([lp.double().sum().item() for lp in per_choice]) for per_choice in token_logprobs]


def choice_loglikelihoods(model, tokenizer, rows: list[dict], batch_size: int = 16) -> list[torch.Tensor]:
    """Summed log-likelihood of each choice: one [n_choices] float64 tensor per row."""
    return _summed(choice_token_logprobs(model, tokenizer, rows, batch_size)[1])


def token_average_scores(choice_ids: list[list[int]], logprobs: list[torch.Tensor]) -> torch.Tensor:
    """llama.cpp's score of each choice: mean log-prob of its tokens from the first one where the choices
    differ (their common prefix is context to llama.cpp, not answer). [n_choices] float64."""
    shortest = min(len(ids) for ids in choice_ids)
    prefix = 0
    while prefix < shortest - 1 and len({ids[prefix] for ids in choice_ids}) == 1:
        prefix += 1
    return torch.tensor([lp[prefix:].double().mean().item() for lp in logprobs])


def score_rows(rows: list[dict], loglikelihoods: list[torch.Tensor]) -> tuple[float, float]:
    """(acc, acc_norm) of rows given their per-choice summed log-likelihoods."""
    correct = correct_norm = 0
    for row, ll in zip(rows, loglikelihoods):
        chars = torch.tensor([len(" " + c) for c in row["choices"]], dtype=torch.float64)  # [n_choices]
        correct += int(ll.argmax()) == row["label"]
        correct_norm += int((ll / chars).argmax()) == row["label"]
    return correct / len(rows), correct_norm / len(rows)


def token_average_accuracy(rows: list[dict], choice_ids: list[list[list[int]]],
                           token_logprobs: list[list[torch.Tensor]]) -> float:
    """Accuracy under llama.cpp's rule (`token_average_scores`) given each row's choice ids and log-probs."""
    correct = sum(int(token_average_scores(ids, per_choice).argmax()) == row["label"]
                  for row, ids, per_choice in zip(rows, choice_ids, token_logprobs))
    return correct / len(rows)


def evaluate_multiple_choice(model, tokenizer, task: str, limit: int | None = None, rows=None,
                             batch_size: int = 16) -> MCResult:
    """acc / acc_norm of `model` on `rows` (default: the first `limit` eval rows of `task`)."""
    from tasa_deploy.eval.generate import binomial_se

    if rows is None:
        if task not in MC_TASKS:
            raise UsageError(f"unknown multiple-choice task '{task}'; use one of {', '.join(MC_TASKS)}")
        from tasa_deploy.data import load_rows

        rows = load_rows(task, "eval", limit)
    rows = list(rows)[:limit]
    if not rows:
        raise UsageError(f"no rows to evaluate for {task}")
    choice_ids, token_logprobs = choice_token_logprobs(model, tokenizer, rows, batch_size)
    acc, acc_norm = score_rows(rows, _summed(token_logprobs))
    n = len(rows)
    return MCResult(task=task, acc=acc, acc_norm=acc_norm, n=n,
                    acc_tokavg=token_average_accuracy(rows, choice_ids, token_logprobs),
                    acc_se=binomial_se(round(acc * n), n), acc_norm_se=binomial_se(round(acc_norm * n), n))


def choice_nll(model, tokenizer, rows: list[dict]) -> float:
    """Mean over rows of -log softmax(summed choice log-likelihoods)[label]: a task loss for profiling."""
    loglikelihoods = choice_loglikelihoods(model, tokenizer, rows)
    losses = [-torch.log_softmax(ll, dim=0)[row["label"]].item() for row, ll in zip(rows, loglikelihoods)]
    return sum(losses) / len(losses)
