"""Block-streamed gradients and input Gram matrices for several token sets, one decoder block at a time.

The mixture search needs, per decoder block, the weight gradient of the mean next-token loss on each source
(general, task, probe) and the Gram matrix of each fused-group input on each source. Holding them for the
whole model costs 3 x (parameters + Grams): ~242 GB at Llama-3-8B. Instead:

1. Forward: each source's micro-batches run block by block (blocks onloaded one at a time, no autograd),
   keeping only the block-boundary hidden states (activation checkpoints at block granularity; they spill to
   a temporary directory when they would not fit `memory_budget`).
2. Head: the loss and its gradient w.r.t. the last hidden states, logits formed 512 positions at a time.
3. Backward walk, last block first: block i is recomputed from its stored input with autograd on (only that
   block's graph exists) for every source and micro-batch in lockstep, giving the block's weight gradient
   per source, the gradient w.r.t. its input (the next step's output gradient) and, from the same
   recomputation, the Gram matrices of its inputs. The caller receives one `BlockStats` per block, reduces it
   to scalars and drops it.

Memory: the boundary states (or none, when spilled) + one block with its gradients and Grams for each source,
flat in depth. The gradients equal full-model autograd up to float rounding (tested).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from tasa_deploy import UsageError
from tasa_deploy.capture import BlockInputs, capture_block_inputs, linear_input_hooks, run_block
from tasa_deploy.device import onloaded, place_shell
from tasa_deploy.model import FUSED_GROUPS, block_linears, decoder_blocks, final_norm
from tasa_deploy.moments import InputHessian

HEAD_CHUNK = 512  # positions whose logits exist at once


@dataclass
class BlockStats:
    """One block's statistics for every source (handed to the caller, then dropped)."""

    index: int
    grads: dict[str, torch.Tensor]  # source -> the block's quantizable-weight gradient, flattened [P_b], fp32
    grams: dict[str, dict[str, InputHessian]]  # source -> fused group ('qkv', 'o', 'gate_up', 'down') -> H,
    #   as its rows while the source has at most K tokens, else the K x K matrix (`moments.InputHessian`)


class _Stash:
    """Block-boundary states by key, in memory or spilled to a temporary directory (our own files only)."""

    def __init__(self, spill: bool):
        self.dir = Path(tempfile.mkdtemp(prefix="tasa-stream-")) if spill else None
        self.items: dict[tuple, torch.Tensor | Path] = {}

    def put(self, key: tuple, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu")
        if self.dir is None:
            self.items[key] = tensor
        else:
            path = self.dir / ("_".join(map(str, key)) + ".pt")
            torch.save(tensor, path)
            self.items[key] = path

    def pop(self, key: tuple) -> torch.Tensor:
        item = self.items.pop(key)
        if isinstance(item, Path):
            tensor = torch.load(item, weights_only=True)
            item.unlink()
            return tensor
        return item

    def close(self) -> None:
        self.items.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def _head_loss_grad(model: nn.Module, hidden: torch.Tensor, tokens: torch.Tensor,
                    share: float) -> tuple[float, torch.Tensor]:
    """Mean next-token NLL of `tokens` [B, T] from the last block's output [B, T, H], and d(share x loss)/d hidden."""
    from tasa_deploy.objectives import output_logits_fn

    norm, logits_fn = final_norm(model), output_logits_fn(model)
    hidden = hidden.detach().requires_grad_(True)
    with torch.enable_grad():
        states = norm(hidden)[:, :-1].reshape(-1, hidden.shape[-1])  # [P, H]
        targets = tokens[:, 1:].reshape(-1).to(hidden.device)  # [P]
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, states.shape[0], HEAD_CHUNK):
            logits = logits_fn(states[start:start + HEAD_CHUNK]).float()  # [c, V]
            total = total + F.cross_entropy(logits, targets[start:start + HEAD_CHUNK], reduction="sum")
        loss = total / states.shape[0]
        (grad,) = torch.autograd.grad(loss * share, hidden)
    return float(loss), grad


def stream_block_stats(model: nn.Module, sources: dict[str, torch.Tensor], *, batch_size: int = 4,
                       device: torch.device | None = None, memory_budget: int = 2 * 1024**3,
                       losses: dict[str, float] | None = None) -> Iterator[BlockStats]:
    """Yield `BlockStats` for blocks L-1 .. 0 over token sets `sources` {name: [n, T]}. `losses`, when given,
    is filled with each source's mean next-token NLL before the first block is yielded."""
    for name, tokens in sources.items():
        if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
            raise UsageError(f"need a token batch [n >= 1, T >= 2] for '{name}'; got shape {tuple(tokens.shape)}")
    blocks = decoder_blocks(model)
    device = device or next(model.parameters()).device
    place_shell(model, device)
    hidden_size = model.config.hidden_size
    boundary_bytes = sum(t.numel() for t in sources.values()) * hidden_size * 4 * (len(blocks) + 1)
    stash = _Stash(spill=boundary_bytes > memory_budget)
    try:
        kwargs, out_grads = _forward_all(model, sources, batch_size, device, stash, losses)
        for index in reversed(range(len(blocks))):
            with onloaded(blocks[index], device) as block:
                yield _walk_block(block, index, kwargs, out_grads, stash, device)
    finally:
        stash.close()


@torch.no_grad()
def _forward_all(model, sources, batch_size, device, stash, losses):
    """Run every micro-batch through all blocks, stashing each block's input and the final states; returns the
    per-micro-batch block kwargs and the head gradients (the last block's output gradients)."""
    blocks = decoder_blocks(model)
    kwargs: dict[tuple, tuple] = {}
    out_grads: dict[tuple, torch.Tensor] = {}
    batches = {(name, i): chunk for name, tokens in sources.items()
               for i, chunk in enumerate(tokens.split(batch_size))}
    inputs = {key: capture_block_inputs(model, [chunk.to(device)])[0] for key, chunk in batches.items()}
    for key, x in inputs.items():
        kwargs[key] = x.block_kwargs
        stash.put((*key, 0), x.hidden_states)
    for index, block in enumerate(blocks):
        with onloaded(block, device):
            for key in batches:
                x = BlockInputs(inputs[key].hidden_states, index, kwargs[key])
                inputs[key] = BlockInputs(run_block(block, x), index + 1, kwargs[key])
                stash.put((*key, index + 1), inputs[key].hidden_states)
    totals = dict.fromkeys(sources, 0.0)
    for (source, i), chunk in batches.items():
        share = chunk.shape[0] / sources[source].shape[0]  # equal T: micro-batch means weighted by rows
        hidden = stash.pop((source, i, len(blocks))).to(device)
        loss, out_grads[(source, i)] = _head_loss_grad(model, hidden, chunk, share)
        totals[source] += loss * share
    if losses is not None:
        losses.update(totals)
    return kwargs, out_grads


def _walk_block(block: nn.Module, index: int, kwargs: dict, out_grads: dict, stash: _Stash,
                device: torch.device) -> BlockStats:
    """Recompute block `index` per micro-batch with autograd: weight gradients, input gradients, input Grams."""
    linears = block_linears(block)
    weights = [linear.weight for linear in linears.values()]
    readers = {group: linears[members[0]] for group, members in FUSED_GROUPS.items()}
    grads: dict[str, torch.Tensor] = {}
    grams: dict[str, dict[str, InputHessian]] = {}
    current = {}

    def fold(group: str, x: torch.Tensor) -> None:
        per_source = grams.setdefault(current["source"], {})
        per_source.setdefault(group, InputHessian(x.shape[-1])).add(x)

    flags = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    try:
        with linear_input_hooks(readers, fold), torch.enable_grad():
            for key in list(out_grads):
                current["source"] = key[0]
                x = stash.pop((*key, index)).to(device).requires_grad_(True)
                out = run_block(block, BlockInputs(x, index, kwargs[key]))
                g_x, *g_w = torch.autograd.grad(out, [x, *weights], grad_outputs=out_grads[key])
                flat = torch.cat([g.reshape(-1).float() for g in g_w])
                grads[key[0]] = grads[key[0]] + flat if key[0] in grads else flat
                out_grads[key] = g_x.detach()
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
    return BlockStats(index, grads, grams)
