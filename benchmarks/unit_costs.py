"""Does the profile's unit-cost proxy rank allocation units the way measurement does?
-> benchmarks/results/unit_costs/<model>/unit_costs.{json,md}

The profile measures one number per (block, objective): the loss change with the WHOLE block RTN-quantized at
the probe width. Every (unit, candidate width) cost the allocator sees is derived from it: split over the block's
units by their block-output error, extrapolated to other widths by tr(dW H dW^T) (`tasa_deploy.units`). Here, for a sample of blocks, every unit
(fused group: qkv, o, gate_up, down) is RTN-quantized ALONE at every candidate width and the objective change
is measured with the same probe rows, the same cached block inputs and the same tail forwards as the profile
(paired per-row deltas with standard errors). Reported per objective: Spearman's rho between proxy and
measured cost over all sampled (unit, width) pairs and within each width, and the median ratio proxy/measured
over pairs measured at least 2 SE from zero, overall and per unit kind (qkv, o, gate_up, down), with the spread
max/min of the per-kind medians (1 = every kind priced on one scale).

The measured side depends only on the model, probe rows and blocks, not on the proxy: --reuse-measured
REPORT.json takes it from an earlier report of the same settings (checked, probe digests included) and judges
the current profile's proxy against it (the profile is re-measured; the single-unit tail forwards are not).

Usage: python benchmarks/unit_costs.py [--model smollm2-135m] [--objectives ppl,kl:math] [--probe-samples 16]
       [--blocks 0,6,12,18,24,29] [--reuse-measured benchmarks/results/unit_costs/<model>/unit_costs.json]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import machine, run_main, write_report  # noqa: E402
from tasa_deploy import UsageError  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "unit_costs"


@torch.no_grad()
def measure_units(model, profile, probes: dict, blocks: list[int]) -> list[dict]:
    """Measured objective change of each unit of each sampled block, alone, at every candidate width."""
    from tasa_deploy.capture import capture_block_inputs
    from tasa_deploy.model import block_linears, block_prefix, decoder_blocks
    from tasa_deploy.profile import _replace_weights, advance_block, tail_losses
    from tasa_deploy.quant.rtn import fake_quantize_rtn
    from tasa_deploy.quant.spec import QuantSpec
    from tasa_deploy.stats import paired_ratio_delta

    objectives = profile.objectives
    batches = [(name, i) for name in objectives for i in range(len(probes[name].batches))]
    hidden = capture_block_inputs(model, [probes[name].batches[i].tokens for name, i in batches])
    baseline, references = tail_losses(model, 0, hidden, batches, probes)
    proxy = {u.name: u for u in profile.units}
    rows = []
    for layer, block in enumerate(decoder_blocks(model)):
        if layer > max(blocks):
            break
        if layer in blocks:
            linears = block_linears(block)
            for unit in (u for u in profile.units if u.layer == layer):
                names = [m.removeprefix(block_prefix(model, layer) + ".") for m in unit.modules]
                for key in unit.errors:
                    fake = {n: fake_quantize_rtn(linears[n].weight.data, QuantSpec.from_key(key)) for n in names}
                    original = _replace_weights(block, fake)
                    try:
                        losses = tail_losses(model, layer, hidden, batches, probes, references)[0]
                    finally:
                        _replace_weights(block, original)
                    for obj in objectives:
                        delta, se = paired_ratio_delta(baseline[obj].num.tolist(), losses[obj].num.tolist(),
                                                       baseline[obj].den.tolist())
                        rows.append({"unit": unit.name, "layer": layer, "candidate": key, "objective": obj,
                                     "measured": delta, "measured_se": se, "proxy": proxy[unit.name].errors[key][obj]})
        hidden, _ = advance_block(block, hidden, batches, probes)
    return rows


def _kind(unit: str) -> str:
    return unit.rsplit(".", 1)[1]


def _median(values: list[float]) -> float | None:
    return sorted(values)[len(values) // 2] if values else None


def reused_measurements(path: Path, settings: dict, probe_data: dict, profile) -> tuple[list[dict], float]:
    """The measured pairs of an earlier report with the same settings and probe rows, priced by `profile`, and
    the seconds that measurement took."""
    from tasa_deploy.schema import read_json

    old = read_json(path, "unit-cost report")
    for key, value in settings.items():
        if old.get(key) != value:
            raise UsageError(f"{path} was measured with {key} = {old.get(key)!r}, not {value!r}")
    old_profile = path.parent / "profile.json"
    old_digests = {k: v["sha256"] for k, v in read_json(old_profile, "profile")["settings"]["probe_data"].items()}
    if old_digests != {k: v["sha256"] for k, v in probe_data.items()}:
        raise UsageError(f"{path} was measured on other probe rows than {old_profile} now describes")
    proxy = {u.name: u for u in profile.units}
    rows = [{**row, "proxy": proxy[row["unit"]].errors[row["candidate"]][row["objective"]]} for row in old["pairs"]]
    return rows, old["seconds"]


def summarize(rows: list[dict], objectives: tuple[str, ...]) -> list[dict]:
    from tasa_deploy.quant.spec import QuantSpec
    from tasa_deploy.stats import spearman_rho

    bits = {r["candidate"]: QuantSpec.from_key(r["candidate"]).bits for r in rows}
    out = []
    for obj in objectives:
        mine = [r for r in rows if r["objective"] == obj]
        within = {f"{b}bit": spearman_rho([r["proxy"] for r in mine if bits[r["candidate"]] == b],
                                          [r["measured"] for r in mine if bits[r["candidate"]] == b])
                  for b in sorted(set(bits.values()))}
        clear = [r for r in mine if r["measured"] > 2 * r["measured_se"] and r["proxy"] > 0]
        kinds = {k: _median([r["proxy"] / r["measured"] for r in clear if _kind(r["unit"]) == k])
                 for k in dict.fromkeys(_kind(r["unit"]) for r in mine)}
        medians = [v for v in kinds.values() if v is not None]
        out.append({"objective": obj, "pairs": len(mine),
                    "spearman_all": spearman_rho([r["proxy"] for r in mine], [r["measured"] for r in mine]),
                    **{f"spearman_{w}": v for w, v in within.items()},
                    "pairs_measured_2se": len(clear),
                    "median_ratio_proxy_measured": _median([r["proxy"] / r["measured"] for r in clear]),
                    **{f"ratio_{k}": v for k, v in kinds.items()},
                    "kind_ratio_spread": max(medians) / min(medians) if medians and min(medians) > 0 else None})
    return out


def write_reports(report: dict, out_dir: Path) -> None:
    columns = list(dict.fromkeys(k for row in report["summary"] for k in row))
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in report["summary"]]
    lines += ["", f"{report['model']}, {report['date']}, blocks {report['blocks']}, {report['probe_samples']} probe rows, "
              f"measured in {report['seconds']} s on {report['machine']['cpus']} CPUs. "
              + __doc__.split("\n\n")[1].replace("\n", " ")]
    write_report(out_dir, "unit_costs", report, lines)


def main(argv: list[str] | None = None) -> dict:
    from tasa_deploy.model import decoder_blocks, load_model
    from tasa_deploy.objectives import load_probe_set
    from tasa_deploy.profile import measure_profile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--objectives", default="ppl,kl:math")
    parser.add_argument("--probe-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--blocks", default="0,6,12,18,24,29")
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--reuse-measured", type=Path, default=None, metavar="REPORT.json")
    args = parser.parse_args(argv)
    objectives = tuple(o.strip() for o in args.objectives.split(",") if o.strip())
    loaded = load_model(args.model)
    n_blocks = len(decoder_blocks(loaded.model))
    blocks = sorted({int(b) for b in args.blocks.split(",")})
    if not blocks or blocks[0] < 0 or blocks[-1] >= n_blocks:
        raise UsageError(f"--blocks must lie in 0..{n_blocks - 1}, got {args.blocks}")
    probes = {name: load_probe_set(name, loaded.tokenizer, args.probe_samples, args.seq_len) for name in objectives}
    profile = measure_profile(loaded.model, loaded.tokenizer, objectives=objectives, n_probe=args.probe_samples,
                              seq_len=args.seq_len, probes=probes)
    out_dir = args.out_dir or RESULTS / Path(args.model).name
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"model": args.model, "objectives": list(objectives), "probe_samples": args.probe_samples,
                "seq_len": args.seq_len, "blocks": blocks}
    start = time.perf_counter()
    if args.reuse_measured:
        rows, seconds = reused_measurements(args.reuse_measured, settings, profile.settings["probe_data"], profile)
    else:
        rows = measure_units(loaded.model, profile, probes, blocks)
        seconds = round(time.perf_counter() - start, 1)
    profile.save(out_dir / "profile.json", force=True)  # the profile whose proxy is judged (with its SEs)
    report = {"schema": "tasa-bench-unit-costs/1", **settings, "date": datetime.date.today().isoformat(),
              "machine": machine(), "seconds": seconds, "unit_error_proxy": profile.settings["unit_error_proxy"],
              "measured_reused_from": str(args.reuse_measured) if args.reuse_measured else None,
              "summary": summarize(rows, objectives), "pairs": rows}
    write_reports(report, out_dir)
    return report


if __name__ == "__main__":
    run_main(main)
