"""llama.cpp tools from Python: find the build, run perplexity / generation / tokenize / bench, and the
`--via llama-quantize` export route.

Tools come from `$LLAMACPP_BIN`, else the cached build of `benchmarks/llamacpp.sh` (llama.cpp 11434.0.0,
built once under the tasa-deploy cache), else that script is run to build it.

The llama-quantize route writes an F16 GGUF of the base model (`gguf.export_dense_gguf`), a
`--tensor-type-file` with one `regex=type` per planned tensor (llama-quantize applies the first matching
pattern, `tools/quantize/quantize.cpp` / `src/llama-quant.cpp`), and an importance matrix in the GGUF
imatrix format this llama.cpp version writes and reads (`common/imatrix-loader.cpp`): per weight tensor,
`<name>.in_sum2` = sum over calibration tokens of x_k^2 per input column k (F32 [K, 1]) and
`<name>.counts` = number of forward calls (F32 [1, 1]), plus the `imatrix.*` metadata keys llama-quantize
requires. Activations are collected with `tasa_deploy.capture.linear_input_hooks`.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import gguf
import numpy as np
import torch

from tasa_deploy import TasaError, UsageError
from tasa_deploy.model import cache_root

LLAMACPP_VERSION = "11434.0.0"
BUILD_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "llamacpp.sh"


def find_llamacpp_bin(tools: tuple[str, ...] = ("llama-quantize",), *, build: bool = True) -> Path | None:
    """Directory holding `tools`: $LLAMACPP_BIN, the cached build, or (build=True) a fresh build.

    Returns None when build=False and no directory has every tool (tests skip on that)."""
    candidates = [Path(os.environ["LLAMACPP_BIN"])] if os.environ.get("LLAMACPP_BIN") else []
    candidates.append(cache_root() / f"llama.cpp-{LLAMACPP_VERSION}" / "build" / "bin")
    for directory in candidates:
        if all(os.access(directory / tool, os.X_OK) for tool in tools):
            return directory
    if not build:
        return None
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        tail = " | ".join(result.stderr.strip().splitlines()[-3:])
        raise TasaError(f"building llama.cpp with {BUILD_SCRIPT} failed: {tail}")
    directory = Path(lines[-1])
    missing = [tool for tool in tools if not os.access(directory / tool, os.X_OK)]
    if missing:
        raise TasaError(f"llama.cpp build in {directory} lacks {', '.join(missing)}")
    return directory


def run_tool(tool: str, args: list[str], *, timeout: float = 1800, bin_dir: Path | None = None) -> str:
    """Run a llama.cpp tool; returns stdout + stderr, raises TasaError (with its last lines) on failure."""
    return run_tool_measured(tool, args, timeout=timeout, bin_dir=bin_dir)[0]


def run_tool_measured(tool: str, args: list[str], *, timeout: float = 1800,
                      bin_dir: Path | None = None) -> tuple[str, float]:
    """run_tool, plus the tool's own peak resident memory in MiB.

    The peak is VmHWM from /proc/<pid>/status, polled every 20 ms while the tool runs (the high-water mark of
    the tool's own address space). rusage's ru_maxrss would be wrong here: Python starts children with vfork,
    and exec records the PARENT's high-water mark into the child's ru_maxrss."""
    directory = bin_dir or find_llamacpp_bin((tool,))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen([str(directory / tool), *args], stdout=out, stderr=err, text=True)
        peak_kib = _poll_peak_rss(process, timeout, tool)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if process.returncode != 0:
        tail = " | ".join((stdout + stderr).strip().splitlines()[-4:])
        raise TasaError(f"{tool} failed (exit {process.returncode}): {tail}")
    return stdout + "\n" + stderr, peak_kib / 1024


def _poll_peak_rss(process: subprocess.Popen, timeout: float, tool: str) -> int:
    """Wait for `process` (killing it past `timeout` s); returns the largest VmHWM (KiB) read meanwhile."""
    deadline, peak_kib = time.monotonic() + timeout, 0
    status_file = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        try:
            line = next((l for l in status_file.read_text().splitlines() if l.startswith("VmHWM:")), "")
            peak_kib = max(peak_kib, int(line.split()[1])) if line else peak_kib
        except (OSError, IndexError, ValueError):  # the process is exiting
            pass
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise TasaError(f"{tool} ran past {timeout:.0f} s and was stopped")
        time.sleep(0.02)
    return peak_kib


def llama_perplexity(model: Path, text_file: Path, *, ctx: int = 512, chunks: int = 4, threads: int = 2) -> float:
    """llama-perplexity's final PPL (windows of `ctx`, second half of each scored, BOS iff the vocab adds it)."""
    output = run_tool("llama-perplexity", ["-m", str(model), "-f", str(text_file), "-c", str(ctx),
                                           "--chunks", str(chunks), "-t", str(threads), "-b", str(ctx)])
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", output)
    if match is None:
        raise TasaError(f"llama-perplexity printed no final estimate for {model}")
    return float(match.group(1))


def llama_kl_divergence(model: Path, base: Path, text_file: Path, *, ctx: int = 512, chunks: int = 4,
                        threads: int = 2, work_dir: Path | None = None) -> dict:
    """llama-perplexity's own KL divergence of `model` from `base` on `text_file` (its protocol: windows of
    `ctx`, second half scored): {"kld", "kld_se", "top1", "top1_se", "chunk_kld"} (top-1 agreement as a
    fraction; chunk_kld: each chunk's mean KL, for comparisons of two models paired over the same chunks). The
    base logits go through a temporary `--kl-divergence-base` file, removed afterwards."""
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        logits = Path(tmp) / "base.kld"
        common = ["-f", str(text_file), "-c", str(ctx), "--chunks", str(chunks), "-t", str(threads), "-b", str(ctx)]
        run_tool("llama-perplexity", ["-m", str(base), *common, "--kl-divergence-base", str(logits)])
        output = run_tool("llama-perplexity", ["-m", str(model), *common, "--kl-divergence-base", str(logits),
                                                "--kl-divergence"])
    kld = re.search(r"Mean\s+KLD:\s+(-?[0-9.]+)\s+±\s+([0-9.]+)", output)
    top = re.search(r"Same top p:\s+([0-9.]+)\s+±\s+([0-9.]+)\s*%", output)
    if kld is None or top is None:
        raise TasaError(f"llama-perplexity printed no KL divergence statistics for {model}")
    return {"kld": float(kld.group(1)), "kld_se": float(kld.group(2)),
            "top1": float(top.group(1)) / 100, "top1_se": float(top.group(2)) / 100,
            "chunk_kld": chunk_means(output)}


_CHUNK_ROW = re.compile(r"^\s*(\d+)\s+\S+\s+±\s+\S+\s+\S+\s+±\s+\S+\s+(-?[0-9.]+)\s+±", re.MULTILINE)


def chunk_means(output: str) -> list[float]:
    """Per-chunk mean KL from llama-perplexity's progress table, which prints the running mean after each chunk
    (5 decimals); every chunk scores the same number of tokens, so chunk i's mean is i * m_i - (i - 1) * m_(i-1)
    (rounding error below 1e-5 * i)."""
    running = [float(m.group(2)) for m in _CHUNK_ROW.finditer(output)]
    return [i * m - (i - 1) * previous for i, (m, previous) in enumerate(zip(running, [0.0, *running]), start=1)]


def llama_tokenize(model: Path, text: str) -> list[int]:
    """Token ids llama.cpp's tokenizer gives `text` (BOS only if the vocab says to add it)."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write(text)
    try:
        output = run_tool("llama-tokenize", ["-m", str(model), "-f", f.name, "--ids", "--log-disable"])
    finally:
        os.unlink(f.name)
    line = next(line for line in output.splitlines() if line.startswith("["))
    return json.loads(line)


def llama_generate(model: Path, prompt: str, *, n_predict: int = 32) -> str:
    """Greedy continuation of `prompt` by llama-simple (prompt included, as the tool prints it)."""
    output = run_tool("llama-simple", ["-m", str(model), "-n", str(n_predict), prompt], timeout=600)
    start = output.find(prompt)
    if start < 0:
        raise TasaError(f"llama-simple did not echo the prompt for {model}")
    return output[start:].split("\nmain: decoded")[0].split("\nllama_perf")[0].strip()


def write_multiple_choice_file(rows: Sequence[Mapping], path: Path) -> Path:
    """llama-perplexity's binary multiple-choice task file (`tools/perplexity/perplexity.cpp`), little-endian:
    uint32 n_tasks, uint32 byte offset of each task, then per task: string question, the single-answer set
    (uint32 n, n strings, n int32 labels 0/1) and an empty multi-answer set (uint32 0). A string is its uint32
    UTF-8 byte length followed by the bytes. Rows are ours ({"query", "choices", "label"}); llama.cpp scores
    question + " " + answer, as our evaluator does."""
    def string(text: str) -> bytes:
        data = text.encode("utf-8")
        return struct.pack("<I", len(data)) + data

    blobs = []
    for row in rows:
        choices = list(row["choices"])
        if not row["query"] or not all(choices):
            raise UsageError("llama.cpp rejects multiple-choice rows with an empty question or answer")
        labels = [int(i == row["label"]) for i in range(len(choices))]
        blobs.append(string(row["query"]) + struct.pack("<I", len(choices)) + b"".join(map(string, choices))
                     + struct.pack(f"<{len(labels)}i", *labels) + struct.pack("<I", 0))
    offsets, position = [], 4 + 4 * len(blobs)
    for blob in blobs:
        offsets.append(position)
        position += len(blob)
    Path(path).write_bytes(struct.pack(f"<I{len(blobs)}I", len(blobs), *offsets) + b"".join(blobs))
    return Path(path)


def llama_multiple_choice(model: Path, rows: Sequence[Mapping], *, threads: int = 2, ctx: int = 2048) -> list[bool]:
    """Per row (in order), whether llama.cpp's own multiple-choice scorer (`llama-perplexity --multiple-choice`)
    picks the labelled choice: each choice's tokens past the choices' common prefix, best mean log-prob wins.

    llama-perplexity prints the running accuracy after each task; the flags are read back from it."""
    if not rows:
        raise UsageError("no multiple-choice rows to score")
    with tempfile.TemporaryDirectory() as folder:
        task_file = write_multiple_choice_file(rows, Path(folder) / "tasks.bin")
        output = run_tool("llama-perplexity", ["-m", str(model), "-f", str(task_file), "--multiple-choice",
                                               "--multiple-choice-tasks", "0", "-c", str(ctx), "-b", str(ctx),
                                               "-t", str(threads)])
    running = [float(m.group(2)) for m in re.finditer(r"^(\d+)\t([0-9.]+)$", output, flags=re.MULTILINE)]
    if len(running) != len(rows) or "Final result:" not in output:
        raise TasaError(f"llama-perplexity --multiple-choice scored {len(running)} of {len(rows)} rows for {model}")
    correct = [round(acc * (i + 1) / 100) for i, acc in enumerate(running)]  # cumulative correct count
    return [now > before for before, now in zip([0, *correct[:-1]], correct)]


@dataclass(frozen=True)
class BenchResult:
    prompt_tok_s: float  # prompt processing throughput (pp)
    decode_tok_s: float  # token generation throughput (tg)
    peak_rss_mib: float | None = None  # llama-bench's own peak resident memory


def llama_bench(model: Path, *, n_prompt: int = 128, n_gen: int = 32, threads: int = 2, reps: int = 2) -> BenchResult:
    """llama-bench throughput for one model (JSON output)."""
    output, peak_rss_mib = run_tool_measured("llama-bench", ["-m", str(model), "-p", str(n_prompt), "-n", str(n_gen),
                                                             "-t", str(threads), "-r", str(reps), "-o", "json"])
    rows = json.loads(output[output.index("["):output.rindex("]") + 1])
    prompt = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
    decode = next(r["avg_ts"] for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    return BenchResult(float(prompt), float(decode), round(peak_rss_mib, 1))


# ------------------------------------------------------------------------------------ importance matrix
@torch.no_grad()
def collect_input_sq_sums(model: torch.nn.Module, modules: Mapping[str, torch.nn.Linear],
                          calibration_tokens: torch.Tensor) -> dict[str, tuple[torch.Tensor, int]]:
    """Per linear: (sum over tokens of x^2 per input column [K] float64, number of forward calls)."""
    from tasa_deploy.capture import linear_input_hooks

    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in modules.items()}
    calls = dict.fromkeys(modules, 0)

    def on_input(name: str, x: torch.Tensor) -> None:
        sums[name] += x.reshape(-1, x.shape[-1]).double().pow(2).sum(0)
        calls[name] += 1

    with linear_input_hooks(dict(modules), on_input):
        for row in calibration_tokens:  # [T]; one call per sequence, like llama-imatrix's chunks
            model(input_ids=row[None], use_cache=False)
    return {name: (sums[name], calls[name]) for name in modules}


def write_imatrix_gguf(path: Path, stats: Mapping[str, tuple[torch.Tensor, int]], *, chunk_size: int,
                       dataset: str = "tasa-calibration") -> None:
    """Write llama.cpp's GGUF imatrix: `<tensor>.in_sum2` [K] and `<tensor>.counts` per GGUF weight name."""
    writer = gguf.GGUFWriter(path, arch="imatrix")  # general.architecture is ignored by the loader
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", [dataset])
    n_calls = max((calls for _, calls in stats.values()), default=0)
    writer.add_uint32("imatrix.chunk_count", n_calls)
    writer.add_uint32("imatrix.chunk_size", chunk_size)
    for name, (sq_sum, calls) in stats.items():
        writer.add_tensor(f"{name}.in_sum2", sq_sum.float().numpy().reshape(1, -1))  # ggml ne = [K, 1]
        writer.add_tensor(f"{name}.counts", np.array([[float(calls)]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ------------------------------------------------------------------------------------ llama-quantize route
FTYPE_FOR_TYPE = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q8_0": "Q8_0", "q2_k": "Q2_K",
                  "q3_k": "Q3_K_M", "q4_k": "Q4_K_M", "q5_k": "Q5_K_M", "q6_k": "Q6_K"}


def llama_quantize(base_gguf: Path, out: Path, ftype: str, *, imatrix: Path | None = None,
                   tensor_type_file: Path | None = None, embedding_type: str | None = None,
                   threads: int = 2) -> Path:
    """Run llama-quantize on an F16/F32 GGUF (`ftype` e.g. "Q4_K_M"); per-tensor overrides optional."""
    args = []
    if tensor_type_file is not None:
        args += ["--tensor-type-file", str(tensor_type_file)]
    if embedding_type is not None:
        args += ["--token-embedding-type", embedding_type, "--output-tensor-type", embedding_type]
    if imatrix is not None:
        args += ["--imatrix", str(imatrix)]
    run_tool("llama-quantize", [*args, str(base_gguf), str(out), ftype, str(threads)])
    return Path(out)


def planned_gguf_types(artifact, type_map: Mapping[int, str] | None = None) -> dict[str, str]:
    """GGUF weight name -> GGML type the plan asks for (int-grid modules mapped as `gguf.export_gguf` does)."""
    from tasa_deploy.exporters.gguf import choose_ggml_type, gguf_architecture

    arch, _ = gguf_architecture(artifact.config)
    name_map = gguf.get_tensor_name_map(arch, int(artifact.config["num_hidden_layers"]))
    types = {}
    for module, qt in artifact.modules.items():
        wanted = qt.fmt if qt.fmt != "int" else choose_ggml_type(qt.bits, qt.shape[1], type_map)[0]
        types[name_map.get_name(f"{module}.weight", try_suffixes=(".weight",))] = wanted
    return types


def imatrix_for_model(model_dir: Path, calibration_tokens: torch.Tensor, path: Path) -> Path:
    """Compute and write a GGUF imatrix for the base model in `model_dir` from token rows [n, T]."""
    from transformers import AutoModelForCausalLM

    from tasa_deploy.exporters.gguf import gguf_architecture
    from tasa_deploy.model import load_config, quantizable_modules

    config = load_config(model_dir, str(model_dir))
    arch, _ = gguf_architecture(config.to_dict())
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=False).eval()
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    stats = collect_input_sq_sums(model, quantizable_modules(model), calibration_tokens)
    named = {name_map.get_name(f"{k}.weight", try_suffixes=(".weight",)): v for k, v in stats.items()}
    write_imatrix_gguf(path, named, chunk_size=int(calibration_tokens.shape[1]))
    return path


def export_gguf_via_llama_quantize(artifact_dir: Path, out: Path, base_model_dir: Path,
                                   calibration_tokens: torch.Tensor | None, force: bool = False, *,
                                   type_map: Mapping[int, str] | None = None, embedding_type: str = "f16"):
    """GGUF with the plan's per-tensor types, quantized by llama-quantize itself from the base weights
    (with an importance matrix from `calibration_tokens` [n, T] when given). Returns a GGUFExportReport
    read back from the written file."""
    from tasa_deploy.quantized_dir import load_artifact
    from tasa_deploy.exporters.gguf import check_gguf_names, export_dense_gguf
    from tasa_deploy.outputs import atomic_path, check_output

    check_output(Path(out), force=force, inputs=(Path(artifact_dir), Path(base_model_dir)))
    artifact = load_artifact(Path(artifact_dir))
    if calibration_tokens is not None and calibration_tokens.ndim != 2:
        raise UsageError(f"calibration tokens must be [n, T], got shape {tuple(calibration_tokens.shape)}")
    types = planned_gguf_types(artifact, type_map)
    dominant = max(set(types.values()), key=list(types.values()).count)
    with tempfile.TemporaryDirectory(dir=Path(out).parent) as work:
        work = Path(work)
        base = export_dense_gguf(Path(base_model_dir), work / "base-f16.gguf", dtype="f16")
        type_file = work / "tensor_types.txt"
        type_file.write_text("".join(f"^{re.escape(name)}$={t}\n" for name, t in types.items()))
        imatrix = imatrix_for_model(Path(base_model_dir), calibration_tokens, work / "imatrix.gguf") \
            if calibration_tokens is not None else None
        with atomic_path(Path(out), force=force, inputs=(Path(artifact_dir),)) as tmp:
            llama_quantize(base, tmp, FTYPE_FOR_TYPE[dominant], imatrix=imatrix, tensor_type_file=type_file,
                           embedding_type=embedding_type)
            check_gguf_names(artifact.config, (t.name for t in gguf.GGUFReader(tmp).tensors), str(out))
    return report_from_file(Path(out), types)


def report_from_file(path: Path, planned: Mapping[str, str]):
    """GGUFExportReport of an existing GGUF: types from its tensor table, bpw over the planned tensors,
    and a warning for each planned tensor whose stored type differs from the plan."""
    from tasa_deploy.exporters.gguf import GGUFExportReport, stored_bits_per_weight

    tensors = gguf.GGUFReader(path).tensors
    types = {t.name: t.tensor_type.name.lower() for t in tensors}
    bpw = stored_bits_per_weight(t for t in tensors if t.name in planned)
    warnings = tuple(f"{name}: planned {want}, llama-quantize stored {types.get(name)}"
                     for name, want in planned.items() if types.get(name) != want)
    return GGUFExportReport(path, path.stat().st_size, types, bpw, warnings)
