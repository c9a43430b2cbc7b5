"""One output policy for every command: never delete what we did not write, never leave half a file.

- Without `force`, an existing output is an error. With `force`, only an output that tasa-deploy wrote is
  replaced, recognised by content: a JSON file whose `schema` starts with `tasa-`, a GGUF or PNG or
  safetensors file carrying the `tasa-deploy` tag in its header, or a directory holding our marker file
  `.tasa-deploy` (which lists the entries we wrote; a directory with anything else in it is refused).
  A directory is never replaced by a file nor a file by a directory.
- An output that is also an input (the same path, or one inside the other) is refused.
- Writes go to a temp path beside the output, named `.NAME.tasa-PID-RANDOM.tmp`, and are renamed into place;
  on any error the temp is removed. Stale temps are removed only when their name is exactly ours and the
  process that made them is gone (no glob patterns: an output named `*` matches nothing but itself).
- `check_output` runs every check up front, so commands refuse a bad `--out` before loading a model.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from tasa_deploy import TasaError, UsageError
from tasa_deploy.schema import MAX_JSON_BYTES

TAG = "tasa-deploy"  # written into every header we control (GGUF general.quantized_by, PNG Software, ...)
MARKER = ".tasa-deploy"  # in every directory we write: {"tool": TAG, "entries": [...]}
_SNIFF_BYTES = 1 << 16


# ----------------------------------------------------------------------------------------- recognition
def _sniff(path: Path, n: int = _SNIFF_BYTES) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _json_object(data: bytes) -> dict:
    """The JSON object in `data`, or {} when it is not one (any parse failure: we only sniff here)."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _is_our_file(path: Path) -> bool:
    head = _sniff(path)
    if head.startswith((b"GGUF", b"\x89PNG")):
        return TAG.encode() in head
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: u64 header length, then a JSON header
        return _safetensors_writer(path, int.from_bytes(head[:8], "little")) == TAG
    if head.lstrip().startswith(b"{") and path.stat().st_size <= MAX_JSON_BYTES:
        obj = _json_object(path.read_bytes())
        schema = obj.get("schema", "")
        return (isinstance(schema, str) and schema.startswith("tasa-")) or _is_layer_config(obj)
    if head.startswith(b"# ") and TAG.encode() in head.split(b"\n", 1)[0]:  # YAML we wrote (emit.py)
        return True
    return bool(head) and path.stat().st_size <= MAX_JSON_BYTES and all(
        _TENSOR_TYPE_LINE.match(line) for line in path.read_bytes().splitlines())  # emit.py's llama-quantize file


_TENSOR_TYPE_LINE = re.compile(rb"^\^blk\\\.\d+\\\.[a-z_]+\\\.weight\$=[a-z0-9_]+$")


def _is_layer_config(obj: dict) -> bool:
    """An AutoRound layer_config as emit.py writes it: every value exactly {bits, group_size, sym}."""
    return bool(obj) and all(isinstance(v, dict) and set(v) == {"bits", "group_size", "sym"} for v in obj.values())


def _safetensors_writer(path: Path, header_len: int) -> str | None:
    if header_len > min(MAX_JSON_BYTES, path.stat().st_size - 8):
        return None
    with open(path, "rb") as f:
        f.seek(8)
        meta = _json_object(f.read(header_len)).get("__metadata__") or {}
    return meta.get("writer") if isinstance(meta, dict) else None


def _dir_entries_we_wrote(path: Path) -> set[str] | None:
    """Entries our marker lists (None when the directory is not ours). Artifacts written before the marker
    existed are recognised by their `quantized.json` schema and their file types."""
    marker = path / MARKER
    if marker.is_file():
        obj = _json_object(marker.read_bytes())
        if obj.get("tool") == TAG and isinstance(obj.get("entries"), list):
            return {str(e) for e in obj["entries"]} | {MARKER}
        return None
    if (path / "quantized.json").is_file() and _is_our_file(path / "quantized.json"):
        legacy = {".json", ".txt", ".model", ".jinja", ".safetensors"}
        return {p.name for p in path.iterdir() if p.is_file() and p.suffix in legacy}
    return None


def _why_not_replaceable(final: Path, is_dir: bool, foreign_ok: bool = False) -> str | None:
    if final.is_dir() != is_dir:
        return (f"{final} is a {'directory' if final.is_dir() else 'file'} and this output is a "
                f"{'directory' if is_dir else 'file'}; refusing to replace one with the other")
    if not is_dir:
        ours = foreign_ok or _is_our_file(final)
        return None if ours else f"{final} was not written by tasa-deploy; refusing to replace it"
    if not any(final.iterdir()):
        return None  # an empty directory holds nothing to lose
    ours = _dir_entries_we_wrote(final)
    if ours is None:
        return f"{final} is a directory tasa-deploy did not write; refusing to replace it"
    extra = sorted(p.name for p in final.iterdir() if p.name not in ours)
    if extra:
        return f"{final} holds files tasa-deploy did not write ({', '.join(extra[:3])}); refusing to replace it"
    return None


# ----------------------------------------------------------------------------------------- checks
def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output(final: Path, *, is_dir: bool = False, force: bool = False, inputs: Iterable[Path] = (),
                 need_bytes: int = 0, foreign_ok: bool = False) -> None:
    """Every reason `final` cannot be written, raised before any work (UsageError, exit 2). `foreign_ok`
    (benchmark result files only) lets `force` replace a file we cannot recognise; never a directory."""
    final = Path(final)
    for source in inputs:
        if source is not None and Path(source).exists() and _overlaps(final, Path(source)):
            raise UsageError(f"output {final} is also an input ({source}); write the output somewhere else")
    if final.exists() or final.is_symlink():
        if final.is_symlink():
            raise UsageError(f"output {final} is a symbolic link; refusing to write through it")
        if not force:
            raise UsageError(f"output {final} already exists; pass --force to overwrite it")
        reason = _why_not_replaceable(final, is_dir, foreign_ok)
        if reason:
            raise UsageError(reason)
    parent = _nearest_existing(final.parent)
    if not parent.is_dir():
        raise UsageError(f"cannot write {final}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {final}: {parent} is not writable")
    free = shutil.disk_usage(parent).free
    if need_bytes and free < need_bytes:
        raise UsageError(f"cannot write {final}: it needs about {need_bytes / 2**20:.0f} MiB and only "
                         f"{free / 2**20:.0f} MiB is free on {parent}")


def check_writable_dir(path: Path, what: str) -> None:
    """A cache or work directory we will create files in: it must exist (or be creatable) and be writable."""
    parent = _nearest_existing(Path(path))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path} is not writable (checked {parent})")


# ----------------------------------------------------------------------------------------- writing
def _temp_prefix(final: Path) -> str:
    return f".{final.name}.tasa-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _remove_stale_temps(final: Path) -> None:
    """Delete temps a killed earlier run left beside `final`: exactly our name, from a process that is gone."""
    prefix = _temp_prefix(final)
    if not final.parent.is_dir():
        return
    for entry in final.parent.iterdir():
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid = name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            _remove(entry)


def _make_temp(final: Path, is_dir: bool) -> Path:
    prefix = f"{_temp_prefix(final)}{os.getpid()}-"
    if is_dir:
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=final.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=final.parent)
    os.close(fd)
    return Path(name)


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def _install(tmp: Path, final: Path) -> None:
    """Rename `tmp` onto `final`; an existing `final` (already checked replaceable) is moved aside first and
    deleted only after the new one is in place."""
    if not final.exists():
        os.replace(tmp, final)
        return
    aside = _make_temp(final, is_dir=False)
    aside.unlink()
    os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(aside, final)
        raise
    _remove(aside)


@contextlib.contextmanager
def atomic_path(final: Path, *, is_dir: bool = False, force: bool = False, inputs: Iterable[Path] = (),
                foreign_ok: bool = False) -> Iterator[Path]:
    """Yield a temp path beside `final`; on success move it into place (see the module docstring for what may
    be replaced), on any error delete it."""
    final = Path(final)
    check_output(final, is_dir=is_dir, force=force, inputs=inputs, foreign_ok=foreign_ok)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final)
    tmp = _make_temp(final, is_dir)
    try:
        yield tmp
        if is_dir:
            entries = sorted(p.name for p in tmp.iterdir())
            (tmp / MARKER).write_text(json.dumps({"tool": TAG, "entries": entries}) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, (0o777 if is_dir else 0o666) & ~umask)  # mkstemp/mkdtemp create private files
        check_output(final, is_dir=is_dir, force=force, foreign_ok=foreign_ok)  # the world may have changed while we worked
        _install(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def write_json_atomic(path: Path, obj: Any, *, force: bool = True, inputs: Iterable[Path] = (),
                      foreign_ok: bool = False) -> None:
    """Write a JSON object atomically. Internal stage files default to `force` (replace our own file); any
    JSON we replace must carry a `tasa-` schema, so give one to everything written this way."""
    with atomic_path(Path(path), force=force, inputs=inputs, foreign_ok=foreign_ok) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


__all__ = ["atomic_path", "write_json_atomic", "check_output", "check_writable_dir", "TAG", "MARKER", "TasaError"]
