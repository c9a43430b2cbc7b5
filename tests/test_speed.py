"""Speed-aware GGUF plans (tasa_deploy.speed): the cost model's arithmetic, and a TASA plan on the tiny Llama
whose predicted decode time is held under llama.cpp's preset of the same size, measured by llama-bench."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from tasa_deploy.artifacts import BitPlan
from tasa_deploy.cli import app
from tasa_deploy.speed import ANCHOR, TypeCosts, reference_preset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_costs_predict_from_measured_differences():
    """A file of type T decodes in 1/tok_s_T; the model stores (1/tok_s_T - 1/tok_s_q8) / w_T per weight, so it
    reproduces each measured single-type file exactly and adds mixed layouts linearly."""
    w = {"q4_0": 600, "q4_k": 200}  # weights that fit each type (the rest of each file is q8_0)
    tok_s = {ANCHOR: 100.0, "q4_0": 125.0, "q4_k": 110.0}
    deltas = {t: 0.0 if t == ANCHOR else (1 / r - 1 / tok_s[ANCHOR]) / w[t] for t, r in tok_s.items()}
    costs = TypeCosts(deltas, 1 / tok_s[ANCHOR], tok_s, {})
    total = 1000
    for type_name in w:
        layout = {type_name: w[type_name], ANCHOR: total - w[type_name]}
        assert costs.predict(layout) == pytest.approx(1 / tok_s[type_name])
    mixed = costs.predict({"q4_0": 400, "q4_k": 200, ANCHOR: 400})
    assert mixed == pytest.approx(1 / 100 + 400 * deltas["q4_0"] + 200 * deltas["q4_k"])


def test_reference_preset_by_size():
    assert reference_preset(4.6) == "q4_k_s" and reference_preset(3.9) == "q3_k_m" and reference_preset(9) == "q8_0"


def test_speed_aware_gguf_plan_is_held_under_the_reference(tiny_model_dir, tmp_path):
    from tasa_deploy.exporters.llamacpp import find_llamacpp_bin

    if find_llamacpp_bin(("llama-bench", "llama-quantize"), build=False) is None:
        pytest.skip("llama.cpp tools not built (bash benchmarks/llamacpp.sh)")
    args = ["quantize", "--model", str(tiny_model_dir), "--target", "gguf", "--bits", "5.0", "--calib-samples", "2",
            "--seq-len", "32", "--probe-samples", "2", "--mix-samples", "2"]
    # 1.05, not 1.0: this tiny model decodes at ~3,400 tok/s, where q8_0 can be the fastest type and Q4_K_M within
    # 1% of it (an AVX-512 VM), so no 5-bit plan can match the preset exactly and the plan says met = False.
    result = CliRunner().invoke(app, [*args, "--max-slowdown", "1.05", "--out", str(tmp_path / "fast")])
    assert result.exit_code == 0, result.output
    speed = BitPlan.load(tmp_path / "fast" / "tasa_plan.json").info["speed"]
    assert speed["reference"] == "q4_k_m" and speed["max_slowdown"] == 1.05
    assert speed["predicted_delta_s"] <= speed["max_delta_s"] + 1e-12 and speed["met"]
    assert speed["reference_tok_s"] > 0 and ANCHOR in speed["type_tok_s"]
    blind = CliRunner().invoke(app, [*args, "--max-slowdown", "0", "--out", str(tmp_path / "blind"),
                                     "--work-dir", str(tmp_path / "fast.work")])
    assert blind.exit_code == 0, blind.output
    assert "speed" not in BitPlan.load(tmp_path / "blind" / "tasa_plan.json").info


def test_speed_options_are_checked_up_front(tmp_path):
    from tasa_deploy import UsageError
    from tasa_deploy.pipeline import QuantizeRequest

    with pytest.raises(UsageError, match="--speed-reference"):
        QuantizeRequest(out=tmp_path / "x", target="gguf", speed_reference="q9_z")
    with pytest.raises(UsageError, match="--max-slowdown"):
        QuantizeRequest(out=tmp_path / "x", target="gguf", max_slowdown=-1.0)
