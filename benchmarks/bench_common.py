"""What the benchmark scripts share: the machine description each result JSON records, and the `__main__`
wrapper that turns a bad-input UsageError into one line on stderr and exit code 2 (as the CLI does)."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Callable


def machine() -> dict:
    """The machine a benchmark ran on: platform, processor, CPUs, Python, torch and its thread count."""
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def write_report(out_dir: Path, stem: str, report: dict, lines: list[str]) -> None:
    """`<stem>.json` (the report) and `<stem>.md` (the table lines) written atomically into out_dir; the table
    is printed too."""
    from tasa_deploy.outputs import atomic_path, write_json_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / f"{stem}.json", report, foreign_ok=True)
    with atomic_path(out_dir / f"{stem}.md", force=True, foreign_ok=True) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


def run_main(main: Callable[[], object]) -> None:
    """Run a script's main(); a UsageError becomes `error: <message>` on stderr and exit code 2."""
    from tasa_deploy import UsageError

    try:
        main()
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
