"""KL divergence and top-1 agreement against a reference model (`tasa-deploy eval --kld-base MODEL`).

Accuracy on a few hundred items moves by several points from noise alone; the divergence of a quantized
model's next-token distribution from its base model's on the same text is a far more sensitive measure of
what quantization changed (llama.cpp reports it as `llama-perplexity --kl-divergence`). For each scored
position t: KL(p_ref || p) = sum_v p_ref(v) (log p_ref(v) - log p(v)), and top-1 agreement = [argmax p ==
argmax p_ref]. Scored positions:
  wikitext2   windows of `seq_len` tokens (protocol "standard": every token with a predecessor; "llamacpp": the
              second half of each window with BOS first, as llama-perplexity scores it), the first `limit`;
  a task      the answer tokens of its eval rows given the prompt (multiple choice: every choice's tokens),
              encoded as the profile's objectives encode them.
Means are pooled per token; their standard errors treat windows / rows as the sampled units (tokens within
one window are correlated): `stats.ratio_mean_se`. Logits are formed `chunk` positions at a time from the
final hidden states, so no [tokens, vocab] tensor is held for a whole window of a 150k-vocabulary model.
Scoring several models against one reference (a quality table's rows)? Wrap it in `ReferenceStates`: its final
hidden states are kept per batch, so its forward pass runs once per batch instead of once per scored model.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import torch

from tasa_deploy import UsageError
from tasa_deploy.eval.perplexity import llamacpp_windows, model_device, resolve_add_bos, standard_windows, track
from tasa_deploy.objectives import (ProbeBatch, batch_sequences, encode_answer, encode_choices, encode_prompt_answer,
                                    next_token_kl, output_logits_fn, scored_positions)
from tasa_deploy.stats import ratio_mean_se


@dataclass(frozen=True)
class KLResult:
    kld: float  # mean KL(reference || model) per scored token, nats
    kld_se: float
    top1: float  # share of scored tokens where both models' most likely token agree
    top1_se: float
    tokens: int
    n: int  # windows or rows: the sampled units of the standard errors

    def to_json(self) -> dict:
        return asdict(self)


def _final_states(model, tokens: torch.Tensor) -> torch.Tensor:
    """Hidden states after the final norm [B, T, H] (the input of the output head)."""
    return model.model(input_ids=tokens.to(model_device(model)), use_cache=False).last_hidden_state


class ReferenceStates:
    """A reference model with its final hidden states kept per token batch (on the CPU, [B, T, H] each: about
    0.7 GB for HumanEval + GSM8K on a 896-wide model), so that every later model scored against it on the same
    batches skips the reference's forward pass. Pass it wherever a reference model is taken."""

    def __init__(self, model):
        self.model = model
        self._states: dict[bytes, torch.Tensor] = {}

    def final_states(self, tokens: torch.Tensor) -> torch.Tensor:
        key = hashlib.sha256(repr(tuple(tokens.shape)).encode() + tokens.cpu().numpy().tobytes()).digest()
        if key not in self._states:
            self._states[key] = _final_states(self.model, tokens).cpu()
        return self._states[key]


@torch.no_grad()
def divergence_sums(model, reference, batch: ProbeBatch, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence of `batch`: summed KL(reference || model) and summed top-1 agreement over its scored
    tokens, both [B] float64. `reference`: a model, or a `ReferenceStates` around one."""
    rows, cols, _ = scored_positions(batch)
    cached = isinstance(reference, ReferenceStates)
    ref_model = reference.model if cached else reference
    states = _final_states(model, batch.tokens)
    ref_states = reference.final_states(batch.tokens) if cached else _final_states(ref_model, batch.tokens)
    head, ref_head = output_logits_fn(model), output_logits_fn(ref_model)
    ref_device = ref_model.get_output_embeddings().weight.device
    kl = torch.zeros(batch.tokens.shape[0], dtype=torch.float64)
    agree = torch.zeros_like(kl)
    for start in range(0, rows.numel(), chunk):
        part = slice(start, start + chunk)
        r, c = rows[part].to(states.device), cols[part].to(states.device)
        logits = head(states[r, c])  # [p, V]
        r2, c2 = rows[part].to(ref_states.device), cols[part].to(ref_states.device)
        ref = ref_head(ref_states[r2, c2].to(ref_device)).to(logits.device)  # [p, V]
        kl.index_add_(0, rows[part], next_token_kl(ref, logits).double().cpu())
        agree.index_add_(0, rows[part], (logits.argmax(-1) == ref.argmax(-1)).double().cpu())
    return kl, agree


def _result(batches: list[ProbeBatch], seq_unit: list[int], n_units: int, model, reference, what: str) -> KLResult:
    """Sum per unit (window / row) over every batch, then the pooled means with their standard errors."""
    kl, agree, count = (torch.zeros(n_units, dtype=torch.float64) for _ in range(3))
    for batch in track(batches, f"KL {what}"):
        batch_kl, batch_agree = divergence_sums(model, reference, batch)
        units = torch.tensor([seq_unit[int(i)] for i in batch.seq_index])
        kl.index_add_(0, units, batch_kl)
        agree.index_add_(0, units, batch_agree)
        count.index_add_(0, units, batch.score_mask.sum(dim=1).double())
    mean_kl, kl_se = ratio_mean_se(kl.tolist(), count.tolist())
    top1, top1_se = ratio_mean_se(agree.tolist(), count.tolist())
    return KLResult(mean_kl, kl_se, top1, top1_se, int(count.sum()), int((count > 0).sum()))


def kl_on_text(model, reference, tokenizer, text: str, seq_len: int = 512, max_windows: int | None = None,
               protocol: str = "standard", batch_size: int = 1) -> KLResult:
    """KL and top-1 agreement on `text` cut into windows (see the module docstring for the protocols)."""
    if protocol == "standard":
        windows, first = standard_windows(tokenizer, text, seq_len), 0
    elif protocol == "llamacpp":
        windows, first = llamacpp_windows(tokenizer, text, seq_len, resolve_add_bos(tokenizer, None)), seq_len // 2
    else:
        raise UsageError(f"unknown protocol '{protocol}'; use standard or llamacpp")
    windows = windows[:max_windows]  # [W, L]
    score = torch.zeros(windows.shape, dtype=torch.bool)
    score[:, first + 1:] = True  # token t scored from position t - 1
    batches = [ProbeBatch(windows[i:i + batch_size], torch.ones_like(score[i:i + batch_size]),
                          score[i:i + batch_size], torch.arange(i, min(i + batch_size, len(windows))))
               for i in range(0, len(windows), batch_size)]
    return _result(batches, list(range(len(windows))), len(windows), model, reference, "text")


def encoder_for(rows: list[dict]):
    """The objectives' encoder that reads these rows: GSM8K {question, answer}, {prompt, answer}, or choices."""
    keys = set(rows[0]) if rows else set()
    if {"question", "answer"} <= keys:
        return encode_answer
    if {"prompt", "answer"} <= keys:
        return encode_prompt_answer
    if {"query", "choices", "label"} <= keys:
        return encode_choices
    raise UsageError(f"cannot score KL on rows with keys {sorted(keys)}; expected question/answer, prompt/answer "
                     "or query/choices/label")


def kl_on_rows(model, reference, tokenizer, rows: list[dict], seq_len: int = 512) -> KLResult:
    """KL and top-1 agreement on the answer (or choice) tokens of task rows."""
    if not rows:
        raise UsageError("no rows to score KL on")
    sequences = encoder_for(rows)(tokenizer, rows, seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches = batch_sequences(sequences, pad_id)
    return _result(list(batches), [s.row for s in sequences], len(rows), model, reference, "rows")


__all__ = ["KLResult", "ReferenceStates", "divergence_sums", "encoder_for", "kl_on_rows", "kl_on_text"]
