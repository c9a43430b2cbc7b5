"""QuantLinear: an nn.Linear replacement that keeps its weight packed (compressed-tensors `pack-quantized`).

Holds `weight_packed` int32 [N, ceil(K*b/32)] and `weight_scale` [N, K/G] for one width b in {2, 3, 4, 8},
the same tensors our vLLM exporter writes. Forward runs the Triton dequant-GEMM (`mixed_gemm.py`) when the
input is on CUDA and the backend is "triton"; otherwise the PyTorch reference (`reference.py`), so a model
with QuantLinears also runs on the CPU. `replace_linears` builds them from a TASA quantized artifact
(`tasa_deploy.quantized_dir.load_artifact`); only symmetric "int" modules can be served (asymmetric and GGML
grids have no kernel here) and anything else is refused before the model is touched.
"""

from __future__ import annotations

import torch
from torch import nn

from tasa_deploy import UsageError
from tasa_deploy.kernels.reference import (SUPPORTED_BITS, SUPPORTED_GROUPS, mixed_gemm_reference, pack_codes,
                                           packed_words)
from tasa_deploy.quant.tensor import QuantizedTensor

BACKENDS = ("triton", "reference")


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W stored packed at `bits` bits, one fp16 scale per `group_size` inputs."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 backend: str = "triton", scale_dtype: torch.dtype = torch.float16):
        super().__init__()
        check_layer(in_features, bits, group_size, backend)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.backend = bits, group_size, backend
        words = packed_words(in_features, bits)
        self.register_buffer("weight_packed", torch.zeros(out_features, words, dtype=torch.int32))  # [N, W]
        self.register_buffer("weight_scale", torch.ones(out_features, in_features // group_size,
                                                        dtype=scale_dtype))  # [N, K/G]
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)  # [N]

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: torch.Tensor | None = None,
                       backend: str = "triton") -> "QuantLinear":
        """Pack a symmetric int QuantizedTensor (codes u = q + 2**(b-1), scales [N, K/G])."""
        if qt.fmt != "int" or not qt.symmetric:
            raise UsageError(f"QuantLinear serves symmetric int weights only, got fmt={qt.fmt} "
                             f"symmetric={qt.symmetric}; quantize for the vLLM target with symmetric grids")
        out_features, in_features = qt.shape
        layer = cls(in_features, out_features, qt.bits, qt.group_size, bias is not None, backend, qt.scales.dtype)
        layer.weight_packed.copy_(pack_codes(qt.codes.cpu(), qt.bits))
        layer.weight_scale.copy_(qt.scales)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_2d = x.reshape(-1, self.in_features)  # [M, K]
        if self.backend == "triton" and x.is_cuda:
            from tasa_deploy.kernels import mixed_gemm

            y = mixed_gemm.mixed_gemm(x_2d, self.weight_packed, self.weight_scale, self.bits, self.group_size)
        else:
            y = mixed_gemm_reference(x_2d, self.weight_packed, self.weight_scale, self.bits, self.group_size)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)  # [..., N]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, backend={self.backend}")


def check_layer(in_features: int, bits: int, group_size: int, backend: str) -> None:
    """One-line UsageError for a layer the kernels cannot serve."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; use one of {BACKENDS}")
    if bits not in SUPPORTED_BITS:
        raise UsageError(f"{bits}-bit weights have no kernel; use one of {SUPPORTED_BITS}")
    if group_size not in SUPPORTED_GROUPS and group_size != in_features:
        raise UsageError(f"group size {group_size} has no kernel; use 32/64/128 or per-channel")
    if in_features % group_size:
        raise UsageError(f"group size {group_size} does not divide in_features {in_features}")


def _unsupported_reason(qt: QuantizedTensor) -> str | None:
    if qt.fmt != "int":
        return f"grid {qt.fmt} (GGML grids are served by llama.cpp, not by this kernel)"
    if not qt.symmetric:
        return "asymmetric int (the kernel is symmetric only)"
    if qt.bits not in SUPPORTED_BITS:
        return f"{qt.bits}-bit (kernels exist for {SUPPORTED_BITS})"
    if qt.group_size not in SUPPORTED_GROUPS and qt.group_size != qt.shape[1]:
        return f"group size {qt.group_size}"
    return None


def replace_linears(model: nn.Module, artifact, backend: str = "triton") -> nn.Module:
    """Swap every nn.Linear that `artifact` (a QuantizedArtifact) quantized for a QuantLinear; returns model.

    All modules are checked before any is swapped, so a refused artifact leaves the model untouched. The
    model's other weights are not touched: load them from the artifact (e.g. `artifact.dense_state_dict()`).
    """
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; use one of {BACKENDS}")
    targets: dict[str, nn.Linear] = {}
    for name, qt in artifact.modules.items():
        reason = _unsupported_reason(qt)
        if reason is not None:
            raise UsageError(f"{name}: {reason} cannot be served by QuantLinear; export it to GGUF instead")
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise UsageError(f"{name} is in the artifact but not in the model; wrong model for this artifact") from None
        if not isinstance(linear, nn.Linear) or (linear.out_features, linear.in_features) != qt.shape:
            raise UsageError(f"{name}: model has {linear}, artifact has a {list(qt.shape)} weight")
        targets[name] = linear
    for name, linear in targets.items():
        bias = artifact.tensors.get(f"{name}.bias", linear.bias)
        layer = QuantLinear.from_quantized(artifact.modules[name], None if bias is None else bias.detach(), backend)
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, layer.to(linear.weight.device))
    return model


__all__ = ["QuantLinear", "replace_linears", "check_layer", "BACKENDS"]
