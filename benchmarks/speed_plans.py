"""Speed-aware vs speed-blind GGUF-target TASA at Q3_K_M's size, against llama.cpp's presets, all measured in one
run on this machine -> benchmarks/results/speed_<model>.{json,md}.

Rows (embeddings and head kept f16 in every file, so the files differ only in their linear layers):
  llamacpp-q3_k_m, llamacpp-q4_k_m      llama-quantize presets of the base model (`--token-embedding-type f16`)
  tasa-gguf-q3_k_m-size                 `quantize --target gguf --size <Q3_K_M's bytes> --max-slowdown 0`
  tasa-gguf-q3_k_m-size-speed           the same with `--max-slowdown 1.0` (decode no slower than Q3_K_M, predicted
                                        from llama-bench of single-type files: tasa_deploy/speed.py)
  tasa-gguf-q3_k_m-size-speed1.05       `--max-slowdown 1.05` (at least 95% of Q3_K_M's decode speed)
  tasa-gguf-q3_k_m-size-nonnative       (--nonnative) the speed-blind plan without the native grid: every embedded
                                        model was dequantized from a GGUF, so some GGML types reproduce some of its
                                        tensors exactly (SmolLM2's q4_1, Qwen's q5_0); those (unit, type) pairs - the
                                        profile's zero-error entries - are removed before planning. A user starting
                                        from bf16 has no such free tensors.
Per row: file bytes, linear bpw, llama-bench decode (tg) and prompt (pp) tok/s (`--reps` runs each, the rows
interleaved round-robin so drift hits all alike; mean and SE over rounds), WikiText-2 perplexity and KL divergence
from the f16 base (llama-perplexity --kl-divergence, ctx 512, --chunks), and task KL: the same on a text of the
task data (GSM8K test solutions; HumanEval prompts with their reference code for --tasks code). The TASA runs share one work dir (mix and profile
are measured once).

Usage: python benchmarks/speed_plans.py [--model smollm2-135m] [--tasks gsm8k,arc] [--chunks 32] [--rounds 3]
       [--slowdowns 1.0,1.05] [--nonnative] [--work DIR]
Run alone on an idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import machine, nonnative_quantize, run_main, write_report  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def task_text(tasks: tuple[str, ...], path: Path, limit: int = 400) -> Path:
    """A plain text of each task's eval answers (what task KL is measured on)."""
    from tasa_deploy.data import load_rows

    parts = []
    for task in tasks:
        if task == "gsm8k":
            parts += [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in load_rows("gsm8k", "eval", limit)]
        elif task == "code":
            parts += [r["prompt"] + r["answer"] for r in load_rows("humaneval", "eval", limit)]
    path.write_text("\n\n".join(parts), encoding="utf-8")
    return path


def nonnative_file(name: str, args, tasks, size: int, work: Path) -> tuple[Path, dict]:
    """The speed-blind request, planned without the native grid."""
    from tasa_deploy.api import export
    from tasa_deploy.pipeline import QuantizeRequest

    request = QuantizeRequest(model=args.model, out=work / name, target="gguf", size=f"{size}B", tasks=tasks,
                              max_slowdown=0.0, work_dir=work / f"{name}.work", force=True)
    summary = nonnative_quantize(request, work / "tasa.work")
    return export(work / name, work / f"{name}.gguf", format="gguf", force=True).path, summary


def build_files(args, tasks: tuple[str, ...], work: Path) -> tuple[Path, dict, dict]:
    """The F16 base, llama.cpp's presets and the TASA rows' GGUFs (GPTQ runs sharing one work dir's mix and
    profile); returns (base, name -> file, name -> TASA stage seconds)."""
    from tasa_deploy.api import export
    from tasa_deploy.exporters.gguf import export_dense_gguf
    from tasa_deploy.exporters.llamacpp import llama_quantize
    from tasa_deploy.model import resolve_model_dir
    from tasa_deploy.pipeline import QuantizeRequest, run_quantize

    base = export_dense_gguf(Path(resolve_model_dir(args.model)), work / "f16.gguf", force=True)
    files = {f"llamacpp-{preset}": llama_quantize(base, work / f"{preset}.gguf", preset.upper(), embedding_type="f16")
             for preset in ("q3_k_m", "q4_k_m")}
    size = files["llamacpp-q3_k_m"].stat().st_size
    seconds = {}
    variants = [("tasa-gguf-q3_k_m-size", 0.0)] + [
        (f"tasa-gguf-q3_k_m-size-speed{'' if float(r) == 1.0 else r}", float(r)) for r in args.slowdowns.split(",")]
    for name, slowdown in variants:
        request = QuantizeRequest(model=args.model, out=work / name, target="gguf", size=f"{size}B", tasks=tasks,
                                  max_slowdown=slowdown, speed_reference="q3_k_m", work_dir=work / "tasa.work",
                                  force=True)
        _, summary = run_quantize(request, log=lambda m: print(m, file=sys.stderr))  # GPTQ changes a model in place
        seconds[name] = summary["stage_seconds"]
        files[name] = export(work / name, work / f"{name}.gguf", format="gguf", force=True).path
    if args.nonnative:
        name = "tasa-gguf-q3_k_m-size-nonnative"
        files[name], seconds[name] = nonnative_file(name, args, tasks, size, work)
    return base, files, seconds


def measure_rows(files: dict, base: Path, task_file: Path, chunks: int, rounds: int) -> dict:
    """Per file: size, bpw, llama-perplexity ppl and KL (wiki, tasks), llama-bench speeds; then each row's speed
    and KL against Q3_K_M's (the KL paired over the same chunks)."""
    from tasa_deploy.data import shared_data_dir
    from tasa_deploy.exporters.gguf import linear_bits_per_weight
    from tasa_deploy.exporters.llamacpp import llama_bench, llama_kl_divergence, llama_perplexity

    wiki = shared_data_dir() / "wikitext-2-raw" / "wiki.test.raw"
    rows = {name: {"name": name, "file_bytes": path.stat().st_size, "linear_bpw": linear_bits_per_weight(path),
                   "ppl_wikitext2": llama_perplexity(path, wiki, chunks=chunks),
                   "kld_wikitext2": llama_kl_divergence(path, base, wiki, chunks=chunks),
                   "kld_tasks": llama_kl_divergence(path, base, task_file, chunks=chunks)}
            for name, path in files.items()}
    speeds = {name: [] for name in files}
    for _ in range(rounds):  # round-robin: machine drift hits every row alike
        for name, path in files.items():
            speeds[name].append(llama_bench(path, n_prompt=128, n_gen=64, threads=2, reps=2))
    for name, runs in speeds.items():
        for key, attr in (("tg_tok_s", "decode_tok_s"), ("pp_tok_s", "prompt_tok_s")):
            values = [getattr(r, attr) for r in runs]
            rows[name][key] = statistics.mean(values)
            rows[name][f"{key}_se"] = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    compare_to_reference(rows)
    return rows


def compare_to_reference(rows: dict, reference: str = "llamacpp-q3_k_m") -> None:
    """Adds tg_vs_q3_k_m and kld_<text>_vs_q3_k_m: (mean, SE) of the row's KL minus the reference's, paired
    over the chunks both were scored on."""
    from tasa_deploy.stats import paired_ratio_delta

    ref = rows[reference]
    for row in rows.values():
        row["tg_vs_q3_k_m"] = row["tg_tok_s"] / ref["tg_tok_s"]
        for text in ("wikitext2", "tasks"):
            chunks = row[f"kld_{text}"]["chunk_kld"]
            row[f"kld_{text}_vs_q3_k_m"] = paired_ratio_delta(ref[f"kld_{text}"]["chunk_kld"], chunks,
                                                              [1.0] * len(chunks))


def table_lines(rows: dict, what: str, chunks: int, rounds: int, command: str) -> list[str]:
    lines = ["| name | file bytes | linear bpw | tg tok/s | pp tok/s | tg / Q3_K_M | WikiText-2 ppl | KL wiki | KL tasks "
             "| KL wiki - Q3_K_M's | KL tasks - Q3_K_M's |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows.values():
        kl = [f"{r[k]['kld']:.4f} ± {r[k]['kld_se']:.4f}" for k in ("kld_wikitext2", "kld_tasks")]
        paired = ["{:+.4f} ± {:.4f}".format(*r[f"kld_{t}_vs_q3_k_m"]) for t in ("wikitext2", "tasks")]
        lines.append(f"| {r['name']} | {r['file_bytes']:,} | {r['linear_bpw']:.3f} | {r['tg_tok_s']:.1f} ± "
                     f"{r['tg_tok_s_se']:.1f} | {r['pp_tok_s']:.0f} ± {r['pp_tok_s_se']:.0f} | {r['tg_vs_q3_k_m']:.3f} | "
                     f"{r['ppl_wikitext2']:.3f} | " + " | ".join(kl + paired) + " |")
    return lines + ["", f"{what}; ctx 512 x {chunks} chunks (KL minus Q3_K_M's: mean ± SE paired over these chunks, "
                        f"n = {chunks}); llama-bench pp128/tg64, {rounds} rounds x 2 reps, 2 threads; "
                        f"{datetime.date.today().isoformat()}. Command: {command}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="gsm8k,arc")
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slowdowns", default="1.0,1.05", help="--max-slowdown of each speed-aware row")
    parser.add_argument("--nonnative", action="store_true", help="add the tasa-gguf-q3_k_m-size-nonnative row")
    parser.add_argument("--work", type=Path, default=None, help="keep files here (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    from tasa_deploy import UsageError
    from tasa_deploy.data import shared_data_dir

    if shared_data_dir() is None:
        raise UsageError("WikiText-2 not found: set TASA_DATA_DIR")
    tasks = tuple(t for t in args.tasks.split(",") if t)
    holder = None if args.work else tempfile.TemporaryDirectory(prefix="tasa-speed-plans-")
    work = args.work or Path(holder.name)
    work.mkdir(parents=True, exist_ok=True)
    base, files, seconds = build_files(args, tasks, work)
    size = files["llamacpp-q3_k_m"].stat().st_size
    rows = measure_rows(files, base, task_text(tasks, work / "tasks.txt"), args.chunks, args.rounds)
    report = {"date": datetime.date.today().isoformat(), "machine": machine(), "model": args.model, "tasks": tasks,
              "chunks": args.chunks, "rounds": args.rounds, "q3_k_m_bytes": size, "tasa_stage_seconds": seconds,
              "rows": list(rows.values())}
    command = (f"python benchmarks/speed_plans.py --model {args.model} --tasks {args.tasks}"
               f"{' --nonnative' if args.nonnative else ''}")
    lines = table_lines(rows, f"{args.model}; tasks {','.join(tasks)}", args.chunks, args.rounds, command)
    write_report(args.out, f"speed_{args.model}", report, lines)


if __name__ == "__main__":
    run_main(main)
