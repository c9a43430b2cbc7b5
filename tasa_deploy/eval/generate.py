"""Greedy batched generation for the generative evals (GSM8K, HumanEval, user tasks), with chat templates.

Instruct models are scored as users prompt them: the question goes into one user turn of the tokenizer's
own chat template (`apply_chat_template(..., add_generation_prompt=True)`); a base model without a template
gets the raw prompt. Generation is greedy over left-padded batches, stopped at the model's end-of-turn /
EOS tokens or at the eval's stop strings, and every answer carries its standard error (`binomial_se`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from tasa_deploy.eval.perplexity import model_device, track


def binomial_se(correct: int, n: int) -> float:
    """Standard error of an accuracy correct / n (sqrt(p (1 - p) / n)); 0 for n = 0."""
    if n == 0:
        return 0.0
    p = correct / n
    return math.sqrt(p * (1 - p) / n)


@dataclass(frozen=True)
class GenerationJob:
    """What a generative eval asks (prompts as text, rendered by `prompt_ids`) and how its answers are scored;
    shared by the PyTorch evals and the served-model benchmark (`tasa_deploy.bench`), so both score alike."""

    task: str
    rows: tuple
    prompts: tuple[str, ...]
    stops: tuple[str, ...]
    max_new_tokens: int
    chat: bool
    scorer: Callable[[tuple, list[str]], Any]  # (rows, generations) -> the eval's result

    def score(self, generations: list[str]):
        return self.scorer(self.rows, generations)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids of `text` as one user turn of the chat template (chat=True), else as plain text."""
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(text)["input_ids"])


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS ids of the generation config and the tokenizer, plus an end-of-turn token the template uses."""
    ids: list[int] = []
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        ids.extend(source if isinstance(source, list) else [source] if source is not None else [])
    vocab = tokenizer.get_vocab()
    ids.extend(vocab[token] for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>") if token in vocab)
    return sorted(set(ids))


def truncate_at(text: str, stop_strings: tuple[str, ...]) -> str:
    cut = min((text.find(s) for s in stop_strings if s in text), default=len(text))
    return text[:cut]


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, *, chat: bool = False,
                    stop_strings: tuple[str, ...] = (), batch_size: int = 8, description: str = "generate") -> list[str]:
    """Greedy continuations of `prompts` (left-padded batches, shortest first), cut at the first stop string."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [prompt_ids(tokenizer, p, chat) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    device = model_device(model)
    eos = stop_token_ids(model, tokenizer)
    for start in track(range(0, len(order), batch_size), description, total=-(-len(order) // batch_size)):
        chunk = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        ids = torch.tensor([[pad_id] * (width - len(encoded[i])) + encoded[i] for i in chunk])  # [B, width]
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in chunk])
        kwargs = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                   max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos or None,
                                   **kwargs)  # [B, width + new]
        for row, i in enumerate(chunk):
            text = tokenizer.decode(generated[row, width:], skip_special_tokens=True)
            outputs[i] = truncate_at(text, stop_strings)
    return outputs


__all__ = ["GenerationJob", "binomial_se", "generate_greedy", "has_chat_template", "prompt_ids", "stop_token_ids", "truncate_at"]
