"""Runs the TASA stages in order and resumes from their artifacts (mix.json -> profile.json -> tasa_plan.json
-> GPTQ blocks -> quantized dir).

Each stage's artifact lands in a work directory (default `<out>.work/`); on a rerun a stage whose artifact
exists and matches the model fingerprint and the stage settings is skipped ("reusing ..."), so an interrupted
run continues where it stopped and a re-plan for another budget re-measures nothing. The stages never import
each other: this module is the only place that knows their order.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from tasa_deploy.device import resolve_device, resolve_dtype
from tasa_deploy.forecast import check_request_memory, linear_budget_bytes
from tasa_deploy.artifacts import BitPlan, CalibrationMix, SensitivityProfile, check_plan_covers
from tasa_deploy.quantized_dir import save_artifact
from tasa_deploy.model import LoadedModel, load_model, model_fingerprint, quantizable_modules
from tasa_deploy.fixed_plans import gguf_type_for, retarget_plan, uniform_plan
from tasa_deploy.request import QuantizeRequest, request_to_json

Log = Callable[[str], None]


@dataclass
class StageTimes:
    seconds: dict[str, float] = field(default_factory=dict)
    spans: dict[str, tuple[float, float]] = field(default_factory=dict)  # perf_counter start, end (benchmarks)

    def run(self, name: str, fn: Callable, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.spans[name] = (start, time.perf_counter())
            self.seconds[name] = round(self.spans[name][1] - start, 2)


def settings_match(saved: dict, wanted: dict) -> bool:
    return json.dumps(saved, sort_keys=True, default=str) == json.dumps(wanted, sort_keys=True, default=str)


def stage_files(work_dir: Path, names: tuple[str, ...] = ("mix.json", "profile.json", "tasa_plan.png")
                ) -> tuple[Path, ...]:
    """The stage artifacts in `work_dir` that the quantized directory carries as provenance."""
    return tuple(work_dir / name for name in names if (work_dir / name).is_file())


# ------------------------------------------------------------------------------------------------ stages
def stage_mix(loaded: LoadedModel, fingerprint: str, request: QuantizeRequest, work_dir: Path, log: Log) -> CalibrationMix:
    """mix.json: reuse when it matches this model and request, else search (or honour --alpha)."""
    from tasa_deploy import mix as mix_stage
    from tasa_deploy.artifacts import MixScore

    path = work_dir / "mix.json"
    wanted = {"general": request.general, "tasks": list(request.task_sources), "seed": request.seed,
              "forced_alpha": request.alpha, "samples": request.mix_samples, "seq_len": request.probe_seq_len * 2}
    if request.mix_draws > 1:  # keyed only when used, so single-draw mix.json files stay reusable
        wanted["draws"] = request.mix_draws
    if path.is_file():
        saved = CalibrationMix.load(path)
        if saved.model_fingerprint == fingerprint and settings_match(saved.settings.get("request", {}), wanted):
            log(f"reusing {path} (alpha = {saved.alpha})")
            return saved
    if request.alpha is not None:
        mix = CalibrationMix(fingerprint, request.alpha, request.general, request.task_sources, (), {"request": wanted})
    else:
        found = mix_stage.search_mixture(loaded.model, loaded.tokenizer, general=request.general,
                                         tasks=request.task_sources, n_samples=request.mix_samples,
                                         draws=request.mix_draws,
                                         seq_len=request.probe_seq_len * 2, seed=request.seed,
                                         device=resolve_device(request.device))
        mix = CalibrationMix(found.model_fingerprint or fingerprint, found.alpha, found.general, found.tasks,
                             tuple(MixScore(**vars(s)) if not isinstance(s, MixScore) else s for s in found.scores),
                             {**found.settings, "request": wanted})
    mix.save(path)
    return mix


def stage_profile(loaded: LoadedModel, fingerprint: str, request: QuantizeRequest, work_dir: Path,
                  log: Log) -> SensitivityProfile:
    """profile.json: reuse when model and settings match; otherwise measure (`measure_request_profile`)."""
    from tasa_deploy import profile as profile_stage

    path = work_dir / "profile.json"
    wanted = profile_stage.profile_settings(objectives=request.objectives, n_probe=request.probe_samples,
                                            **profile_kwargs(request))
    if path.is_file():
        saved = SensitivityProfile.load(path)
        saved_settings = {k: v for k, v in saved.settings.items() if k not in ("settings_hash", "probe_data")}
        if request.probe_snr is not None:  # the row count is the search's outcome; the target must match
            wanted = {**wanted, "n_probe": saved_settings.get("n_probe"), "probe_snr": request.probe_snr,
                      "probe_sizes": saved_settings.get("probe_sizes")}
        if saved.model_fingerprint == fingerprint and settings_match(saved_settings, wanted):
            log(f"reusing {path}")
            return saved
    profile = measure_request_profile(loaded, request, lambda n: work_dir / f"profile.partial.{n}.json", log)
    profile.save(path)
    return profile


def profile_kwargs(request: QuantizeRequest) -> dict:
    """The measurement settings of the request's profile besides its objectives and probe rows."""
    return dict(target=request.target, probe_bits=min(request.widths), candidate_bits=request.widths,
                seq_len=request.probe_seq_len, seed=request.seed)


def measure_request_profile(loaded: LoadedModel, request: QuantizeRequest, partial_path: Callable[[int], Path],
                            log: Log) -> SensitivityProfile:
    """Measure the request's profile (resuming from `partial_path(rows)`); with request.probe_snr the probe
    rows double from probe_samples until every objective reaches that signal-to-noise."""
    from tasa_deploy import profile as profile_stage
    from tasa_deploy.objectives import load_probe_set

    kwargs = {**profile_kwargs(request), "device": resolve_device(request.device), "workers": request.workers,
              "model_source": request.model}
    if request.probe_snr is None:
        return profile_stage.measure_profile(loaded.model, loaded.tokenizer, objectives=request.objectives,
                                             n_probe=request.probe_samples,
                                             partial_path=partial_path(request.probe_samples), **kwargs)
    return profile_stage.measure_profile_to_snr(
        loaded.model, loaded.tokenizer, target_snr=request.probe_snr, max_probe=request.max_probe_samples,
        n_probe=request.probe_samples, log=log, partial_path=partial_path,
        probe_loader=lambda n: {name: load_probe_set(name, loaded.tokenizer, n, request.probe_seq_len, request.seed)
                                for name in request.objectives}, **kwargs)


def speed_for(request: QuantizeRequest, loaded: LoadedModel | None, profile: SensitivityProfile, log: Log):
    """The decode-time budget for a GGUF plan (`tasa_deploy.speed`), or None (vLLM target, --max-slowdown 0, or
    the default without llama.cpp's tools, said in one line)."""
    from tasa_deploy import speed

    if request.target != "gguf" or loaded is None or request.max_slowdown == 0:
        return None
    if request.max_slowdown is None and not speed.tools_available():
        log("speed-blind GGUF plan: llama.cpp's llama-bench is not built (bash benchmarks/llamacpp.sh)")
        return None
    slowdown = request.max_slowdown or 1.0
    return lambda unit_keys, bits: speed.speed_constraint(loaded, profile, unit_keys, bits, slowdown,
                                                          preset=request.speed_reference, log=log)


def stage_plan(profile: SensitivityProfile, request: QuantizeRequest, work_dir: Path,
               loaded: LoadedModel | None = None, log: Log = print) -> BitPlan:
    """The allocation for --bits, or for --size (the linear layers' share of the file: `forecast`)."""
    from tasa_deploy import plan as plan_stage
    from tasa_deploy.forecast import linear_budget_bytes

    budget_bytes = linear_budget_bytes(request, loaded.model_dir, loaded.model.config) if loaded else None
    plan = plan_stage.build_plan(profile, None if budget_bytes else request.bits, target=request.target,
                                 beta=request.beta, candidates=request.plan_candidates, budget_bytes=budget_bytes,
                                 speed=speed_for(request, loaded, profile, log))
    plan.save(work_dir / "tasa_plan.json")
    plan_stage.save_plan_plot(profile, plan, work_dir / "tasa_plan.png")
    return plan


def calibration_tokens(loaded: LoadedModel, request: QuantizeRequest, mix: CalibrationMix | None) -> torch.Tensor:
    """[n, T] calibration rows: the chosen mixture (TASA) or general-only data (uniform, unless --alpha)."""
    from tasa_deploy import mix as mix_stage

    if mix is None:  # no search: a fixed mixture, same sampling code as the searched one
        alpha = 1.0 if request.alpha is None else request.alpha
        mix = CalibrationMix("", alpha, request.general, request.task_sources, ())
    return mix_stage.mixture_token_batches(mix, loaded.tokenizer, request.calib_samples, request.seq_len,
                                           request.seed)


def check_quantize_preconditions(request: QuantizeRequest) -> None:
    """Everything that can be checked in seconds, before the model is loaded: output, work dir, cache, data."""
    from tasa_deploy.data import check_data_dir
    from tasa_deploy.model import EMBEDDED, cache_root
    from tasa_deploy.outputs import check_output, check_writable_dir

    check_output(request.out, is_dir=True, force=request.force, inputs=request.inputs)
    check_writable_dir(request.resolved_work_dir, "work directory")
    if request.model in EMBEDDED or request.model.endswith(".gguf"):
        check_writable_dir(cache_root(), "cache directory (TASA_CACHE)")
    check_data_dir()


def check_calibration_sources(request: QuantizeRequest) -> None:
    """One row of each calibration source: missing data fails in a second, not after the model load."""
    from tasa_deploy.data import load_rows

    for source in (request.general, *request.task_sources):
        load_rows(source, "calib", limit=1)


def predicted_file(plan: BitPlan, loaded: LoadedModel, fmt: str) -> dict:
    """The --target export's size for this plan: linear bpw and whole-file bytes (`sizes`)."""
    from tasa_deploy.bits import plan_total_bits
    from tasa_deploy.sizes import file_layout

    shapes = {name: tuple(module.weight.shape) for name, module in quantizable_modules(loaded.model).items()}
    layout = file_layout(loaded.model_dir, loaded.model.config, fmt)
    linear_bits = plan_total_bits(plan, shapes)
    return {"format": fmt, "linear_bpw": linear_bits / layout.linear_weights,
            "file_bytes": layout.file_bytes(linear_bits), "fixed_bytes": layout.fixed_bytes}


def unquantized_tensors(model: torch.nn.Module, modules: dict) -> dict[str, torch.Tensor]:
    """Every tensor of the model except the weights of quantized modules (their biases stay: Qwen2's q/k/v
    biases were lost here once); a tied lm_head is left out."""
    quantized = {f"{name}.weight" for name in modules}
    if getattr(model.config, "tie_word_embeddings", False):
        quantized.add("lm_head.weight")
    return {name: tensor for name, tensor in model.state_dict().items() if name not in quantized}


def run_quantize(request: QuantizeRequest, log: Log = print, on_block=None,
                 loaded: LoadedModel | None = None) -> tuple[Path, dict]:
    """All stages for one request; returns the artifact dir and a summary (stage times, plan bits).
    `loaded`: a model already in memory (the Python API); otherwise request.model is loaded."""
    from tasa_deploy.sequential import GPTQSettings, quantize_model

    check_quantize_preconditions(request)
    times = StageTimes()
    check_request_memory(request, loaded.model.config if loaded is not None else None)
    check_calibration_sources(request)
    device = resolve_device(request.device)
    if request.size is not None:  # a --size the rest of the file already fills: refused before the model loads
        from tasa_deploy.model import load_config, resolve_model_dir

        model_dir = loaded.model_dir if loaded is not None else resolve_model_dir(request.model)
        linear_budget_bytes(request, model_dir, loaded.model.config if loaded is not None
                            else load_config(model_dir, request.model))
    if loaded is None:
        loaded = times.run("load", load_model, request.model, resolve_dtype(request.dtype, device))
    fingerprint = times.run("fingerprint", model_fingerprint, loaded.model)
    work_dir = request.resolved_work_dir  # created only once there is something to keep in it
    mix = None
    if request.plan_path is not None:
        plan = BitPlan.load(request.plan_path)
        plan.check_model(fingerprint, request.plan_path)
        check_plan_covers(plan, {n: tuple(m.weight.shape) for n, m in quantizable_modules(loaded.model).items()},
                          request.plan_path)
        if request.target == "gguf":  # the explicit, non-default target wins; --target vllm keeps the plan's
            plan = retarget_plan(plan, loaded.model, request.target, log)
        if (work_dir / "mix.json").is_file():
            mix = CalibrationMix.load(work_dir / "mix.json")
    elif request.method == "tasa":
        work_dir.mkdir(parents=True, exist_ok=True)
        mix = times.run("mix", stage_mix, loaded, fingerprint, request, work_dir, log)
        profile = times.run("profile", stage_profile, loaded, fingerprint, request, work_dir, log)
        plan = times.run("plan", stage_plan, profile, request, work_dir, loaded, log)
    else:
        plan = uniform_plan(loaded.model, fingerprint, int(request.bits), request.target,
                            group_size=request.group_size, symmetric=request.symmetric, method=request.quantizer)
    plan = BitPlan(plan.model_fingerprint, plan.target, plan.modules, plan.budget_bits, plan.average_bits,
                   {**plan.info, "request": request_to_json(request), "alpha": mix.alpha if mix else None})
    tokens = times.run("calibration data", calibration_tokens, loaded, request, mix)
    settings = GPTQSettings(act_order=request.act_order, true_sequential=request.true_sequential)
    modules = times.run("quantize", quantize_model, loaded.model, plan, tokens, settings=settings,
                        resume_dir=work_dir / "gptq", on_block=on_block, device=device)
    tensors = unquantized_tensors(loaded.model, modules)
    with tempfile.TemporaryDirectory(prefix="tasa-recipe-") as tmp:
        from tasa_deploy.recipe import recipe_text

        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(recipe_text(request), encoding="utf-8")
        times.run("save", save_artifact, request.out, base_model_dir=loaded.model_dir, plan=plan, modules=modules,
                  tensors=tensors, force=request.force, inputs=request.inputs,
                  extra_files=(*stage_files(work_dir), recipe))
    summary = {"stage_seconds": times.seconds, "stage_spans": times.spans, "plan": plan,
               "alpha": mix.alpha if mix else None,
               "file": predicted_file(plan, loaded, request.target)}
    if request.method == "tasa" and request.plan_path is None:
        from tasa_deploy import plan as plan_stage

        summary["kendall_tau"] = plan_stage.tau_table(profile)
        summary["reliability"] = plan_stage.reliability_table(profile)
        summary["top_layers"] = {k: list(v) for k, v in plan_stage.top_layers(profile, 5).items()}
    return request.out, summary


__all__ = ["run_quantize", "QuantizeRequest", "StageTimes", "uniform_plan", "gguf_type_for", "settings_match", "LoadedModel",
           "load_model", "model_fingerprint", "CalibrationMix", "SensitivityProfile", "save_artifact"]
