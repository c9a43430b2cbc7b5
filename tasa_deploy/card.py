"""Model cards (README.md with the YAML front matter the Hugging Face hub reads) and the upload to the hub.

A card says what a user needs before downloading: the base model, how it was quantized (method, linear-layer bits
per weight, the grids/types and how many modules each, the whole file's bytes, the tasks the plan protects and
the calibration mixture), measured quality and speed when `tasa-deploy eval --out eval.json` and / or
`tasa-deploy bench --out bench.json` were run and passed with `export --results` (repeatable), and how to serve it (llama-server for GGUF, vllm serve for a compressed-tensors directory).
The vLLM export directory carries it as README.md; `export --push-to-hub REPO` uploads the export with its card
(for a GGUF: the file plus README.md) through `huggingface_hub`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

from tasa_deploy import TasaError, UsageError
from tasa_deploy.artifacts import BitPlan
from tasa_deploy.schema import check_schema, read_json

EVAL_SCHEMA = "tasa-eval/1"
BENCH_SCHEMA = "tasa-bench/1"


def read_results(paths) -> dict:
    """Measured figures for the card from `eval --out` (quality) and `bench --out` (served tasks and load test)
    files, merged: {row: {metric: number}}. Any other file is refused with one line."""
    merged: dict = {}
    for path in [paths] if isinstance(paths, (str, Path)) else list(paths):
        obj = read_json(Path(path), "results")
        schema = obj.get("schema")
        check_schema(obj, EVAL_SCHEMA if schema != BENCH_SCHEMA else BENCH_SCHEMA, Path(path), "eval or bench results")
        if schema == BENCH_SCHEMA:
            merged.update({f"{task} (served)": _numbers(m) for task, m in (obj.get("tasks") or {}).items()})
            for row in obj.get("load") or []:
                if isinstance(row, dict) and isinstance(row.get("ttft_s"), dict):
                    merged[f"load, {row.get('clients')} clients"] = _numbers({
                        "output tok/s": row.get("output_tok_per_s"), "TTFT p50 (s)": row["ttft_s"].get("p50"),
                        "TPOT p50 (ms)": 1000 * (row.get("tpot_s") or {}).get("p50", float("nan"))})
            continue
        results = obj.get("results")
        if not isinstance(results, dict):
            raise UsageError(f"--results {path}: 'results' must be an object of task -> metrics")
        merged.update({task: _numbers(metrics) for task, metrics in results.items() if isinstance(metrics, dict)})
    return merged


def _numbers(metrics) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)} \
        if isinstance(metrics, dict) else {}


def model_card(plan: BitPlan, config: Mapping[str, Any], *, fmt: str, file_name: str, file_bytes: int,
               results: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """README.md text for an export of `plan` (fmt "gguf" | "vllm")."""
    request = plan.info.get("request") or {}
    base = str(request.get("model") or config.get("_name_or_path") or "unknown")
    grids = Counter(module.spec.key for module in plan.modules.values())
    front = {"base_model": base, "library_name": "gguf" if fmt == "gguf" else "transformers",
             "pipeline_tag": "text-generation", "quantized_by": "tasa-deploy",
             "tags": ["tasa", "mixed-precision", "quantized", "gguf" if fmt == "gguf" else "compressed-tensors"]}
    method = "TASA task-aware mixed precision" if plan.budget_bits is not None else f"uniform ({plan.info.get('kind')})"
    lines = ["---", *_yaml(front), "---", "", f"# {Path(file_name).stem} ({fmt.upper()})", "",
             f"{base} quantized with [tasa-deploy](https://arxiv.org/abs/2607.00908): {method}, GPTQ.", "",
             "| | |", "|---|---|",
             f"| linear layers | {plan.average_bits:.3f} bits per weight |" if plan.average_bits else "| linear layers | - |",
             f"| whole file | {file_bytes:,} bytes ({file_bytes / 1e6:.1f} MB) |",
             f"| grids | {', '.join(f'{k} x{n}' for k, n in sorted(grids.items()))} |",
             f"| tasks protected | {', '.join(request.get('tasks') or []) or '-'} |",
             f"| calibration | share of general data alpha = {plan.info.get('alpha')} |", ""]
    lines += _results_section(results)
    lines += ["## Run it", "", "```sh"]
    lines += ([f"llama-server -m {file_name} --port 8080   # OpenAI-compatible API at http://127.0.0.1:8080/v1"]
              if fmt == "gguf" else [f"vllm serve ./{file_name}   # OpenAI-compatible API at http://127.0.0.1:8000/v1"])
    lines += ["```", ""]
    return "\n".join(lines)


def _results_section(results: Mapping[str, Mapping[str, float]] | None) -> list[str]:
    if not results:
        return ["## Quality", "", "Not measured yet: `tasa-deploy eval --model <artifact> --tasks wikitext2,gsm8k "
                "--out results.json`, then export with `--results results.json`.", ""]
    lines = ["## Quality and speed (measured)", "", "| task | metric | value |", "|---|---|---|"]
    for task, metrics in results.items():
        lines += [f"| {task} | {name} | {value:.4g} |" for name, value in metrics.items()]
    return lines + [""]


def _yaml(obj: Mapping[str, Any]) -> list[str]:
    out = []
    for key, value in obj.items():
        if isinstance(value, list):
            out.append(f"{key}:")
            out += [f"- {json.dumps(item)}" for item in value]
        else:
            out.append(f"{key}: {json.dumps(value)}")
    return out


def push_to_hub(repo: str, export_path: Path, card: str, *, private: bool = False) -> str:
    """Upload an export (a vLLM directory, whose README.md is its card, or a GGUF file plus the card as README.md)
    to the hub repo `repo`; returns its URL. Any hub or network failure is one TasaError line."""
    import tempfile

    from huggingface_hub import HfApi

    export_path = Path(export_path)
    api = HfApi()
    try:
        url = api.create_repo(repo, private=private, exist_ok=True)
        if export_path.is_dir():
            api.upload_folder(repo_id=repo, folder_path=str(export_path), commit_message="tasa-deploy export")
        else:
            with tempfile.TemporaryDirectory(prefix="tasa-card-") as tmp:
                readme = Path(tmp) / "README.md"
                readme.write_text(card, encoding="utf-8")
                api.upload_file(path_or_fileobj=str(export_path), path_in_repo=export_path.name, repo_id=repo)
                api.upload_file(path_or_fileobj=str(readme), path_in_repo="README.md", repo_id=repo)
    except Exception as exc:  # huggingface_hub raises many types (offline mode, HTTP, auth); all end the push
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TasaError(f"push to the hub ({repo}) failed: {type(exc).__name__}: {first}; the export is kept at "
                        f"{export_path}") from None
    return str(url)
