"""GGUF exports of real models scored by llama.cpp against PyTorch on the same weights
-> benchmarks/results/gguf_convert_check.{json,md}.

Per model: a uniform 4-bit GGUF-target artifact (`quantize --method uniform --bits 4 --target gguf --quantizer
rtn`: q4_k where a row of K fits it, q4_0 elsewhere), exported through llama.cpp's convert_hf_to_gguf.py with our
tensors in place (`--via convert`; for Gemma-3 this is the only route) and, for Llama/Qwen2, through our own
writer too. Each file is scored with `llama-perplexity` (WikiText-2 test, ctx 512, the first N chunks) and the
artifact's dequantized weights are scored in PyTorch with llama-perplexity's protocol (`eval.perplexity`,
protocol "llamacpp": the same windows, the second half of each scored), embeddings rounded to f16 as exported.
The goal (#18): within 2%.

Usage: python benchmarks/gguf_convert_check.py [--models gemma3-270m,qwen2.5-coder-0.5b] [--chunks 8]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import machine, run_main, write_report  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CTX = 512


def torch_ppl(artifact: Path, text: str, chunks: int) -> float:
    from tasa_deploy.eval.perplexity import evaluate_perplexity
    from tasa_deploy.model import load_artifact_model

    loaded = load_artifact_model(artifact)
    embed = loaded.model.get_input_embeddings()
    embed.weight.data = embed.weight.data.half().float()  # the GGUF stores embeddings as f16
    return evaluate_perplexity(loaded.model, loaded.tokenizer, text, CTX, chunks, protocol="llamacpp",
                               batch_size=1).ppl


def check_model(model: str, text_file: Path, chunks: int, tmp: Path) -> dict:
    import gguf

    from tasa_deploy.api import export
    from tasa_deploy.exporters.gguf import ARCHITECTURES
    from tasa_deploy.exporters.llamacpp import llama_perplexity
    from tasa_deploy.model import load_config, resolve_model_dir
    from tasa_deploy.pipeline import QuantizeRequest, run_quantize

    artifact = tmp / f"{model}-q4"
    start = time.perf_counter()
    run_quantize(QuantizeRequest(model=model, out=artifact, method="uniform", bits=4, target="gguf", quantizer="rtn",
                                 calib_samples=1, seq_len=32), log=lambda m: None)
    row = {"model": model, "quantize_s": round(time.perf_counter() - start, 1)}
    row["ppl_torch"] = torch_ppl(artifact, text_file.read_text(encoding="utf-8"), chunks)
    model_type = load_config(resolve_model_dir(model), model).model_type
    routes = ["convert"] + (["ours"] if model_type in ARCHITECTURES else [])
    for route in routes:
        path = tmp / f"{model}-{route}.gguf"
        start = time.perf_counter()
        export(artifact, path, format="gguf", via="convert" if route == "convert" else None)
        seconds = time.perf_counter() - start
        types = Counter(t.tensor_type.name.lower() for t in gguf.GGUFReader(path).tensors)
        ppl = llama_perplexity(path, text_file, ctx=CTX, chunks=chunks)
        row[route] = {"file_bytes": path.stat().st_size, "export_s": round(seconds, 1), "types": dict(types),
                      "ppl_llamacpp": ppl, "rel_diff": abs(ppl - row["ppl_torch"]) / row["ppl_torch"],
                      "within_2pct": abs(ppl - row["ppl_torch"]) / row["ppl_torch"] < 0.02}
        print(f"[convert-check] {model} {route}: llama.cpp {ppl:.3f} vs torch {row['ppl_torch']:.3f}",
              file=sys.stderr, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gemma3-270m,qwen2.5-coder-0.5b")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    from tasa_deploy import UsageError
    from tasa_deploy.data import shared_data_dir

    if shared_data_dir() is None:
        raise UsageError("WikiText-2 not found: set TASA_DATA_DIR to the shared data folder")
    rows = []
    with tempfile.TemporaryDirectory(prefix="tasa-convert-check-") as tmp:
        for model in filter(None, args.models.split(",")):
            rows.append(check_model(model, shared_data_dir() / "wikitext-2-raw" / "wiki.test.raw", args.chunks, Path(tmp)))
    report = {"date": datetime.date.today().isoformat(), "machine": machine(), "ctx": CTX, "chunks": args.chunks,
              "rows": rows}
    lines = ["| model | route | GGUF types | file bytes | llama.cpp ppl | PyTorch ppl (same weights) | rel. diff | < 2% |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for route in ("convert", "ours"):
            if route in row:
                r = row[route]
                lines.append(f"| {row['model']} | {route} | {', '.join(f'{k} x{v}' for k, v in sorted(r['types'].items()))} | "
                             f"{r['file_bytes']:,} | {r['ppl_llamacpp']:.3f} | {row['ppl_torch']:.3f} | "
                             f"{100 * r['rel_diff']:.2f}% | {'yes' if r['within_2pct'] else 'NO'} |")
    lines += ["", f"WikiText-2 test, ctx {CTX}, first {args.chunks} chunks ({args.chunks * (CTX // 2 - 1)} scored tokens); "
              f"uniform 4-bit RTN on GGML grids; {report['date']}. Command: python benchmarks/gguf_convert_check.py"]
    write_report(args.out, "gguf_convert_check", report, lines)


if __name__ == "__main__":
    run_main(main)
