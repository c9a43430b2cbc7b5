"""Write part of MBPP as a `--task-data` JSONL file: the "bring your own task" twin of the built-in `code` task.

    python benchmarks/mbpp_jsonl.py --rows 400 --out /tmp/mbpp_part.jsonl
    tasa-deploy quantize --model qwen2.5-coder-0.5b --bits 3.5 --task-data mine=/tmp/mbpp_part.jsonl \
        --tasks mine,gsm8k --out out/q35-mine

Rows are `{"prompt", "answer", "tests"}` exactly as the built-in task builds them (`data.mbpp_rows`), the first
`--rows` distinct prompts of the 500 problems in file order. The file is written outside the repo: data is never
committed. The tool then splits it into calibration / probe / eval rows by its own rule for user data, so the
rows it calibrates and probes on are not the built-in task's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import run_main  # noqa: E402
from tasa_deploy import UsageError  # noqa: E402
from tasa_deploy.data import mbpp_rows  # noqa: E402
from tasa_deploy.outputs import atomic_path  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.rows < 1:
        raise UsageError(f"--rows must be >= 1, got {args.rows}")
    if args.out.exists():  # a plain JSONL file carries no tasa-deploy tag, so it is never replaced
        raise UsageError(f"{args.out} already exists; remove it or choose another --out")
    rows = mbpp_rows()[:args.rows]
    with atomic_path(args.out) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} MBPP rows to {args.out}")
    return args.out


if __name__ == "__main__":
    run_main(main)
