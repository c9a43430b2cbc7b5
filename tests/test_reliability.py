"""Reliability (issue 8): every bad input is one clear line + exit code and writes nothing; outputs are
atomic; identical runs give identical bytes; no pickle; memory is checked up front."""

import hashlib
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tasa_deploy.artifacts import SensitivityProfile, UnitSensitivity
from tasa_deploy.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def synthetic_profile(fingerprint="f" * 64) -> SensitivityProfile:
    units = []
    for layer in range(2):
        for group, k in (("qkv", 64), ("o", 64), ("gate_up", 64), ("down", 128)):
            errors = {f"int{b}g{64 if k == 64 else 128}": {"ppl": (layer + 1) / b**2, "math": 1 / b**2} for b in (3, 4, 8)}
            units.append(UnitSensitivity(f"model.layers.{layer}.{group}", layer, (f"model.layers.{layer}.{group}",), 4096, k, errors))
    return SensitivityProfile(fingerprint, ("ppl", "math"), {"ppl": 3.0, "math": 1.0},
                              {"ppl": (0.2, 0.1), "math": (0.1, 0.3)}, tuple(units), {"target": "vllm"})


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dir):
    """Realistic broken inputs next to a good quantized artifact."""
    tmp_path = tmp_path_factory.mktemp("bad-inputs")
    good = tmp_path / "art"
    assert invoke("quantize", "--model", tiny_model_dir, "--method", "uniform", "--bits", "4", "--quantizer", "rtn",
                  "--calib-samples", "2", "--seq-len", "32", "--out", good).exit_code == 0
    profile = tmp_path / "profile.json"
    synthetic_profile().save(profile)
    truncated = tmp_path / "truncated.json"
    truncated.write_text(profile.read_text()[:200])
    wrong_schema = tmp_path / "wrong_schema.json"
    wrong_schema.write_text(json.dumps({**json.loads(profile.read_text()), "schema": "tasa-profile/0"}))
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    broken_art = tmp_path / "broken_art"
    subprocess.run(["cp", "-r", str(good), str(broken_art)], check=True)
    weights = broken_art / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    other_plan = tmp_path / "other_plan.json"
    plan = json.loads((good / "tasa_plan.json").read_text())
    other_plan.write_text(json.dumps({**plan, "model_fingerprint": "0" * 64}))
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 40)
    return {"good": good, "profile": profile, "truncated": truncated, "wrong_schema": wrong_schema,
            "no_config": no_config, "gpt2": gpt2, "broken_art": broken_art, "other_plan": other_plan,
            "bad_gguf": bad_gguf, "tiny": tiny_model_dir, "tmp": tmp_path}


CASES = [  # (name, argv with {placeholders}, exit code, words the one-line error must contain)
    ("missing model", "quantize --model {tmp}/nope --out {tmp}/o", 2, "model not found"),
    ("dir without config", "quantize --model {no_config} --out {tmp}/o", 2, "no config.json"),
    ("unsupported arch", "quantize --model {gpt2} --method uniform --bits 4 --out {tmp}/o", 2, "unsupported architecture"),
    ("bits above 8", "quantize --model {tiny} --method uniform --bits 9 --out {tmp}/o", 2, "2..8"),
    ("infeasible budget", "plan --profile {profile} --bits 2.0 --out {tmp}/o", 2, "cheapest"),
    ("group not dividing", "quantize --model {tiny} --method uniform --bits 4 --group-size 128 --out {tmp}/o", 2, "does not divide"),
    ("unknown task", "quantize --model {tiny} --tasks nosuch --out {tmp}/o", 2, "unknown task"),
    ("data dir missing", "eval --model {tiny} --data-dir {tmp}/nodata --out {tmp}/o", 2, "does not exist"),
    ("truncated profile", "plan --profile {truncated} --out {tmp}/o", 2, "not valid JSON"),
    ("wrong schema", "plan --profile {wrong_schema} --out {tmp}/o", 2, "schema"),
    ("plan for another model", "quantize --model {tiny} --plan {other_plan} --out {tmp}/o", 2, "another model"),
    ("truncated safetensors", "export {broken_art} --format vllm --out {tmp}/o", 2, "truncated"),
    ("truncated safetensors inspect", "inspect {broken_art}", 2, "truncated"),
    ("corrupt gguf", "inspect {bad_gguf}", 2, "GGUF"),
    ("output exists", "quantize --model {tiny} --method uniform --bits 4 --out {good}", 2, "--force"),
]


@pytest.mark.parametrize("name, argv, code, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(files, name, argv, code, words):
    before = sorted(p.name for p in files["tmp"].iterdir())
    result = invoke(*argv.format(**files).split())
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and words in " ".join(lines), result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in files["tmp"].iterdir()) == before  # nothing written, no temp left


def test_killed_writer_leaves_no_partial_file(tmp_path):
    """SIGKILL in the middle of an atomic write: the final path never appears; the next write cleans up."""
    target = tmp_path / "big.json"
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from tasa_deploy.artifacts import atomic_path
        with atomic_path(Path({str(target)!r})) as tmp:
            with open(tmp, "w") as f:
                f.write("partial" * 1000); f.flush()
                print("writing", flush=True)
                time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not target.exists()
    from tasa_deploy.artifacts import write_json_atomic

    write_json_atomic(target, {"ok": True})
    assert json.loads(target.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["big.json"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_identical_runs_are_byte_identical(tiny_model_dir, tmp_path):
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / run / "q3"
        args = ["quantize", "--model", tiny_model_dir, "--method", "uniform", "--bits", "3", "--calib-samples", "4",
                "--seq-len", "64", "--out", out]
        assert invoke(*args).exit_code == 0
        plan_out = tmp_path / run / "plan.json"
        assert invoke("plan", "--profile", _saved_profile(tmp_path / run), "--bits", "4.5", "--out", plan_out).exit_code == 0
        gguf_out = tmp_path / run / "model.gguf"
        assert invoke("export", out, "--format", "gguf", "--out", gguf_out).exit_code == 0
        outputs.append([_digest(out / "model.safetensors"), _digest(out / "tasa_plan.json"), _digest(plan_out),
                        _digest(gguf_out)])
    assert outputs[0] == outputs[1]


def _saved_profile(folder: Path) -> Path:
    path = folder / "profile.json"
    synthetic_profile().save(path)
    return path


def test_no_pickle_loading_anywhere():
    """Weights come from safetensors/GGUF only; any torch.load must pass weights_only=True."""
    offenders = []
    for path in [*REPO.glob("tasa_deploy/**/*.py"), *REPO.glob("exporters/*.py"), *REPO.glob("kernels/*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if ("torch.load(" in line and "weights_only=True" not in line) or "import pickle" in line:
                offenders.append(f"{path.name}:{number}")
    assert offenders == []


def test_memory_is_checked_up_front(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TASA_MEMORY_LIMIT_GB", "0.5")
    out = tmp_path / "o"
    result = invoke("quantize", "--model", tiny_model_dir, "--method", "uniform", "--bits", "4", "--out", out)
    assert result.exit_code == 1 and "needs about" in result.output and "GiB" in result.output
    assert not out.exists()


def test_killed_quantize_resumes_byte_identical(tmp_path, smollm2, calibration_data):
    """SIGKILL `tasa-deploy quantize` after its 2nd GPTQ block; the rerun says it resumed and its artifact is
    byte-identical to an uninterrupted run."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=8, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(smollm2.tokenizer), tie_word_embeddings=True)
    model_dir = tmp_path / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    smollm2.tokenizer.save_pretrained(model_dir)
    base = [sys.executable, "-m", "tasa_deploy.cli", "quantize", "--model", str(model_dir), "--method", "uniform",
            "--bits", "3", "--calib-samples", "16", "--seq-len", "128"]
    reference = tmp_path / "reference"
    subprocess.run([*base, "--out", str(reference)], check=True, capture_output=True)
    out = tmp_path / "resumed"
    proc = subprocess.Popen([*base, "--out", str(out)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:
        if "block 2/8" in line:
            proc.kill()
            break
    proc.wait()
    assert not out.exists()
    rerun = subprocess.run([*base, "--out", str(out)], capture_output=True, text=True, check=True)
    assert "resumed from checkpoint" in rerun.stderr
    assert _digest(out / "model.safetensors") == _digest(reference / "model.safetensors")
