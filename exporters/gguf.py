"""Export a quantized artifact to a GGUF file that llama.cpp loads, one GGML type per weight as planned.

Container: `gguf.GGUFWriter` (GGUF spec: ggml docs/gguf.md). Tensor names come from gguf-py's own
HF -> GGUF name map (`blk.N.attn_q.weight`, `token_embd.weight`, ...); `output.weight` is left out when the
embeddings are tied. Supported architectures: LLaMA family (llama, mistral; SmolLM2 is llama) and qwen2.

Weights:
  - a module quantized on a GGML grid (fmt "q4_k", ...) is packed losslessly (`gguf_pack.pack_quantized`);
  - a module on the vLLM "int" grid is mapped bits -> GGML type (`DEFAULT_TYPE_FOR_BITS`, or `type_map`),
    falling back to the nearest block-32 type with at least as many bits (q4_0/q5_0/q8_0) when the row
    length does not fit a k-quant (K % 256 != 0, e.g. SmolLM2's 576), and re-rounded (RTN) from its
    dequantized weight, with a warning per module;
  - LLaMA q_proj / k_proj rows are permuted into llama.cpp's rotary layout (convert_hf_to_gguf's `permute`:
    rows reshaped [heads, 2, head_dim/2] and the last two axes swapped). Quantization groups run along K,
    so permuting rows of codes and per-row scales is lossless;
  - embeddings (and an untied lm_head) are written as `embedding_type` (f16, f32 or a block-32 GGML type),
    norms and biases as f32.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Mapping

import gguf
import numpy as np
import torch

from tasa_deploy import UsageError
from tasa_deploy.quantized_dir import load_artifact
from tasa_deploy.outputs import TAG, atomic_path, check_output
from tasa_deploy.schema import read_json
from tasa_deploy.exporters import gguf_vocab
from tasa_deploy.exporters.gguf_pack import GGUF_QTYPE, pack_quantized
from tasa_deploy.quant.ggml_types import DEFAULT_TYPE_FOR_BITS, GGML_TYPES, fits_row
from tasa_deploy.quant.rtn import quantize_rtn
from tasa_deploy.quant.spec import QuantSpec
from tasa_deploy.quant.tensor import QuantizedTensor
from tasa_deploy.weights_check import expected_parameters, optional_parameters

log = logging.getLogger(__name__)

# HF model_type -> (GGUF architecture, whether q/k rows need llama.cpp's rotary permutation)
ARCHITECTURES = {"llama": (gguf.MODEL_ARCH.LLAMA, True), "mistral": (gguf.MODEL_ARCH.LLAMA, True),
                 "qwen2": (gguf.MODEL_ARCH.QWEN2, False)}
BLOCK32_FALLBACK = ("q4_0", "q5_0", "q8_0")  # by increasing bits: the fallback when a k-quant does not fit
FLOAT_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16}
FILE_TYPES = {"q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
              "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0, "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q2_k": gguf.LlamaFileType.MOSTLY_Q2_K,
              "q3_k": gguf.LlamaFileType.MOSTLY_Q3_K_M, "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_M,
              "q5_k": gguf.LlamaFileType.MOSTLY_Q5_K_M, "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K,
              "f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32}


@dataclass(frozen=True)
class GGUFExportReport:
    path: Path
    file_bytes: int
    tensor_types: Mapping[str, str]  # GGUF tensor name -> type name ("q4_k", "f16", "f32")
    bits_per_weight: float  # stored bits / weights over the quantized linear tensors (measured from bytes)
    warnings: tuple[str, ...]


def choose_ggml_type(bits: int, in_features: int, type_map: Mapping[int, str] | None = None) -> tuple[str, str | None]:
    """GGML type for an int-grid module of `bits` and row length K: (type, warning if it had to fall back)."""
    table = dict(type_map) if type_map is not None else DEFAULT_TYPE_FOR_BITS
    if bits not in table:
        raise UsageError(f"the GGUF type map has no type for {bits}-bit modules (it covers {sorted(table)}); "
                         f"add one, e.g. {bits}=q{max(bits, 4)}_0")
    wanted = table[bits].lower()
    if wanted not in GGML_TYPES:
        raise UsageError(f"type map entry {bits}={wanted} is not a GGML type; known: {', '.join(GGML_TYPES)}")
    if fits_row(wanted, in_features):
        return wanted, None
    for fallback in BLOCK32_FALLBACK:
        if GGML_TYPES[fallback].nominal_bits >= bits and fits_row(fallback, in_features):
            return fallback, f"rows of {in_features} cannot take {wanted}; stored as {fallback}"
    raise UsageError(f"rows of {in_features} weights fit no GGML block (need a multiple of 32); "
                     "this tensor cannot be exported to GGUF")


def rotary_row_order(n_rows: int, n_heads: int) -> torch.Tensor:
    """Row order taking HF q/k rows to llama.cpp's: view [heads, 2, head_dim/2], swap the last two axes."""
    head_dim = n_rows // n_heads
    return torch.arange(n_rows).reshape(n_heads, 2, head_dim // 2).transpose(1, 2).reshape(-1)  # [N]


def permute_rows(qt: QuantizedTensor, order: torch.Tensor) -> QuantizedTensor:
    """The same quantized tensor with its rows reordered (codes, scales and every per-row parameter)."""
    return replace(qt, codes=qt.codes[order], scales=qt.scales[order],
                   zeros=None if qt.zeros is None else qt.zeros[order],
                   extra={k: v[order] for k, v in qt.extra.items()})


def to_ggml_grid(name: str, qt: QuantizedTensor, type_map, warnings: list[str]) -> QuantizedTensor:
    """A module on a GGML grid as is; an int-grid module re-rounded onto its mapped GGML type."""
    if qt.fmt in GGUF_QTYPE:
        return qt
    target, fallback_note = choose_ggml_type(qt.bits, qt.shape[1], type_map)
    note = f"{name}: {qt.fmt} {qt.bits}-bit re-rounded onto {target} (lossy)"
    warnings.append(note + (f"; {fallback_note}" if fallback_note else ""))
    return quantize_rtn(qt.dequantize(), QuantSpec.for_ggml(target))


def dense_tensor(weight: torch.Tensor, type_name: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A float tensor as (data, GGUF type): f32/f16 as is, or a block-32 GGML type via RTN."""
    if type_name in FLOAT_TYPES:
        dtype = np.float32 if type_name == "f32" else np.float16
        return weight.float().numpy().astype(dtype), FLOAT_TYPES[type_name]
    if type_name not in GGUF_QTYPE:
        raise UsageError(f"unknown embedding type '{type_name}'; use f16, f32 or one of {', '.join(GGUF_QTYPE)}")
    return pack_quantized(quantize_rtn(weight.float(), QuantSpec.for_ggml(type_name))), GGUF_QTYPE[type_name]


def _rope_theta(config: Mapping) -> float:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise UsageError(f"rope type '{rope.get('rope_type')}' is not supported by the GGUF exporter yet")
    return float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0)


def _write_metadata(writer: gguf.GGUFWriter, config: Mapping, file_type: str) -> None:
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_string("general.quantized_by", TAG)  # early in the header: outputs.py recognises our files by it
    writer.add_name(str(config.get("_name_or_path") or config.get("_model_name_or_path") or "tasa-quantized"))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != int(config["hidden_size"]) // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_file_type(int(FILE_TYPES.get(file_type, gguf.LlamaFileType.GUESSED)))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def gguf_architecture(config: Mapping) -> tuple[gguf.MODEL_ARCH, bool]:
    """(GGUF architecture, q/k rotary permutation?) of an HF config dict; a one-line UsageError otherwise."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UsageError(f"GGUF export supports {', '.join(ARCHITECTURES)} models; this one is '{model_type}'")
    return ARCHITECTURES[model_type]


def _qk_heads(config: Mapping, hf_name: str) -> int | None:
    """Head count whose rotary row order applies to this q_proj/k_proj weight (None: no permutation)."""
    if not ARCHITECTURES[config["model_type"]][1] or not hf_name.endswith(("q_proj.weight", "k_proj.weight")):
        return None
    if hf_name.endswith("q_proj.weight"):
        return int(config["num_attention_heads"])
    return int(config.get("num_key_value_heads") or config["num_attention_heads"])


def gguf_tensors(config: Mapping, modules: Mapping[str, QuantizedTensor], dense: Mapping[str, torch.Tensor], *,
                 type_map=None, embedding_type: str = "f16"):
    """GGUF tensors of quantized modules + dense HF tensors: ({gguf name: (data, type)}, warnings, bpw of
    the quantized modules). 2-D dense tensors are stored as `embedding_type`, others as f32."""
    arch, _ = gguf_architecture(config)
    name_map = gguf.get_tensor_name_map(arch, int(config["num_hidden_layers"]))
    out, rerounded, n_weights, n_bits = {}, [], 0, 0
    for module, qt in modules.items():
        gguf_name = name_map.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if gguf_name is None:
            raise UsageError(f"module {module} has no GGUF tensor name for {arch.name.lower()}")
        qt = to_ggml_grid(module, qt, type_map, rerounded)
        if (heads := _qk_heads(config, f"{module}.weight")) is not None:
            qt = permute_rows(qt, rotary_row_order(qt.shape[0], heads))
        data = pack_quantized(qt)  # [N, bytes per row]
        out[gguf_name] = (data, GGUF_QTYPE[qt.fmt])
        n_weights, n_bits = n_weights + qt.codes.numel(), n_bits + data.nbytes * 8
    tied = bool(config.get("tie_word_embeddings", False))
    for hf_name, tensor in dense.items():
        if tied and hf_name == "lm_head.weight":
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UsageError(f"tensor {hf_name} has no GGUF name for {arch.name.lower()}")
        if (heads := _qk_heads(config, hf_name)) is not None:
            tensor = tensor[rotary_row_order(tensor.shape[0], heads)]
        if tensor.ndim == 2:
            out[gguf_name] = dense_tensor(tensor, embedding_type)
        else:
            out[gguf_name] = (tensor.float().numpy(), FLOAT_TYPES["f32"])
    return out, summarize_rerounding(rerounded), n_bits / max(n_weights, 1)


def summarize_rerounding(notes: list[str]) -> list[str]:
    """One warning for every int-grid module re-rounded onto a GGML type (was one line per module)."""
    if not notes:
        return []
    types = Counter(note.split(" onto ")[1].split(" ")[0] for note in notes)
    fallbacks = sum("cannot take" in note for note in notes)
    return [f"re-rounded {len(notes)} int-grid modules onto GGML types ("
            + ", ".join(f"{t} x{n}" for t, n in sorted(types.items())) + ") from their dequantized weights, lossy"
            + (f"; {fallbacks} of them fell back to a block-32 type (row length)" if fallbacks else "")
            + f"; e.g. {notes[0]}"]


def expected_gguf_names(config: Mapping) -> set[str]:
    """GGUF tensor names the model's config implies (its HF parameters through gguf-py's name map; a tied
    lm_head is left out, as llama.cpp re-ties it)."""
    arch, _ = gguf_architecture(config)
    name_map = gguf.get_tensor_name_map(arch, int(config["num_hidden_layers"]))
    names = set()
    for hf_name in set(expected_parameters(config)) - optional_parameters(config):
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UsageError(f"the config's tensor {hf_name} has no GGUF name for {arch.name.lower()}")
        names.add(gguf_name)
    return names


def check_gguf_names(config: Mapping, names: Iterable[str], where: str) -> None:
    """One-line UsageError unless the GGUF tensor names are exactly those the config implies."""
    names, expected = set(names), expected_gguf_names(config)
    missing, unexpected = sorted(expected - names), sorted(names - expected)
    if missing or unexpected:
        raise UsageError(f"{where}: the GGUF tensors do not match the model's config.json ({len(missing)} "
                         f"missing, first: {missing[:3]}; {len(unexpected)} unexpected, first: {unexpected[:3]}); "
                         "nothing was written")


def write_gguf(out: Path, config: Mapping, tokenizer_dir: Path, tensors: Mapping, *, force: bool = False,
               pre_tokenizer: str | None = None, inputs: tuple[Path, ...] = ()) -> list[str]:
    """Write metadata, tokenizer and `tensors` ({name: (data, type)}) to `out` atomically; returns warnings."""
    arch, _ = gguf_architecture(config)
    check_gguf_names(config, tensors, str(out))
    vocab = gguf_vocab.read_vocab(Path(tokenizer_dir), int(config["vocab_size"]), pre_tokenizer)
    linear_types = Counter(_type_name(t) for name, (_, t) in tensors.items() if name.startswith("blk.")
                           and t != FLOAT_TYPES["f32"])
    with atomic_path(Path(out), force=force, inputs=(*inputs, Path(tokenizer_dir))) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        _write_metadata(writer, config, linear_types.most_common(1)[0][0] if linear_types else "f32")
        gguf_vocab.add_to_writer(vocab, writer)
        for name, (data, qtype) in tensors.items():
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return list(vocab.warnings)


def export_dense_gguf(model_dir: Path, out: Path, *, dtype: str = "f16", force: bool = False) -> Path:
    """An unquantized GGUF (2-D weights in `dtype`, f16 or f32) of an HF safetensors directory — the input
    llama-quantize expects."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    config = read_json(model_dir / "config.json", "model config", allow_nonfinite=True)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{model_dir} has no *.safetensors weights")
    check_output(Path(out), force=force, inputs=(model_dir,))
    state = {k: v for f in files for k, v in load_file(str(f)).items()}
    tensors, _, _ = gguf_tensors(config, {}, state, embedding_type=dtype)
    write_gguf(Path(out), config, model_dir, tensors, force=force)
    return Path(out)


def stored_bits_per_weight(tensors: Iterable) -> float:
    """Stored bits / weights over GGUFReader tensors, read from the file's bytes (0.0 for no weights)."""
    tensors = list(tensors)
    return sum(int(t.n_bytes) * 8 for t in tensors) / max(sum(int(t.n_elements) for t in tensors), 1)


def linear_bits_per_weight(path: Path) -> float:
    """Stored bits per weight over a GGUF file's quantized linears (its 2-D `blk.*` tensors)."""
    return stored_bits_per_weight(t for t in gguf.GGUFReader(path).tensors
                                  if t.name.startswith("blk.") and len(t.shape) == 2)


def _type_name(qtype: gguf.GGMLQuantizationType) -> str:
    return qtype.name.lower()


def export_gguf(artifact_dir: Path, out: Path, *, force: bool = False, type_map: dict[int, str] | None = None,
                embedding_type: str = "f16", pre_tokenizer: str | None = None) -> GGUFExportReport:
    """Write `out` (a .gguf) from the quantized artifact in `artifact_dir`; see the module docstring."""
    out = Path(out)
    check_output(out, force=force, inputs=(Path(artifact_dir),))
    if (Path(artifact_dir) / "config.json").is_file():  # an unsupported architecture is the first thing to say
        gguf_architecture(read_json(Path(artifact_dir) / "config.json", "model config", allow_nonfinite=True))
    artifact = load_artifact(Path(artifact_dir))
    tensors, warnings, bpw = gguf_tensors(artifact.config, artifact.modules, artifact.tensors, type_map=type_map,
                                          embedding_type=embedding_type)
    warnings += write_gguf(out, artifact.config, artifact.path, tensors, force=force, pre_tokenizer=pre_tokenizer,
                           inputs=(Path(artifact_dir),))
    for note in warnings:
        log.warning(note)
    types = {name: _type_name(qtype) for name, (_, qtype) in tensors.items()}
    return GGUFExportReport(out, out.stat().st_size, types, bpw, tuple(warnings))
