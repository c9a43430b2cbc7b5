"""Serve an export with the runtime that will serve it in production: llama-server for a GGUF, vLLM for a
compressed-tensors export.

`tasa-deploy serve model.gguf` starts llama.cpp's `llama-server` (built by `benchmarks/llamacpp.sh`) on
127.0.0.1 with an OpenAI-compatible API (`/v1/completions`, `/v1/chat/completions`), waits until its `/health`
answers, prints the URL and keeps it in the foreground until interrupted. A quantized artifact directory is
exported to a temporary GGUF first (`api.export`; an int-grid artifact is re-quantized onto GGML grids).
`start_server` is the Python API the load test and the task benchmark (`tasa_deploy.bench`) use: a `Server` that
knows its URL, its process and its peak memory, and stops its process on exit.

Defaults follow llama-server's own, sized for a small box: context 4096 shared by `parallel` slots (4), the
machine's CPU count for threads.

A `tasa-deploy export --format vllm` directory (or an artifact with `runtime="vllm"`, exported first) is served
by vLLM's OpenAI server (what `vllm serve` runs), run by the python of a separate vLLM environment:
`$TASA_VLLM_PYTHON`, else the one `benchmarks/vllm_cpu_env.sh` builds. vLLM pins its own torch and
transformers, so it never shares this package's environment; that environment has tasa-deploy installed without
dependencies, whose `vllm.general_plugins` entry point (`tasa_deploy.kernels.vllm_plugin`) gives vLLM a kernel
for the 3- and 8-bit layers its own WNA16 kernels lack. Both runtimes answer `/health` and the same OpenAI routes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tasa_deploy import TasaError, UsageError

READY_TIMEOUT_S = 600
RUNTIMES = ("auto", "llamacpp", "vllm")
VLLM_PYTHON_DEFAULT = Path.home() / ".cache" / "tasa-deploy" / "vllm-venv" / "bin" / "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running llama-server or vLLM server (`start_server`); a context manager that stops it."""

    process: subprocess.Popen
    url: str  # base URL of the OpenAI-compatible API, e.g. http://127.0.0.1:8080/v1
    log_path: Path
    cleanup: list = field(default_factory=list)  # temporary directories to remove when stopped
    runtime: str = "llamacpp"

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    def peak_rss_mib(self) -> float:
        """The server's memory high-water mark (VmHWM), read while it runs: summed over its process tree, since
        vLLM runs its engine in child processes (an upper bound on the tree's joint peak)."""
        peaks = [_vm_hwm_kib(pid) for pid in _process_tree(self.process.pid)]
        peaks = [p for p in peaks if p is not None]
        return sum(peaks) / 1024 if peaks else float("nan")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # both servers stop their own children on SIGTERM
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for item in self.cleanup:
            item.cleanup()
        self.cleanup.clear()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def llama_server_command(gguf: Path, *, port: int, ctx: int = 4096, parallel: int = 4,
                         threads: int | None = None) -> list[str]:
    from tasa_deploy.exporters.llamacpp import find_llamacpp_bin

    directory = find_llamacpp_bin(("llama-server",))
    return [str(directory / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "-c", str(ctx), "-np", str(parallel), "-t", str(threads or os.cpu_count() or 1), "--no-webui"]


def _process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except OSError:
                pass
    return pids


def _vm_hwm_kib(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    line = next((l for l in status.splitlines() if l.startswith("VmHWM:")), None)
    return int(line.split()[1]) if line else None


def is_vllm_export(path: Path) -> bool:
    """A directory with a compressed-tensors `quantization_config` (what `export --format vllm` writes)."""
    config = Path(path) / "config.json"
    if not (Path(path).is_dir() and config.is_file()):
        return False
    try:
        quant = json.loads(config.read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(quant, dict) and quant.get("quant_method") == "compressed-tensors"


def vllm_python() -> Path:
    """The python of the vLLM environment ($TASA_VLLM_PYTHON, else benchmarks/vllm_cpu_env.sh's venv)."""
    path = Path(os.environ.get("TASA_VLLM_PYTHON") or VLLM_PYTHON_DEFAULT)
    if not path.is_file():
        raise UsageError(f"no vLLM environment at {path}: build one with `bash benchmarks/vllm_cpu_env.sh` (CPU), "
                         "or set TASA_VLLM_PYTHON to a python that has vllm and tasa-deploy (--no-deps) installed")
    return path


def vllm_server_command(model_dir: Path, *, python: Path, port: int, ctx: int = 4096, parallel: int = 4,
                        dtype: str = "bfloat16") -> list[str]:
    # vLLM's OpenAI server module, which `vllm serve` wraps: the `vllm` CLI looks up its own distribution by the
    # name "vllm" and fails in builds published under another name (vllm-cpu)
    return [str(python), "-W", "ignore::DeprecationWarning", "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(ctx),
            "--max-num-seqs", str(parallel), "--dtype", dtype, "--served-model-name", Path(model_dir).name]


def start_server(path: Path, *, port: int | None = None, ctx: int = 4096, parallel: int = 4,
                 threads: int | None = None, runtime: str = "auto", timeout: float = READY_TIMEOUT_S,
                 log=lambda m: None) -> Server:
    """A ready server: llama-server for a GGUF file, vLLM for a compressed-tensors export directory; a quantized
    artifact is exported first to the format of `runtime` (auto: GGUF)."""
    if runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime {runtime!r}: choose {', '.join(RUNTIMES)}")
    path, cleanup = _servable(Path(path), runtime, log)
    vllm = path.is_dir()  # _servable returns a vLLM export directory or a .gguf file
    port = port or free_port()
    log_file = tempfile.NamedTemporaryFile(prefix=f"tasa-{'vllm' if vllm else 'llama'}-server-", suffix=".log",
                                           delete=False)
    if vllm:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        command = vllm_server_command(path, python=vllm_python(), port=port, ctx=ctx, parallel=parallel)
    else:
        from tasa_deploy.exporters.gguf_check import check_gguf_header

        check_gguf_header(path)  # an untrusted file is checked before the runtime reads it
        env, command = None, llama_server_command(path, port=port, ctx=ctx, parallel=parallel, threads=threads)
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    server = Server(process, f"http://127.0.0.1:{port}/v1", Path(log_file.name), cleanup,
                    "vllm" if vllm else "llamacpp")
    try:
        _wait_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _servable(path: Path, runtime: str, log) -> tuple[Path, list]:
    """The file or directory the runtime reads (an artifact exported to a temporary one), and what to clean up."""
    if path.is_dir() and (path / "quantized.json").is_file():
        from tasa_deploy.api import export

        tmp = tempfile.TemporaryDirectory(prefix="tasa-serve-")
        fmt = "vllm" if runtime == "vllm" else "gguf"
        out = Path(tmp.name) / (path.name if fmt == "vllm" else f"{path.name}.gguf")
        log(f"exporting {path} to {fmt} for {'vLLM' if fmt == 'vllm' else 'llama-server'}")
        export(path, out, format=fmt, log=log)
        return out, [tmp]
    if is_vllm_export(path):
        if runtime == "llamacpp":
            raise UsageError(f"{path} is a vLLM export; llama-server serves a .gguf (use --runtime vllm)")
        return path, []
    if path.is_dir():
        raise UsageError(f"{path} is a directory but neither a tasa-deploy artifact nor a vLLM export; serve a "
                         ".gguf, an artifact, or an `export --format vllm` directory")
    if path.suffix != ".gguf" or not path.is_file():
        raise UsageError(f"nothing to serve at {path}: give a .gguf file, a quantized artifact or a vLLM export")
    if runtime == "vllm":
        raise UsageError(f"{path} is a GGUF; vLLM serves an `export --format vllm` directory (use --runtime llamacpp)")
    return path, []


def _wait_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            tail = " | ".join(server.log_path.read_text(errors="replace").strip().splitlines()[-3:])
            raise TasaError(f"{_name(server)} exited (code {server.process.returncode}) before it was ready: {tail}")
        try:
            with urllib.request.urlopen(f"{server.root}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise TasaError(f"{_name(server)} was not ready after {timeout:.0f} s (log: {server.log_path})")


def _name(server: Server) -> str:
    return "vLLM" if server.runtime == "vllm" else "llama-server"
