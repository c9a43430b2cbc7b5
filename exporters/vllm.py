"""Export a quantized artifact as a compressed-tensors `pack-quantized` checkpoint that vLLM serves.

TASA (arXiv 2607.00908) gives every layer its own width (e.g. 3/4/8 bits under a 3.5-bit average); vLLM
reads such a mixed checkpoint through the compressed-tensors format
(https://github.com/neuralmagic/compressed-tensors, `quantization_config` in config.json):

  config.json        the base config + `quantization_config`: one `config_groups` entry per distinct
                     scheme {num_bits, type: int, symmetric: true, strategy: group|channel, group_size},
                     `targets` are regexes naming the modules of that scheme (`re:.*layers\\.(0|3)\\.mlp\\.down_proj$`),
                     `ignore: ["lm_head"]`, `format: pack-quantized`, `quantization_status: compressed`.
  model.safetensors  per quantized Linear: `weight_packed` int32 [N, ceil(K*b/32)] (dense little-endian
                     bitstream of q + 2^(b-1) along K), `weight_scale` fp16 [N, K/G], `weight_shape` int64 [2];
                     every other tensor dense under its HF name.
  tokenizer files    copied from the artifact; tasa_plan.json copied for provenance.

Packing goes through compressed-tensors' own packer, `pack_to_int32` (>= 0.18: 0.17 packs 3-bit another
way, which vLLM rejects), and the config through its pydantic models. Our symmetric int grid is the same as
compressed-tensors' symmetric int, w = (q - 2^(b-1)) * s with fp16 s, so our integer codes are packed as
they are (no re-rounding) and our scales are written bit for bit.

vLLM serves q/k/v and gate/up as single fused layers with the first shard's scheme, so a plan whose fused
groups (tasa_deploy.model.FUSED_GROUPS) do not share one spec is refused.
"""

from __future__ import annotations

import re
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from tasa_deploy import TasaError, UsageError
from tasa_deploy.quantized_dir import QuantizedArtifact, load_artifact
from tasa_deploy.outputs import atomic_path, check_output
from tasa_deploy.model import FUSED_GROUPS
from tasa_deploy.quant.tensor import QuantizedTensor
from tasa_deploy.weights_check import check_weights

PACK_FORMAT = "pack-quantized"
ARTIFACT_ONLY_FILES = ("quantized.json", "config.json", "model.safetensors")
COPIED_SUFFIXES = (".json", ".txt", ".model", ".jinja")
EXPORT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
LAYER_NAME = re.compile(r"^(?P<prefix>.*layers)\.(?P<layer>\d+)\.(?P<rest>.+)$")


@dataclass(frozen=True)
class VllmExportReport:
    """What `export_vllm` wrote."""

    out_dir: Path
    n_quantized: int  # Linear modules stored packed
    modules_per_scheme: Mapping[str, int]  # QuantSpec-style key ("int3g64") -> module count
    config_groups: int  # distinct schemes in quantization_config
    dtype: str  # dtype of the unquantized tensors and of config.json
    average_bits: float | None  # from the plan (tasa_deploy.bits), None if the plan has none
    file_bytes: int  # size of model.safetensors


# ----------------------------------------------------------------------------------------- validation
def scheme_key(qt: QuantizedTensor) -> tuple[int, int]:
    """(bits, group) of a module's grid; one scale per row (group = K) is written as -1 (strategy channel)."""
    return qt.bits, -1 if qt.scales.shape[1] == 1 else qt.group_size


def check_int_symmetric(name: str, qt: QuantizedTensor) -> None:
    """compressed-tensors' pack-quantized holds symmetric int grids of 1..8 bits with fp16 scales."""
    if qt.fmt != "int":
        raise UsageError(f"{name} is on the GGML grid '{qt.fmt}'; vLLM export needs an int-grid artifact "
                         "(quantize with a plan made for --target vllm)")
    if not qt.symmetric or qt.zeros is not None:
        raise UsageError(f"{name} is asymmetric; vLLM export supports symmetric int grids only "
                         "(re-quantize with symmetric=True)")
    if qt.scales.dtype != torch.float16:
        raise UsageError(f"{name} has {qt.scales.dtype} scales; compressed-tensors stores fp16 scales")


def check_fused_groups(modules: Mapping[str, QuantizedTensor], dense_names: set[str]) -> None:
    """Every fused group (q/k/v, gate/up) must be all dense or all quantized with one scheme."""
    for name, qt in modules.items():
        for group, members in FUSED_GROUPS.items():
            member = next((m for m in members if name.endswith("." + m)), None)
            if member is None or len(members) == 1:
                continue
            prefix = name[: -len(member) - 1]
            for sibling in (f"{prefix}.{m}" for m in members):
                if sibling in modules and (modules[sibling].bits, modules[sibling].group_size) != (
                        qt.bits, qt.group_size):
                    raise UsageError(f"{prefix}: fused group {group} mixes {name} ({qt.bits}-bit g{qt.group_size}) "
                                     f"and {sibling} ({modules[sibling].bits}-bit g{modules[sibling].group_size}); "
                                     "vLLM fuses them: tie them in the plan (tasa-deploy plan --target vllm)")
                if sibling not in modules and f"{sibling}.weight" in dense_names:
                    raise UsageError(f"{prefix}: fused group {group} has {name} quantized but {sibling} dense; "
                                     "quantize all of its members or none")


# ----------------------------------------------------------------------------------------- config
def layer_target_regexes(names: list[str]) -> list[str]:
    """Compact `re:` targets for a set of module names: one regex per module role over its layer indices."""
    layers_by_role: dict[str, list[int]] = defaultdict(list)
    exact: list[str] = []
    for name in names:
        match = LAYER_NAME.match(name)
        if match is None:
            exact.append(f"re:^{re.escape(name)}$")
        else:
            layers_by_role[match["rest"]].append(int(match["layer"]))
    regexes = [f"re:.*layers\\.({'|'.join(str(i) for i in sorted(layers))})\\.{re.escape(role)}$"
               for role, layers in sorted(layers_by_role.items())]
    return regexes + sorted(exact)


def weight_args(bits: int, group: int):
    from compressed_tensors.quantization import QuantizationArgs

    if group == -1:
        return QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="channel")
    return QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group)


def build_schemes(modules: Mapping[str, QuantizedTensor]) -> tuple[dict, dict]:
    """One compressed-tensors QuantizationScheme per distinct (bits, group); returns
    ({group name: scheme}, {module name: its scheme})."""
    from compressed_tensors.quantization import QuantizationScheme

    names_by_scheme: dict[tuple[int, int], list[str]] = defaultdict(list)
    for name, qt in modules.items():
        names_by_scheme[scheme_key(qt)].append(name)
    schemes, scheme_of = {}, {}
    for index, ((bits, group), names) in enumerate(sorted(names_by_scheme.items())):
        scheme = QuantizationScheme(targets=layer_target_regexes(names), weights=weight_args(bits, group),
                                    format=PACK_FORMAT)
        schemes[f"group_{index}"] = scheme
        scheme_of.update({name: scheme for name in names})
    return schemes, scheme_of


def quantization_config_dict(schemes: dict) -> dict:
    """The `quantization_config` block, serialized by the library's own pydantic models."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    config = QuantizationConfig(config_groups=schemes, format=PACK_FORMAT, ignore=["lm_head"],
                                quantization_status=QuantizationStatus.COMPRESSED)
    return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
            "sparsity_config": {}, "transform_config": {}, **config.model_dump(mode="json",
                                                                               exclude={"quant_method"})}


# ----------------------------------------------------------------------------------------- packing
def pack_module(name: str, qt: QuantizedTensor, scheme) -> dict[str, torch.Tensor]:
    """`{name}.weight_packed/.weight_scale/.weight_shape`, packed by compressed-tensors' own packer.

    Our codes are packed as they are (q - 2^(b-1), the signed int the pack-quantized compressor packs), so
    nothing is re-rounded; the tensor names come from the library's pack-quantized compressor."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    if not PackedQuantizationCompressor.can_compress(torch.nn.Linear, scheme):
        raise UsageError(f"{name}: compressed-tensors cannot pack a {qt.bits}-bit int weight (1..8 bits)")
    signed_codes = (qt.codes.to(torch.int16) - 2 ** (qt.bits - 1)).to(torch.int8)  # [N, K]
    tensors = {"weight_packed": pack_to_int32(signed_codes, qt.bits),  # int32 [N, ceil(K*b/32)]
               "weight_scale": qt.scales,  # fp16 [N, K/G]
               "weight_shape": torch.tensor(qt.shape, dtype=torch.int64)}  # [2]
    expected = set(PackedQuantizationCompressor.compression_param_names(scheme))
    if expected != set(tensors):
        raise TasaError(f"compressed-tensors expects {sorted(expected)} for pack-quantized, not {sorted(tensors)}; "
                        "this compressed-tensors version is not supported")
    return {f"{name}.{key}": value.contiguous() for key, value in tensors.items()}


def dense_tensors(artifact: QuantizedArtifact, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Unquantized tensors in the export dtype; a tied lm_head is left out (the runtime re-ties it)."""
    tied = bool(artifact.config.get("tie_word_embeddings", False))
    return {name: tensor.to(dtype) if tensor.is_floating_point() else tensor
            for name, tensor in artifact.tensors.items() if not (tied and name == "lm_head.weight")}


def checkpoint_shapes(tensors: Mapping[str, torch.Tensor], modules: Mapping[str, QuantizedTensor]) -> dict:
    """{HF parameter: shape} a compressed-tensors checkpoint stands for: each packed module's
    weight_packed/_scale/_shape trio counts as its `.weight` of the module's shape."""
    packed = {f"{name}.{key}" for name in modules for key in ("weight_packed", "weight_scale", "weight_shape")}
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if name not in packed}
    shapes.update({f"{name}.weight": tuple(qt.shape) for name, qt in modules.items() if f"{name}.weight_packed" in tensors})
    return shapes


def export_dtype_name(config: Mapping) -> str:
    """bfloat16 when the base model is bfloat16 (fp16 may overflow it), else float16."""
    declared = str(config.get("torch_dtype") or config.get("dtype") or "float16")
    return "bfloat16" if declared == "bfloat16" else "float16"


# ----------------------------------------------------------------------------------------- export
def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer / generation files (and tasa_plan.json for provenance) from the artifact directory."""
    for item in sorted(src.iterdir()):
        if item.is_file() and item.suffix in COPIED_SUFFIXES and item.name not in ARTIFACT_ONLY_FILES:
            shutil.copy2(item, dst / item.name)


def export_vllm(artifact_dir: Path, out_dir: Path, *, force: bool = False,
                results: Mapping | None = None) -> VllmExportReport:
    """Write a compressed-tensors checkpoint of the artifact at `artifact_dir` that `vllm serve out_dir` loads,
    with its model card (README.md; `results`: measured figures, `tasa_deploy.card.read_results`)."""
    import json

    from tasa_deploy.card import model_card
    from tasa_deploy.safetensors_io import LazyTensor, write_safetensors

    check_output(Path(out_dir), is_dir=True, force=force, inputs=(Path(artifact_dir),))
    artifact = load_artifact(Path(artifact_dir))
    if not artifact.modules:
        raise UsageError(f"{artifact_dir} has no quantized modules; nothing to export")
    for name, qt in artifact.modules.items():
        check_int_symmetric(name, qt)
    check_fused_groups(artifact.modules, set(artifact.tensors))
    schemes, scheme_of = build_schemes(artifact.modules)
    dtype_name = export_dtype_name(artifact.config)
    tensors = dense_tensors(artifact, EXPORT_DTYPES[dtype_name])
    for name, qt in artifact.modules.items():
        tensors.update(pack_module(name, qt, scheme_of[name]))
    check_weights(artifact.config, checkpoint_shapes(tensors, artifact.modules), str(out_dir))
    config = {**artifact.config, "dtype": dtype_name, "torch_dtype": dtype_name,
              "quantization_config": quantization_config_dict(schemes)}
    with atomic_path(Path(out_dir), is_dir=True, force=force, inputs=(Path(artifact_dir),)) as tmp:
        copy_side_files(artifact.path, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_safetensors(tmp / "model.safetensors", {k: LazyTensor.of(v) for k, v in tensors.items()},
                          metadata={"format": "pt"})  # no bytes copy of the checkpoint (save_file makes one)
        file_bytes = (tmp / "model.safetensors").stat().st_size
        (tmp / "README.md").write_text(model_card(artifact.plan, artifact.config, fmt="vllm", file_name=Path(out_dir).name,
                                                  file_bytes=file_bytes, results=results), encoding="utf-8")
    counts: dict[str, int] = defaultdict(int)
    for qt in artifact.modules.values():
        bits, group = scheme_key(qt)
        counts[f"int{bits}g{group if group != -1 else 'c'}"] += 1
    return VllmExportReport(Path(out_dir), len(artifact.modules), dict(sorted(counts.items())), len(schemes),
                            dtype_name, artifact.plan.average_bits, file_bytes)


__all__ = ["export_vllm", "VllmExportReport", "build_schemes", "quantization_config_dict", "layer_target_regexes"]
