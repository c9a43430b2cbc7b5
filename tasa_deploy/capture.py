"""The one place with forward hooks: capturing block inputs and per-linear input statistics.

Everything that needs to look inside a running model (sequential GPTQ, Gram matrices for the mixture search,
gradients for alignment) goes through here, so stage code stays hook-free.

Block inputs: the model's own forward builds what every decoder block receives besides the hidden states
(attention mask, position ids, rotary cos/sin) and may give each block different values: Gemma-3 alternates
sliding-window and global attention layers, each type with its own mask and its own rope base (transformers'
Gemma3TextModel.forward picks `causal_mask_mapping[layer_types[i]]` and `position_embeddings[layer_types[i]]`
for layer i); Qwen2 with `use_sliding_window` does the same for its masks. `capture_block_inputs` therefore
records the keyword arguments of EVERY block during one forward in which the blocks are temporarily replaced
by recorders (so no block computes anything), and replaying block i uses block i's own arguments. Blocks that
receive the same tensors (all of them for Llama) share them: the capture costs the embedding lookup plus the
mask and rope construction, whatever the depth.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from tasa_deploy import TasaError
from tasa_deploy.model import decoder_blocks


class _StopForward(Exception):
    """Raised by the last block's recorder: every block's inputs are captured, the rest is not needed."""


@dataclass(frozen=True)
class BlockInputs:
    """The inputs of decoder block `layer` for one batch, plus the keyword arguments of every block."""

    hidden_states: torch.Tensor  # [B, T, H]
    layer: int  # the block these hidden states go into
    block_kwargs: tuple[dict, ...]  # per block: attention mask, position ids / embeddings, ... as the model passed them

    @property
    def kwargs(self) -> dict:
        """Keyword arguments of block `layer`."""
        return self.block_kwargs[self.layer]


class _KwargsRecorder(nn.Module):
    """Stands in for one decoder block during capture: records its call, returns the hidden states unchanged.
    Attributes the model's forward may read off a block (e.g. `attention_type`) come from the real block."""

    def __init__(self, block: nn.Module, on_call: Callable[[tuple, dict], None]):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: the recorder owns no parameters
        object.__setattr__(self, "_on_call", on_call)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, *args, **kwargs):
        self._on_call(args, kwargs)
        return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def _recording_blocks(blocks: nn.ModuleList, calls: list[tuple[tuple, dict]]) -> Iterator[None]:
    """While active, `blocks[i]` is a recorder appending (args, kwargs) to `calls`; the last one stops the forward."""
    originals = list(blocks)

    def record(args, kwargs):
        calls.append((args, kwargs))
        if len(calls) == len(originals):
            raise _StopForward

    try:
        for index, block in enumerate(originals):
            blocks[index] = _KwargsRecorder(block, record)
        yield
    finally:
        for index, block in enumerate(originals):
            blocks[index] = block


def _replay_kwargs(kwargs: dict) -> dict:
    """A block's captured kwargs without the cache (replay is cache-free), with use_cache=False."""
    kept = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
    kept["use_cache"] = False
    return kept


@torch.no_grad()
def capture_block_inputs(model: nn.Module, token_batches: Iterable[torch.Tensor]) -> list[BlockInputs]:
    """For each batch of token ids [B, T]: block 0's hidden states and every block's keyword arguments,
    exactly as the model's forward passes them (one forward per batch in which no block runs)."""
    blocks = decoder_blocks(model)
    captured: list[BlockInputs] = []
    for tokens in token_batches:
        calls: list[tuple[tuple, dict]] = []
        with _recording_blocks(blocks, calls), contextlib.suppress(_StopForward):
            model(input_ids=tokens, use_cache=False)
        if len(calls) != len(blocks):
            raise TasaError(f"the model's forward called {len(calls)} of its {len(blocks)} decoder blocks")
        args, kwargs = calls[0]
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.append(BlockInputs(hidden.detach(), 0, tuple(_replay_kwargs(kw) for _, kw in calls)))
    return captured


def run_block(block: nn.Module, inputs: BlockInputs) -> torch.Tensor:
    """Call decoder block `inputs.layer` on its captured inputs; returns its output hidden states [B, T, H]."""
    layer_idx = getattr(getattr(block, "self_attn", None), "layer_idx", None)
    if layer_idx is not None and layer_idx != inputs.layer:
        raise TasaError(f"block {layer_idx} called with the inputs of block {inputs.layer}")
    out = block(inputs.hidden_states, **inputs.kwargs)
    return out[0] if isinstance(out, tuple) else out


def next_block_inputs(block: nn.Module, inputs: BlockInputs) -> BlockInputs:
    """Run block `inputs.layer` and return the inputs of the block after it."""
    return BlockInputs(run_block(block, inputs), inputs.layer + 1, inputs.block_kwargs)


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
