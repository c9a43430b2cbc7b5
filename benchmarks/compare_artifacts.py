"""Evaluate several models/artifacts on the same quick eval set and write one comparison table.

    python benchmarks/compare_artifacts.py fp=smollm2-135m tasa-3.5=out/tasa35 uniform3-gptq=out/u3 \
        --tasks wikitext2,gsm8k_ll,arc_easy --limit 50 --out benchmarks/results/tasa_smollm2/compare.json
    python benchmarks/compare_artifacts.py --from-json fp=eval-fp.json ...   # merge `tasa-deploy eval --out` files

Rows carry bits per weight from tasa_deploy.bits (the artifact's plan) so the table shows cost and quality.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

from tasa_deploy.artifacts import write_json_atomic
from tasa_deploy.quantized_dir import load_artifact


def plan_bits(path: str) -> float | None:
    folder = Path(path)
    if not (folder / "quantized.json").is_file():
        return None
    from tasa_deploy.bits import plan_average_bits

    artifact = load_artifact(folder)
    return plan_average_bits(artifact.plan, {name: qt.shape for name, qt in artifact.modules.items()})


def evaluate(source: str, tasks: list[str], limit: int) -> dict:
    from tasa_deploy.eval import EVALS
    from tasa_deploy.model import load_any

    loaded = load_any(source)
    return {task: EVALS[task](loaded.model, loaded.tokenizer, limit) for task in tasks}


def flatten(name: str, source: str, results: dict) -> dict:
    row = {"name": name, "bpw": plan_bits(source)}
    for task, result in results.items():
        if "ppl" in result:
            row[f"{task}_ppl"] = result["ppl"]
        elif "answer_nll" in result:
            row[f"{task}_answer_nll"] = result["answer_nll"]
        else:
            row[f"{task}_acc"] = result.get("acc")
            row[f"{task}_acc_norm"] = result.get("acc_norm")
    return row


def markdown(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row.get(c):.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="+", help="name=model-or-artifact (or name=eval.json with --from-json)")
    parser.add_argument("--tasks", default="wikitext2,gsm8k_ll,arc_easy")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--from-json", action="store_true", help="rows point at `tasa-deploy eval --out` files")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compare.json"))
    args = parser.parse_args()
    rows = []
    for spec in args.rows:
        name, source = spec.split("=", 1)
        if args.from_json:
            saved = json.loads(Path(source).read_text())
            rows.append(flatten(name, saved["model"], saved["results"]))
        else:
            rows.append(flatten(name, source, evaluate(source, args.tasks.split(","), args.limit)))
    report = {"machine": f"{platform.machine()} {platform.processor() or ''} (CPU)".strip(),
              "date": datetime.date.today().isoformat(), "tasks": args.tasks, "limit": args.limit, "rows": rows}
    write_json_atomic(args.out, report, foreign_ok=True)
    args.out.with_suffix(".md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
