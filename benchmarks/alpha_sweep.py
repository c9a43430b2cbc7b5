"""Does the mixture search pick the calibration mix that is best after quantization?
-> benchmarks/results/alpha_sweep/<model>/alpha_sweep.{json,md}

`tasa-deploy mix` scores each alpha (share of general data in the GPTQ calibration set) without quantizing:
gradient alignment, the Hessian-trace proxy and their combination (`tasa_deploy.mix`). Here the same plan
(uniform GPTQ at --bits, so only the calibration changes) is quantized once per alpha of the grid with the
alpha forced, and each result is measured against the unquantized model: mean KL divergence on the task's
answer tokens (eval rows, `eval.kld`; lower is better) and WikiText-2 perplexity (standard protocol). The
measured best alpha is the one with the lowest task KL; alphas within two standard errors of it tie with it.
The search's alpha* is "validated" when it is the best or ties with it.

Every artifact is cached under $TASA_CACHE/bench/alpha_sweep (a rerun resumes). `--mix DIR/mix.json` reuses the
scores of a mixture search `quantize` already ran, after checking it was made on this model with the same data
and settings (its alpha grid must cover the sweep's).
Usage: python benchmarks/alpha_sweep.py [--model smollm2-135m] [--tasks gsm8k,arc] [--bits 3] [--limit 200]
       [--mix WORK/mix.json]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import machine, run_main, write_report  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "alpha_sweep"
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def quantize_at(model: str, tasks: tuple[str, ...], bits: int, alpha: float, root: Path,
                calib: tuple[int, int]) -> tuple[Path, float]:
    from tasa_deploy.pipeline import QuantizeRequest, run_quantize

    out = root / f"uniform{bits}-alpha{alpha:g}-calib{calib[0]}x{calib[1]}"
    if (out / "quantized.json").is_file():
        return out, 0.0
    start = time.perf_counter()
    request = QuantizeRequest(model=model, out=out, bits=bits, method="uniform", tasks=tasks, alpha=alpha,
                              calib_samples=calib[0], seq_len=calib[1])
    run_quantize(request, log=lambda m: print(f"  {m}", file=sys.stderr))
    return out, round(time.perf_counter() - start, 1)


def measure(artifact: Path, base, tasks: tuple[str, ...], limit: int, windows: int) -> dict:
    """Task KL (pooled over the tasks' eval rows) and WikiText-2 perplexity of one artifact."""
    from tasa_deploy.data import wikitext2_test_text
    from tasa_deploy.eval import evaluate_kld
    from tasa_deploy.eval.perplexity import evaluate_perplexity
    from tasa_deploy.model import load_any
    from tasa_deploy.tasks import get_task

    loaded = load_any(str(artifact))
    evals = [e for t in tasks for e in get_task(t).evals]
    kl = evaluate_kld(loaded, base, evals, limit)
    per_task = {k.removeprefix("kld:"): v for k, v in kl.items() if k != "kld:wikitext2"}
    tokens = sum(v["tokens"] for v in per_task.values())
    task_kl = sum(v["kld"] * v["tokens"] for v in per_task.values()) / tokens
    task_se = sum((v["kld_se"] * v["tokens"]) ** 2 for v in per_task.values()) ** 0.5 / tokens
    ppl = evaluate_perplexity(loaded.model, loaded.tokenizer, wikitext2_test_text(), seq_len=512, max_windows=windows)
    return {"task_kl": task_kl, "task_kl_se": task_se, "per_task": per_task, "wikitext_kl": kl["kld:wikitext2"],
            "wikitext_ppl": ppl.ppl}


def reuse_mix(path: Path, base, request, draws: int):
    """A saved `mix.json` of this model, data and settings (else a UsageError naming what differs)."""
    from tasa_deploy import UsageError
    from tasa_deploy.artifacts import CalibrationMix
    from tasa_deploy.model import model_fingerprint

    mix = CalibrationMix.load(path)
    wanted = {"model_fingerprint": model_fingerprint(base.model), "general": request.general,
              "tasks": tuple(request.task_sources), "n_samples": request.mix_samples,
              "seq_len": request.probe_seq_len * 2, "seed": request.seed, "draws": draws,
              "alphas": tuple(ALPHAS)}
    found = {"model_fingerprint": mix.model_fingerprint, "general": mix.general, "tasks": mix.tasks,
             "n_samples": mix.settings.get("n_samples"), "seq_len": mix.settings.get("seq_len"),
             "seed": mix.settings.get("seed"), "draws": len((mix.settings.get("draws") or {}).get("per_draw") or [0]),
             "alphas": tuple(s.alpha for s in mix.scores)}
    differs = [k for k in wanted if wanted[k] != found[k]]
    if differs:
        raise UsageError(f"{path} does not match this sweep: "
                         + ", ".join(f"{k} {found[k]!r} != {wanted[k]!r}" for k in differs))
    return mix


def verdict(rows: list[dict], alpha_star: float) -> dict:
    best = min(rows, key=lambda r: r["task_kl"])
    ties = [r["alpha"] for r in rows
            if r["task_kl"] - best["task_kl"] <= 2 * (r["task_kl_se"] ** 2 + best["task_kl_se"] ** 2) ** 0.5]
    return {"alpha_star": alpha_star, "measured_best": best["alpha"], "tied_with_best": ties,
            "validated": alpha_star in ties}


def write_reports(report: dict, out_dir: Path) -> None:
    lines = ["| alpha | grad_alignment | hessian_trace | combined | task KL ± SE | WikiText-2 KL | WikiText-2 ppl |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['alpha']:g}{' (alpha*)' if r['alpha'] == report['verdict']['alpha_star'] else ''} | "
                     f"{r['grad_alignment']:.4f} | {r['hessian_trace']:.1f} | {r['combined']:+.3f} | "
                     f"{r['task_kl']:.4f} ± {r['task_kl_se']:.4f} | {r['wikitext_kl']['kld']:.4f} | "
                     f"{r['wikitext_ppl']:.2f} |")
    v = report["verdict"]
    lines += ["", f"alpha* = {v['alpha_star']:g}; measured best = {v['measured_best']:g}; tied with it (2 SE): "
              f"{', '.join(f'{a:g}' for a in v['tied_with_best'])}; validated: {v['validated']}.", "",
              f"{report['model']}, {report['date']}, uniform {report['bits']}-bit GPTQ, tasks {report['tasks']}, "
              f"{report['limit']} eval rows per task, {report['windows']} WikiText-2 windows, "
              f"{report['machine']['cpus']} CPUs. " + __doc__.split("\n\n")[1].replace("\n", " ")]
    write_report(out_dir, "alpha_sweep", report, lines)


def main(argv: list[str] | None = None) -> dict:
    from tasa_deploy.mix import search_mixture
    from tasa_deploy.model import cache_root, load_model
    from tasa_deploy.pipeline import QuantizeRequest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="gsm8k,arc")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--limit", type=int, default=200, help="eval rows per task for the KL")
    parser.add_argument("--windows", type=int, default=40, help="WikiText-2 windows of 512 tokens")
    parser.add_argument("--mix-draws", type=int, default=1, help="data draws of the mixture search (spread kept)")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512, help="calibration row length")
    parser.add_argument("--mix", type=Path, default=None, help="reuse this mix.json (same model, data, settings)")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    request = QuantizeRequest(model=args.model, tasks=tasks)  # the mix settings `quantize` uses
    base = load_model(args.model)
    if args.mix is not None:
        mix = reuse_mix(args.mix, base, request, args.mix_draws)
    else:
        mix = search_mixture(base.model, base.tokenizer, general=request.general, tasks=request.task_sources,
                             alphas=ALPHAS, n_samples=request.mix_samples, seq_len=request.probe_seq_len * 2,
                             seed=request.seed, draws=args.mix_draws)
    root = Path(os.environ.get("TASA_BENCH_CACHE", cache_root() / "bench" / "alpha_sweep")) / Path(args.model).name
    rows = []
    for score in mix.scores:
        artifact, seconds = quantize_at(args.model, tasks, args.bits, score.alpha, root,
                                        (args.calib_samples, args.seq_len))
        rows.append({"alpha": score.alpha, "grad_alignment": score.grad_alignment,
                     "hessian_trace": score.hessian_trace, "combined": score.combined, "quantize_seconds": seconds,
                     **measure(artifact, base, tasks, args.limit, args.windows)})
        print(f"[alpha {score.alpha:g}] task KL {rows[-1]['task_kl']:.4f}", file=sys.stderr)
    report = {"schema": "tasa-bench-alpha-sweep/1", "model": args.model, "date": datetime.date.today().isoformat(),
              "machine": machine(), "tasks": list(tasks), "bits": args.bits, "limit": args.limit,
              "windows": args.windows, "calib": [args.calib_samples, args.seq_len], "mix_settings": mix.settings, "rows": rows,
              "verdict": verdict(rows, mix.alpha)}
    write_reports(report, args.out_dir or RESULTS / Path(args.model).name)
    return report


if __name__ == "__main__":
    run_main(main)
