"""`quantize --dry-run` against what the run then does -> benchmarks/results/forecast_<model>.{json,md}.

For each configuration: the forecast (`tasa_deploy.forecast`, from the config and tokenizer only), then the real
run in this process (`run_quantize`, fresh output) with RSS sampled every 50 ms, then the export of the run's
--target format. Recorded per stage: predicted vs measured peak RSS (the stage's window from the pipeline's
own `stage_spans`); and predicted vs measured file bytes. The goal (#18): within 10% on SmolLM2.

Configurations (one process, run in this order; the second reuses the first's mix and profile, as a user
re-planning for another budget does):
  tasa-3.5        default TASA run (--bits 3.5, target vllm) -> vLLM export
  tasa-size       the same profile planned for a whole-file --size (default 100MB) -> vLLM export
  uniform4-gguf   --method uniform --bits 4 --target gguf -> GGUF export (our writer)

Usage: python benchmarks/forecast_check.py [--model smollm2-135m] [--size 100MB] [--quick]
Run alone on an idle machine (peak memory and times are what it measures).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import machine, run_main, write_report  # noqa: E402
from pipeline_cost import RssSampler  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 1024**3


def measure(request, export_format: str, tmp: Path) -> dict:
    """Forecast, run, export; the row of predicted vs measured figures."""
    from tasa_deploy.api import export
    from tasa_deploy.forecast import forecast
    from tasa_deploy.pipeline import run_quantize

    predicted = forecast(request)
    with RssSampler() as sampler:
        _, summary = run_quantize(request, log=lambda m: None)
    stages = {}
    for name, estimate in predicted.stages.items():
        span = summary["stage_spans"].get("quantize" if name == "gptq" else name)
        if span:
            stages[name] = {"predicted_gib": round((predicted.weights + 1 * GIB + estimate.total) / GIB, 3),
                            "measured_gib": round(sampler.peak_between(*span) / GIB, 3)}
    out = tmp / f"export-{request.out.name}{'.gguf' if export_format == 'gguf' else ''}"
    export(request.out, out, format=export_format, re_round=True)
    file = out if export_format == "gguf" else out / "model.safetensors"
    peak = max(rss for _, rss in sampler.samples)
    return {"stages": stages, "predicted_peak_gib": round(predicted.peak_host / GIB, 3),
            "measured_peak_gib": round(peak / GIB, 3), "peak_ratio": round(predicted.peak_host / peak, 3),
            "predicted_file_bytes": predicted.file_bytes, "measured_file_bytes": file.stat().st_size,
            "file_ratio": round(predicted.file_bytes / file.stat().st_size, 4),
            "linear_bpw_predicted": round(predicted.linear_bpw, 4), "exact": predicted.exact,
            "seconds": summary["stage_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--size", default="100MB")
    parser.add_argument("--quick", action="store_true", help="tiny calibration (checks the script in minutes)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    from tasa_deploy.pipeline import QuantizeRequest

    small = dict(calib_samples=2, seq_len=64, probe_samples=2, probe_seq_len=64, mix_samples=2) if args.quick else {}
    rows = {}
    with tempfile.TemporaryDirectory(prefix="tasa-forecast-") as tmp:
        tmp = Path(tmp)
        work = tmp / "tasa.work"
        configs = {"tasa-3.5": (QuantizeRequest(model=args.model, out=tmp / "tasa", work_dir=work, **small), "vllm"),
                   "tasa-size": (QuantizeRequest(model=args.model, out=tmp / "size", size=args.size, work_dir=work,
                                                 **small), "vllm"),
                   "uniform4-gguf": (QuantizeRequest(model=args.model, out=tmp / "u4", method="uniform", bits=4,
                                                     target="gguf", **small), "gguf")}
        for name, (request, fmt) in configs.items():
            print(f"[forecast] {name} ...", file=sys.stderr, flush=True)
            rows[name] = {"format": fmt, **measure(request, fmt, tmp)}
    report = {"date": datetime.date.today().isoformat(), "machine": machine(), "model": args.model,
              "size": args.size, "quick": args.quick, "rows": rows}
    lines = ["| run | stage | predicted GiB | measured GiB | ratio |", "|---|---|---|---|---|"]
    for name, row in rows.items():
        for stage, fig in row["stages"].items():
            lines.append(f"| {name} | {stage} | {fig['predicted_gib']} | {fig['measured_gib']} | "
                         f"{fig['predicted_gib'] / fig['measured_gib']:.3f} |")
        lines.append(f"| {name} | whole run (peak) | {row['predicted_peak_gib']} | {row['measured_peak_gib']} | "
                     f"{row['peak_ratio']} |")
    lines += ["", "| run | format | linear bpw (predicted) | predicted bytes | measured bytes | ratio |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {row['format']} | {row['linear_bpw_predicted']}{' (exact)' if row['exact'] else ''} | "
              f"{row['predicted_file_bytes']:,} | {row['measured_file_bytes']:,} | {row['file_ratio']} |"
              for name, row in rows.items()]
    lines += ["", f"{args.model}, --size {args.size}{', quick settings' if args.quick else ''}; "
              f"{report['machine']['cpus']} CPUs; {report['date']}. "
              "Command: python benchmarks/forecast_check.py" + (" --quick" if args.quick else "")]
    write_report(args.out, f"forecast_{args.model}" + ("_quick" if args.quick else ""), report, lines)


if __name__ == "__main__":
    run_main(main)
