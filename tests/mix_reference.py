"""The full-model autograd reference for the mixture search's streamed statistics (tests only).

`measure_source` takes the gradient of the mean next-token NLL over every block's linear weights and the Gram
matrix of every fused-group input from plain full-model forward/backward passes with hooks: what
`tasa_deploy.stream.stream_block_stats` computes block by block, and what the library did before it streamed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from tasa_deploy import UsageError
from tasa_deploy.capture import linear_input_hooks
from tasa_deploy.model import FUSED_GROUPS, block_prefix, decoder_blocks, quantizable_modules
from tasa_deploy.quant.gptq import accumulate_hessian, make_empty_hessian


@dataclass(frozen=True)
class SourceStats:
    """What one gradient pass over a token set yields."""

    block_grads: tuple[torch.Tensor, ...]  # per decoder block: its linear-weight gradients, flattened [P_b]
    grams: dict[str, torch.Tensor]  # per fused-group input, e.g. "model.layers.0.qkv": H = 2/n X^T X [K, K]
    loss: float  # mean next-token NLL over the set
    tokens: int  # tokens whose inputs went into the Gram matrices


def group_inputs(model: nn.Module) -> dict[str, nn.Linear]:
    """One linear per distinct layer input: the first member of each fused group, keyed by unit name."""
    modules = quantizable_modules(model)
    inputs = {}
    for index in range(len(decoder_blocks(model))):
        prefix = block_prefix(model, index)
        for group, members in FUSED_GROUPS.items():
            inputs[f"{prefix}.{group}"] = modules[f"{prefix}.{members[0]}"]
    return inputs


def block_weight_params(model: nn.Module) -> list[list[nn.Parameter]]:
    """Per decoder block, the weights of its quantizable linears (in execution order)."""
    modules = quantizable_modules(model)
    blocks = []
    for index in range(len(decoder_blocks(model))):
        prefix = block_prefix(model, index)
        blocks.append([m.weight for name, m in modules.items() if name.startswith(prefix + ".")])
    return blocks


def measure_source(model: nn.Module, tokens: torch.Tensor, batch_size: int = 4) -> SourceStats:
    """Gradient of the mean next-token NLL on `tokens` [n, T] w.r.t. every block's linear weights, and the
    Gram matrix of every fused-group input, from the same forward passes (micro-batches of `batch_size`)."""
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise UsageError(f"need a token batch [n >= 1, T >= 2]; got shape {tuple(tokens.shape)}")
    blocks = block_weight_params(model)
    grams: dict[str, tuple[torch.Tensor, int]] = {}

    def fold(name: str, x: torch.Tensor) -> None:
        hessian, seen = grams.get(name) or (make_empty_hessian(x.shape[-1]), 0)
        grams[name] = accumulate_hessian(hessian, seen, x)

    flags = {p: p.requires_grad for p in model.parameters()}
    wanted = {id(p) for params in blocks for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
        p.grad = None
    total_loss = 0.0
    try:
        with torch.enable_grad(), linear_input_hooks(group_inputs(model), fold):
            for start in range(0, tokens.shape[0], batch_size):
                chunk = tokens[start:start + batch_size]  # [b, T]
                share = chunk.shape[0] / tokens.shape[0]  # equal T: chunk means weighted by rows = overall mean
                loss = model(input_ids=chunk, labels=chunk, use_cache=False).loss
                (loss * share).backward()
                total_loss += loss.item() * share
        block_grads = tuple(torch.cat([p.grad.reshape(-1) for p in params]) for params in blocks)
    finally:
        for p, flag in flags.items():
            p.grad = None
            p.requires_grad_(flag)
    n_tokens = next(iter(grams.values()))[1]
    return SourceStats(block_grads, {name: h for name, (h, _) in grams.items()}, total_loss, n_tokens)


def mixture_gradient(gen: Sequence[torch.Tensor], task: Sequence[torch.Tensor], alpha: float) -> list[torch.Tensor]:
    """g_alpha = alpha g_gen + (1 - alpha) g_task per block: the gradient of L_alpha (gradients are linear)."""
    return [alpha * g + (1.0 - alpha) * t for g, t in zip(gen, task)]
