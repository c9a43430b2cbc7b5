"""The streamed safetensors writer against the real library's bytes, and GPTQ's per-block files as the artifact's
source (the artifact is byte-identical whether the quantized modules come from memory or from disk)."""

import pytest
import torch
from safetensors.torch import load_file, save

from tasa_deploy import UsageError
from tasa_deploy.model import load_model, model_fingerprint
from tasa_deploy.pipeline import uniform_plan, unquantized_tensors
from tasa_deploy.quantized_dir import load_artifact, save_artifact
from tasa_deploy.safetensors_io import DTYPE_NAMES, LazyTensor, lazy_tensors, write_safetensors
from tasa_deploy.sequential import BlockFiles, quantize_model


def _random(dtype, shape, gen):
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(0, 100, shape, generator=gen).to(dtype)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bytes_equal_the_safetensors_library(tmp_path, seed):
    gen = torch.Generator().manual_seed(seed)
    dtypes = list(DTYPE_NAMES)
    tensors = {}
    for i in range(12):
        dtype = dtypes[int(torch.randint(0, len(dtypes), (1,), generator=gen))]
        shape = tuple(int(s) for s in torch.randint(0, 5, (int(torch.randint(0, 3, (1,), generator=gen)),),
                                                    generator=gen))
        tensors[f"t{int(torch.randint(0, 1000, (1,), generator=gen))}.{i}"] = _random(dtype, shape, gen)
    expected = save(tensors, metadata={"format": "pt"})
    write_safetensors(tmp_path / "x.safetensors", {k: LazyTensor.of(v) for k, v in tensors.items()},
                      metadata={"format": "pt"})
    assert (tmp_path / "x.safetensors").read_bytes() == expected
    lazy = lazy_tensors(tmp_path / "x.safetensors")
    assert set(lazy) == set(tensors)
    for name, entry in lazy.items():
        assert entry.dtype == tensors[name].dtype and entry.shape == tuple(tensors[name].shape)
        assert torch.equal(entry.load(), tensors[name])


def test_a_tensor_that_loads_other_than_declared_is_refused(tmp_path):
    wrong = LazyTensor(torch.float32, (2, 3), lambda: torch.zeros(3, 2))
    with pytest.raises(UsageError, match="declared"):
        write_safetensors(tmp_path / "x.safetensors", {"w": wrong})
    with pytest.raises(UsageError, match="does not store"):
        write_safetensors(tmp_path / "y.safetensors", {"w": LazyTensor.of(torch.zeros(2, dtype=torch.complex64))})


def test_artifact_from_block_files_is_byte_identical(tiny_model_dir, tmp_path):
    """GPTQ with a resume dir keeps no module in memory (BlockFiles); the saved artifact equals the in-memory one."""
    tokens = torch.randint(0, 1000, (8, 64), generator=torch.Generator().manual_seed(0))
    artifacts = {}
    for kind in ("memory", "files"):
        model = load_model(str(tiny_model_dir)).model
        plan = uniform_plan(model, model_fingerprint(model), 3, "vllm")
        modules = quantize_model(model, plan, tokens, resume_dir=tmp_path / "gptq" if kind == "files" else None)
        assert isinstance(modules, BlockFiles) == (kind == "files")
        artifacts[kind] = save_artifact(tmp_path / kind, base_model_dir=tiny_model_dir, plan=plan, modules=modules,
                                        tensors=unquantized_tensors(model, modules))
    memory, files = (load_file(str(artifacts[k] / "model.safetensors")) for k in ("memory", "files"))
    assert (artifacts["memory"] / "model.safetensors").read_bytes() == (artifacts["files"] / "model.safetensors").read_bytes()
    assert len(memory) == len(files) > 0
    opened = load_artifact(artifacts["files"])
    assert len(opened.modules) == 4 * 7
