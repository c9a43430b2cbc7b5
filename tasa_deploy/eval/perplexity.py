"""Perplexity of a causal LM on a long text, under two window protocols, and the shared progress helper.

"standard" (GPTQ / lm-eval convention, used in the TASA paper's WikiText-2 tables): tokenize the text once
with the tokenizer's default special tokens, cut it into floor(n / seq_len) non-overlapping windows, and score
every token of each window that has a predecessor in it (seq_len - 1 tokens per window).

"llamacpp" reproduces llama.cpp's `llama-perplexity -c seq_len` (tools/perplexity/perplexity.cpp,
`perplexity()`): tokenize the whole text with a leading BOS when the vocab's add_bos flag is set; require at
least 2 * seq_len tokens; cut floor(n / seq_len) chunks (`--chunks` = max_windows); replace each chunk's first
token with BOS (again only when add_bos); score only the second half of each chunk: the tokens at positions
seq_len/2 + 1 .. seq_len - 1, each predicted from its prefix in the chunk (seq_len - 1 - seq_len/2 per chunk).
PPL = exp(sum NLL / count) as in its "Final estimate". To compare with `llama-perplexity -f wiki.test.raw`
score `data.wikitext2_test_text(raw=True)`, the file exactly as llama.cpp reads it.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from typing import Iterable, TypeVar

import torch
import torch.nn.functional as F
from rich.progress import track as rich_track

from tasa_deploy import UsageError

PROTOCOLS = ("standard", "llamacpp")
T = TypeVar("T")


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterable[T]:
    """A transient rich progress bar over `items`, silent when stderr is not a terminal."""
    return rich_track(items, description=description, total=total, transient=True,
                      disable=not sys.stderr.isatty())


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean NLL (nats) per scored token
    tokens: int  # tokens scored
    windows: int  # windows (llama.cpp: chunks) evaluated
    seq_len: int
    protocol: str

    def to_json(self) -> dict:
        return asdict(self)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def scored_nll_sum(model, windows: torch.Tensor, first: int, batch_size: int) -> tuple[float, int]:
    """Sum of NLLs of windows[:, first + 1:] given their prefixes; returns (sum, count).

    windows: [W, L] int64. Only logits at positions first .. L - 2 are computed (`logits_to_keep`).
    """
    n_windows, seq_len = windows.shape
    keep = seq_len - first  # logits for positions first .. L - 1; the last one predicts nothing
    total, count = 0.0, 0
    device = model_device(model)
    for start in track(range(0, n_windows, batch_size), "perplexity", total=-(-n_windows // batch_size)):
        batch = windows[start:start + batch_size].to(device)  # [B, L]
        logits = model(input_ids=batch, logits_to_keep=keep).logits[:, :-1]  # [B, L - 1 - first, V]
        targets = batch[:, first + 1:]  # [B, L - 1 - first]
        for row_logits, row_targets in zip(logits, targets):  # one row at a time bounds log-softmax memory
            total += F.cross_entropy(row_logits.float(), row_targets, reduction="sum").item()
        count += targets.numel()
    return total, count


def token_nll(model, token_batch: torch.Tensor) -> float:
    """Mean next-token NLL over a [B, T] batch: every token but the first of each row is scored."""
    total, count = scored_nll_sum(model, token_batch, first=0, batch_size=len(token_batch))
    return total / count


def resolve_add_bos(tokenizer, add_bos: bool | None) -> bool:
    """llama.cpp's add_bos flag (GGUF add_bos_token): explicit, else whether the tokenizer itself puts BOS in
    front of a text. Its `add_bos_token` attribute is not that: transformers 5's Gemma tokenizer says False and
    adds BOS through its post-processor (Gemma scored without BOS: WikiText-2 ppl 39.4 instead of 23.2)."""
    if add_bos is None:
        bos = tokenizer.bos_token_id
        add_bos = bos is not None and list(tokenizer("a")["input_ids"][:1]) == [bos]
    if add_bos and tokenizer.bos_token_id is None:
        raise UsageError("add_bos is set but the tokenizer has no BOS token; pass add_bos=False")
    return add_bos


def standard_windows(tokenizer, text: str, seq_len: int) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]  # [n]
    n_windows = len(ids) // seq_len
    if n_windows == 0:
        raise UsageError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}; lower seq_len")
    return ids[: n_windows * seq_len].view(n_windows, seq_len)  # [W, L]


def llamacpp_windows(tokenizer, text: str, seq_len: int, add_bos: bool) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]  # [n]
    if add_bos:
        ids = torch.cat([torch.tensor([tokenizer.bos_token_id]), ids])
    if len(ids) < 2 * seq_len:
        raise UsageError(f"llama-perplexity needs at least {2 * seq_len} tokens for seq_len {seq_len}; "
                         f"the text has {len(ids)}")
    n_windows = len(ids) // seq_len
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len).clone()  # [W, L]
    if add_bos:
        windows[:, 0] = tokenizer.bos_token_id
    return windows


def evaluate_perplexity(model, tokenizer, text: str, seq_len: int = 512, max_windows: int | None = None,
                        protocol: str = "standard", batch_size: int = 4,
                        add_bos: bool | None = None) -> PerplexityResult:
    """Perplexity of `model` on `text` (see the module docstring for the two protocols).

    max_windows caps the windows scored (the first ones, like llama-perplexity's --chunks);
    add_bos applies to protocol="llamacpp" only (default: the tokenizer's add_bos_token).
    """
    if protocol not in PROTOCOLS:
        raise UsageError(f"unknown perplexity protocol '{protocol}'; use one of {', '.join(PROTOCOLS)}")
    if seq_len < 2 or (max_windows is not None and max_windows < 1) or batch_size < 1:
        raise UsageError(f"need seq_len >= 2, max_windows >= 1, batch_size >= 1; got {seq_len}, "
                         f"{max_windows}, {batch_size}")
    if protocol == "standard":
        windows, first = standard_windows(tokenizer, text, seq_len), 0
    else:
        windows = llamacpp_windows(tokenizer, text, seq_len, resolve_add_bos(tokenizer, add_bos))
        first = seq_len // 2
    windows = windows[:max_windows]  # [W, L]
    total, count = scored_nll_sum(model, windows, first, batch_size)
    nll = total / count
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=count, windows=len(windows), seq_len=seq_len,
                            protocol=protocol)
