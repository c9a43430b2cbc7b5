"""Serve an export with the runtime that will serve it in production: llama-server for a GGUF.

`tasa-deploy serve model.gguf` starts llama.cpp's `llama-server` (built by `benchmarks/llamacpp.sh`) on
127.0.0.1 with an OpenAI-compatible API (`/v1/completions`, `/v1/chat/completions`), waits until its `/health`
answers, prints the URL and keeps it in the foreground until interrupted. A quantized artifact directory is
exported to a temporary GGUF first (`api.export`; an int-grid artifact is re-quantized onto GGML grids).
`start_server` is the Python API the load test and the task benchmark (`tasa_deploy.bench`) use: a `Server` that
knows its URL, its process and its peak memory, and stops its process on exit.

Defaults follow llama-server's own, sized for a small box: context 4096 shared by `parallel` slots (4), the
machine's CPU count for threads. A vLLM compressed-tensors export is served by `vllm serve DIR` in the vLLM
environment (`benchmarks/vllm_cpu_env.sh`); that route is not wired here yet.
"""

from __future__ import annotations

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running llama-server (`start_server`); a context manager that stops it."""

    process: subprocess.Popen
    url: str  # base URL of the OpenAI-compatible API, e.g. http://127.0.0.1:8080/v1
    log_path: Path
    cleanup: list = field(default_factory=list)  # temporary directories to remove when stopped

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    def peak_rss_mib(self) -> float:
        """The server's memory high-water mark (VmHWM), read while it runs."""
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return float("nan")
        line = next((l for l in status.splitlines() if l.startswith("VmHWM:")), "VmHWM: 0 kB")
        return int(line.split()[1]) / 1024

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
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


def start_server(path: Path, *, port: int | None = None, ctx: int = 4096, parallel: int = 4,
                 threads: int | None = None, timeout: float = READY_TIMEOUT_S, log=lambda m: None) -> Server:
    """llama-server for a GGUF file (or a quantized artifact, exported to a temporary GGUF first), ready."""
    path = Path(path)
    cleanup = []
    if path.is_dir() and (path / "quantized.json").is_file():
        from tasa_deploy.api import export

        tmp = tempfile.TemporaryDirectory(prefix="tasa-serve-")
        cleanup.append(tmp)
        log(f"exporting {path} to GGUF for llama-server")
        export(path, Path(tmp.name) / f"{path.name}.gguf", format="gguf", log=log)
        path = Path(tmp.name) / f"{path.name}.gguf"
    elif path.is_dir():
        raise UsageError(f"{path} is a directory but not a tasa-deploy artifact; serve a .gguf or an artifact "
                         "(a vLLM export is served with `vllm serve DIR` in the vLLM environment)")
    elif path.suffix != ".gguf" or not path.is_file():
        raise UsageError(f"nothing to serve at {path}: give a .gguf file or a quantized artifact directory")
    from tasa_deploy.exporters.gguf_check import check_gguf_header

    check_gguf_header(path)  # an untrusted file is checked before the runtime reads it
    port = port or free_port()
    log_file = tempfile.NamedTemporaryFile(prefix="tasa-llama-server-", suffix=".log", delete=False)
    process = subprocess.Popen(llama_server_command(path, port=port, ctx=ctx, parallel=parallel, threads=threads),
                               stdout=log_file, stderr=subprocess.STDOUT)
    server = Server(process, f"http://127.0.0.1:{port}/v1", Path(log_file.name), cleanup)
    try:
        _wait_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            tail = " | ".join(server.log_path.read_text(errors="replace").strip().splitlines()[-3:])
            raise TasaError(f"llama-server exited (code {server.process.returncode}) before it was ready: {tail}")
        try:
            with urllib.request.urlopen(f"{server.root}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise TasaError(f"llama-server was not ready after {timeout:.0f} s (log: {server.log_path})")
