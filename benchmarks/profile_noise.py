"""How much of a TASA profile is signal: per-objective signal-to-noise at several probe sizes, NLL vs KL task
objectives, and Kendall tau between objectives with bootstrap intervals
-> benchmarks/results/profile_noise/<model>/{profile.json,noise.json,noise.md}.

One profile is measured at the largest probe size (`tasa_deploy.profile.measure_profile`, cached and resumable
under $TASA_CACHE/profiles). Smaller probe sizes are read off its per-row deltas: the first n probe rows of
each objective are a probe set of n rows (rows are a seeded sample), so SNR(n) is measured, not extrapolated.
SNR = median over blocks of |block delta| / SE (`tasa_deploy.stats`); an objective is usable at n rows when
SNR >= 3 (its typical block is three standard errors from zero).

Usage: python benchmarks/profile_noise.py [--model smollm2-135m] [--objectives ppl,math,arc,kl:math,kl:arc]
       [--probe-samples 48] [--sizes 8,16,32,48] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import machine, run_main, write_report  # noqa: E402
from tasa_deploy import UsageError  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "profile_noise"
TARGET_SNR = 3.0


def subset_reliability(profile, objective: str, n_rows: int) -> dict:
    """SNR, mean SE and negative blocks of `objective` from its first n_rows probe rows only."""
    from tasa_deploy.stats import ratio_mean_se, reliability

    weights = profile.row_weights[objective][:n_rows]
    pairs = [ratio_mean_se(layer[:n_rows], weights) for layer in profile.row_deltas[objective]]
    deltas, ses = [d for d, _ in pairs], [s for _, s in pairs]
    return {"objective": objective, "rows": n_rows, "mean_delta": sum(deltas) / len(deltas), **reliability(deltas, ses)}


def rows_for_target(table: list[dict], objective: str) -> int | None:
    """The smallest measured probe size whose SNR reaches TARGET_SNR (None: none of them)."""
    sizes = [r["rows"] for r in table if r["objective"] == objective and r["snr"] >= TARGET_SNR]
    return min(sizes) if sizes else None


def write_reports(report: dict, out_dir: Path) -> None:
    lines = ["| objective | rows | SNR (median abs delta / SE) | mean delta | mean SE | negative blocks |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['objective']} | {r['rows']} | {r['snr']:.2f} | {r['mean_delta']:.4g} | {r['mean_se']:.3g} | "
              f"{r['negative_blocks']}/{r['blocks']} |" for r in report["snr"]]
    lines += ["", "| pair | Kendall tau-b | 95% bootstrap interval |", "|---|---|---|"]
    lines += [f"| {r['pair']} | {r['tau']:.3f} | [{r['ci95_low']:.3f}, {r['ci95_high']:.3f}] |" for r in report["tau"]]
    lines += ["", f"Probe rows needed for SNR >= {TARGET_SNR:g}: "
              + ", ".join(f"{k}: {v if v is not None else 'more than measured'}" for k, v in report["rows_needed"].items()),
              "", f"{report['model']}, {report['date']}, profile wall time {report['profile_seconds']} s on "
              f"{report['machine']['cpus']} CPUs ({report['machine']['threads']} torch threads). "
              + __doc__.split("\n\n")[1].replace("\n", " ")]
    write_report(out_dir, "noise", report, lines)


def main(argv: list[str] | None = None) -> dict:
    from tasa_deploy.model import load_model
    from tasa_deploy.plan import tau_table
    from tasa_deploy.profile import measure_profile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--objectives", default="ppl,math,arc,kl:math,kl:arc")
    parser.add_argument("--probe-samples", type=int, default=48)
    parser.add_argument("--sizes", default="8,16,32,48", help="probe sizes to report (<= --probe-samples)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    objectives = tuple(o.strip() for o in args.objectives.split(",") if o.strip())
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    if not sizes or sizes[0] < 2 or sizes[-1] > args.probe_samples:
        raise UsageError(f"--sizes must lie in 2..--probe-samples ({args.probe_samples}), got {args.sizes}")
    out_dir = args.out_dir or RESULTS / Path(args.model).name
    loaded = load_model(args.model)
    start = time.perf_counter()
    profile = measure_profile(loaded.model, loaded.tokenizer, objectives=objectives, n_probe=args.probe_samples,
                              seq_len=args.seq_len)
    seconds = round(time.perf_counter() - start, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    profile.save(out_dir / "profile.json", force=True)
    table = [subset_reliability(profile, o, min(n, len(profile.row_weights[o]))) for o in objectives for n in sizes]
    report = {"schema": "tasa-bench-profile-noise/1", "model": args.model, "date": datetime.date.today().isoformat(),
              "machine": machine(), "profile_seconds": seconds, "objectives": list(objectives),
              "probe_samples": args.probe_samples, "seq_len": args.seq_len, "target_snr": TARGET_SNR,
              "snr": table, "tau": tau_table(profile),
              "rows_needed": {o: rows_for_target(table, o) for o in objectives}}
    write_reports(report, out_dir)
    return report


if __name__ == "__main__":
    run_main(main)
