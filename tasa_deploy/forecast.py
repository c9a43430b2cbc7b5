"""What a quantize run will cost and produce, before any work: memory per stage and the file it writes.

`quantize --dry-run` prints this and stops; every real run checks the same memory figures up front
(`check_request_memory`) and refuses when they do not fit. Memory comes from `resources.estimate_stages` (weights
at the run's dtype + interpreter overhead + the stage's working memory); the file from `sizes.file_layout`
(the parts the plan does not choose) plus the linear layers' bits:
  - a plan given with --plan, or a uniform width: exact (`bits.plan_total_bits` of that plan);
  - TASA with --bits B: B x the linear weights (the allocator meets the budget from below);
  - TASA with --size S: S (the allocator is given S minus the fixed parts, `linear_budget_bytes`).
Only the config and tokenizer files are read (the model is built on the meta device), so a dry run of an 8B or
70B model takes seconds on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from tasa_deploy import UsageError
from tasa_deploy.device import resolve_device, resolve_dtype
from tasa_deploy.resources import GIB, OVERHEAD, StageEstimate, check_memory, estimate_stages, weights_bytes
from tasa_deploy.sizes import FileLayout, file_layout, human, parse_size


@dataclass(frozen=True)
class Forecast:
    """A dry run's predictions (bytes)."""

    weights: int  # the model's weights on the host at the run's dtype
    stages: Mapping[str, StageEstimate]
    layout: FileLayout  # the export of the run's --target
    linear_bits: int  # predicted storage bits of the quantized linears
    exact: bool  # linear_bits is the plan's own (uniform / --plan) rather than the budget

    @property
    def peak_host(self) -> int:
        return self.weights + OVERHEAD + max(e.total for e in self.stages.values())

    @property
    def file_bytes(self) -> int:
        return self.layout.file_bytes(self.linear_bits)

    @property
    def linear_bpw(self) -> float:
        return self.linear_bits / max(self.layout.linear_weights, 1)

    def rows(self) -> list[dict]:
        """One row per stage, then the whole run and the file, for the CLI table."""
        rows = [{"item": f"{name} memory", "predicted": f"{(self.weights + OVERHEAD + e.total) / GIB:.2f} GiB",
                 "detail": f"weights {self.weights / GIB:.2f} + overhead {OVERHEAD / GIB:.2f} + working "
                           f"{e.total / GIB:.2f} (mostly {e.largest})"} for name, e in self.stages.items()]
        rows.append({"item": "peak host memory", "predicted": f"{self.peak_host / GIB:.2f} GiB", "detail": "largest stage"})
        rows.append({"item": f"{self.layout.format} file", "predicted": human(self.file_bytes),
                     "detail": f"{self.file_bytes:,} bytes: linear layers {self.linear_bpw:.3f} bpw "
                               f"({'exact' if self.exact else 'at the budget'}) + "
                               + ", ".join(f"{k} {human(v)}" for k, v in self.layout.parts.items())})
        return rows


def request_stages(request, config) -> dict[str, StageEstimate]:
    """The stages `request` runs, estimated for `config` (TASA: mix, profile, GPTQ; a uniform or given plan:
    GPTQ only)."""
    stages = estimate_stages(config, calib_rows=request.calib_samples, seq_len=request.seq_len,
                             mix_rows=request.mix_samples, mix_seq_len=request.probe_seq_len * 2,
                             probe_rows=request.max_probe_samples if request.probe_snr else request.probe_samples,
                             probe_seq_len=request.probe_seq_len, objectives=len(request.objectives),
                             weight_bytes=_element_size(request))
    if request.method != "tasa" or request.plan_path is not None:
        stages = {"gptq": stages["gptq"]}
    return stages


def check_request_memory(request, config=None) -> None:
    """Refuse (TasaError, with the estimate and the knob) a run whose hungriest stage does not fit."""
    from tasa_deploy.model import check_architecture, load_config, resolve_model_dir

    config = config if config is not None else load_config(resolve_model_dir(request.model), request.model)
    check_architecture(config)
    check_memory(weights_bytes(config, _element_size(request)), request_stages(request, config))


def linear_budget_bytes(request, model_dir, config) -> int | None:
    """The linear layers' share of --size (None without --size)."""
    if request.size is None:
        return None
    layout = file_layout(model_dir, config, request.target)
    budget = layout.linear_budget_bytes(parse_size(request.size))
    bpw = 8 * budget / layout.linear_weights
    if bpw < min(request.widths):
        raise UsageError(f"--size {request.size} leaves {bpw:.2f} bits per weight for the linear layers (the rest of "
                         f"the file is {human(layout.fixed_bytes)}), below the narrowest candidate width "
                         f"{min(request.widths)}; raise --size or add a narrower --candidates width")
    return budget


def forecast(request) -> Forecast:
    """Predict `request`'s memory and output file from its model's config and tokenizer files alone."""
    from tasa_deploy.artifacts import BitPlan
    from tasa_deploy.bits import plan_total_bits
    from tasa_deploy.model import check_architecture, load_config, resolve_model_dir
    from tasa_deploy.sizes import meta_parameters

    model_dir = resolve_model_dir(request.model)
    config = load_config(model_dir, request.model)
    check_architecture(config)
    layout = file_layout(model_dir, config, request.target)
    shapes = meta_parameters(config)[1]
    exact = request.plan_path is not None or request.method == "uniform"
    if request.plan_path is not None:
        linear_bits = plan_total_bits(BitPlan.load(request.plan_path), shapes)
    elif request.method == "uniform":
        linear_bits = plan_total_bits(_uniform_plan(request, config), shapes)
    elif request.size is not None:
        linear_bits = 8 * linear_budget_bytes(request, model_dir, config)
    else:
        linear_bits = int(request.bits * layout.linear_weights)
    return Forecast(weights_bytes(config, _element_size(request)), request_stages(request, config), layout,
                    int(linear_bits), exact)


def _uniform_plan(request, config):
    from transformers import AutoModelForCausalLM

    from tasa_deploy.fixed_plans import uniform_plan

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return uniform_plan(model, "dry-run", int(request.bits), request.target, group_size=request.group_size,
                        symmetric=request.symmetric, method=request.quantizer)


def _element_size(request) -> int:
    return torch.empty(0, dtype=resolve_dtype(request.dtype, resolve_device(request.device))).element_size()
