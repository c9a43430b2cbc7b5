"""Scale without a GPU: every stage on the real layer shapes of Llama-3-8B and a 70B, with only a few blocks
-> benchmarks/results/scale.{json,md}.

Models: LlamaForCausalLM with random bf16 weights and the real shapes (8B: hidden 4096, ffn 14336, 32 heads /
8 KV heads, vocab 128256; 70B: hidden 8192, ffn 28672, 64 / 8 heads, vocab 128256, untied head), depth 1, 2, 4
(8B) and 1, 2 (70B). Token ids come from SmolLM2's tokenizer (all < 128256), data from the usual sources.
Calibration is deliberately tiny (default 2 rows x 64 tokens per source / objective) so a 70B block (~0.86B
parameters) runs on 2 cores; the numbers measure how memory and time grow with DEPTH, not full-size runs.

Per stage (mix, profile, plan, GPTQ as the pipeline runs it (each block's codes to disk as it is done), save,
vLLM export): wall time and the peak host RSS above the RSS with the model
loaded ("working memory", sampled every 20 ms by a thread reading /proc/self/status). Depth growth is fitted
per stage: working memory should be flat (within 10% from the shallowest to the deepest run); time grows
linearly (mix, GPTQ, export) or with L(L+1)/2 block passes (profile's tail passes). The projection to 32 and 80
blocks uses those forms; the weights themselves (bf16, on the host) are added as 2 bytes x parameters.

Usage: python benchmarks/scale.py [--runs 8b:1,8b:2,8b:4,70b:1,70b:2] [--rows 2] [--seq-len 64] [--append]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import machine, run_main, write_report  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {"8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "vocab_size": 128256, "full_layers": 32},
          "70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8,
                  "vocab_size": 128256, "full_layers": 80},
          "smoke": {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "vocab_size": 49152, "full_layers": 8}}  # checks the script in seconds
GIB = 1024**3
FLAT_SLACK_GIB = 0.05  # sampling jitter of RSS; below it a stage's working memory counts as flat whatever the ratio


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """Peak RSS while the `with` block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def build_model(shape: str, layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = {k: v for k, v in SHAPES[shape].items() if k != "full_layers"}
    config = LlamaConfig(**spec, num_hidden_layers=layers, max_position_embeddings=8192, tie_word_embeddings=False,
                         rope_theta=500000.0)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, torch_dtype=torch.bfloat16).eval()
    return model


def run_one(shape: str, layers: int, rows: int, seq_len: int, tokenizer, tmp: Path) -> dict:
    from tasa_deploy import mix
    from tasa_deploy.exporters.vllm import export_vllm
    from tasa_deploy.model import model_fingerprint, quantizable_modules
    from tasa_deploy.pipeline import unquantized_tensors
    from tasa_deploy.plan import build_plan
    from tasa_deploy.profile import measure_profile
    from tasa_deploy.sequential import quantize_model
    from tasa_deploy.quantized_dir import save_artifact

    start = time.perf_counter()
    model = build_model(shape, layers)
    params = sum(p.numel() for p in model.parameters())
    base_dir = tmp / f"{shape}-{layers}"
    model.config.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    gc.collect()
    loaded_rss = rss_bytes()
    row = {"shape": shape, "layers": layers, "parameters": params, "build_s": round(time.perf_counter() - start, 1),
           "loaded_rss_gib": loaded_rss / GIB, "stages": {}}
    print(f"[scale] {shape} x {layers} blocks: {params / 1e9:.2f}B parameters, RSS {loaded_rss / GIB:.1f} GiB",
          file=sys.stderr, flush=True)
    state = {}

    def stage(name, fn):
        gc.collect()
        before = rss_bytes()
        t0 = time.perf_counter()
        with PeakRss() as peak:
            state[name] = fn()
        seconds = time.perf_counter() - t0
        row["stages"][name] = {"seconds": round(seconds, 2), "peak_rss_gib": peak.peak / GIB,
                               "working_gib": (peak.peak - before) / GIB}
        print(f"[scale]   {name}: {seconds:.1f} s, working memory {(peak.peak - before) / GIB:.2f} GiB",
              file=sys.stderr, flush=True)

    stage("mix", lambda: mix.search_mixture(model, tokenizer, tasks=("gsm8k",), n_samples=rows, seq_len=seq_len,
                                            progress=False))
    stage("profile", lambda: measure_profile(model, tokenizer, objectives=("kl:ppl", "kl:math"), n_probe=rows,
                                             seq_len=seq_len, partial_path=tmp / f"profile-{shape}-{layers}.json",
                                             progress=False))
    fingerprint = model_fingerprint(model)
    stage("plan", lambda: build_plan(state["profile"], 3.5))
    tokens = mix.mixture_token_batches(state["mix"], tokenizer, rows, seq_len)
    stage("gptq", lambda: quantize_model(model, state["plan"], tokens, resume_dir=tmp / f"gptq-{shape}-{layers}"))
    artifact = tmp / f"artifact-{shape}-{layers}"
    stage("save", lambda: save_artifact(artifact, base_model_dir=base_dir, plan=state["plan"], modules=state["gptq"],
                                        tensors=unquantized_tensors(model, state["gptq"])))
    stage("vllm export", lambda: export_vllm(artifact, tmp / f"vllm-{shape}-{layers}"))
    from tasa_deploy.resources import estimate_stages

    estimates = estimate_stages(model.config, calib_rows=rows, seq_len=seq_len, mix_rows=rows, mix_seq_len=seq_len,
                                probe_rows=rows, probe_seq_len=seq_len, objectives=2, weight_bytes=2)
    for name, estimate in estimates.items():
        row["stages"][name]["estimate_gib"] = estimate.total / GIB
        row["stages"][name]["estimate_parts_gib"] = {k: round(v / GIB, 3) for k, v in estimate.parts.items()}
    row["plan_fingerprint_ok"] = state["plan"].model_fingerprint == fingerprint
    row["quantized_modules"] = len(state["gptq"]) == len(quantizable_modules(model))
    return row  # the model and the stage results go with this frame


def fit_and_project(rows: list[dict]) -> list[dict]:
    """Per shape and stage: working-memory spread over depth and the time per block (per block pass for the
    profile), projected to the full depth."""
    out = []
    for shape in sorted({r["shape"] for r in rows}):
        runs = sorted((r for r in rows if r["shape"] == shape), key=lambda r: r["layers"])
        full = SHAPES[shape]["full_layers"]
        deepest = runs[-1]
        per_layer_params = (deepest["parameters"] - runs[0]["parameters"]) / max(deepest["layers"] - runs[0]["layers"], 1) \
            if len(runs) > 1 else None
        for name in deepest["stages"]:
            working = [r["stages"][name]["working_gib"] for r in runs]
            layers = deepest["layers"]
            units = layers * (layers + 1) / 2 if name == "profile" else layers
            full_units = full * (full + 1) / 2 if name == "profile" else full
            seconds_per_unit = deepest["stages"][name]["seconds"] / units
            estimate = deepest["stages"][name].get("estimate_gib")
            out.append({"shape": shape, "stage": name, "depths": [r["layers"] for r in runs],
                        "working_gib": [round(w, 3) for w in working],
                        "estimate_gib_deepest": None if estimate is None else round(estimate, 3),
                        "spread": round((max(working) - min(working)) / max(max(working), 1e-9), 3),
                        "flat": max(working) - min(working) <= max(0.1 * max(working), FLAT_SLACK_GIB),
                        "growth": "L(L+1)/2 block passes" if name == "profile" else "linear in L",
                        "seconds_per_unit": round(seconds_per_unit, 3),
                        "projected_seconds_full": round(seconds_per_unit * full_units, 1),
                        "working_gib_per_block": round(_slope([r["layers"] for r in runs], working), 3),
                        "projected_working_gib_full": round(_extrapolate([r["layers"] for r in runs], working, full), 2),
                        "projected_host_gib_full": round(_extrapolate([r["layers"] for r in runs], working, full)
                                                         + 2 * _full_params(shape, runs, per_layer_params) / GIB, 1)})
    return out


def _slope(xs: list[int], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 with one point)."""
    if len(xs) < 2:
        return 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def _extrapolate(xs: list[int], ys: list[float], at: int) -> float:
    """The linear fit at `at`, never below the largest measured value (a flat stage projects to its peak)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return max(max(ys), my + _slope(xs, ys) * (at - mx))


def _full_params(shape: str, runs: list[dict], per_layer: float | None) -> float:
    full = SHAPES[shape]["full_layers"]
    spec = SHAPES[shape]
    h, f, kv = spec["hidden_size"], spec["intermediate_size"], spec["num_key_value_heads"]
    head_dim = h // spec["num_attention_heads"]
    block = 2 * h * h + 2 * h * kv * head_dim + 3 * h * f + 2 * h  # q,o + k,v + gate,up,down + norms
    return (per_layer or block) * full + 2 * spec["vocab_size"] * h + h


def full_size_estimates() -> list[dict]:
    """`resources.estimate_stages` for the full 32- and 80-block models at the CLI's default settings, bf16:
    host = weights + the hungriest stage's working memory; device (CUDA, blocks onloaded one at a time) = that
    working memory less its host-only parts (codes, boundary states) + one block + the shell (embeddings, head)."""
    from transformers import LlamaConfig

    from tasa_deploy.resources import HOST_ONLY, OVERHEAD, Shapes, estimate_stages

    out = []
    for shape in ("8b", "70b"):
        spec = {k: v for k, v in SHAPES[shape].items() if k != "full_layers"}
        config = LlamaConfig(**spec, num_hidden_layers=SHAPES[shape]["full_layers"], tie_word_embeddings=False)
        shapes = Shapes.of(config)
        stages = estimate_stages(config, calib_rows=32, seq_len=512, weight_bytes=2)
        shell = 2 * shapes.vocab * shapes.hidden * 2
        for name, estimate in stages.items():
            out.append({"shape": shape, "stage": name, "working_gib": round(estimate.total / GIB, 2),
                        "largest_part": estimate.largest,
                        "host_gib": round((2 * shapes.params + OVERHEAD + estimate.total) / GIB, 1),
                        "device_gib": round((sum(v for k, v in estimate.parts.items() if k not in HOST_ONLY)
                                             + 2 * shapes.block_params + shell) / GIB, 1)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="8b:1,8b:2,8b:4,70b:1,70b:2")
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--append", action="store_true", help="Keep the runs already in OUT/scale.json (other "
                        "shapes/depths) and refit with the new ones.")
    args = parser.parse_args()
    from tasa_deploy import UsageError
    from tasa_deploy.model import load_model

    runs = []
    for item in filter(None, args.runs.split(",")):
        shape, _, layers = item.partition(":")
        if shape not in SHAPES or not layers.isdigit() or int(layers) < 1:
            raise UsageError(f"--runs entries are SHAPE:LAYERS with SHAPE in {sorted(SHAPES)}, got '{item}'")
        runs.append((shape, int(layers)))
    rows = []
    tokenizer = load_model("smollm2-135m").tokenizer if runs else None
    with tempfile.TemporaryDirectory(prefix="tasa-scale-") as tmp:
        for shape, layers in runs:
            rows.append(run_one(shape, layers, args.rows, args.seq_len, tokenizer, Path(tmp)))
    if args.append and (args.out / "scale.json").is_file():
        import json

        fresh = {(r["shape"], r["layers"]) for r in rows}
        kept = json.loads((args.out / "scale.json").read_text())["runs"]
        rows = [r for r in kept if (r["shape"], r["layers"]) not in fresh] + rows
    fits = fit_and_project(rows)
    full = full_size_estimates()
    report = {"date": datetime.date.today().isoformat(), "machine": machine(), "rows_per_source": args.rows,
              "seq_len": args.seq_len, "runs": rows, "fits": fits, "full_size_estimates": full}
    lines = ["| shape | stage | depths | working GiB per depth | estimate GiB (deepest) | flat | GiB per block | "
             "s per unit | growth | projected s (full) | projected working GiB (full) | projected host GiB (full, bf16 "
             "weights incl.) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {f['shape']} | {f['stage']} | {f['depths']} | {f['working_gib']} | {f['estimate_gib_deepest']} | "
              f"{'yes' if f['flat'] else 'NO'} | {f['working_gib_per_block']} | "
              f"{f['seconds_per_unit']} | {f['growth']} | {f['projected_seconds_full']} | "
              f"{f['projected_working_gib_full']} | {f['projected_host_gib_full']} |"
              for f in fits]
    lines += ["", "Full-size estimates (resources.estimate_stages, default CLI settings, bf16 weights on the host):", "",
              "| shape | stage | working GiB | largest part | host GiB (weights + stage) | device GiB (stage on device + block + shell) |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {e['shape']} | {e['stage']} | {e['working_gib']} | {e['largest_part']} | {e['host_gib']} | "
              f"{e['device_gib']} |" for e in full]
    lines += ["", f"{len(rows)} runs, {args.rows} rows x {args.seq_len} tokens per source/objective, "
              f"{report['machine']['cpus']} CPUs; {report['date']}."]
    write_report(args.out, "scale", report, lines)


if __name__ == "__main__":
    run_main(main)
