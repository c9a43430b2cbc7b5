"""TASA stage 2: per-block and per-unit RTN sensitivity for every objective -> `profile.json`.

Method (TASA, arXiv 2607.00908, sensitivity analysis; RTN on purpose, as the paper does):
  1. Encode each objective's probe rows (`tasa_deploy.objectives`) and run the model's embeddings once
     (`capture.capture_block_inputs`); keep block 0's inputs h_0 for every probe batch, with the keyword
     arguments (mask, rope) the model gives each block, so a replayed block l sees exactly its own.
  2. Baseline: run blocks 0..L-1 from h_0, final norm + lm_head on the scored positions only, and reduce
     each objective's loss per probe row (`objectives.RowLosses`). All objectives come out of the same
     forward. KL objectives ("kl:math") keep the unquantized final states at their scored positions here:
     their per-token loss is KL(unquantized || quantized), 0 at the baseline.
  3. For block l (holding its full-precision inputs h_l): RTN-fake-quantize all its linears at the probe
     width (int `probe_bits`, group = default_group_size(K)), run blocks l..L-1 from h_l, record per
     objective the paired per-row changes, the block delta and its standard error (`stats.paired_ratio_delta`),
     restore the weights. Then run block l in full precision to get h_{l+1}; during that pass
     `capture.linear_input_hooks` accumulates each objective's input Gram matrix H_k = X^T X / n over real
     (non-pad) tokens of its probe sequences, one per distinct linear input (q/k/v share one, gate/up share
     one). Layer l costs about (L - l) / L of a full forward.
  4. Per-unit costs without a tail forward per (unit, width) (too slow on CPU): for each unit u of block l,
     RTN-quantize u ALONE at the probe width and run block l once more on its inputs h_l; B_k(u) is the
     block-output error sum_t ||dy_t||^2 / ||y_t||^2 over objective k's real tokens (relative per token, as
     the next block's RMSNorm sees it). Within a unit, widths are related by the output-error energy
        E_k(u, c)       = sum over modules m in u of tr(dW_m H_k dW_m^T),  dW = W - RTN_c(W)
        error_k(u, c)   = shrunk_k(l) * B_k(u) / sum_{u' in l} B_k(u') * E_k(u, c) / E_k(u, probe spec)
     i.e. the block's measured delta is split over its units by their error in the residual stream they all
     write to, and extrapolated to other widths of the same unit by the energy ratio. shrunk_k is
     `stats.shrink` of the objective's block deltas with their standard errors (a noisy block moves toward the
     objective's mean instead of being clipped; an all-noise objective becomes flat). tr(dW H dW^T) =
     sum(H * dW^T dW), so dW^T dW [K, K] is formed once per (module, candidate) and shared by all objectives.
     Splitting by E_k alone mispriced o/down 20-40x against measured single-unit costs
     (benchmarks/unit_costs.py); the extra block passes cost (units per block) / ((L - l) + 1) of a layer.
     Units, energies and shares: `tasa_deploy.units`.
Units: target "vllm" -> one unit per fused group (model.FUSED_GROUPS: qkv, o, gate_up, down), named
f"{block_prefix}.{group}", candidates int{b}g{default_group_size(K)} for b in `candidate_bits`;
target "gguf" -> one unit per module (full HF name), candidates = GGML types its row fits (bits.gguf_candidates).

Cache and resume: after each block a partial JSON (settings, settings hash, baselines, per-layer results) is
written atomically. The hash covers the model fingerprint, the settings and the exact probe tokens, so a rerun
with the same (model, data, settings) returns the cached profile, and an interrupted run resumes at the next
block N (recomputing h_N by running blocks 0..N-1 in full precision); a state file written for anything else
is reported and overwritten (it is a cache, not an output). Everything is deterministic and the final profile
is always built from the JSON-shaped state, so a resumed profile is byte-identical to an uninterrupted one.

Cost: see `measure_profile`; it scales with (probe tokens) x (L + 1) / 2 full forwards.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from tasa_deploy import UsageError
from tasa_deploy.artifacts import PLAN_TARGETS, SensitivityProfile, UnitSensitivity, read_json, write_json_atomic
from tasa_deploy.device import onloaded, place_shell
from tasa_deploy.moments import SecondMoment
from tasa_deploy.capture import BlockInputs, capture_block_inputs, linear_input_hooks, next_block_inputs
from tasa_deploy.model import SHARED_INPUT, block_linears, cache_root, decoder_blocks, final_norm, model_fingerprint
from tasa_deploy.objectives import (ProbeSet, RowLosses, get_objective, load_probe_set, output_logits_fn,
                                    reduce_probe, scored_loss_sums, scored_states)
from tasa_deploy.quant.rtn import fake_quantize_rtn
from tasa_deploy.stats import SHRINKAGE_RULE, ratio_mean_se, shrink
from tasa_deploy.units import UNIT_ERROR_PROXY, UnitLayout, block_units, layer_unit_shares, probe_spec

PARTIAL_SCHEMA = "tasa-profile-partial/2"


# ----------------------------------------------------------------------------------------- settings
def profile_settings(*, objectives: Sequence[str] = ("ppl", "math", "arc"), target: str = "vllm",
                     probe_bits: int = 3, candidate_bits: Iterable[int] = (3, 4, 8), n_probe: int = 32,
                     seq_len: int = 256, seed: int = 0, gguf_types: Iterable[str] | None = None) -> dict:
    """The validated settings that, with the model and the probe data, key the profile cache."""
    if not objectives:
        raise UsageError("no objectives given; name at least one (e.g. ppl, math, code, kl:math)")
    for name in objectives:
        get_objective(name)  # an unknown name is a UsageError listing the known ones
    if target not in PLAN_TARGETS:
        raise UsageError(f"unknown target '{target}'; choose one of {', '.join(PLAN_TARGETS)}")
    bits = sorted(set(int(b) for b in candidate_bits))
    if not bits or any(not 2 <= b <= 8 for b in bits) or not 2 <= probe_bits <= 8:
        raise UsageError(f"widths must be in 2..8 (probe {probe_bits}, candidates {bits})")
    if n_probe < 2 or seq_len < 8:
        raise UsageError(f"need n_probe >= 2 (a standard error needs two rows) and seq_len >= 8 "
                         f"(got {n_probe}, {seq_len})")
    return {"objectives": list(objectives), "target": target, "probe_bits": int(probe_bits),
            "probe_group": "default_group_size(K)",
            # a GGUF profile measures every GGML type in gguf_types that a row fits, whatever widths a plan will
            # later draw from, so the widths key only vLLM profiles (`quantize --candidates` then reuses a GGUF one)
            "candidate_bits": bits if target == "vllm" else None,
            "gguf_types": sorted(gguf_types) if gguf_types is not None else None,
            "n_probe": int(n_probe), "seq_len": int(seq_len), "seed": int(seed), "method": "rtn",
            "unit_error_proxy": UNIT_ERROR_PROXY, "shrinkage": SHRINKAGE_RULE}


def settings_hash(fingerprint: str, settings: dict, probes: dict[str, ProbeSet]) -> str:
    key = {"model": fingerprint, "settings": settings, "probe": {k: p.digest() for k, p in probes.items()}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def default_partial_path(hash_hex: str) -> Path:
    """Where the profile for one (model, data, settings) hash is cached: $TASA_CACHE/profiles/<hash>.json."""
    return cache_root() / "profiles" / f"{hash_hex[:24]}.json"


# ----------------------------------------------------------------------------------------- forwards
@torch.no_grad()
def tail_losses(model: nn.Module, start: int, hidden: Sequence[BlockInputs], batches: Sequence[tuple[str, int]],
                probes: dict[str, ProbeSet], references: Sequence[torch.Tensor | None] | None = None
                ) -> tuple[dict[str, RowLosses], list[torch.Tensor | None]]:
    """Every objective's per-row losses from running blocks start..L-1 on the block-`start` inputs of each batch.

    `batches[i] = (objective, batch index)` names the probe batch whose inputs are hidden[i]. KL objectives
    score against references[i], the unquantized model's `scored_states` of batch i; with references None
    (the unquantized baseline) their losses are 0 by definition and the states are returned to be those
    references (second value; None for the other objectives' batches).
    """
    blocks, norm, logits_fn = decoder_blocks(model), final_norm(model), output_logits_fn(model)
    sums: dict[str, list[torch.Tensor]] = {name: [] for name in probes}
    kept: list[torch.Tensor | None] = []
    current = list(hidden)
    for block in blocks[start:]:  # block-outer: each block is onloaded once for all batches
        with onloaded(block, current[0].hidden_states.device):
            current = [next_block_inputs(block, inputs) for inputs in current]
    for i, (inputs, (name, index)) in enumerate(zip(current, batches, strict=True)):
        states = norm(inputs.hidden_states)  # [B, T, H]
        batch = probes[name].batches[index]
        kl = get_objective(name).score == "kl"
        kept.append(scored_states(states, batch) if kl and references is None else None)
        if kl and references is None:
            sums[name].append(torch.zeros(batch.tokens.shape[0], dtype=torch.float64))
        else:
            sums[name].append(scored_loss_sums(logits_fn, states, batch, references[i] if kl else None))
    return {name: reduce_probe(probes[name], sums[name]) for name in probes}, kept


@torch.no_grad()
def advance_block(block: nn.Module, hidden: Sequence[BlockInputs], batches: Sequence[tuple[str, int]],
                  probes: dict[str, ProbeSet]) -> tuple[list[BlockInputs], dict[str, dict[str, torch.Tensor]]]:
    """Run one full-precision block on every batch: its outputs, and per objective the second moment
    H = X^T X / n of each distinct linear input over real tokens (keyed by the reading module; `SecondMoment`
    keeps it as rows while there are fewer than K)."""
    readers = {name: linear for name, linear in block_linears(block).items() if name not in SHARED_INPUT}
    grams = {obj: {name: SecondMoment(linear.in_features) for name, linear in readers.items()} for obj in probes}
    current: dict = {}

    def accumulate(name: str, x: torch.Tensor) -> None:
        grams[current["objective"]][name].add(x[current["mask"]])  # [n, K] real tokens

    outputs = []
    with linear_input_hooks(readers, accumulate), onloaded(block, hidden[0].hidden_states.device):
        for inputs, (name, index) in zip(hidden, batches, strict=True):
            current.update(objective=name, mask=probes[name].batches[index].token_mask)
            outputs.append(next_block_inputs(block, inputs))
    return outputs, grams


def _replace_weights(block: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Swap in new weights for the named linears; returns the old ones (to restore)."""
    linears = block_linears(block)
    old = {}
    for name, weight in weights.items():
        old[name] = linears[name].weight.data
        linears[name].weight.data = weight
    return old


@torch.no_grad()
def quantized_block_losses(model: nn.Module, layer: int, probe_bits: int, hidden: Sequence[BlockInputs],
                           batches: Sequence[tuple[str, int]], probes: dict[str, ProbeSet],
                           references: Sequence[torch.Tensor | None]) -> dict[str, RowLosses]:
    """Objective losses with only block `layer` RTN-fake-quantized at the probe width (weights restored after)."""
    block = decoder_blocks(model)[layer]
    with onloaded(block, hidden[0].hidden_states.device):
        fake = {name: fake_quantize_rtn(linear.weight.data, probe_spec(linear.in_features, probe_bits))
                for name, linear in block_linears(block).items()}
        original = _replace_weights(block, fake)
        try:
            return tail_losses(model, layer, hidden, batches, probes, references)[0]
        finally:
            _replace_weights(block, original)


@torch.no_grad()
def unit_output_errors(block: nn.Module, units: Sequence[UnitLayout], probe_bits: int,
                       hidden: Sequence[BlockInputs], outputs: Sequence[BlockInputs],
                       batches: Sequence[tuple[str, int]], probes: dict[str, ProbeSet]) -> list[dict[str, float]]:
    """B_k(u) per unit (step 4): sum over objective k's real tokens of ||dy_t||^2 / ||y_t||^2, y = the block's
    full-precision outputs, dy the change with only u's modules RTN-quantized at the probe width."""
    linears = block_linears(block)
    errors = []
    with onloaded(block, hidden[0].hidden_states.device):
        for unit in units:
            spec = probe_spec(unit.in_features, probe_bits)
            original = _replace_weights(block, {m: fake_quantize_rtn(linears[m].weight.data, spec)
                                                for m in unit.modules})
            try:
                per = dict.fromkeys(probes, 0.0)
                for inputs, reference, (name, index) in zip(hidden, outputs, batches, strict=True):
                    mask = probes[name].batches[index].token_mask.to(reference.hidden_states.device)
                    y = reference.hidden_states[mask].double()  # [n, H] real tokens
                    dy = next_block_inputs(block, inputs).hidden_states[mask].double() - y
                    per[name] += float((dy.pow(2).sum(-1) / y.pow(2).sum(-1).clamp_min(1e-30)).sum())
            finally:
                _replace_weights(block, original)
            errors.append(per)
    return errors


def layer_record(layer: int, baseline: dict[str, dict], losses: dict[str, RowLosses], units: list[dict]) -> dict:
    """One block's JSON state: per objective its delta, standard error and per-row paired deltas."""
    record = {"layer": layer, "deltas": {}, "se": {}, "row_deltas": {}, "units": units}
    for obj, rows in losses.items():
        diffs = [n - b for n, b in zip(rows.num.tolist(), baseline[obj]["num"], strict=True)]
        record["deltas"][obj], record["se"][obj] = ratio_mean_se(diffs, baseline[obj]["den"])
        record["row_deltas"][obj] = diffs
    return record


# ----------------------------------------------------------------------------------------- state + driver
def _load_state(path: Path, digest: str) -> tuple[dict | None, str]:
    """The partial/complete state at `path` if it was written for this model, data and settings.

    A state for anything else is reported (second value) and ignored: it is a cache, and the new run
    overwrites it. An unreadable file is a UsageError (read_json names it)."""
    if not path.is_file():
        return None, ""
    state = read_json(path, "partial profile")
    if state.get("schema") != PARTIAL_SCHEMA or state.get("settings_hash") != digest:
        return None, f"{path} holds a profile for another model, probe data or settings; starting over"
    return state, ""


def _probe_summary(probes: dict[str, ProbeSet]) -> dict:
    return {name: {"sources": list(get_objective(name).sources), "rows": probe.n_rows,
                   "sequences": probe.n_sequences, "tokens": probe.n_tokens, "sha256": probe.digest()}
            for name, probe in probes.items()}


def profile_from_state(state: dict) -> SensitivityProfile:
    """The SensitivityProfile of a complete JSON-shaped state (same bytes whether or not the run resumed).
    Unit errors = the block's shrunk delta (`stats.shrink` over the objective's blocks) x the unit's share."""
    objectives = tuple(state["settings"]["objectives"])
    layers = state["layers"]
    deltas = {obj: tuple(layer["deltas"][obj] for layer in layers) for obj in objectives}
    ses = {obj: tuple(layer["se"][obj] for layer in layers) for obj in objectives}
    shrunk = {obj: shrink(deltas[obj], ses[obj]) for obj in objectives}
    units = tuple(UnitSensitivity(u["name"], int(u["layer"]), tuple(u["modules"]), int(u["n_weights"]),
                                  int(u["in_features"]),
                                  {key: {obj: shrunk[obj][index] * share[obj] for obj in objectives}
                                   for key, share in u["shares"].items()})
                  for index, layer in enumerate(layers) for u in layer["units"])
    rows = {obj: tuple(tuple(layer["row_deltas"][obj]) for layer in layers) for obj in objectives}
    weights = {obj: tuple(state["baseline_rows"][obj]["den"]) for obj in objectives}
    return SensitivityProfile(state["model_fingerprint"], objectives, dict(state["baselines"]), deltas, units,
                              {**state["settings"], "settings_hash": state["settings_hash"],
                               "probe_data": state["probe_data"]}, ses, rows, weights)


def _console_progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]profile[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True), disable=not enabled)


def prepare_inputs(model: nn.Module, state: dict, probes: dict[str, ProbeSet]) -> tuple[list, list, list]:
    """(batches, block-0 inputs, KL references) of the probe sets; fills the state's baselines when missing."""
    batches = [(name, i) for name in state["settings"]["objectives"] for i in range(len(probes[name].batches))]
    device = next(final_norm(model).parameters()).device  # measure_profile placed the shell there
    hidden = capture_block_inputs(model, [probes[name].batches[i].tokens.to(device) for name, i in batches])
    references: list[torch.Tensor | None] = [None] * len(batches)
    if state["baselines"] is None or any(get_objective(o).score == "kl" for o in state["settings"]["objectives"]):
        baseline, references = tail_losses(model, 0, hidden, batches, probes)  # + the KL objectives' references
        if state["baselines"] is None:
            state["baselines"] = {name: rows.loss for name, rows in baseline.items()}
            state["baseline_rows"] = {name: {"num": rows.num.tolist(), "den": rows.den.tolist()}
                                      for name, rows in baseline.items()}
    return batches, hidden, references


def measure_layer(model: nn.Module, layer: int, state: dict, probes: dict[str, ProbeSet], batches: list,
                  hidden: list, references: list) -> tuple[dict, list]:
    """One block's experiment from its full-precision inputs: (its JSON record, the next block's inputs)."""
    settings, block = state["settings"], decoder_blocks(model)[layer]
    losses = quantized_block_losses(model, layer, settings["probe_bits"], hidden, batches, probes, references)
    outputs, grams = advance_block(block, hidden, batches, probes)
    layout = block_units(model, layer, settings)
    with onloaded(block, hidden[0].hidden_states.device):  # one transfer for both steps (inner onloads are no-ops)
        output_errors = unit_output_errors(block, layout, settings["probe_bits"], hidden, outputs, batches, probes)
        units = layer_unit_shares(block, layout, settings["probe_bits"], grams, output_errors)
    return layer_record(layer, state["baseline_rows"], losses, units), outputs


def _run_layers(model: nn.Module, state: dict, probes: dict[str, ProbeSet], path: Path, progress: bool,
                on_layer: Callable[[int], None] | None, notice: str = "", workers=None,
                model_source: str | None = None) -> None:
    """Measure the blocks not yet in `state`, saving it atomically after each one (on Ray with `workers`)."""
    blocks = decoder_blocks(model)
    batches, hidden, references = prepare_inputs(model, state, probes)
    write_json_atomic(path, state)
    start = len(state["layers"])
    with _console_progress(progress) as bar:
        task = bar.add_task(f"{len(probes)} objectives", total=len(blocks), completed=start)
        if notice or start:
            bar.console.print(notice or f"resuming from layer {start} ({path})")
        if workers is not None:
            from tasa_deploy.distributed import measure_layers_on_ray

            records = measure_layers_on_ray(model_source, model, state, probes, range(start, len(blocks)), workers)
        else:
            for layer in range(start):
                hidden, _ = advance_block(blocks[layer], hidden, batches, probes)
            records = None
        for layer in range(start, len(blocks)):
            if records is None:
                record, hidden = measure_layer(model, layer, state, probes, batches, hidden, references)
            else:
                record = next(records)
            state["layers"].append(record)
            write_json_atomic(path, state)
            bar.advance(task)
            if on_layer is not None:
                on_layer(layer)


def measure_profile(model: nn.Module, tokenizer, *, objectives: Sequence[str] = ("ppl", "math", "arc"),
                    target: str = "vllm", probe_bits: int = 3, candidate_bits: Iterable[int] = (3, 4, 8),
                    n_probe: int = 32, seq_len: int = 256, seed: int = 0, partial_path: Path | None = None,
                    progress: bool = True, gguf_types: Iterable[str] | None = None,
                    probes: dict[str, ProbeSet] | None = None,
                    on_layer: Callable[[int], None] | None = None,
                    device: torch.device | None = None, workers=None,
                    model_source: str | None = None) -> SensitivityProfile:
    """Measure (or reuse / resume) the TASA sensitivity profile of `model`.

    device: where blocks run, onloaded one at a time (default: where the model is); results are reduced on
    the host, and the state file does not depend on the device.
    workers: run the per-block experiments as Ray tasks (`distributed.measure_layers_on_ray`): an int starts a
    local Ray cluster with that many workers, a string is a Ray address; each task loads `model_source` itself.
    The state is byte-identical to the serial run's.
    partial_path: the resumable state file; None -> $TASA_CACHE/profiles/<hash of model, data, settings>.json.
    probes: ready probe sets by objective (default: `objectives.load_probe_set` from the data registry).
    on_layer: called with each block index after its result is saved (progress hooks, tests).
    Cost: one full forward for the baseline plus sum_l (L - l) / L forwards (~16.5 for 30 blocks) over the
    probe tokens. SmolLM2-135M, n_probe=16, seq_len=192 (6.1k real / 6.5k padded tokens): measured 222 CPU-s
    for baseline + block 0 and 117 CPU-s for block 1 on a heavily shared 2-core box (~2000 CPU-s projected).
    """
    settings = profile_settings(objectives=objectives, target=target, probe_bits=probe_bits,
                                candidate_bits=candidate_bits, n_probe=n_probe, seq_len=seq_len, seed=seed,
                                gguf_types=gguf_types)
    if probes is None:
        probes = {name: load_probe_set(name, tokenizer, n_probe, seq_len, seed) for name in objectives}
    if sorted(probes) != sorted(objectives):
        raise UsageError(f"probe sets {sorted(probes)} do not match the objectives {sorted(objectives)}")
    probes = {name: probes[name] for name in objectives}
    fingerprint = model_fingerprint(model)
    digest = settings_hash(fingerprint, settings, probes)
    path = Path(partial_path) if partial_path is not None else default_partial_path(digest)
    state, notice = _load_state(path, digest)
    state = state or {"schema": PARTIAL_SCHEMA, "model_fingerprint": fingerprint, "settings_hash": digest,
                      "settings": settings, "probe_data": _probe_summary(probes), "baselines": None,
                      "baseline_rows": None, "layers": []}
    if len(state["layers"]) < len(decoder_blocks(model)):
        place_shell(model, device or next(model.parameters()).device)
        _run_layers(model, state, probes, path, progress, on_layer, notice, workers, model_source)
    return profile_from_state(state)


def measure_profile_to_snr(model: nn.Module, tokenizer, *, target_snr: float, max_probe: int, n_probe: int,
                           probe_loader: Callable[[int], dict[str, ProbeSet]],
                           partial_path: Callable[[int], Path | None] = lambda n: None,
                           log: Callable[[str], None] = lambda m: None, **settings) -> SensitivityProfile:
    """Probe rows chosen by the noise: measure at n_probe rows per objective; while some objective's
    signal-to-noise (median |block delta| / SE, `stats.signal_to_noise`) is below target_snr, double the rows
    (a fresh seeded sample of that size, `probe_loader(n)`, measured anew) up to max_probe. At most about twice
    the cost of measuring the final size once. The profile's settings record the target and the sizes tried."""
    from dataclasses import replace as replace_fields

    from tasa_deploy.stats import signal_to_noise

    if target_snr <= 0 or max_probe < n_probe:
        raise UsageError(f"need a target SNR > 0 and max probe rows >= {n_probe} (got {target_snr}, {max_probe})")
    tried: list[dict] = []
    while True:
        probes = probe_loader(n_probe)
        profile = measure_profile(model, tokenizer, n_probe=n_probe, probes=probes, partial_path=partial_path(n_probe),
                                  objectives=tuple(probes), **settings)
        snr = {obj: signal_to_noise(profile.layer_deltas[obj], profile.layer_se[obj]) for obj in profile.objectives}
        tried.append({"rows": n_probe, "snr": snr})
        weak = [obj for obj, value in snr.items() if not value >= target_snr]
        log(f"probe rows {n_probe}: signal-to-noise " + ", ".join(f"{k} {v:.1f}" for k, v in snr.items()))
        if not weak or n_probe >= max_probe:
            if weak:
                log(f"below the target SNR {target_snr:g} at the maximum of {max_probe} rows: {', '.join(weak)}")
            break
        n_probe = min(2 * n_probe, max_probe)
    return replace_fields(profile, settings={**profile.settings, "probe_snr": target_snr, "probe_sizes": tried})
