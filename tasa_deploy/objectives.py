"""TASA objectives: probe data + a per-token loss mask + a reducer, all computed from the logits of token batches.

TASA (arXiv 2607.00908) measures each layer's sensitivity separately for every objective the deployed model
must serve. An objective here is three pure pieces:
  - `load_rows(n, seed)`: held-out PROBE rows from `tasa_deploy.data` (role "probe": disjoint from the
    calibration rows and from the evaluation split);
  - `encode(tokenizer, rows, seq_len) -> [EncodedSequence]`: token ids, the positions whose token is scored,
    the probe row each sequence belongs to and whether it holds the correct choice;
  - `reduce(seq_loss, seq_count, probe) -> RowLosses`: the loss split over probe rows (loss = sum num / sum
    den), from per-sequence summed per-token losses; the rows give every delta its standard error.
Because every loss is a function of per-sequence sums of a per-token loss, one forward over the probe batches
yields all objectives at once; `tasa_deploy.profile` exploits that to share the forward of the quantized tail
across objectives. The per-token loss is the NLL of the scored token, or for "kl:NAME" objectives the KL
divergence KL(unquantized || quantized) of the next-token distribution at that position (same rows and
tokens as NAME; pooled per token; 0 at the baseline).

Registry `OBJECTIVES` (one dict per concept):
  ppl   mean next-token NLL over general prose (LAMBADA probe passages; NOT the WikiText-2 test text used for
        evaluation), every token after the first scored;
  math  mean per-token NLL of GSM8K answer tokens given "Question: ...\\nAnswer:" (token-weighted pooling);
  arc   multiple-choice loss, -log softmax_c(sum of choice-token log-likelihoods)[label], averaged over
        ARC-Easy + ARC-Challenge probe questions (half each); `hellaswag`, `piqa` likewise on their rows;
  code  mean per-token NLL of MBPP reference code given the problem text and its first test;
  NAME  a user task (`--task-data`, `tasa_deploy.tasks`): answer NLL or choice loss, by its row kind;
  kl:NAME  any of the above scored by KL from the unquantized model (the default in `quantize`).
Sequences are right-padded: with a causal mask a real token never attends to a later pad, so no attention
mask is needed and batch composition does not change any scored log-prob (up to float rounding).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from tasa_deploy import UsageError

MAX_BATCH_TOKENS = 2048  # padded tokens per probe batch (B * T); bounds activation memory
PAD_BUCKET = 0.8  # a sequence shorter than 0.8 x its batch's longest starts a new batch (less padding)


@dataclass(frozen=True)
class EncodedSequence:
    """One probe sequence before batching."""

    ids: tuple[int, ...]
    scored_from: int  # tokens ids[scored_from:] are scored (predicted from the previous position); >= 1
    row: int  # index of the probe row it came from
    is_target: bool  # multiple choice: this sequence holds the correct choice (True for LM objectives)


@dataclass(frozen=True)
class ProbeBatch:
    """Right-padded token batch of one objective."""

    tokens: torch.Tensor  # [B, T] int64
    token_mask: torch.Tensor  # [B, T] bool: real (non-pad) token
    score_mask: torch.Tensor  # [B, T] bool: token t is scored, predicted from position t-1 (never t = 0)
    seq_index: torch.Tensor  # [B] int64: index of each sequence in the objective's sequence list


@dataclass(frozen=True)
class ProbeSet:
    """All probe batches of one objective, plus per-sequence bookkeeping for the reducer."""

    objective: str
    batches: tuple[ProbeBatch, ...]
    seq_row: torch.Tensor  # [S] int64: probe row of each sequence
    seq_is_target: torch.Tensor  # [S] bool
    n_rows: int

    @property
    def n_sequences(self) -> int:
        return int(self.seq_row.numel())

    @property
    def n_tokens(self) -> int:
        return int(sum(int(b.token_mask.sum()) for b in self.batches))

    def digest(self) -> str:
        """sha256 of the exact probe tokens and masks: identifies the probe data in cache keys."""
        digest = hashlib.sha256(self.objective.encode())
        for batch in self.batches:
            for tensor in (batch.tokens, batch.score_mask, batch.seq_index):
                digest.update(tensor.contiguous().numpy().tobytes())
        digest.update(self.seq_row.numpy().tobytes() + self.seq_is_target.numpy().tobytes())
        return digest.hexdigest()


@dataclass(frozen=True)
class RowLosses:
    """An objective's loss split over its probe rows: loss = sum(num) / sum(den) (`tasa_deploy.stats` pairs
    two of these into a delta with a standard error)."""

    num: torch.Tensor  # [R] float64: the row's summed per-token loss (token mean) or its loss (per-row mean)
    den: torch.Tensor  # [R] float64: the row's scored tokens (token mean) or 1

    @property
    def loss(self) -> float:
        return float(self.num.sum() / self.den.sum().clamp(min=1))


Reducer = Callable[[torch.Tensor, torch.Tensor, ProbeSet], RowLosses]


@dataclass(frozen=True)
class Objective:
    name: str
    sources: tuple[str, ...]  # data registry names the probe rows come from
    load_rows: Callable[[int, int], list[dict]]  # (n_rows, seed) -> probe rows
    encode: Callable[[object, list[dict], int], list[EncodedSequence]]  # (tokenizer, rows, seq_len)
    reduce: Reducer
    description: str
    score: str = "nll"  # per-token loss: "nll" of the scored token, or "kl" from the unquantized model


# ----------------------------------------------------------------------------------------- reducers
def reduce_token_mean(seq_loss: torch.Tensor, seq_count: torch.Tensor, probe: ProbeSet) -> RowLosses:
    """Mean per-token loss pooled over all sequences (seq_loss/seq_count: [S] float64 / int64), split by row."""
    num = torch.zeros(probe.n_rows, dtype=torch.float64).index_add_(0, probe.seq_row, seq_loss)
    den = torch.zeros(probe.n_rows, dtype=torch.float64).index_add_(0, probe.seq_row, seq_count.double())
    return RowLosses(num, den)


def reduce_choice(seq_loss: torch.Tensor, seq_count: torch.Tensor, probe: ProbeSet) -> RowLosses:
    """Per row: -log softmax over that row's choices (summed log-likelihoods) at the correct one; mean over rows."""
    losses = []
    for row in range(probe.n_rows):
        in_row = probe.seq_row == row  # [S] bool
        choice_scores = -seq_loss[in_row]  # [C]
        target = probe.seq_is_target[in_row].nonzero()[0, 0]
        losses.append(-torch.log_softmax(choice_scores, dim=0)[target])
    return RowLosses(torch.stack(losses).double(), torch.ones(probe.n_rows, dtype=torch.float64))


# ----------------------------------------------------------------------------------------- encoders
def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prose(tokenizer, rows: list[dict], seq_len: int) -> list[EncodedSequence]:
    """One sequence per {"text"} row, truncated to seq_len; every token after the first is scored."""
    sequences = []
    for row_index, row in enumerate(rows):
        ids = _ids(tokenizer, row["text"])[:seq_len]
        if len(ids) >= 2:
            sequences.append(EncodedSequence(tuple(ids), 1, row_index, True))
    return sequences


def prompt_continuation_ids(tokenizer, prompt: str, continuation: str, seq_len: int) -> tuple[tuple[int, ...], int]:
    """Token ids of prompt + continuation (tokenized apart so the boundary is exact), cut to seq_len by
    dropping the prompt's start first, then the continuation's end; returns (ids, index of 1st scored)."""
    prompt_ids = _ids(tokenizer, prompt)
    cont_ids = _ids(tokenizer, continuation)[: seq_len - 1]
    prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(cont_ids) - seq_len):]
    if not prompt_ids:
        raise UsageError(f"probe prompt is empty after truncation to --seq-len {seq_len}; raise --seq-len")
    return tuple(prompt_ids + cont_ids), len(prompt_ids)


def encode_answer(tokenizer, rows: list[dict], seq_len: int) -> list[EncodedSequence]:
    """GSM8K {"question", "answer"} rows: score the answer tokens given 'Question: ...\\nAnswer:'."""
    sequences = []
    for row_index, row in enumerate(rows):
        ids, start = prompt_continuation_ids(tokenizer, f"Question: {row['question']}\nAnswer:",
                                              " " + row["answer"].strip(), seq_len)
        sequences.append(EncodedSequence(ids, start, row_index, True))
    return sequences


def encode_prompt_answer(tokenizer, rows: list[dict], seq_len: int) -> list[EncodedSequence]:
    """{"prompt", "answer"} rows (code, user tasks): score the answer tokens given the prompt + newline."""
    sequences = []
    for row_index, row in enumerate(rows):
        ids, start = prompt_continuation_ids(tokenizer, row["prompt"].rstrip() + "\n", row["answer"], seq_len)
        sequences.append(EncodedSequence(ids, start, row_index, True))
    return sequences


def encode_choices(tokenizer, rows: list[dict], seq_len: int) -> list[EncodedSequence]:
    """MC {"query", "choices", "label"} rows: one sequence per choice, its tokens scored after the query."""
    sequences = []
    for row_index, row in enumerate(rows):
        if not 0 <= int(row["label"]) < len(row["choices"]):
            raise UsageError(f"probe row {row_index} has label {row['label']} outside its "
                             f"{len(row['choices'])} choices; check the data source")
        for choice_index, choice in enumerate(row["choices"]):
            continuation = choice if choice.startswith((" ", "\n")) else " " + choice
            ids, start = prompt_continuation_ids(tokenizer, row["query"], continuation, seq_len)
            sequences.append(EncodedSequence(ids, start, row_index, choice_index == int(row["label"])))
    return sequences


# ----------------------------------------------------------------------------------------- probe rows
def sample_rows(rows: list[dict], n_rows: int, seed: int) -> list[dict]:
    """A seeded subset of n_rows rows (all of them, in order, when there are no more than n_rows)."""
    if len(rows) <= n_rows:
        return list(rows)
    generator = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(rows), generator=generator)[:n_rows].sort().values
    return [rows[i] for i in picked.tolist()]


def _probe_rows(source: str, n_rows: int, seed: int) -> list[dict]:
    from tasa_deploy import data  # lazy: data sources open files only when an objective is used

    rows = data.load_rows(source, "probe")
    if not rows:
        raise UsageError(f"data source '{source}' has no probe rows; check its files (tasa_deploy.data)")
    return sample_rows(rows, n_rows, seed)


def _rows_from(source: str) -> Callable[[int, int], list[dict]]:
    return lambda n_rows, seed: _probe_rows(source, n_rows, seed)


def _arc_rows(n_rows: int, seed: int) -> list[dict]:
    easy = n_rows - n_rows // 2
    return _probe_rows("arc_easy", easy, seed) + _probe_rows("arc_challenge", n_rows - easy, seed)


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("ppl", ("lambada",), _rows_from("lambada"), encode_prose, reduce_token_mean,
              "mean next-token NLL on general prose (LAMBADA probe passages)"),
    Objective("math", ("gsm8k",), _rows_from("gsm8k"), encode_answer, reduce_token_mean,
              "mean NLL of GSM8K answer tokens given the question"),
    Objective("arc", ("arc_easy", "arc_challenge"), _arc_rows, encode_choices, reduce_choice,
              "ARC multiple-choice loss: -log softmax over summed choice log-likelihoods"),
    Objective("hellaswag", ("hellaswag",), _rows_from("hellaswag"), encode_choices, reduce_choice,
              "HellaSwag multiple-choice loss"),
    Objective("piqa", ("piqa",), _rows_from("piqa"), encode_choices, reduce_choice, "PIQA multiple-choice loss"),
    Objective("code", ("mbpp",), _rows_from("mbpp"), encode_prompt_answer, reduce_token_mean,
              "mean NLL of MBPP reference code given its problem text"),
)}
KL_PREFIX = "kl:"
ENCODERS = {"answer": encode_prompt_answer, "mc": encode_choices}  # user task rows by kind
REDUCERS = {"answer": reduce_token_mean, "mc": reduce_choice}


def register_task_objective(name: str, kind: str) -> Objective:
    """The objective of a user task (`--task-data`): answer NLL or choice loss over its probe rows."""
    if name in OBJECTIVES:
        raise UsageError(f"objective '{name}' already exists")
    OBJECTIVES[name] = Objective(name, (name,), _rows_from(name), ENCODERS[kind], REDUCERS[kind],
                                 f"user task '{name}': " + ("answer NLL" if kind == "answer" else "choice loss"))
    return OBJECTIVES[name]


def get_objective(name: str) -> Objective:
    """The registered objective; "kl:NAME" is derived from NAME on first use (same probe rows and tokens,
    per-token loss KL(unquantized || quantized) instead of NLL, pooled per token)."""
    base = name.removeprefix(KL_PREFIX)
    if name not in OBJECTIVES and name != base and base in OBJECTIVES and OBJECTIVES[base].score == "nll":
        source = OBJECTIVES[base]
        OBJECTIVES[name] = replace(source, name=name, reduce=reduce_token_mean, score="kl",
                                   description=f"KL(unquantized || quantized) next-token divergence on {base}'s scored tokens")
    if name not in OBJECTIVES:
        raise UsageError(f"unknown objective '{name}'; known: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


# ----------------------------------------------------------------------------------------- batching
def batch_sequences(sequences: Sequence[EncodedSequence], pad_id: int,
                    max_batch_tokens: int = MAX_BATCH_TOKENS) -> tuple[ProbeBatch, ...]:
    """Group sequences (longest first, stable) into right-padded batches of at most max_batch_tokens,
    starting a new batch when a sequence would be padded by more than 1 - PAD_BUCKET."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i].ids))
    batches, current = [], []
    for index in order:
        width = len(sequences[current[0]].ids) if current else len(sequences[index].ids)
        too_short = len(sequences[index].ids) < PAD_BUCKET * width  # would be mostly padding
        if current and ((len(current) + 1) * width > max_batch_tokens or too_short):
            batches.append(_pad_batch([sequences[i] for i in current], current, pad_id))
            current = []
        current.append(index)
    if current:
        batches.append(_pad_batch([sequences[i] for i in current], current, pad_id))
    return tuple(batches)


def _pad_batch(sequences: list[EncodedSequence], indices: list[int], pad_id: int) -> ProbeBatch:
    width = max(len(s.ids) for s in sequences)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.int64)  # [B, T]
    token_mask = torch.zeros((len(sequences), width), dtype=torch.bool)  # [B, T]
    score_mask = torch.zeros_like(token_mask)  # [B, T]
    for b, seq in enumerate(sequences):
        tokens[b, : len(seq.ids)] = torch.tensor(seq.ids, dtype=torch.int64)
        token_mask[b, : len(seq.ids)] = True
        score_mask[b, seq.scored_from: len(seq.ids)] = True
    return ProbeBatch(tokens, token_mask, score_mask, torch.tensor(indices, dtype=torch.int64))


def build_probe_set(name: str, tokenizer, rows: list[dict], seq_len: int,
                    max_batch_tokens: int = MAX_BATCH_TOKENS) -> ProbeSet:
    """Encode and batch given probe rows for objective `name` (rows in the data registry's schema)."""
    objective = get_objective(name)
    sequences = objective.encode(tokenizer, rows, seq_len)
    if not sequences:
        raise UsageError(f"objective '{name}' has no probe sequences with at least two tokens; check its data")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return ProbeSet(name, batch_sequences(sequences, pad_id, max_batch_tokens),
                    torch.tensor([s.row for s in sequences], dtype=torch.int64),
                    torch.tensor([s.is_target for s in sequences], dtype=torch.bool), len(rows))


def load_probe_set(name: str, tokenizer, n_rows: int, seq_len: int, seed: int = 0) -> ProbeSet:
    """Probe rows from the data registry, encoded and batched for objective `name`."""
    return build_probe_set(name, tokenizer, get_objective(name).load_rows(n_rows, seed), seq_len)


# ----------------------------------------------------------------------------------------- losses
def scored_positions(batch: ProbeBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows [P], positions [P], targets [P]) of the scored tokens: token t+1 is predicted at position t."""
    rows, cols = batch.score_mask[:, 1:].nonzero(as_tuple=True)
    return rows, cols, batch.tokens[rows, cols + 1]


def scored_states(hidden: torch.Tensor, batch: ProbeBatch) -> torch.Tensor:
    """The final hidden states [P, H] at the scored positions (what the KL objective keeps of the unquantized model)."""
    rows, cols, _ = scored_positions(batch)
    return hidden[rows, cols]


def next_token_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_ref || p) [p] between the next-token distributions of two logit rows [p, V] (float32 softmax)."""
    ref = torch.log_softmax(ref_logits.float(), dim=-1)
    return (ref.exp() * (ref - torch.log_softmax(logits.float(), dim=-1))).sum(dim=-1)


def scored_loss_sums(logits_fn: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, batch: ProbeBatch,
                     reference: torch.Tensor | None = None, chunk: int = 512) -> torch.Tensor:
    """Per-sequence sum of the per-token loss [B] float64, from final hidden states [B, T, H].

    reference None: NLL, -log p(scored token | prefix). reference [P, H] (the unquantized model's
    `scored_states`): KL(p_ref || p) over the vocabulary at each scored position. `logits_fn` maps hidden rows
    [p, H] to logits [p, V]; only `chunk` scored positions go through it at a time, so no [P, V] tensor exists.
    """
    rows, cols, targets = scored_positions(batch)
    sums = torch.zeros(batch.tokens.shape[0], dtype=torch.float64)  # [B]
    for start in range(0, rows.numel(), chunk):
        part = slice(start, start + chunk)
        logits = logits_fn(hidden[rows[part], cols[part]])  # [p, V]
        if reference is None:
            losses = -torch.log_softmax(logits.float(), dim=-1).gather(1, targets[part, None].to(logits.device))[:, 0]
        else:
            losses = next_token_kl(logits_fn(reference[part]), logits)  # [p]
        sums.index_add_(0, rows[part], losses.double().cpu())  # reduced on the host, whatever the device
    return sums


def reduce_probe(probe: ProbeSet, batch_sums: Sequence[torch.Tensor]) -> RowLosses:
    """The objective's per-row losses from the per-batch sums of `scored_loss_sums` (in probe.batches order)."""
    seq_loss = torch.zeros(probe.n_sequences, dtype=torch.float64)  # [S]
    seq_count = torch.zeros(probe.n_sequences, dtype=torch.int64)  # [S]
    for batch, sums in zip(probe.batches, batch_sums, strict=True):
        seq_loss[batch.seq_index] = sums
        seq_count[batch.seq_index] = batch.score_mask.sum(dim=1)
    return get_objective(probe.objective).reduce(seq_loss, seq_count, probe)


def output_logits_fn(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """Hidden [P, H] (after the final norm) -> logits [P, V]: lm_head plus the model's final soft-cap, if any."""
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if not cap:
        return head
    return lambda hidden: torch.tanh(head(hidden) / cap) * cap


@torch.no_grad()
def objective_row_losses(model, probe: ProbeSet, reference_model=None) -> RowLosses:
    """Reference: the objective's per-row losses from plain full-model forwards (no caching, no hooks). A KL
    objective needs `reference_model` (the unquantized model) and scores KL(reference || model)."""
    kl = get_objective(probe.objective).score == "kl"
    if kl and reference_model is None:
        raise UsageError(f"objective '{probe.objective}' is a KL divergence: pass the unquantized reference model")
    batch_sums = []
    for batch in probe.batches:
        logits = model(input_ids=batch.tokens, use_cache=False).logits  # [B, T, V]
        reference = scored_states(reference_model(input_ids=batch.tokens, use_cache=False).logits, batch) if kl else None
        batch_sums.append(scored_loss_sums(lambda rows: rows, logits, batch, reference))
    return reduce_probe(probe, batch_sums)


def evaluate_objective(model, probe: ProbeSet, reference_model=None) -> float:
    """The objective's loss from plain full-model forwards (`objective_row_losses`, pooled)."""
    return objective_row_losses(model, probe, reference_model).loss
