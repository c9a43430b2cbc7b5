"""`tasa-deploy` command line: one typer command per stage. Commands parse, call the library, write the
artifact and print a rich summary — nothing more. Errors are one line on stderr (exit 2 = usage, 1 = runtime);
`--debug` shows the traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from tasa_deploy import TasaError, UsageError
from tasa_deploy.cli_common import (CandidatesOption, DeviceOption, DtypeOption, ObjectiveLossOption,
                                    TaskDataOption, WorkersOption, candidates_arg, console, csv as _csv, out_console,
                                    table as _table)
from tasa_deploy.cli_eval import evaluate
from tasa_deploy.outputs import check_output

STATE = {"debug": False}


# Exceptions the CLI framework raises for its own control flow (--help, usage errors, Ctrl-C prompts). They are
# recognised by name and module, not by class: typer >= 0.29 vendors click (`typer._click`), so its Exit/Abort/
# UsageError no longer derive from click's, and either hierarchy may change again.
_FRAMEWORK_MODULES = ("click", "typer")
_FRAMEWORK_CLASSES = {"Exit", "Abort", "ClickException"}


def is_framework_exception(exc: BaseException) -> bool:
    """True for click's or typer's Exit / Abort / ClickException (and subclasses), whatever their hierarchy."""
    return any(cls.__name__ in _FRAMEWORK_CLASSES and cls.__module__.split(".")[0] in _FRAMEWORK_MODULES
               for cls in type(exc).__mro__)


class _OneLineErrors(TyperGroup):
    """Turns TasaError into one red line on stderr and its exit code (2 usage, 1 runtime); --debug re-raises."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TasaError as exc:
            if STATE["debug"]:
                raise
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            resumable = getattr(ctx, "invoked_subcommand", None) in ("quantize", "profile")
            console.print("interrupted; " + ("rerun the same command to resume from the last completed stage/layer"
                                             if resumable else "nothing was written"))
            raise typer.Exit(130) from None
        except Exception as exc:  # an unexpected failure: still one line, the traceback only with --debug
            if STATE["debug"] or is_framework_exception(exc):
                raise
            console.print(f"[bold red]error:[/] {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                          highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None


app = typer.Typer(cls=_OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Task-aware mixed-precision quantization (TASA) with GGUF and vLLM export.")


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    STATE["debug"] = debug


# ------------------------------------------------------------------------------------------------ quantize
@app.command()
def quantize(
    out: Annotated[Path, typer.Option("--out", help="Quantized artifact directory to write.")],
    model: Annotated[str, typer.Option(help="Embedded name (smollm2-135m, gemma3-270m, qwen2.5-coder-0.5b), HF dir, .gguf, or hub id.")] = "smollm2-135m",
    bits: Annotated[float, typer.Option(help="Average-bit budget (TASA) or the width (uniform).")] = 3.5,
    size: Annotated[Optional[str], typer.Option(help="Whole-file budget of the --target export instead of --bits "
                                                "(TASA), e.g. 120MB, 4GB, 3.5GiB: embeddings, norms and header counted.")] = None,
    max_slowdown: Annotated[Optional[float], typer.Option(help="GGUF target: decode no slower than this x "
                                                          "llama.cpp's preset of the same size (measured with "
                                                          "llama-bench; default 1.0 when llama.cpp is built; 0: off).")] = None,
    speed_reference: Annotated[Optional[str], typer.Option(help="The llama.cpp preset for --max-slowdown, e.g. "
                                                           "q3_k_m (default: the preset of the budget's nominal size).")] = None,
    method: Annotated[str, typer.Option(help="tasa | uniform")] = "tasa",
    target: Annotated[str, typer.Option(help="Grid to quantize onto: vllm (int groups) | gguf (GGML types).")] = "vllm",
    tasks: Annotated[str, typer.Option(help="Tasks to protect: gsm8k, arc, arc_easy, arc_challenge, hellaswag, piqa, code, or a --task-data NAME.")] = "gsm8k,arc",
    task_data: TaskDataOption = None,
    objective_loss: ObjectiveLossOption = "kl",
    candidates: CandidatesOption = None,
    beta: Annotated[float, typer.Option(help="MOA weight of the reasoning objectives (1-beta on perplexity).")] = 0.5,
    group_size: Annotated[Optional[int], typer.Option(help="Int group size (default: largest of 128/64/32 dividing K).")] = None,
    asym: Annotated[bool, typer.Option("--asym", help="Asymmetric int grid (uniform only; vLLM serves symmetric).")] = False,
    quantizer: Annotated[str, typer.Option(help="gptq | rtn")] = "gptq",
    alpha: Annotated[Optional[float], typer.Option(help="Force the general-data share of the calibration mix.")] = None,
    calib_samples: Annotated[int, typer.Option(help="Calibration rows for GPTQ.")] = 32,
    seq_len: Annotated[int, typer.Option(help="Calibration row length in tokens.")] = 512,
    seed: Annotated[int, typer.Option()] = 0,
    act_order: Annotated[bool, typer.Option("--act-order")] = False,
    true_sequential: Annotated[bool, typer.Option("--true-sequential", help="One calibration pass per fused group.")] = False,
    probe_samples: Annotated[int, typer.Option(help="Rows per objective for the sensitivity profile.")] = 16,
    probe_snr: Annotated[Optional[float], typer.Option(help="Double the probe rows until every objective's signal-to-noise (median |block delta| / SE) reaches this.")] = None,
    max_probe_samples: Annotated[int, typer.Option(help="Upper bound on probe rows for --probe-snr.")] = 256,
    mix_samples: Annotated[int, typer.Option(help="Rows per data source for the mixture search.")] = 8,
    mix_draws: Annotated[int, typer.Option(help="Repeat the mixture search on this many independent data draws and average the scores (spread kept in mix.json).")] = 1,
    work_dir: Annotated[Optional[Path], typer.Option(help="Stage artifacts (default: OUT.work); reruns resume from it.")] = None,
    plan_file: Annotated[Optional[Path], typer.Option("--plan", help="Quantize with this tasa_plan.json (skips mix/profile/plan).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    workers: WorkersOption = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="A recipe YAML of quantize options (every "
                                                   "artifact carries its own recipe.yaml); command-line options "
                                                   "override it.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the predicted memory of each stage and the "
                                          "file size, then stop (reads only the config and tokenizer).")] = False,
    ctx: typer.Context = None,
) -> None:
    """Run TASA (mix -> profile -> plan -> GPTQ) or a uniform quantization; write a quantized artifact."""
    from tasa_deploy.pipeline import QuantizeRequest, run_quantize

    options = dict(model=model, bits=bits, size=size, max_slowdown=max_slowdown, speed_reference=speed_reference,
                   method=method, target=target, tasks=_csv(tasks),
                   task_data=tuple(task_data or ()), objective_loss=objective_loss, candidates=candidates_arg(candidates),
                   beta=beta, group_size=group_size, symmetric=not asym, quantizer=quantizer, alpha=alpha,
                   calib_samples=calib_samples, seq_len=seq_len, seed=seed, act_order=act_order,
                   true_sequential=true_sequential, probe_samples=probe_samples, probe_snr=probe_snr,
                   max_probe_samples=max_probe_samples, mix_samples=mix_samples, mix_draws=mix_draws,
                   device=device, dtype=dtype, workers=_workers(workers))
    if config is not None:
        from tasa_deploy.recipe import read_recipe

        given = {_FIELD_OF_PARAM.get(name, name) for name in ctx.params
                 if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"}
        options = {**read_recipe(config), **{k: v for k, v in options.items() if k in given}}
    request = QuantizeRequest(**options, out=out, work_dir=work_dir, plan_path=plan_file, force=force)
    if dry_run:
        from tasa_deploy.forecast import forecast

        out_console.print(_table(f"dry run: {request.model} -> {out} (nothing written)", forecast(request).rows()))
        return

    def on_block(index: int, total: int, resumed: bool) -> None:
        console.print(f"  block {index + 1}/{total} {'(resumed from checkpoint)' if resumed else 'quantized'}")

    path, summary = run_quantize(request, log=lambda m: console.print(m), on_block=on_block)
    _print_plan_summary(summary["plan"])
    file = summary["file"]
    out_console.print(f"linear layers {file['linear_bpw']:.3f} bpw; the {file['format']} export will be "
                      f"{file['file_bytes']:,} bytes ({file['file_bytes'] / 1e6:.1f} MB, of which "
                      f"{file['fixed_bytes'] / 1e6:.1f} MB embeddings, norms and header)")
    if "kendall_tau" in summary:
        out_console.print(_table("signal-to-noise per objective (median |block delta| / SE)", summary["reliability"]))
        out_console.print(_table("Kendall tau between objectives (95% bootstrap interval over probe rows)",
                                 summary["kendall_tau"]))
        out_console.print(_table("top-5 layers", [{"objective": k, "layers": str(v)} for k, v in summary["top_layers"].items()]))
        out_console.print(f"calibration mix: alpha = {summary['alpha']} (share of general data)")
    out_console.print(_table("stage wall time (s)", [summary["stage_seconds"]]))
    out_console.print(f"wrote {path}")


def _workers(value: str | None) -> int | str | None:
    """--workers N (local Ray workers) or a Ray address."""
    return int(value) if value is not None and value.strip().lstrip("-").isdigit() else value


_FIELD_OF_PARAM = {"asym": "symmetric", "plan_file": "plan_path"}  # quantize's option names that differ


def _print_plan_summary(plan) -> None:
    """One row per layer, one column per module (q/k/v/o/gate/up/down), cells = grid keys."""
    by_layer: dict[str, dict[str, str]] = {}
    for name, module_plan in plan.modules.items():
        layer = name.split(".layers.")[1].split(".")[0] if ".layers." in name else "-"
        short = name.rsplit(".", 1)[-1].replace("_proj", "")
        by_layer.setdefault(layer, {"layer": layer})[short] = module_plan.spec.key
    average = f"{plan.average_bits:.4f}" if plan.average_bits else "n/a"
    out_console.print(_table(f"plan ({plan.target}, average {average} bpw)", list(by_layer.values())))
    speed = plan.info.get("speed")
    if speed:
        predicted = 1 / (1 / speed["anchor_tok_s"] + speed["predicted_delta_s"])
        out_console.print(f"speed-aware: predicted decode {predicted:.1f} tok/s against llama.cpp "
                          f"{speed['reference'].upper()} measured {speed['reference_tok_s']:.1f} tok/s "
                          f"(--max-slowdown {speed['max_slowdown']})" + ("" if speed.get("met", True) else
                          "; NOT met: no plan within the size budget is predicted that fast, this is the fastest"))


# ------------------------------------------------------------------------------------------------ mix / profile / plan
@app.command()
def mix(
    out: Annotated[Path, typer.Option("--out", help="mix.json to write.")] = Path("mix.json"),
    model: Annotated[str, typer.Option()] = "smollm2-135m",
    general: Annotated[str, typer.Option(help="General data source.")] = "lambada",
    tasks: Annotated[str, typer.Option()] = "gsm8k,arc",
    task_data: TaskDataOption = None,
    alphas: Annotated[str, typer.Option(help="Grid of general-data shares.")] = "0,0.25,0.5,0.75,1",
    samples: Annotated[int, typer.Option()] = 16,
    seq_len: Annotated[int, typer.Option()] = 256,
    seed: Annotated[int, typer.Option()] = 0,
    draws: Annotated[int, typer.Option(help="Repeat the search on this many independent data draws: scores are averaged, their spread kept in mix.json.")] = 1,
    force: Annotated[bool, typer.Option("--force")] = False,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
) -> None:
    """Search the calibration mixture (gradient alignment + Hessian-trace proxy); write mix.json."""
    from tasa_deploy import mix as mix_stage
    from tasa_deploy.device import resolve_device, resolve_dtype
    from tasa_deploy.model import load_model
    from tasa_deploy.pipeline import QuantizeRequest

    check_output(out, force=force)
    request = QuantizeRequest(tasks=_csv(tasks), task_data=tuple(task_data or ()), mix_samples=samples,
                              seq_len=seq_len, seed=seed, device=device, dtype=dtype)
    sources, target_device = request.task_sources, resolve_device(device)
    try:
        grid = tuple(float(a) for a in _csv(alphas))
    except ValueError:
        raise UsageError(f"--alphas must be numbers, got '{alphas}'") from None
    if not grid or any(not 0.0 <= a <= 1.0 for a in grid):  # also refuses nan
        raise UsageError(f"--alphas must be numbers in [0, 1], got '{alphas}'")
    loaded = load_model(model, resolve_dtype(dtype, target_device))
    result = mix_stage.search_mixture(loaded.model, loaded.tokenizer, general=general, tasks=sources, alphas=grid,
                                      n_samples=samples, seq_len=seq_len, seed=seed, draws=draws,
                                      device=target_device)
    result.save(out, force=force)
    out_console.print(_table("calibration mixtures (alpha = general share)", mix_stage.mix_table_rows(result)))
    out_console.print(f"chosen alpha = {result.alpha}; wrote {out}")


@app.command()
def profile(
    out: Annotated[Path, typer.Option("--out", help="profile.json to write.")] = Path("profile.json"),
    model: Annotated[str, typer.Option()] = "smollm2-135m",
    tasks: Annotated[str, typer.Option()] = "gsm8k,arc",
    task_data: TaskDataOption = None,
    objective_loss: ObjectiveLossOption = "kl",
    target: Annotated[str, typer.Option(help="vllm | gguf: which candidate grids to measure.")] = "vllm",
    candidates: CandidatesOption = None,
    probe_samples: Annotated[int, typer.Option()] = 32,
    probe_snr: Annotated[Optional[float], typer.Option(help="Double the probe rows until every objective's signal-to-noise reaches this.")] = None,
    max_probe_samples: Annotated[int, typer.Option()] = 256,
    seq_len: Annotated[int, typer.Option(help="Probe row length in tokens.")] = 256,
    seed: Annotated[int, typer.Option()] = 0,
    top_k: Annotated[int, typer.Option(help="Show the k most sensitive layers per objective.")] = 5,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing profile written by tasa-deploy.")] = False,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    workers: WorkersOption = None,
) -> None:
    """Measure per-layer, per-objective RTN sensitivity; write profile.json (resumes per layer)."""
    from tasa_deploy import plan as plan_stage
    from tasa_deploy.device import resolve_device, resolve_dtype
    from tasa_deploy.model import load_model
    from tasa_deploy.pipeline import QuantizeRequest, measure_request_profile

    request = QuantizeRequest(tasks=_csv(tasks), task_data=tuple(task_data or ()), objective_loss=objective_loss,
                              target=target, candidates=candidates_arg(candidates), probe_samples=probe_samples,
                              probe_snr=probe_snr, max_probe_samples=max_probe_samples, probe_seq_len=seq_len,
                              seed=seed, device=device, dtype=dtype, workers=_workers(workers))
    check_output(out, force=force)
    loaded = load_model(model, resolve_dtype(dtype, resolve_device(device)))
    result = measure_request_profile(loaded, request, lambda n: out.with_name(f"{out.name}.partial.{n}"),
                                     lambda m: console.print(m))
    result.save(out, force=force)
    _print_profile_diagnostics(plan_stage, result, top_k)
    out_console.print(f"wrote {out}")


def _print_profile_diagnostics(plan_stage, result, top_k: int) -> None:
    out_console.print(_table("signal-to-noise per objective (median |block delta| / SE)",
                             plan_stage.reliability_table(result)))
    out_console.print(_table("Kendall tau between objectives (per-layer sensitivity; 95% bootstrap interval "
                             "over probe rows)", plan_stage.tau_table(result)))
    top = plan_stage.top_layers(result, top_k)
    out_console.print(_table(f"top-{top_k} layers", [{"objective": k, "layers": str(list(v))} for k, v in top.items()]))


@app.command()
def plan(
    profile_path: Annotated[Path, typer.Option("--profile", help="profile.json from `tasa-deploy profile`.")],
    bits: Annotated[float, typer.Option(help="Average bits-per-weight budget.")] = 3.5,
    out: Annotated[Path, typer.Option("--out")] = Path("tasa_plan.json"),
    target: Annotated[str, typer.Option()] = "vllm",
    beta: Annotated[float, typer.Option()] = 0.5,
    candidates: CandidatesOption = None,
    plot: Annotated[Optional[Path], typer.Option(help="PNG of sensitivity and chosen bits per layer.")] = None,
    emit: Annotated[Optional[str], typer.Option(help="Also write the plan for llama-quantize (--tensor-type-file), "
                                                "llm-compressor (recipe YAML) or autoround (layer_config JSON), "
                                                "beside --out.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite outputs written by tasa-deploy.")] = False,
) -> None:
    """Re-plan from an existing profile for a budget (seconds, no model needed); write tasa_plan.json."""
    from tasa_deploy import plan as plan_stage
    from tasa_deploy.artifacts import SensitivityProfile
    from tasa_deploy.emit import EMITTERS
    from tasa_deploy.plan import check_budget_args

    check_budget_args(bits, beta, target)
    if emit is not None and emit not in EMITTERS:
        raise UsageError(f"unknown --emit format '{emit}'; choose from: {', '.join(EMITTERS)}")
    emitted = out.with_name(out.stem + EMITTERS[emit][1]) if emit else None
    for path in (out, plot, emitted):
        if path is not None:
            check_output(path, force=force, inputs=(profile_path,))
    if plot is not None and plot.absolute() == out.absolute():
        raise UsageError(f"--plot and --out are the same file ({out})")
    loaded_profile = SensitivityProfile.load(profile_path)
    result = plan_stage.build_plan(loaded_profile, bits, target=target, beta=beta, candidates=candidates_arg(candidates))
    result.save(out, force=force, inputs=(profile_path,))
    out_console.print(_table("bits per layer", plan_stage.plan_table(result)))
    if plot:
        plan_stage.save_plan_plot(loaded_profile, result, plot, force=force, inputs=(profile_path,))
    if emitted is not None:
        from tasa_deploy.emit import emit as emit_plan
        from tasa_deploy.outputs import atomic_path

        text = emit_plan(result, emit, {m: u.in_features for u in loaded_profile.units for m in u.modules})
        with atomic_path(emitted, force=force, inputs=(profile_path,)) as tmp:
            tmp.write_text(text, encoding="utf-8")
        out_console.print(f"wrote {emitted} ({emit})")
    out_console.print(f"average {result.average_bits:.4f} bpw (budget {bits}); wrote {out}")


# ------------------------------------------------------------------------------------------------ eval / export / inspect
app.command("eval")(evaluate)  # defined in cli_eval.py


@app.command()
def export(
    artifact: Annotated[Path, typer.Argument(help="Quantized artifact directory from `tasa-deploy quantize`.")],
    out: Annotated[Path, typer.Option("--out", help="model.gguf (gguf) or a directory (vllm).")],
    format: Annotated[str, typer.Option("--format", help="gguf | vllm")] = "gguf",
    via: Annotated[Optional[str], typer.Option(help="gguf only: 'llama-quantize' lets llama.cpp's quantizer apply the "
                                               "plan; 'convert' writes through llama.cpp's convert_hf_to_gguf.py "
                                               "(the default for architectures our writer does not know).")] = None,
    re_round: Annotated[bool, typer.Option("--re-round", help="gguf only: round int-grid modules onto GGML types "
                                           "from their dequantized weights (fast, lossy) instead of re-running GPTQ.")] = False,
    device: DeviceOption = None,
    force: Annotated[bool, typer.Option("--force")] = False,
    results: Annotated[Optional[list[Path]], typer.Option(help="`eval --out` / `bench --out` JSON whose figures go into "
                                                          "the model card (repeatable).")] = None,
    push_to_hub: Annotated[Optional[str], typer.Option("--push-to-hub", help="Upload the export and its model "
                                                       "card to this Hugging Face hub repo (org/name).")] = None,
    private: Annotated[bool, typer.Option("--private", help="With --push-to-hub: create the repo private.")] = False,
) -> None:
    """Export a quantized artifact for llama.cpp (GGUF) or vLLM (compressed-tensors).

    GGUF of an int-grid artifact (the default `quantize` target): GPTQ runs again onto the GGML grids from the
    artifact's own base model, plan and calibration mixture, so no second rounding is stacked on the first."""
    from tasa_deploy.api import export as export_artifact

    report = export_artifact(artifact, out, format=format, via=via, re_round=re_round, device=device, force=force,
                             log=lambda m: console.print(m), results=results, push_to_hub=push_to_hub, private=private)
    for warning in getattr(report, "warnings", ()) or ():
        console.print(f"[yellow]warning:[/] {warning}")
    out_console.print(f"wrote {out}{_size_note(report)}")


def _size_note(report) -> str:
    """' (N bytes; linear layers B bpw)': every export report states both."""
    bpw = getattr(report, "bits_per_weight", None) or getattr(report, "average_bits", None)
    if not hasattr(report, "file_bytes"):
        return ""
    return f" ({report.file_bytes:,} bytes" + (f"; linear layers {bpw:.3f} bpw)" if bpw else ")")


@app.command()
def inspect(path: Annotated[Path, typer.Argument(help="Artifact dir, tasa_plan.json, profile.json, mix.json or .gguf")]) -> None:
    """Print what an artifact holds."""
    from tasa_deploy.inspect import describe

    for title, rows in describe(path):
        out_console.print(_table(title, rows))


from tasa_deploy.cli_serve import bench, serve  # noqa: E402  (the runtime-facing commands live there)

app.command()(serve)
app.command()(bench)


def run() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    run()
