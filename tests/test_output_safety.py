"""Nothing lost, nothing run (issue #13): every command's output policy, input/output overlap, preconditions
checked before the model loads, and remote code never executed.

Each CLI case runs in a fresh copy of a small world (a real tiny quantized artifact, a real SmolLM2 profile,
a user's directory and files, hidden `.*.tmp` entries that a glob would match). The harness compares a listing
with checksums of the whole world before and after: an error case must change nothing, a success case only its
output; every error is one line, exit 2 for usage and input errors."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tasa_deploy.cli import app

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "benchmarks" / "results" / "tasa_smollm2" / "profile.json"
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def template(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("world")
    art = root / "art"
    done = invoke("quantize", "--model", tiny_model_dir, "--method", "uniform", "--bits", "4", "--quantizer", "rtn",
                  "--calib-samples", "2", "--seq-len", "32", "--out", art)
    assert done.exit_code == 0, done.output
    assert invoke("export", art, "--format", "vllm", "--out", root / "ours_vllm").exit_code == 0
    shutil.copytree(root / "ours_vllm", root / "ours_vllm_plus")
    (root / "ours_vllm_plus" / "my_notes.txt").write_text("the user's own file")
    shutil.copy(PROFILE, root / "profile.json")
    assert invoke("plan", "--profile", root / "profile.json", "--out", root / "ours_plan.json",
                  "--plot", root / "ours_plot.png").exit_code == 0
    (root / "userdir" / "sub").mkdir(parents=True)
    (root / "userdir" / "a.txt").write_text("keep me")
    (root / "userdir" / "sub" / "b.txt").write_text("keep me too")
    (root / "user.json").write_text(json.dumps({"my": "data"}))
    (root / ".a.b.tmp").write_text("hidden file a glob '.*.*.tmp' would match")
    (root / ".x.y.tmp").mkdir()
    (root / ".x.y.tmp" / "inside").write_text("hidden dir")
    (root / "nested.json").write_text("[" * 100_000 + "]" * 100_000)
    (root / "latin1.json").write_bytes(b'{"schema": "tasa-profile/1", "x": "\xe9"}')
    (root / "link.json").symlink_to(root / "user.json")
    plan = json.loads((art / "tasa_plan.json").read_text())
    plan["modules"] = dict(list(plan["modules"].items())[:7])
    (root / "partial_plan.json").write_text(json.dumps(plan))
    return {"root": root, "tiny": tiny_model_dir}


@pytest.fixture
def world(template, tmp_path):
    root = tmp_path / "w"
    shutil.copytree(template["root"], root, symlinks=True)
    return {"root": root, "tiny": template["tiny"]}


def snapshot(root: Path) -> dict[str, str]:
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            found[rel] = "dir"
        else:
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


P = "plan --profile {root}/profile.json"
Q = "quantize --model {tiny} --method uniform --bits 4 --quantizer rtn --calib-samples 2 --seq-len 32"
CASES = [  # id, argv, env, exit code, regex the error line must match (None: success), outputs that may change
    ("plan out is a dir", f"{P} --out {{root}}/userdir", {}, 2, "already exists", ()),
    ("plan out is a dir, force", f"{P} --out {{root}}/userdir --force", {}, 2, "is a directory", ()),
    ("plan out is its input", f"{P} --out {{root}}/profile.json --force", {}, 2, "also an input", ()),
    ("plan plot is a dir", f"{P} --out {{root}}/new.json --plot {{root}}/userdir --force", {}, 2, "directory", ()),
    ("plan plot is its input", f"{P} --out {{root}}/new.json --plot {{root}}/profile.json --force", {}, 2,
     "also an input", ()),
    ("plan replaces a user file", f"{P} --out {{root}}/user.json --force", {}, 2, "not written by tasa-deploy", ()),
    ("plan writes through a link", f"{P} --out {{root}}/link.json --force", {}, 2, "symbolic link", ()),
    ("plan replaces its own", f"{P} --out {{root}}/ours_plan.json --plot {{root}}/ours_plot.png --force", {}, 0,
     None, ("ours_plan.json", "ours_plot.png")),
    ("glob characters in the name", f"{P} --out {{root}}/*", {}, 0, None, ("*",)),
    ("parent is a file", f"{P} --out {{root}}/user.json/sub/p.json", {}, 2, "not a directory", ()),
    ("eval out is a dir", "eval --model {tiny} --out {root}/userdir --force", {}, 2, "is a directory", ()),
    ("export onto its input", "export {root}/art --format vllm --out {root}/art --force", {}, 2, "also an input", ()),
    ("export gguf onto a dir", "export {root}/art --format gguf --out {root}/ours_vllm --force", {}, 2,
     "is a directory", ()),
    ("export over user files", "export {root}/art --format vllm --out {root}/ours_vllm_plus --force", {}, 2,
     "did not write", ()),
    ("export over an unrelated dir", "export {root}/art --format vllm --out {root}/userdir --force", {}, 2,
     "did not write", ()),
    ("export replaces its own", "export {root}/art --format vllm --out {root}/ours_vllm --force", {}, 0, None,
     ("ours_vllm",)),
    ("quantize over an unrelated dir", f"{Q} --out {{root}}/userdir --force", {}, 2, "did not write", ()),
    ("quantize over its own input", "quantize --model {root}/art --plan {root}/ours_plan.json --out {root}/art "
     "--force", {}, 2, "also an input", ()),
    ("plan covering 7 of 28 modules", "quantize --model {tiny} --plan {root}/partial_plan.json --out {root}/q", {}, 2,
     "does not match this model", ()),
    ("infeasible budget before any work", "quantize --model {tiny} --bits 1.5 --out {root}/q", {}, 2,
     "narrowest candidate", ()),
    ("seed overflows", f"{Q} --seed 99999999999999999999999 --out {{root}}/q", {}, 2, "--seed must be in", ()),
    ("bits nan", "quantize --model {tiny} --bits nan --out {root}/q", {}, 2, "finite", ()),
    ("one probe row", f"{Q} --probe-samples 1 --out {{root}}/q", {}, 2, "a standard error needs two rows", ()),
    ("probe snr not positive", f"{Q} --probe-snr 0 --out {{root}}/q", {}, 2, "--probe-snr must be", ()),
    ("probe cap below start", f"{Q} --probe-samples 32 --max-probe-samples 8 --out {{root}}/q", {}, 2,
     "--max-probe-samples", ()),
    ("unknown objective loss", f"{Q} --objective-loss mse --out {{root}}/q", {}, 2, "--objective-loss must be", ()),
    ("alphas nan", "mix --model {tiny} --alphas nan,0.5 --out {root}/m.json", {}, 2, r"\[0, 1\]", ()),
    ("data dir missing", f"{Q} --out {{root}}/q", {"TASA_DATA_DIR": "{root}/nodata"}, 2, "TASA_DATA_DIR", ()),
    ("cache not writable", "quantize --model smollm2-135m --out {root}/q", {"TASA_CACHE": "{root}/user.json/c"}, 2,
     "not writable", ()),
    ("memory limit not a number", f"{Q} --out {{root}}/q", {"TASA_MEMORY_LIMIT_GB": "abc"}, 2,
     "TASA_MEMORY_LIMIT_GB='abc'", ()),
    ("deeply nested json", "plan --profile {root}/nested.json --out {root}/p.json", {}, 2, "nest|deep", ()),
    ("non-utf8 json", "plan --profile {root}/latin1.json --out {root}/p.json", {}, 2, "UTF-8|utf-8", ()),
]


@pytest.mark.parametrize("name, argv, env, code, error, outputs", CASES, ids=[c[0] for c in CASES])
def test_cli_case(world, name, argv, env, code, error, outputs):
    root = world["root"]
    before = snapshot(root)
    args = [a.format(**world) for a in argv.split()]
    result = invoke(*args, env={k: v.format(**world) for k, v in env.items()})
    assert result.exit_code == code, result.output
    after = snapshot(root)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    allowed = {k for k in changed if any(k == o or k.startswith(o + "/") for o in outputs)}
    assert changed == allowed, f"changed outside the output: {sorted(changed - allowed)[:5]}"
    assert not [k for k in after if ".tasa-" in k and k.endswith(".tmp")], "a temp file was left behind"
    assert "Traceback" not in result.output
    if error is not None:
        lines = [line for line in result.output.strip().splitlines() if line.strip()]
        assert lines[-1].startswith("error:") and re.search(error, lines[-1]), result.output
    for out in outputs:
        assert (root / out).exists()


def test_full_disk_is_found_before_the_work(tmp_path):
    from tasa_deploy import UsageError
    from tasa_deploy.outputs import check_output

    free = shutil.disk_usage(tmp_path).free
    check_output(tmp_path / "ok.gguf", need_bytes=1)
    with pytest.raises(UsageError, match="MiB is free"):
        check_output(tmp_path / "big.gguf", need_bytes=free * 2)


def test_interrupted_export_does_not_promise_a_resume(world, monkeypatch):
    import tasa_deploy.exporters.vllm as vllm_export

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(vllm_export, "export_vllm", interrupted)
    result = invoke("export", world["root"] / "art", "--format", "vllm", "--out", world["root"] / "v")
    assert result.exit_code == 130 and "nothing was written" in result.output and "resume" not in result.output


def test_stale_temps_are_removed_only_when_ours_and_orphaned(tmp_path):
    from tasa_deploy.outputs import write_json_atomic

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    orphan = tmp_path / f".out.json.tasa-{dead}-abc.tmp"
    live = tmp_path / f".out.json.tasa-{os.getpid()}-abc.tmp"
    lookalike = tmp_path / ".out.json.other.tmp"
    for path in (orphan, live, lookalike):
        path.write_text("x")
    write_json_atomic(tmp_path / "out.json", {"schema": "tasa-test/1"})
    assert not orphan.exists() and live.exists() and lookalike.exists()


REMOTE_CODE = '''
from pathlib import Path
Path(__file__).with_name("REMOTE_CODE_RAN").write_text("ran")
from transformers import PretrainedConfig
class EvilConfig(PretrainedConfig):
    model_type = "evil"
'''


def test_remote_code_never_runs_even_when_answered_yes_on_a_terminal(tmp_path):
    """transformers asks on a terminal whether to trust a directory's code; we never let it ask."""
    pty = pytest.importorskip("pty")
    model = tmp_path / "evil"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "evil", "architectures": ["EvilForCausalLM"],
                                                   "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    (model / "configuration_evil.py").write_text(REMOTE_CODE)
    leader, follower = pty.openpty()
    os.write(leader, b"y\ny\ny\n")
    proc = subprocess.run([sys.executable, "-m", "tasa_deploy.cli", "quantize", "--model", str(model), "--method",
                           "uniform", "--bits", "4", "--out", str(tmp_path / "q")], stdin=follower,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    os.close(follower)
    os.close(leader)
    assert not (model / "REMOTE_CODE_RAN").exists()
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error:"), proc.stderr
    assert not (tmp_path / "q").exists()
