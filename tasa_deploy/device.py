"""Where the work runs: device and dtype choice, and sequential onloading of decoder blocks.

Every stage keeps the model's weights on the host and moves ONE decoder block to the compute device while it
works on it (`onloaded`), as llm-compressor's sequential pipeline and AutoRound do; the rest of the model
(embeddings, final norm, head, rotary tables: the "shell") stays on the device for the whole run (`place_shell`).
Device memory is then about one block, its Hessians or gradients and the calibration activations, plus the
shell, whatever the depth. On a CPU-only machine the device is the host and onloading moves nothing.

Accumulations (Hessians, Gram matrices, losses, gradient dot products) are float32 or float64 whatever the
weight dtype; the code that accumulates converts (see `quant.gptq.make_empty_hessian`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from tasa_deploy import UsageError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_device(name: str | None = None) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' (or None/'auto': cuda when available, else cpu) -> torch.device; one-line errors."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got '{name}'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got '{name}'")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """'bf16' | 'fp16' | 'fp32' (None/'auto': bf16 on CUDA, fp32 on the CPU, where bf16 matmuls are slow)."""
    if name in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UsageError(f"--dtype must be bf16, fp16 or fp32, got '{name}'")
    return DTYPES[name]


def _blocks_of(model: nn.Module) -> nn.ModuleList:
    from tasa_deploy.model import decoder_blocks

    return decoder_blocks(model)


def place_shell(model: nn.Module, device: torch.device) -> None:
    """Move everything but the decoder blocks (embeddings, norm, head, rotary buffers) to `device`."""
    block_ids = {id(p) for p in _blocks_of(model).parameters()} | {id(b) for b in _blocks_of(model).buffers()}
    for module in model.modules():
        for key, param in list(module._parameters.items()):
            if param is not None and id(param) not in block_ids and param.device != device:
                param.data = param.data.to(device)
        for key, buf in list(module._buffers.items()):
            if buf is not None and id(buf) not in block_ids and buf.device != device:
                module._buffers[key] = buf.to(device)


@contextlib.contextmanager
def onloaded(block: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """While active, `block`'s parameters and buffers live on `device`; afterwards they are back where they were
    (weights changed on the device, e.g. by GPTQ, come back changed)."""
    home = next(block.parameters()).device
    if home == device:
        yield block
        return
    block.to(device)
    try:
        yield block
    finally:
        block.to(home)
