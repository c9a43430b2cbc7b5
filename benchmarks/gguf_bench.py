"""GGUF baselines for SmolLM2-135M in the real llama.cpp -> benchmarks/results/gguf_smollm2.json.

Rows (embeddings kept f16 in every row, so rows differ only in how the linear layers are stored):
  ours-q4_0                 uniform Q4_0 by our RTN packer (byte-identical to gguf-py / ggml reference)
  llama-quantize-q4_0       llama-quantize Q4_0 from an F16 GGUF
  llama-quantize-q3_k_m/q4_k_m, each with and without an importance matrix (ours, from calibration text)
  one row per extra artifact directory given on the command line (TASA plans), exported by export_gguf
Per row: file bytes, bits per weight over the blk.* 2-D tensors (from the file), llama-perplexity on
WikiText-2 test (ctx 512, --chunks), llama-bench prompt / decode tok/s.

Usage: python benchmarks/gguf_bench.py [ARTIFACT_DIR ...] [--chunks 8] [--threads 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import machine, run_main  # noqa: E402
from tasa_deploy.artifacts import BitPlan, ModulePlan, write_json_atomic  # noqa: E402
from tasa_deploy.quantized_dir import save_artifact  # noqa: E402
from tasa_deploy.exporters.gguf import export_dense_gguf, export_gguf, linear_bits_per_weight  # noqa: E402
from tasa_deploy.exporters.llamacpp import imatrix_for_model, llama_bench, llama_perplexity, llama_quantize  # noqa: E402
from tasa_deploy.model import load_model, quantizable_modules  # noqa: E402
from tasa_deploy.quant.rtn import quantize_rtn  # noqa: E402
from tasa_deploy.quant.spec import QuantSpec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "gguf_smollm2.json"


def uniform_rtn_artifact(loaded, type_name: str, out: Path) -> Path:
    """Every linear RTN-quantized on one GGML grid, saved as an artifact (our uniform baseline)."""
    modules = {name: quantize_rtn(linear.weight.detach(), QuantSpec.for_ggml(type_name))
               for name, linear in quantizable_modules(loaded.model).items()}
    plan = BitPlan("uniform", "gguf", {name: ModulePlan(QuantSpec.for_ggml(type_name), "rtn") for name in modules})
    skip = {f"{n}.weight" for n in modules} | {"lm_head.weight"}
    dense = {k: v for k, v in loaded.model.state_dict().items() if k not in skip}
    return save_artifact(out, base_model_dir=loaded.model_dir, plan=plan, modules=modules, tensors=dense, force=True)


def calibration_tokens(tokenizer, n_samples: int = 32, seq_len: int = 256) -> torch.Tensor:
    """[n, T] calibration tokens for the importance matrix (LAMBADA prose; not the WikiText-2 test set)."""
    from tasa_deploy.data import calibration_texts, token_batches

    return token_batches(tokenizer, calibration_texts("lambada", "calib"), n_samples, seq_len, seed=0)


def plan_summary(artifact: Path) -> dict:
    """How a TASA artifact was made, from its plan: target grid, budget, achieved bpw, retargeting."""
    plan = BitPlan.load(artifact / "tasa_plan.json") if (artifact / "tasa_plan.json").is_file() else None
    if plan is None:
        from tasa_deploy.quantized_dir import load_artifact

        plan = load_artifact(artifact).plan
    return {"target": plan.target, "budget_bits": plan.budget_bits, "average_bits": plan.average_bits,
            "retargeted_from": plan.info.get("retargeted_from"), "alpha": plan.info.get("alpha")}


def measure(name: str, path: Path, text: Path, chunks: int, threads: int) -> dict:
    start = time.time()
    bench = llama_bench(path, threads=threads)
    row = {"name": name, "file": str(path), "file_bytes": path.stat().st_size,
           "bits_per_weight": round(linear_bits_per_weight(path), 4),
           "ppl_wikitext2": llama_perplexity(path, text, ctx=512, chunks=chunks, threads=threads),
           "prompt_tok_s": round(bench.prompt_tok_s, 1), "decode_tok_s": round(bench.decode_tok_s, 1),
           "llama_bench_peak_rss_mib": bench.peak_rss_mib}
    print(f"{name:28s} {row['bits_per_weight']:6.3f} bpw  ppl {row['ppl_wikitext2']:8.3f}  "
          f"pp {row['prompt_tok_s']:7.1f}  tg {row['decode_tok_s']:6.1f} tok/s  "
          f"rss {bench.peak_rss_mib:6.0f} MiB  ({time.time() - start:.0f} s)")
    return row


def build_models(work: Path, extra_artifacts: list[Path]) -> dict[str, Path]:
    loaded = load_model("smollm2-135m")
    base = export_dense_gguf(loaded.model_dir, work / "smollm2-f16.gguf", force=True)
    imatrix = imatrix_for_model(loaded.model_dir, calibration_tokens(loaded.tokenizer), work / "imatrix.gguf")
    models = {"ours-q4_0": export_gguf(uniform_rtn_artifact(loaded, "q4_0", work / "ours-q4_0"),
                                       work / "ours-q4_0.gguf", force=True).path}
    for ftype, use_imatrix in (("Q4_0", False), ("Q3_K_M", False), ("Q3_K_M", True), ("Q4_K_M", False),
                               ("Q4_K_M", True)):
        name = f"llama-quantize-{ftype.lower()}" + ("-imatrix" if use_imatrix else "")
        models[name] = llama_quantize(base, work / f"{name}.gguf", ftype, imatrix=imatrix if use_imatrix else None,
                                      embedding_type="f16")
    for artifact in extra_artifacts:
        models[f"tasa:{artifact.name}"] = export_gguf(artifact, work / f"{artifact.name}.gguf", force=True).path
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="*", type=Path, help="extra quantized artifact dirs (TASA plans)")
    parser.add_argument("--chunks", type=int, default=8, help="llama-perplexity chunks of 512 tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tasa-gguf-bench"))
    args = parser.parse_args()
    from tasa_deploy.data import wikitext2_test_text

    args.work.mkdir(parents=True, exist_ok=True)
    text = args.work / "wiki.test.raw"
    text.write_text(wikitext2_test_text(raw=True), encoding="utf-8")
    models = build_models(args.work, args.artifacts)
    rows = [measure(name, path, text, args.chunks, args.threads) for name, path in models.items()]
    for row, artifact in zip(rows[len(rows) - len(args.artifacts):], args.artifacts):
        row["plan"] = plan_summary(artifact)
    write_json_atomic(RESULTS, {"model": "SmolLM2-135M-Instruct", "date": datetime.date.today().isoformat(),
                                "machine": machine(),
                                "ctx": 512, "chunks": args.chunks, "threads": args.threads,
                                "embeddings": "f16 in every row", "rows": rows}, foreign_ok=True)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    run_main(main)
