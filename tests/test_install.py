"""Install hygiene (issue #12): what a fresh machine runs is what CI runs, every import is declared, the lock
satisfies the declared ranges, and `--help` on every command exits 0 with no error line."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "locks" / "cpu-py311.txt"
SOURCE_DIRS = ("tasa_deploy", "exporters", "kernels")
# Modules documented as needing an extra at import time (everything else imports extras lazily, in functions).
EXTRA_AT_IMPORT = {"kernels/mixed_gemm.py": {"triton"}}

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _norm(re.split(r"[\s<>=!~;\[]", req.strip(), maxsplit=1)[0])


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _declared() -> tuple[set[str], set[str]]:
    project = _project()
    core = {_requirement_name(r) for r in project["dependencies"]}
    extras = {_requirement_name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    return core, extras


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module name, imported at module level?) for every absolute import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # imports inside a module-level `if`/`try` still run at import time
        if isinstance(node, (ast.If, ast.Try)):
            top_level.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], id(node) in top_level))
    return found


def _distributions(module: str) -> set[str]:
    return {_norm(d) for d in metadata.packages_distributions().get(module, [])} or {_norm(module)}


def test_every_import_is_a_declared_dependency():
    core, extras = _declared()
    problems = []
    for folder in SOURCE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = str(path.relative_to(REPO))
            for module, at_import in _imports(path):
                if module in sys.stdlib_module_names or module in ("tasa_deploy", "__future__"):
                    continue
                dists = _distributions(module)
                allowed = core | (EXTRA_AT_IMPORT.get(rel, set()) if at_import else extras)
                if not dists & allowed:
                    problems.append(f"{rel}: import {module} (distribution {sorted(dists)}) is not declared"
                                    f"{' as a core dependency' if at_import else ''}")
    assert not problems, "\n".join(problems)


def test_readme_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    section = readme.split("Run the tests", 1)[1]
    command = re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines, f"README test command is not a line of .ci/run:\n{command}"


def test_readme_commands_install_from_the_lock():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.+?)\n```", readme, re.S)[:2]
    assert len(blocks) == 2
    for block in blocks:
        for install in re.findall(r"pip install [^&]+", block):
            assert f"-c {LOCK.relative_to(REPO)}" in install, install


def _lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[_norm(name)] = version.strip()
    return pins


def test_lock_pins_every_declared_dependency_within_its_range():
    from packaging.requirements import Requirement
    from packaging.version import Version

    pins = _lock_pins()
    project = _project()
    reqs = list(project["dependencies"]) + list(project["optional-dependencies"]["test"])
    for text in reqs:
        req = Requirement(text)
        name = _norm(req.name)
        assert name in pins, f"{name} is declared but not pinned in {LOCK.name}"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), (text, pins[name])


def _commands() -> list[str]:
    from tasa_deploy.cli import app
    import typer

    return [""] + sorted(typer.main.get_command(app).commands)


@pytest.mark.parametrize("command", _commands())
def test_help_exits_zero_without_an_error_line(command):
    args = [sys.executable, "-m", "tasa_deploy.cli", *([command] if command else []), "--help"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "error" not in done.stderr.lower(), done.stderr
    assert "Usage" in done.stdout


def test_usage_errors_exit_2_with_clicks_usage_message():
    for args in (["plan"], ["plan", "--profile", "x.json", "--bogus"], ["plan", "--profile", "x.json", "--bits", "abc"]):
        done = subprocess.run([sys.executable, "-m", "tasa_deploy.cli", *args], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2, (args, done.stderr)
        assert "Usage:" in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert not re.search(r"\b(MissingParameter|NoSuchOption|BadParameter):", done.stderr), done.stderr


def test_framework_exceptions_are_recognised_whatever_their_hierarchy():
    import typer

    from tasa_deploy.cli import is_framework_exception

    assert is_framework_exception(typer.Exit(0)) and is_framework_exception(typer.Abort())
    click = pytest.importorskip("click")
    assert is_framework_exception(click.exceptions.Exit(0))
    assert is_framework_exception(click.UsageError("x"))
    assert not is_framework_exception(RuntimeError("Exit"))
