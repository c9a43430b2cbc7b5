"""The task registry and `--task-data`: built-in tasks map to sources/objectives/evals, user files become the
same three things with deterministic disjoint splits, and bad files get one-line errors naming the row."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tasa_deploy import UsageError, data, objectives, tasks
from tasa_deploy.eval import EVALS
from tasa_deploy.pipeline import QuantizeRequest


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


GEN = [{"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(12)]
MC = [{"prompt": f"Is {i} even?", "choices": ["yes", "no"], "label": i % 2} for i in range(9)]


def test_builtin_tasks_resolve_to_registered_pieces():
    for task in tasks.TASKS.values():
        assert all(s in data.DATASETS for s in task.sources), task
        assert task.objective in objectives.OBJECTIVES and all(e in EVALS for e in task.evals), task
    request = QuantizeRequest(tasks=("code", "gsm8k", "hellaswag"))
    assert request.task_sources == ("mbpp", "gsm8k", "hellaswag")
    assert request.objectives == ("kl:ppl", "kl:code", "kl:math", "kl:hellaswag")  # none is silently objective-less
    assert replace(request, objective_loss="nll").objectives == ("ppl", "code", "math", "hellaswag")
    assert all(objectives.get_objective(name).score == "kl" for name in request.objectives)


@pytest.mark.parametrize("bad,message", [
    (("nope",), r"unknown task 'nope'; known: gsm8k, arc, .*--task-data"),
    ((), r"--tasks is empty"),
])
def test_unknown_or_empty_tasks_are_refused(bad, message):
    with pytest.raises(UsageError, match=message):
        QuantizeRequest(tasks=bad)


def test_user_task_becomes_source_objective_and_eval(tmp_path):
    path = write_jsonl(tmp_path / "adds.jsonl", GEN)
    task = tasks.register_task_data(f"adds={path}")
    assert tasks.register_task_data(f"adds={path}") is task  # idempotent
    parts = {role: data.load_rows("adds", role) for role in data.ROLES}
    assert [r["answer"] for r in parts["eval"]] == [str(2 * i) for i in range(12) if i % 4 in (0, 1)]
    assert [r["answer"] for r in parts["calib"]] == ["4", "12", "20"] and [r["answer"] for r in parts["probe"]] == ["6", "14", "22"]
    assert data.calibration_texts("adds")[0] == "What is 2 plus 2?\n4"
    request = QuantizeRequest(tasks=("adds", "gsm8k"), task_data=(f"adds={path}",))
    assert request.objectives == ("kl:ppl", "kl:adds", "kl:math") and "adds" in EVALS
    with pytest.raises(UsageError, match="task 'adds' already exists"):
        tasks.register_task_data(f"adds={write_jsonl(tmp_path / 'other.jsonl', GEN)}")


def test_user_multiple_choice_task(tmp_path):
    tasks.register_task_data(f"parity={write_jsonl(tmp_path / 'mc.jsonl', MC)}")
    assert data.get_source("parity").kind == "mc"
    probe = data.load_rows("parity", "probe")
    assert probe == [{"query": "Is 3 even?", "choices": ["yes", "no"], "label": 1},
                     {"query": "Is 7 even?", "choices": ["yes", "no"], "label": 1}]
    assert objectives.get_objective("parity").reduce is objectives.reduce_choice


def _lines(rows):
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


BAD_FILES = [  # (file bytes, message)
    (b"", r"has 0 rows; it needs at least 4"),
    (_lines(GEN[:3]), r"has 3 rows; it needs at least 4"),
    (_lines(GEN[:4]) + b"[1, 2]\n", r"bad\.jsonl:5: a row must be a JSON object, got list"),
    (_lines(GEN[:4] + [{"prompt": "x"}]), r":5: needs a non-empty string \"answer\""),
    (_lines(GEN[:4] + [{"answer": "x"}]), r":5: needs a non-empty string \"prompt\""),
    (_lines(GEN[:4] + [{"prompt": 3, "answer": "x"}]), r":5: needs a non-empty string \"prompt\""),
    (_lines(GEN[:4] + [{"prompt": "q", "answer": "a", "tests": 5}]), r":5: \"tests\" must be a non-empty string"),
    (_lines(MC[:4] + [{"prompt": "q", "choices": ["a", "b"], "label": 2}]), r":5: \"label\" must be an integer index into its 2 choices, got 2"),
    (_lines(MC[:4] + [{"prompt": "q", "choices": ["a", "b"], "label": True}]), r":5: \"label\" must be an integer"),
    (_lines(MC[:4] + [{"prompt": "q", "choices": ["a"], "label": 0}]), r":5: \"choices\" must be a list of at least 2"),
    (_lines(MC[:4] + [{"prompt": "q", "choices": ["a", "b"], "label": 0, "answer": "a"}]), r":5: has both"),
    (_lines(GEN[:4] + MC[:1]), r":5: mixes multiple-choice and generation rows"),
    (_lines(GEN[:4]) + b"{\"prompt\": \"caf\xe9\"}\n", r":5: not valid UTF-8 \(byte 15\)"),
    (_lines(GEN[:4]) + b"{\"prompt\": \n", r":5: not JSON"),
    (_lines(GEN[:4]) + b"{\"prompt\": \"" + b"x" * (tasks.MAX_ROW_BYTES + 10) + b"\"}\n",
     r":5: row is longer than 1048576 bytes"),
]


@pytest.mark.parametrize("content,message", BAD_FILES, ids=[str(i) for i in range(len(BAD_FILES))])
def test_bad_task_files_name_the_row(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(UsageError, match=message) as info:
        tasks.read_task_rows(str(tmp_path / "bad.jsonl"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("spec,message", [
    ("nofile", r"takes NAME=PATH"),
    ("Bad-Name=x.jsonl", r"must be lower-case letters"),
    ("gsm8k=x.jsonl", r"task 'gsm8k' already exists"),
    ("lambada=x.jsonl", r"built-in data source or objective name"),
    ("fresh=/does/not/exist.jsonl", r"does not exist"),
])
def test_bad_task_data_specs(spec, message):
    with pytest.raises(UsageError, match=message):
        tasks.register_task_data(spec)


def test_datasets_directory_is_read_without_pickle(tmp_path):
    import datasets

    datasets.Dataset.from_list(GEN).save_to_disk(str(tmp_path / "ds"))
    kind, rows = tasks.read_task_rows(str(tmp_path / "ds"))
    assert kind == "answer" and rows[5] == {"prompt": "What is 5 plus 5?", "answer": "10"}


def test_cli_reports_a_bad_task_file_in_one_line_before_loading_a_model(tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(_lines(GEN[:4] + [{"prompt": "x"}]))
    result = subprocess.run([sys.executable, "-m", "tasa_deploy.cli", "quantize", "--out", str(tmp_path / "o"),
                             "--model", "/no/such/model", "--task-data", f"mine={tmp_path / 'bad.jsonl'}",
                             "--tasks", "mine"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "bad.jsonl:5: needs a non-empty string \"answer\"" in result.stderr
    assert not (tmp_path / "o").exists()


def test_code_task_probe_and_objective_use_mbpp(calibration_data, smollm2):
    rows = objectives.get_objective("code").load_rows(4, 0)
    assert len(rows) == 4 and all("def " in r["answer"] and "assert" in r["tests"] for r in rows)
    probe = objectives.build_probe_set("code", smollm2.tokenizer, rows, 256)
    loss = objectives.evaluate_objective(smollm2.model, probe)
    assert 0.2 < loss < 3.0, loss  # SmolLM2 on reference Python: about 1 nat per token
    calib, probe_rows = data.load_rows("mbpp", "calib"), data.load_rows("mbpp", "probe")
    assert (len(calib), len(probe_rows)) == (250, 249)  # 500 problems, one stated twice
    assert not {r["prompt"] for r in calib} & {r["prompt"] for r in probe_rows}


def test_mbpp_jsonl_twin_is_a_valid_user_task(tmp_path, calibration_data):
    """benchmarks/mbpp_jsonl.py writes the `--task-data` twin of the built-in code task (the Qwen run's input):
    its rows are the built-in MBPP rows, and they load as a user task with disjoint splits."""
    out = tmp_path / "mbpp_part.jsonl"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "mbpp_jsonl.py"
    run = subprocess.run([sys.executable, str(script), "--rows", "40", "--out", str(out)], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    builtin = data.load_rows("mbpp", "calib") + data.load_rows("mbpp", "probe")
    assert len(rows) == 40 and all(r in builtin for r in rows)
    tasks.register_task_data(f"mbpp40={out}")
    parts = {role: [r["prompt"] for r in data.load_rows("mbpp40", role)] for role in data.ROLES}
    assert sum(map(len, parts.values())) == 40 and all(parts.values())
    calib, probe, held_out = map(set, (parts["calib"], parts["probe"], parts["eval"]))
    assert not (calib & probe or probe & held_out or calib & held_out)
    again = subprocess.run([sys.executable, str(script), "--out", str(out)], capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr  # never replaces a file it cannot recognise
