"""GGUF through llama.cpp's convert_hf_to_gguf.py with our quantized tensors in place (exporters.gguf_convert).

References: the converter's own float32 GGUF of the same dequantized weights (every quantized tensor we place
must dequantize, by gguf-py's own dequantizer, to exactly that tensor), our own writer on a Llama (the packed
bytes of every module must be identical through both routes: the converter's rotary q/k reordering is found
from the data), and llama.cpp itself (the file loads and scores as the converter's float file does).
Skipped when the llama.cpp source (for the converter) is not in the cache: `bash benchmarks/llamacpp.sh`.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize
from typer.testing import CliRunner

from tasa_deploy import UsageError
from tasa_deploy.cli import app
from tasa_deploy.quantized_dir import load_artifact

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _converter() -> Path:
    from tasa_deploy.exporters.gguf_convert import CONVERTER
    from tasa_deploy.exporters.llamacpp import LLAMACPP_VERSION
    from tasa_deploy.model import cache_root

    path = Path(os.environ.get("LLAMACPP_CONVERT") or
                cache_root() / f"llama.cpp-{LLAMACPP_VERSION}" / "src" / "llama.cpp" / CONVERTER)
    if not path.is_file():
        pytest.skip(f"llama.cpp's {CONVERTER} is not cached (bash benchmarks/llamacpp.sh)")
    return path


def _quantize(model_dir: Path, out: Path, bits: str = "4") -> Path:
    result = CliRunner().invoke(app, ["quantize", "--model", str(model_dir), "--method", "uniform", "--bits", bits,
                                      "--quantizer", "rtn", "--target", "gguf", "--calib-samples", "2",
                                      "--seq-len", "32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _export(artifact: Path, out: Path, *via: str) -> Path:
    result = CliRunner().invoke(app, ["export", str(artifact), "--format", "gguf", *via, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _converted_f32(artifact: Path, tmp: Path) -> gguf.GGUFReader:
    from tasa_deploy.exporters.gguf_convert import run_converter, write_dense_dir

    write_dense_dir(load_artifact(artifact), tmp / "dense")
    run_converter(tmp / "dense", tmp / "dense.gguf", _converter())
    return gguf.GGUFReader(tmp / "dense.gguf")


@pytest.fixture(scope="module")
def gemma_artifact(tmp_path_factory, smollm2, calibration_data):
    from test_gemma3 import _tiny_gemma3

    _converter()
    root = tmp_path_factory.mktemp("convert-gemma")
    _tiny_gemma3(smollm2.tokenizer).save_pretrained(root / "hf")
    smollm2.tokenizer.save_pretrained(root / "hf")
    return _quantize(root / "hf", root / "artifact")


def test_gemma3_exports_through_the_converter_with_every_module_in_place(gemma_artifact, tmp_path):
    """Gemma-3 (which our writer does not know) goes through the converter by default; each quantized tensor
    dequantizes to exactly the converter's own f32 tensor of the same weights, norms are the converter's
    (Gemma's +1 shift included), the embedding is its f16 rounding, and every key the converter wrote is kept."""
    out = _export(gemma_artifact, tmp_path / "m.gguf")
    ours, reference = gguf.GGUFReader(out), _converted_f32(gemma_artifact, tmp_path)
    assert [t.name for t in ours.tensors] == [t.name for t in reference.tensors]
    quantized = 0
    for mine, ref in zip(ours.tensors, reference.tensors):
        values = dequantize(mine.data, mine.tensor_type).reshape(ref.data.shape)
        if mine.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            quantized += 1
            assert np.array_equal(values, ref.data), mine.name
        elif mine.tensor_type == gguf.GGMLQuantizationType.F16:
            assert np.array_equal(values, ref.data.astype(np.float16).astype(np.float32)), mine.name
        else:
            assert np.array_equal(values, ref.data), mine.name
    assert quantized == 4 * 7 == len(load_artifact(gemma_artifact).modules)
    assert ours.fields["general.quantized_by"].contents() == "tasa-deploy"
    assert ours.fields["general.name"].contents() == "m"  # the output's name (the converter's --model-name)
    kept = {k for k in reference.fields if not k.startswith("GGUF.") and k not in ("general.file_type", "general.name")}
    for key in kept:
        assert ours.fields[key].contents() == reference.fields[key].contents(), key


def test_llama_bytes_match_our_own_writer(tiny_model_dir, tmp_path):
    """On a Llama both routes write the same packed bytes per module: the converter's rotary reordering of
    q/k rows is recovered from the data alone."""
    artifact = _quantize(tiny_model_dir, tmp_path / "artifact")
    _converter()
    ours = gguf.GGUFReader(_export(artifact, tmp_path / "ours.gguf"))
    converted = gguf.GGUFReader(_export(artifact, tmp_path / "conv.gguf", "--via", "convert"))
    mine = {t.name: t for t in ours.tensors}
    quantized = [t for t in converted.tensors if t.tensor_type not in (gguf.GGMLQuantizationType.F32,
                                                                      gguf.GGMLQuantizationType.F16)]
    assert len(quantized) == 4 * 7
    for tensor in quantized:
        assert tensor.tensor_type == mine[tensor.name].tensor_type, tensor.name
        assert np.array_equal(np.asarray(tensor.data), np.asarray(mine[tensor.name].data)), tensor.name
    assert {t.name for t in converted.tensors} == set(mine)


def test_a_module_the_converter_changed_is_refused(gemma_artifact, tmp_path):
    """If no converter tensor is a row reordering of a module (here: one module's codes altered), nothing is
    placed: one clear error."""
    from dataclasses import replace

    from tasa_deploy.exporters.gguf_convert import locate_modules

    reader = _converted_f32(gemma_artifact, tmp_path)
    modules = dict(load_artifact(gemma_artifact).modules)
    name = sorted(modules)[3]
    codes = modules[name].codes.clone()
    codes[0, 0] = (int(codes[0, 0]) + 1) % 16
    modules[name] = replace(modules[name], codes=codes)
    with pytest.raises(UsageError, match="not in the converter's output"):
        locate_modules(reader, modules)


def test_an_architecture_nobody_knows_is_refused_up_front():
    from tasa_deploy.api import gguf_writer

    _converter()
    with pytest.raises(UsageError, match="neither our writer"):
        gguf_writer({"model_type": "nosuch", "architectures": ["NoSuchForCausalLM"]}, None)


def test_llamacpp_scores_the_converted_gemma3_as_the_converters_own_file(gemma_artifact, tmp_path, shared_data):
    """llama.cpp loads our Gemma-3 file and its perplexity equals that of the converter's f32 file of the same
    weights (the only difference is the f16 embedding)."""
    from tasa_deploy.exporters.llamacpp import find_llamacpp_bin, llama_perplexity

    if find_llamacpp_bin(("llama-perplexity",), build=False) is None:
        pytest.skip("llama.cpp tools not built (bash benchmarks/llamacpp.sh)")
    text = tmp_path / "wiki.txt"
    text.write_text((shared_data / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")[:40000])
    ours = llama_perplexity(_export(gemma_artifact, tmp_path / "m.gguf"), text, ctx=128, chunks=4)
    _converted_f32(gemma_artifact, tmp_path)
    reference = llama_perplexity(tmp_path / "dense.gguf", text, ctx=128, chunks=4)
    assert abs(ours - reference) / reference < 0.005, (ours, reference)


def test_a_config_without_architectures_gets_the_causal_lm_class():
    """Configs written from a GGUF carry no `architectures`; the converter needs one to pick its writer."""
    from tasa_deploy.exporters.gguf_convert import architectures_of

    assert architectures_of({"model_type": "gemma3_text"}) == ["Gemma3ForCausalLM"]
    assert architectures_of({"model_type": "qwen2"}) == ["Qwen2ForCausalLM"]
    assert architectures_of({"model_type": "llama", "architectures": ["MistralForCausalLM"]}) == ["MistralForCausalLM"]
    assert architectures_of({"model_type": "nosuch"}) == []
