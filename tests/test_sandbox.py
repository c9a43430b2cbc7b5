"""Generated code runs contained: hostile samples are scored as failed and the evaluator survives them.
HumanEval's canonical solutions all pass through the real program builder (a reference the scorer must
reproduce), and wrong or missing ones fail."""

import os
import subprocess
import time

import pytest

from tasa_deploy.eval.code import extract_code, program, score_programs
from tasa_deploy.sandbox import SandboxLimits, can_drop_privileges, run_python

FAST = SandboxLimits(wall_seconds=3, cpu_seconds=3)
needs_isolation = pytest.mark.skipif(not can_drop_privileges(),
                                     reason="uid drop and network namespace need root on Linux")


def nobody_processes() -> list[str]:
    out = subprocess.run(["ps", "-u", "nobody", "-o", "pid="], capture_output=True, text=True).stdout
    return out.split()


def test_a_good_program_passes_and_a_failing_one_fails():
    assert run_python("assert sum([1, 2]) == 3\nprint('ok')", FAST).passed
    result = run_python("assert 1 == 2", FAST)
    assert (result.passed, result.status) == (False, "failed") and "AssertionError" in result.output


HOSTILE = {
    "infinite loop": "while True:\n    pass\n",
    "10 GB allocation": "x = bytearray(10 * 2**30)\n",
    "print forever": "while True:\n    print('x' * 10000)\n",
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
}


@pytest.mark.parametrize("source", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_samples_fail_within_the_limits(source):
    start = time.monotonic()
    result = run_python(source, FAST)
    assert not result.passed and result.status in ("failed", "timeout", "killed"), result
    assert time.monotonic() - start < FAST.wall_seconds + 5
    assert len(result.output) <= 2000


@needs_isolation
def test_fork_bomb_leaves_no_process_behind():
    run_python(HOSTILE["fork bomb"], FAST)
    deadline = time.monotonic() + 5
    while nobody_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert nobody_processes() == []


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("TASA_TEST_SECRET", "hunter2")
    assert not run_python("import os\nassert 'TASA_TEST_SECRET' in os.environ", FAST).passed
    assert run_python("import os\nassert 'TASA_TEST_SECRET' not in os.environ", FAST).passed


def test_runs_in_a_fresh_directory_that_is_removed():
    result = run_python("import os\nprint(os.getcwd())\nprint(sorted(os.listdir('.')))", FAST)
    cwd = result.output.splitlines()[0]
    assert result.passed and "tasa-sandbox-" in cwd and not os.path.exists(cwd)


@needs_isolation
def test_cannot_write_outside_its_directory(tmp_path):
    target = tmp_path / "escaped.txt"
    result = run_python(f"open({str(target)!r}, 'w').write('x')", FAST)
    assert not result.passed and not target.exists()


@needs_isolation
def test_cannot_read_the_parents_environment_or_signal_it(monkeypatch):
    monkeypatch.setenv("TASA_TEST_SECRET", "hunter2")
    leak = run_python("import os\nprint(open(f'/proc/{os.getppid()}/environ').read())", FAST)
    assert not leak.passed and "hunter2" not in leak.output
    kill = run_python(f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)", FAST)
    assert not kill.passed and "PermissionError" in kill.output  # and this test process is still alive


@needs_isolation
def test_no_network():
    result = run_python("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=2)", FAST)
    assert not result.passed and "no-network" in result.isolation


def test_humaneval_canonical_solutions_all_pass(calibration_data):
    from tasa_deploy.data import load_rows

    rows = load_rows("humaneval", "eval")
    assert len(rows) == 164
    # as a chat model answers: the whole function in a fence, and as a bare body continuation
    fenced = [program(r, f"Here:\n```python\n{r['prompt']}{r['answer']}```\nDone.") for r in rows]
    result = score_programs("humaneval", fenced, SandboxLimits(wall_seconds=10, cpu_seconds=10))
    assert (result.passed, result.n, result.pass_at_1_se) == (164, 164, 0.0), result.statuses
    bodies = score_programs("humaneval", [program(r, r["answer"]) for r in rows[:20]])
    assert bodies.passed == 20


def test_wrong_or_empty_answers_fail(calibration_data):
    from tasa_deploy.data import load_rows

    rows = load_rows("humaneval", "eval", 10) + load_rows("mbpp", "probe", 10)
    wrong = [program(r, "```python\ndef nothing():\n    return None\n```") if "entry_point" not in r
             else program(r, "    return None\n") for r in rows]
    result = score_programs("mix", wrong, FAST)
    assert result.passed <= 1 and result.n == 20  # at most one check might accept a None result
    mbpp_reference = score_programs("mbpp", [program(r, r["answer"]) for r in load_rows("mbpp", "probe", 30)])
    assert mbpp_reference.passed >= 29, mbpp_reference.statuses


def test_extract_code_takes_the_first_fence():
    assert extract_code("text\n```python\na = 1\n```\nmore\n```python\nb = 2\n```") == "a = 1\n"
    assert extract_code("```\nx = 3\n") == "x = 3\n"  # cut at the stop string: no closing fence
    assert extract_code("return 1") == "return 1\n"
