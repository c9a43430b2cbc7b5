"""Packaging: exporters/ and kernels/ install as tasa_deploy.exporters / tasa_deploy.kernels, never as a
top-level `kernels` (a PyPI package of that name exists and transformers probes for it)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_subpackages_are_namespaced():
    import tasa_deploy.exporters
    import tasa_deploy.kernels

    assert Path(tasa_deploy.exporters.__file__).parent == REPO / "exporters"
    assert Path(tasa_deploy.kernels.__file__).parent == REPO / "kernels"


def test_no_top_level_kernels_module():
    probe = "import importlib.util; s = importlib.util.find_spec('kernels'); print(s.origin if s else None)"
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    origin = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                            check=True).stdout.strip()
    assert not origin.startswith(str(REPO)), origin  # our kernels/ must not be importable as `kernels`
