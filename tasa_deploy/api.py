"""The Python API a notebook calls; the CLI is a thin skin over the same functions.

    import tasa_deploy
    artifact = tasa_deploy.quantize("smollm2-135m", out="out/t35", bits=3.5, tasks=["gsm8k", "arc"])
    tasa_deploy.export(artifact, "out/t35.gguf", format="gguf")

`quantize` takes a model name / path (as the CLI's --model) or an in-memory `PreTrainedModel` with its
tokenizer, and user task data as files or as rows ({"prompt", "answer"} or {"prompt", "choices", "label"});
every other keyword is a `pipeline.QuantizeRequest` field (method, target, candidates, calib_samples, ...).
It returns the opened `QuantizedArtifact`. `export` writes GGUF (llama.cpp) or compressed-tensors (vLLM).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from tasa_deploy import UsageError

GGUF_ROUTES = (None, "llama-quantize", "convert")  # export --via: our writer (None), llama.cpp's quantizer or converter

Log = Callable[[str], None]


def _quiet(_message: str) -> None:
    return None


def _task_data_specs(task_data: Mapping[str, Any] | None, work_dir: Path) -> tuple[str, ...]:
    """NAME -> path or rows  ->  ("NAME=PATH", ...); rows are written to work_dir/task_data/NAME.jsonl (kept, so
    the run is reproducible from its work dir)."""
    specs = []
    for name, value in (task_data or {}).items():
        if isinstance(value, (str, Path)):
            specs.append(f"{name}={value}")
            continue
        rows = list(value)
        path = work_dir / "task_data" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        specs.append(f"{name}={path}")
    return tuple(specs)


def _in_memory(model, tokenizer, work_dir: Path):
    """A LoadedModel for a PreTrainedModel held by the caller: its config and tokenizer are saved once into
    work_dir/base (the artifact copies them from there)."""
    from tasa_deploy.model import LoadedModel, check_architecture

    if tokenizer is None:
        raise UsageError("quantizing an in-memory model needs its tokenizer: quantize(model, tokenizer=...)")
    check_architecture(model.config)
    base = work_dir / "base"
    base.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(base)
    tokenizer.save_pretrained(base)
    return LoadedModel(model.eval(), tokenizer, base, getattr(model, "name_or_path", "") or "in-memory")


def quantize(model: Any = "smollm2-135m", *, out: str | Path, tokenizer=None, tasks: Iterable[str] = ("gsm8k", "arc"),
             bits: float = 3.5, task_data: Mapping[str, Any] | None = None, log: Log = _quiet, on_block=None,
             **options):
    """Run TASA (or `method="uniform"`) and return the written artifact (`quantized_dir.QuantizedArtifact`).
    An in-memory model is quantized in place, as llm-compressor's oneshot does: GPTQ replaces its linear weights
    by their quantized values (load it again for an unquantized copy)."""
    from tasa_deploy.pipeline import run_quantize
    from tasa_deploy.request import QuantizeRequest, default_work_dir
    from tasa_deploy.quantized_dir import load_artifact

    out = Path(out)
    work_dir = Path(options.pop("work_dir", None) or default_work_dir(out))
    name = getattr(model, "name_or_path", "")  # an in-memory model loaded from a local dir keeps that name
    source = model if isinstance(model, (str, Path)) else name if name and Path(name).is_dir() else "in-memory"
    request = QuantizeRequest(model=str(source), out=out, bits=bits, tasks=tuple(tasks), work_dir=work_dir,
                              task_data=_task_data_specs(task_data, work_dir), **options)
    loaded = None if isinstance(model, (str, Path)) else _in_memory(model, tokenizer, work_dir)
    path, _summary = run_quantize(request, log=log, on_block=on_block, loaded=loaded)
    return load_artifact(path)


def export(artifact, out: str | Path, *, format: str = "gguf", via: str | None = None, re_round: bool = False,
           device: str | None = None, force: bool = False, log: Log = _quiet, results=None,
           push_to_hub: str | None = None, private: bool = False):
    """Export an artifact (a QuantizedArtifact or its directory) for llama.cpp (GGUF) or vLLM; returns the
    exporter's report. GGUF of an int-grid artifact re-runs GPTQ onto the GGML grids (`requantize`) unless
    re_round; via="llama-quantize" lets llama.cpp's own quantizer apply the plan; via="convert" writes through
    llama.cpp's convert_hf_to_gguf.py (the default for architectures our writer does not know, e.g. Gemma-3).
    results: `eval --out` / `bench --out` files (one or a list) whose figures go into the model card; push_to_hub:
    a hub repo id to upload the export and its card to (`tasa_deploy.card`)."""
    from tasa_deploy.card import read_results

    figures = read_results(results) if results else None  # a bad results file is refused before any work
    report = _export(artifact, out, format, via, re_round, device, force, log, figures)
    if push_to_hub:
        from tasa_deploy.card import push_to_hub as push

        card = _card_text(Path(getattr(artifact, "path", artifact)), Path(out), format, figures)
        log(f"uploaded to {push(push_to_hub, Path(out), card, private=private)}")
    return report


def _card_text(artifact: Path, out: Path, format: str, figures: dict | None) -> str:
    """The export's card: the vLLM directory's README.md, or one made for a GGUF file."""
    from tasa_deploy.artifacts import BitPlan
    from tasa_deploy.card import model_card
    from tasa_deploy.schema import read_json

    if format == "vllm":
        return (out / "README.md").read_text(encoding="utf-8")
    return model_card(BitPlan.load(artifact / "tasa_plan.json"),
                      read_json(artifact / "config.json", "model config", allow_nonfinite=True), fmt="gguf",
                      file_name=out.name, file_bytes=out.stat().st_size,
                      results=figures)


def _export(artifact, out, format, via, re_round, device, force, log, figures):
    from tasa_deploy.outputs import check_output

    artifact = Path(getattr(artifact, "path", artifact))
    out = Path(out)
    if format not in ("gguf", "vllm"):
        raise UsageError(f"unknown export format '{format}'; use --format gguf|vllm")
    if via not in GGUF_ROUTES or (via and format != "gguf"):
        raise UsageError(f"--via must be one of {', '.join(r for r in GGUF_ROUTES if r)} and applies to "
                         f"--format gguf only, got '{via}'")
    need = sum(f.stat().st_size for f in artifact.glob("*.safetensors")) if artifact.is_dir() else 0
    check_output(out, is_dir=format == "vllm", force=force, inputs=(artifact,), need_bytes=need)
    if format == "vllm":
        from tasa_deploy.exporters.vllm import export_vllm

        return export_vllm(artifact, out, force=force, results=figures)
    if via == "llama-quantize":
        return _export_via_llama_quantize(artifact, out, force)
    return _export_gguf(artifact, out, re_round, device, force, log, via)


def gguf_writer(config: dict, via: str | None):
    """The GGUF writer for a model: ours (`exporters.gguf`) for the architectures it knows, unless
    via="convert"; llama.cpp's converter with our tensors in place (`exporters.gguf_convert`) otherwise. An
    architecture neither knows is refused here, before any work."""
    from tasa_deploy.exporters.gguf import ARCHITECTURES, export_gguf
    from tasa_deploy.exporters.gguf_convert import (CONVERTER, architectures_of, converter_knows,
                                                    export_gguf_converted, find_converter)

    if via != "convert" and config.get("model_type") in ARCHITECTURES:
        return export_gguf
    converter = find_converter()
    if converter_knows(config, converter) is False:
        raise UsageError(f"GGUF export: neither our writer ({', '.join(ARCHITECTURES)}) nor llama.cpp's {CONVERTER} "
                         f"knows this model ('{config.get('model_type')}', {architectures_of(config)})")
    return lambda artifact, out, force=False: export_gguf_converted(artifact, out, force=force, converter=converter)


def _export_gguf(artifact: Path, out: Path, re_round: bool, device: str | None, force: bool, log: Log,
                 via: str | None = None):
    from tasa_deploy.quantized_dir import load_artifact
    from tasa_deploy.requantize import needs_requantize, requantize_for_gguf

    from tasa_deploy.schema import read_json

    config = read_json(artifact / "config.json", "model config", allow_nonfinite=True) \
        if (artifact / "config.json").is_file() else {}
    export_gguf = gguf_writer(config, via)  # an unknown architecture is refused here, before minutes of GPTQ
    opened = None if re_round else load_artifact(artifact)
    if opened is None or not needs_requantize(opened):
        return export_gguf(artifact, out, force=force)
    start = time.perf_counter()
    log(f"re-quantizing {artifact} onto GGML grids with GPTQ (its base model, plan and calibration mix); "
        "--re-round skips this (lossy)")
    work = Path(tempfile.mkdtemp(prefix=".tasa-regguf-", dir=out.resolve().parent))
    try:
        regridded, summary = requantize_for_gguf(opened, work, log=_quiet, device=device)
        report = export_gguf(regridded, out, force=force)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plan = summary["plan"]
    log(f"re-quantized {len(plan.modules)} modules with GPTQ onto GGML types ({plan.average_bits:.3f} bpw) in "
        f"{time.perf_counter() - start:.0f} s")
    return report


def _export_via_llama_quantize(artifact: Path, out: Path, force: bool):
    from tasa_deploy.artifacts import CalibrationMix
    from tasa_deploy.exporters.gguf import gguf_architecture
    from tasa_deploy.exporters.llamacpp import export_gguf_via_llama_quantize
    from tasa_deploy.model import load_model
    from tasa_deploy.pipeline import QuantizeRequest, calibration_tokens
    from tasa_deploy.quantized_dir import load_artifact

    opened = load_artifact(artifact)
    gguf_architecture(opened.config)  # refuse an unsupported model before loading it and its calibration data
    request_json = opened.plan.info.get("request") or {}
    request = QuantizeRequest(model=request_json.get("model", "smollm2-135m"),
                              tasks=tuple(request_json.get("tasks", ("gsm8k", "arc"))),
                              task_data=tuple(request_json.get("task_data", ())), calib_samples=32, seq_len=512)
    loaded = load_model(request.model)
    mix = CalibrationMix.load(artifact / "mix.json") if (artifact / "mix.json").is_file() else None
    tokens = calibration_tokens(loaded, request, mix)
    return export_gguf_via_llama_quantize(artifact, out, loaded.model_dir, tokens, force=force)
