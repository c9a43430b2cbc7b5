"""What the benchmark scripts share: the machine description each result JSON records, and the `__main__`
wrapper that turns a bad-input UsageError into one line on stderr and exit code 2 (as the CLI does)."""

from __future__ import annotations

import os
import platform
import sys
from typing import Callable


def machine() -> dict:
    """The machine a benchmark ran on: platform, processor, CPUs, Python, torch and its thread count."""
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def run_main(main: Callable[[], object]) -> None:
    """Run a script's main(); a UsageError becomes `error: <message>` on stderr and exit code 2."""
    from tasa_deploy import UsageError

    try:
        main()
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
