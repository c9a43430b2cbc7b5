"""Sequential block-by-block GPTQ with a BitPlan (stage 4 of TASA).

Like llm-compressor's sequential pipeline: calibration tokens go through the embeddings once, capturing block 0's
hidden states and the keyword arguments the model gives each block (`capture.capture_block_inputs`: per-layer
masks and rope for Gemma-3's sliding/global layers); then for each block the inputs of block i come from the
already-quantized blocks < i, so errors are compensated downstream and peak memory is one block plus the
calibration activations, not the model twice. By default one calibration pass per
block collects every Hessian of the block (2 block passes in all, counting the output pass); with
`true_sequential` the fused groups are quantized in execution order (q/k/v, o, gate/up, down), each calibrated on
inputs that already see the quantized earlier groups (5 passes: better, and 2.5x slower on a CPU).

Resume and bounded memory: with a `resume_dir`, each block's quantized tensors are saved to
`resume_dir/block_XXX.safetensors` (atomically) as soon as the block is done, and dropped from memory: the result
is a `BlockFiles` mapping that reads a module back only when asked (the artifact writer streams them,
`safetensors_io`), so host memory does not grow with depth. A rerun with the same plan and calibration data
loads finished blocks, replays them to rebuild the activations, and continues; the result is byte-identical to an
uninterrupted run (CPU, deterministic ops). Without a `resume_dir` the tensors are returned in a dict.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from tasa_deploy import UsageError
from tasa_deploy.artifacts import BitPlan
from tasa_deploy.outputs import TAG, atomic_path
from tasa_deploy.device import onloaded, place_shell
from tasa_deploy.capture import BlockInputs, capture_block_inputs, linear_input_hooks, next_block_inputs, run_block
from tasa_deploy.model import FUSED_GROUPS, block_linears, block_prefix, decoder_blocks, quantizable_modules
from tasa_deploy.quant import QuantizedTensor, accumulate_hessian, make_empty_hessian, quantize_rtn, quantize_weight
from tasa_deploy.safetensors_io import LazyTensor, lazy_tensors

BlockCallback = Callable[[int, int, bool], None]  # (block index, total blocks, resumed?) -> None


@dataclass(frozen=True)
class GPTQSettings:
    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128
    batch_size: int = 8  # calibration rows per forward
    true_sequential: bool = False  # one calibration pass per fused group (4 per block) instead of one per block


@torch.no_grad()
def quantize_model(model: nn.Module, plan: BitPlan, calibration_tokens: torch.Tensor, *,
                   settings: GPTQSettings = GPTQSettings(), resume_dir: Path | None = None,
                   on_block: BlockCallback | None = None,
                   device: torch.device | None = None) -> Mapping[str, QuantizedTensor]:
    """Quantize every planned module of `model` in place (weights replaced by their dequantized values) and
    return the quantized tensors (on the host) by HF module name: a dict, or with `resume_dir` a `BlockFiles`
    reading them back from the per-block files. calibration_tokens: [n, T] int64.
    `device`: where blocks are worked on, one at a time (`device.onloaded`); default: where the model is."""
    _check_plan_covers_model(model, plan)
    device = device or next(model.parameters()).device
    place_shell(model, device)
    batches = [chunk.to(device) for chunk in calibration_tokens.split(settings.batch_size)]
    inputs = capture_block_inputs(model, batches)
    blocks = decoder_blocks(model)
    resume_key = _resume_key(plan, calibration_tokens, settings)
    quantized: dict[str, QuantizedTensor] = {}
    stored = BlockFiles()
    for index, block in enumerate(blocks):
        prefix = block_prefix(model, index)
        saved = _load_block(resume_dir, index, resume_key) if resume_dir else None
        with onloaded(block, device):
            if saved is None:
                block_result = {k: qt.to("cpu") for k, qt in _quantize_block(block, prefix, inputs, plan,
                                                                             settings).items()}
                if resume_dir:
                    _save_block(resume_dir, index, resume_key, block_result)
            else:
                block_result = saved
                _apply(block, prefix, block_result)
            if resume_dir:
                stored.add(_block_path(resume_dir, index), block_result)
            else:
                quantized.update(block_result)
            del block_result
            inputs = [next_block_inputs(block, x) for x in inputs]
        if on_block:
            on_block(index, len(blocks), saved is not None)
    return stored if resume_dir else quantized


class BlockFiles(Mapping[str, QuantizedTensor]):
    """Quantized modules kept in the per-block files GPTQ wrote: module name -> QuantizedTensor, each read from
    its file when asked; `index` (grid and shape per module) and `flat_tensors` (the stored tensors, for a
    streamed write) come without reading any tensor data."""

    def __init__(self) -> None:
        self._where: dict[str, Path] = {}  # module -> its block file
        self._keys: dict[str, tuple[str, ...]] = {}  # module -> its tensor names in the file
        self._index: dict[str, dict] = {}  # module -> QuantizedTensor.index_entry()

    def add(self, path: Path, tensors: Mapping[str, QuantizedTensor]) -> None:
        for name, qt in tensors.items():
            self._where[name] = path
            self._keys[name] = tuple(qt.tensors(name))
            self._index[name] = qt.index_entry()

    def __getitem__(self, name: str) -> QuantizedTensor:
        from safetensors import safe_open

        with safe_open(str(self._where[name]), "pt") as f:
            flat = {key: f.get_tensor(key) for key in self._keys[name]}
        meta = self._index[name]
        return QuantizedTensor.from_tensors(name, flat, meta["fmt"], meta["bits"], meta["group_size"],
                                            meta["symmetric"])

    def index(self) -> dict[str, dict]:
        return dict(self._index)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def flat_tensors(self) -> dict[str, LazyTensor]:
        out: dict[str, LazyTensor] = {}
        for name, path in self._where.items():
            out.update(lazy_tensors(path, self._keys[name]))
        return out


def _quantize_block(block: nn.Module, prefix: str, inputs: list[BlockInputs], plan: BitPlan,
                    settings: GPTQSettings) -> dict[str, QuantizedTensor]:
    linears = block_linears(block)
    planned = {name: linear for name, linear in linears.items() if f"{prefix}.{name}" in plan.modules}
    needs_hessian = any(plan.modules[f"{prefix}.{n}"].method != "rtn" for n in planned)
    groups = [tuple(n for n in g if n in planned) for g in FUSED_GROUPS.values()]
    if not settings.true_sequential:
        groups = [tuple(planned)]  # one pass: every Hessian sees the block's unquantized weights
    result: dict[str, QuantizedTensor] = {}
    for group in groups:
        members = {name: planned[name] for name in group}
        if not members:
            continue
        hessians = _collect_hessians(block, members, inputs) if needs_hessian else {}
        for name, linear in members.items():
            full_name = f"{prefix}.{name}"
            module_plan = plan.modules[full_name]
            weight = linear.weight.detach().float()  # [N, K]
            if module_plan.method == "rtn":
                qt = quantize_rtn(weight, module_plan.spec)
            else:
                qt, _ = quantize_weight(weight, hessians[name], module_plan.spec, damp=settings.damp,
                                        act_order=settings.act_order, block_size=settings.block_size)
            linear.weight.copy_(qt.dequantize(linear.weight.dtype))
            result[full_name] = qt
    return result


def shared_input_keys(names) -> dict[str, str]:
    """Module name -> the name of the first listed module reading the same input: q/k/v share one input, as
    do gate/up (`model.FUSED_GROUPS`), so they share one Hessian."""
    keys = {}
    for name in names:
        group = next((g for g in FUSED_GROUPS.values() if name in g), (name,))
        keys[name] = next(n for n in names if n in group)
    return keys


def _collect_hessians(block: nn.Module, members: dict[str, nn.Linear],
                      inputs: list[BlockInputs]) -> dict[str, torch.Tensor]:
    """Run the block over all calibration inputs and accumulate each member's input Hessian [K, K]; members
    that read the same input get the same tensor (one accumulation, one copy in memory)."""
    keys = shared_input_keys(list(members))
    readers = {key: members[key] for key in set(keys.values())}
    state = {name: (make_empty_hessian(linear.in_features, linear.weight.device), 0)
             for name, linear in readers.items()}

    def on_input(name: str, x: torch.Tensor) -> None:
        hessian, n_seen = state[name]
        state[name] = accumulate_hessian(hessian, n_seen, x)

    with linear_input_hooks(readers, on_input):
        for x in inputs:
            run_block(block, x)
    return {name: state[key][0] for name, key in keys.items()}


def _apply(block: nn.Module, prefix: str, tensors: dict[str, QuantizedTensor]) -> None:
    linears = block_linears(block)
    for full_name, qt in tensors.items():
        linear = linears[full_name[len(prefix) + 1:]]
        linear.weight.copy_(qt.to(linear.weight.device).dequantize(linear.weight.dtype))


def _check_plan_covers_model(model: nn.Module, plan: BitPlan) -> None:
    unknown = sorted(set(plan.modules) - set(quantizable_modules(model)))
    if unknown:
        raise UsageError(f"plan names modules this model does not have (e.g. {unknown[0]}); "
                         "was it made for another model?")


# ------------------------------------------------------------------------------------------------- resume
def _resume_key(plan: BitPlan, tokens: torch.Tensor, settings: GPTQSettings) -> str:
    digest = hashlib.sha256(json.dumps(plan.to_json(), sort_keys=True).encode())
    digest.update(tokens.contiguous().numpy().tobytes())
    digest.update(json.dumps(settings.__dict__, sort_keys=True).encode())
    return digest.hexdigest()


def _save_block(resume_dir: Path, index: int, key: str, tensors: dict[str, QuantizedTensor]) -> None:
    from safetensors.torch import save_file

    flat, meta = {}, {"resume_key": key, "writer": TAG}
    for name, qt in tensors.items():
        flat.update({k: v.contiguous() for k, v in qt.tensors(name).items()})
        meta[name] = json.dumps([qt.fmt, qt.bits, qt.group_size, qt.symmetric])
    resume_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(_block_path(resume_dir, index), force=True) as tmp:
        save_file(flat, str(tmp), metadata=meta)


def _block_path(resume_dir: Path, index: int) -> Path:
    return resume_dir / f"block_{index:03d}.safetensors"


def _load_block(resume_dir: Path, index: int, key: str) -> dict[str, QuantizedTensor] | None:
    from safetensors import safe_open

    path = _block_path(resume_dir, index)
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("resume_key") != key:
            return None  # made with another plan / data / settings: redo this block
        flat = {k: f.get_tensor(k) for k in f.keys()}
    out = {}
    for name, value in meta.items():
        if name in ("resume_key", "writer"):
            continue
        try:
            fmt, bits, group, sym = json.loads(value)
            out[name] = QuantizedTensor.from_tensors(name, flat, fmt, bits, group, sym)
        except (UsageError, ValueError, TypeError):
            return None  # a damaged checkpoint is a cache miss: redo this block
    return out
