"""Quality table for TASA (arXiv 2607.00908) against uniform RTN/GPTQ and llama.cpp's own k-quants
-> benchmarks/results/quality.{json,md,png}.

Every row is built once into a cache OUTSIDE the repo ($TASA_CACHE/bench/quality, default
~/.cache/tasa-deploy/bench/quality) and its evaluation is cached per (row, eval settings), so a rerun resumes
where it stopped. Rows (see ROWS): `fp` (the dequantized base), uniform int-g128 RTN / GPTQ at 3 and 4 bits,
TASA at 3.0 / 3.5 / 4.0 average bits (candidates {3,4,8}; ONE mix.json + profile.json shared by every budget
through one pipeline work dir), three TASA-3.5 ablations (perplexity objective only, alpha=0 task-only
calibration, alpha=1 general-only calibration), and llama-quantize Q3_K_M / Q4_K_M from an F16 GGUF of the
same base, with and without an importance matrix computed on the same calibration mixture, and
`tasa-gguf-q3_k_m-size`: TASA planned over GGML types at Q3_K_M's bits per weight, GPTQ'd onto those grids.

Columns: bpw (our rows: tasa_deploy.bits over the plan; GGUF rows: stored bits / weights over the file's
quantized blk.* tensors), wikitext_ppl (our "standard" protocol, PyTorch), wikitext_ppl_llamacpp (llama.cpp's
protocol: our rows scored with tasa_deploy.eval.perplexity protocol="llamacpp" on the raw file, GGUF rows by
the real llama-perplexity), gsm8k (few-shot exact match), gsm8k_ll (mean per-token log-likelihood of the
reference solution, higher is better), arc_easy / arc_challenge / hellaswag / piqa (accuracy under llama.cpp's
multiple-choice rule: mean log-prob per token of each choice past the choices' common prefix; our rows by
the PyTorch replica `acc_tokavg`, GGUF rows by the real `llama-perplexity --multiple-choice`; lm-eval's
acc_norm is kept as `<task>_acc_norm`), task_score = mean of the five task accuracies. GGUF rows' GSM8K
cells come from our evaluator on the GGUF's own dequantized weights (transformers' GGUF reader); quality_qwen.py
scores its generations through llama-server instead. KL columns (`*_kld`, benchmarks/kl_cells.py): mean KL from
the unquantized model on WikiText-2 and on the protected tasks' answer / choice tokens. TASA rows profile with
KL objectives (QuantSettings.objective_loss) and are cached under "-kl" names.

Usage: python benchmarks/quality.py --model smollm2-135m [--full] [--rows a,b] [--limit N] [--tiny-quant]
The default eval settings (QUICK_EVAL: 8 windows, 50 items per task, 10 GSM8K generations) are the ones the
committed table uses: its 13 rows took 3,383 s (56 min) from scratch on 2 CPU cores, one row at a time, plus
the llama.cpp build. --full (FULL_EVAL) takes ~8 h there.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import machine, run_main  # noqa: E402
from kl_cells import kl_cells  # noqa: E402
from quality_rows import base_gguf, build_row  # noqa: E402
from tasa_deploy import UsageError  # noqa: E402
from tasa_deploy.artifacts import read_json, write_json_atomic  # noqa: E402
from tasa_deploy.model import cache_root  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
TASKS = ("gsm8k", "arc_easy", "arc_challenge", "hellaswag", "piqa")  # task_score = mean of these accuracies
ALL_ROWS = ("fp", "uniform3-rtn", "uniform4-rtn", "uniform3-gptq", "uniform4-gptq", "tasa-3.0", "tasa-3.5",
            "tasa-4.0", "tasa-3.5-pplonly", "tasa-3.5-taskonly", "tasa-3.5-generalonly", "llamacpp-q3_k_m",
            "llamacpp-q3_k_m-imatrix", "llamacpp-q4_k_m", "llamacpp-q4_k_m-imatrix", "tasa-gguf-q3_k_m-size")


@dataclass(frozen=True)
class EvalSettings:
    """How much of each eval to run (None = the whole eval split)."""

    wikitext_windows: int | None = 40  # windows of 512 tokens, both protocols
    mc_items: int | None = 500  # rows per multiple-choice task
    gsm8k_items: int | None = 50  # few-shot generations
    gsm8k_ll_items: int | None = 200

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class QuantSettings:
    """Calibration sizes handed to every `tasa-deploy quantize` of the table (QuantizeRequest fields)."""

    calib_samples: int = 32
    seq_len: int = 512
    probe_samples: int = 16
    mix_samples: int = 8
    seed: int = 0
    tasks: tuple[str, ...] = ("gsm8k", "arc")  # what TASA protects (quality_qwen.py: code, gsm8k)
    objective_loss: str = "kl"  # how TASA's profile scores objectives (QuantizeRequest.objective_loss)

    def key(self) -> str:
        """The cache folder's key. objective_loss is not in it (fp, uniform and llama.cpp rows do not depend
        on it); TASA rows carry it in their own names instead (`tasa_name`)."""
        fields = asdict(self)
        del fields["objective_loss"]
        if self.tasks == ("gsm8k", "arc"):  # the key of caches made before tasks were a setting
            del fields["tasks"]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    def tasa_name(self, name: str) -> str:
        """Cache name of a row or work dir: TASA ones (`tasa*`, `work-*`) gain "-kl" for the KL objectives
        (caches made with NLL objectives keep their names)."""
        needs = name.startswith(("tasa", "work-")) and self.objective_loss != "nll"
        return f"{name}-{self.objective_loss}" if needs else name


FULL_EVAL = EvalSettings()
QUICK_EVAL = EvalSettings(wikitext_windows=8, mc_items=50, gsm8k_items=10, gsm8k_ll_items=50)
TINY_QUANT = QuantSettings(calib_samples=2, seq_len=64, probe_samples=2, mix_samples=2)


def limited(settings: EvalSettings, limit: int | None) -> EvalSettings:
    """--limit N caps every eval at N items (windows for wikitext)."""
    if limit is None:
        return settings
    if limit < 1:
        raise UsageError(f"--limit must be >= 1, got {limit}")
    cap = lambda v: limit if v is None else min(v, limit)  # noqa: E731
    return EvalSettings(cap(settings.wikitext_windows), cap(settings.mc_items), cap(settings.gsm8k_items),
                        cap(settings.gsm8k_ll_items))


def parse_rows(text: str | None) -> tuple[str, ...]:
    if not text:
        return ALL_ROWS
    rows = tuple(r.strip() for r in text.split(",") if r.strip())
    unknown = [r for r in rows if r not in ALL_ROWS]
    if unknown:
        raise UsageError(f"unknown row '{unknown[0]}'; known rows: {', '.join(ALL_ROWS)}")
    return rows


def bench_root(model: str, quant: QuantSettings) -> Path:
    root = Path(os.environ.get("TASA_BENCH_CACHE", cache_root() / "bench" / "quality"))
    return root / f"{Path(model).name}-{quant.key()}"


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate_torch(loaded, settings: EvalSettings) -> dict:
    """Every column of one row with our PyTorch evaluator (dequantized weights)."""
    from tasa_deploy.data import load_rows, wikitext2_test_text
    from tasa_deploy.eval import evaluate_perplexity, gsm8k_answer_nll

    model, tokenizer = loaded.model, loaded.tokenizer
    cells = {"wikitext_ppl": evaluate_perplexity(model, tokenizer, wikitext2_test_text(), seq_len=512,
                                                 max_windows=settings.wikitext_windows).ppl}
    cells["wikitext_ppl_llamacpp"] = evaluate_perplexity(model, tokenizer, wikitext2_test_text(raw=True), seq_len=512,
                                                         max_windows=settings.wikitext_windows,
                                                         protocol="llamacpp").ppl
    cells.update(evaluate_tasks(model, tokenizer, settings))
    cells["gsm8k_ll"] = -gsm8k_answer_nll(model, tokenizer, load_rows("gsm8k", "eval", settings.gsm8k_ll_items))
    return cells


def evaluate_tasks(model, tokenizer, settings: EvalSettings) -> dict:
    from tasa_deploy.eval import evaluate_gsm8k, evaluate_multiple_choice

    cells = {"gsm8k": evaluate_gsm8k(model, tokenizer, limit=settings.gsm8k_items).exact_match}
    for task in TASKS[1:]:
        result = evaluate_multiple_choice(model, tokenizer, task, limit=settings.mc_items)
        cells[task], cells[f"{task}_acc_norm"] = result.acc_tokavg, result.acc_norm
    return cells


def evaluate_gguf(path: Path, settings: EvalSettings, text_file: Path) -> dict:
    """GGUF row IN llama.cpp: wikitext_ppl_llamacpp by llama-perplexity, the four multiple-choice columns by
    llama-perplexity --multiple-choice on the same rows (its token-average rule, = our acc_tokavg). GSM8K
    (generation + answer log-likelihood), the standard-protocol ppl and the `<task>_torch` cross-check
    columns come from our PyTorch evaluator on the GGUF's own weights, dequantized by transformers' reader."""
    from tasa_deploy.data import load_rows
    from tasa_deploy.exporters.llamacpp import llama_multiple_choice, llama_perplexity
    from tasa_deploy.model import load_model

    chunks = settings.wikitext_windows or 10**6  # llama-perplexity stops at the text's end
    cells = evaluate_torch(load_model(str(path)), settings)
    cells["wikitext_ppl_llamacpp_torch"] = cells.pop("wikitext_ppl_llamacpp")  # same protocol, PyTorch
    cells["wikitext_ppl_llamacpp"] = llama_perplexity(path, text_file, ctx=512, chunks=chunks, threads=2)
    for task in TASKS[1:]:
        flags = llama_multiple_choice(path, load_rows(task, "eval", settings.mc_items))
        cells[f"{task}_torch"], cells[task] = cells[task], sum(flags) / len(flags)
    return cells


def task_score(cells: dict) -> float | None:
    values = [cells.get(t) for t in TASKS]
    return None if any(v is None for v in values) else sum(values) / len(values)


# ------------------------------------------------------------------------------------------------ building rows
def kl_columns(target: Path | None, model: str, root: Path, text_file: Path, settings: EvalSettings) -> dict:
    """KL from the unquantized model on WikiText-2 and on the protected tasks' eval rows (`kl_cells`)."""
    tasks = {"gsm8k": ("gsm8k", "eval", settings.gsm8k_ll_items), "arc_easy": ("arc_easy", "eval", settings.mc_items),
             "arc_challenge": ("arc_challenge", "eval", settings.mc_items)}
    base = base_gguf(model, root) if target is not None and target.suffix == ".gguf" else None
    return kl_cells(target, model, base, text_file, settings.wikitext_windows, tasks)


def run_row(name: str, model: str, quant: QuantSettings, settings: EvalSettings, root: Path, text_file: Path) -> dict:
    """Build + evaluate one row, resuming from its cached result (rows cached before the KL columns gain them)."""
    from tasa_deploy.model import load_any

    cache = root / "results" / f"{quant.tasa_name(name)}-{settings.key()}.json"
    if cache.is_file():
        print(f"[{name}] cached: {cache}", file=sys.stderr)
        row = read_json(cache, "cached benchmark row")
        if "wikitext_kld" not in row:
            row |= kl_columns(build_row(name, model, quant, root)[0], model, root, text_file, settings)
            write_json_atomic(cache, row, foreign_ok=True)
        return row
    start = time.perf_counter()
    target, info = build_row(name, model, quant, root)
    eval_start = time.perf_counter()
    if target is not None and target.suffix == ".gguf":
        cells = evaluate_gguf(target, settings, text_file)
    else:
        cells = evaluate_torch(load_any(str(target) if target else model), settings)
    cells |= kl_columns(target, model, root, text_file, settings)
    row = {"name": name, "bpw": info.pop("bpw"), **cells, "task_score": task_score(cells),
           "eval_seconds": round(time.perf_counter() - eval_start, 1),
           "wall_seconds": round(time.perf_counter() - start, 1), **info}
    write_json_atomic(cache, row, foreign_ok=True)
    print(f"[{name}] done in {row['wall_seconds']} s", file=sys.stderr)
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--full", action="store_true", help="full eval limits (40 windows, 500 items, 50 gens)")
    parser.add_argument("--quick", action="store_true", help="the default eval limits (kept for old commands)")
    parser.add_argument("--rows", default=None, help=f"comma-separated subset of: {','.join(ALL_ROWS)}")
    parser.add_argument("--limit", type=int, default=None, help="cap every eval at N items / windows")
    parser.add_argument("--tiny-quant", action="store_true", help="2 calibration rows of 64 tokens (smoke test)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    from plot_quality import write_reports

    rows = parse_rows(args.rows)
    if args.full and args.quick:
        raise UsageError("give at most one of --full and --quick")
    settings = limited(FULL_EVAL if args.full else QUICK_EVAL, args.limit)
    quant = TINY_QUANT if args.tiny_quant else QuantSettings()
    root = bench_root(args.model, quant)
    text_file = root / "wiki.test.raw"
    if not text_file.is_file():
        from tasa_deploy.data import wikitext2_test_text

        root.mkdir(parents=True, exist_ok=True)
        text_file.write_text(wikitext2_test_text(raw=True), encoding="utf-8")
    results = [run_row(name, args.model, quant, settings, root, text_file) for name in rows]
    report = {"model": args.model, "machine": machine(), "date": datetime.date.today().isoformat(),
              "settings": {"eval": asdict(settings), "quant": asdict(quant), "quick": not args.full,
                           "cache": str(root)}, "rows": results}
    write_reports(report, args.out_dir)
    return report


if __name__ == "__main__":
    run_main(main)
