"""benchmarks/unit_costs.py's summary: Spearman and per-kind proxy/measured ratios on rows whose answer is known,
and --reuse-measured refusing a report of other settings or other probe rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tasa_deploy import UsageError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import unit_costs  # noqa: E402


def _row(unit: str, candidate: str, measured: float, proxy: float, se: float = 1e-6) -> dict:
    return {"unit": unit, "layer": int(unit.split(".")[2]), "candidate": candidate, "objective": "kl:ppl",
            "measured": measured, "measured_se": se, "proxy": proxy}


def test_summary_reports_each_kinds_ratio_and_their_spread():
    rows = []
    for layer, scale in ((0, 1.0), (1, 2.0), (2, 3.0)):
        for kind, ratio in (("qkv", 1.0), ("o", 0.05), ("gate_up", 2.0), ("down", 0.05)):
            for candidate, size in (("int3g64", 1.0), ("int4g64", 0.25)):
                measured = scale * size * (1 + 0.1 * len(kind))
                rows.append(_row(f"model.layers.{layer}.{kind}", candidate, measured, ratio * measured))
    rows.append(_row("model.layers.0.o", "int8g64", 1e-7, 1.0, se=1e-6))  # inside its noise: not in the ratios
    (summary,) = unit_costs.summarize(rows, ("kl:ppl",))
    assert summary["pairs"] == 25 and summary["pairs_measured_2se"] == 24
    assert summary["ratio_qkv"] == pytest.approx(1.0) and summary["ratio_o"] == pytest.approx(0.05)
    assert summary["ratio_gate_up"] == pytest.approx(2.0) and summary["ratio_down"] == pytest.approx(0.05)
    assert summary["kind_ratio_spread"] == pytest.approx(40.0)
    assert summary["spearman_3bit"] < 1.0  # the mispriced kinds scramble the order within a width


def test_reuse_refuses_other_settings_and_other_probe_rows(tmp_path):
    settings = {"model": "m", "objectives": ["kl:ppl"], "probe_samples": 16, "seq_len": 128, "blocks": [0]}
    pairs = [_row("model.layers.0.o", "int3g64", 0.5, 0.1)]
    (tmp_path / "unit_costs.json").write_text(json.dumps({**settings, "seconds": 9.0, "pairs": pairs}))
    (tmp_path / "profile.json").write_text(json.dumps({"settings": {"probe_data": {"kl:ppl": {"sha256": "aa"}}}}))
    unit = SimpleNamespace(name="model.layers.0.o", errors={"int3g64": {"kl:ppl": 0.4}})
    profile = SimpleNamespace(units=[unit])
    rows, seconds = unit_costs.reused_measurements(tmp_path / "unit_costs.json", settings,
                                                   {"kl:ppl": {"sha256": "aa"}}, profile)
    assert rows == [{**pairs[0], "proxy": 0.4}] and seconds == 9.0
    with pytest.raises(UsageError, match="blocks"):
        unit_costs.reused_measurements(tmp_path / "unit_costs.json", {**settings, "blocks": [1]},
                                       {"kl:ppl": {"sha256": "aa"}}, profile)
    with pytest.raises(UsageError, match="other probe rows"):
        unit_costs.reused_measurements(tmp_path / "unit_costs.json", settings, {"kl:ppl": {"sha256": "bb"}}, profile)
