"""Run untrusted Python (model-generated code and its tests) in a contained child process.

Code evaluation (HumanEval / MBPP pass@1, `--task-data` rows with "tests") executes what a model wrote; it
must never run in the tool's own process, and a hostile or broken sample must cost one failed item, not the
evaluator. Each sample runs in a fresh child process:

  - the base interpreter in isolated mode (`python -I -B`: no site-packages, no PYTHON* variables), cwd a
    fresh temporary directory removed afterwards, stdin closed, a scrubbed environment (PATH, LANG, HOME=cwd);
  - rlimits: CPU seconds, address space (a 10 GB allocation fails), file size (output is written to a file,
    so an endless print is cut at `max_output_bytes`), open files, processes (a fork bomb stalls), no core;
  - its own session, killed as a group at the wall-clock timeout;
  - where the platform allows (running as root on Linux, with a Python `nobody` may run): a new network namespace (no network) and the
    uid/gid of `nobody`, so it cannot write outside its directory, read /proc/<parent>/environ or signal the
    evaluator, and every process it left behind is killed afterwards (kill(-1) as `nobody`). Without root
    these two layers are skipped and `SandboxResult.isolation` says so.

A sample passes when its program exits 0 within the limits; everything else (exception, assertion, timeout,
signal) is a failure. `SandboxResult.status` says which.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534
CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class SandboxLimits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30  # address space of the child
    max_processes: int = 16  # counted per uid: effective once the child runs as `nobody`
    max_output_bytes: int = 1 << 20
    max_open_files: int = 64


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # "passed" | "failed" (non-zero exit) | "timeout" | "killed" (by a signal or a limit)
    returncode: int | None
    output: str  # the last 2000 characters of stdout + stderr
    isolation: tuple[str, ...]  # layers applied, e.g. ("rlimits", "session", "no-network", "uid-nobody")


def _world_executable(path: Path) -> bool:
    """Whether any user may run `path`: the file is o+rx and every folder above it o+x."""
    path = path.resolve()
    if not path.is_file() or path.stat().st_mode & 0o005 != 0o005:
        return False
    return all(parent.stat().st_mode & 0o001 for parent in path.parents)


def _interpreter(drop: bool) -> str | None:
    """A base Python (not a venv's: the sample gets the standard library and nothing of ours); when the
    child will run as `nobody`, one that `nobody` may execute (None if there is none)."""
    candidates = [getattr(sys, "_base_executable", None) or sys.executable, "/usr/bin/python3",
                  shutil.which("python3") or ""]
    if not drop:
        return candidates[0]
    return next((c for c in candidates if c and _world_executable(Path(c))), None)


def can_drop_privileges() -> bool:
    """Running as root on Linux with an interpreter `nobody` can execute."""
    return sys.platform.startswith("linux") and os.geteuid() == 0 and _interpreter(True) is not None


def _child_setup(limits: SandboxLimits, drop: bool):
    def setup() -> None:  # runs in the child between fork and exec
        for kind, value in ((resource.RLIMIT_CPU, limits.cpu_seconds), (resource.RLIMIT_AS, limits.memory_bytes),
                            (resource.RLIMIT_FSIZE, limits.max_output_bytes), (resource.RLIMIT_CORE, 0),
                            (resource.RLIMIT_NOFILE, limits.max_open_files),
                            (resource.RLIMIT_NPROC, limits.max_processes)):
            resource.setrlimit(kind, (value, value))
        if drop:
            ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET)  # best effort: 0 on success
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
    return setup


def _kill_leftovers(drop: bool) -> None:
    """Kill every process of `nobody` (what a fork bomb left behind): a child that becomes nobody and
    calls kill(-1), which reaches exactly the processes that uid may signal."""
    if not drop:
        return
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked child
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def run_python(source: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `source` as a program in the sandbox described in the module docstring."""
    drop = can_drop_privileges()
    isolation = ("rlimits", "session", "clean-env") + (("no-network", "uid-nobody") if drop else ())
    workdir = Path(tempfile.mkdtemp(prefix="tasa-sandbox-"))
    try:
        (workdir / "program.py").write_text(source, encoding="utf-8")
        if drop:
            os.chown(workdir, NOBODY, NOBODY)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(workdir)}
        with open(workdir / ".output", "wb") as out:
            process = subprocess.Popen([_interpreter(drop), "-I", "-B", "program.py"], cwd=workdir, env=env,
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True, close_fds=True,
                                       preexec_fn=_child_setup(limits, drop))
            try:
                returncode = process.wait(timeout=limits.wall_seconds)
                status = "passed" if returncode == 0 else ("killed" if returncode < 0 else "failed")
            except subprocess.TimeoutExpired:
                returncode, status = None, "timeout"
            finally:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                process.wait()
                _kill_leftovers(drop)
        with open(workdir / ".output", "rb") as f:
            f.seek(max(0, os.path.getsize(workdir / ".output") - 8000))
            output = f.read().decode("utf-8", errors="replace")[-2000:]
        return SandboxResult(status == "passed", status, returncode, output, isolation)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


__all__ = ["SandboxLimits", "SandboxResult", "run_python", "can_drop_privileges"]
