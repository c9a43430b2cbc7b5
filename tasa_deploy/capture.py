"""The one place with forward hooks: capturing block inputs and per-linear input statistics.

Everything that needs to look inside a running model (sequential GPTQ, Gram matrices for the mixture search,
gradients for alignment) goes through here, so stage code stays hook-free.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from tasa_deploy.model import decoder_blocks


class _StopForward(Exception):
    """Raised inside block 0's pre-hook: we have its inputs, the rest of the forward is not needed."""


@dataclass(frozen=True)
class BlockInputs:
    """The positional hidden states and keyword arguments one decoder block was called with (one batch)."""

    hidden_states: torch.Tensor  # [B, T, H]
    kwargs: dict  # attention mask, position ids / embeddings, ... exactly as the model passed them


@torch.no_grad()
def capture_first_block_inputs(model: nn.Module, token_batches: Iterable[torch.Tensor]) -> list[BlockInputs]:
    """Run the model up to decoder block 0 for each batch of token ids [B, T] and return block 0's inputs."""
    block0 = decoder_blocks(model)[0]
    captured: list[BlockInputs] = []

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kept = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
        kept["use_cache"] = False
        captured.append(BlockInputs(hidden.detach(), kept))
        raise _StopForward

    handle = block0.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for tokens in token_batches:
            with contextlib.suppress(_StopForward):
                model(input_ids=tokens, use_cache=False)
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, inputs: BlockInputs) -> torch.Tensor:
    """Call one decoder block on captured inputs; returns its output hidden states [B, T, H]."""
    out = block(inputs.hidden_states, **inputs.kwargs)
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def linear_input_hooks(modules: dict[str, nn.Linear],
                       on_input: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """While active, call `on_input(name, x)` with each named linear's input x [..., K] on every forward."""
    handles = []
    for name, module in modules.items():
        def hook(_module, args, _name=name):
            on_input(_name, args[0].detach())
        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
