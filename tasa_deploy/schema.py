"""Reading untrusted JSON and checking its fields: the one place stage files and artifact indexes are parsed.

`read_json` bounds the file size, rejects duplicate keys, non-finite numbers (unless asked), bad UTF-8 and deep
nesting with one-line UsageErrors. `get_field` / `check_value` / `get_items` / `get_keyed` check one field's JSON
type, range, finiteness and choices, naming the file and the field path (`Loc`) in every message, so each
dataclass's `from_json` in artifacts.py reads as a list of rules.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from tasa_deploy import UsageError

MAX_JSON_BYTES = 256 * 2**20  # no stage file comes near this (a 7B profile is a few MB); bigger is not ours

# ----------------------------------------------------------------------------------------- reading JSON
class _JsonRejected(ValueError):
    """Raised by read_json's parser hooks (duplicate key, non-finite number); becomes a UsageError."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    obj: dict = {}
    for key, value in pairs:
        if key in obj:
            raise _JsonRejected(f"duplicate key {key!r} in one JSON object (JSON would silently keep the last)")
        obj[key] = value
    return obj


def _reject_constant(name: str) -> float:
    raise _JsonRejected(f"{name} is not a number tasa-deploy accepts (NaN and Infinity are refused)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _JsonRejected(f"number {text[:30]} overflows a float")
    return value


def _read_bounded(path: Path, what: str, max_bytes: int) -> bytes:
    too_big = f"{what} {path} is over the {max_bytes / 2**20:g} MiB limit for a JSON stage file; it is not one we wrote"
    try:
        if path.stat().st_size > max_bytes:
            raise UsageError(too_big)
        with open(path, "rb") as handle:
            raw = handle.read(max_bytes + 1)  # bounded even if the file grew since stat
    except OSError as exc:
        raise UsageError(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
    if len(raw) > max_bytes:
        raise UsageError(too_big)
    return raw


def read_json(path: Path, what: str, *, max_bytes: int | None = None, allow_nonfinite: bool = False) -> dict:
    """The JSON object in `path`; every failure is a one-line UsageError naming the file: missing, over
    `max_bytes` (default MAX_JSON_BYTES), not UTF-8, not JSON (truncated), nested too deeply, a duplicate key
    in one object, NaN/Infinity or a number overflowing a float (unless `allow_nonfinite`), not an object."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} not found: {path}")
    raw = _read_bounded(path, what, MAX_JSON_BYTES if max_bytes is None else max_bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} {path} is not valid UTF-8 (byte {exc.start}); it is not a JSON stage file") from None
    hooks = {} if allow_nonfinite else {"parse_constant": _reject_constant, "parse_float": _finite_float}
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys, **hooks)
    except _JsonRejected as exc:
        raise UsageError(f"{what} {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                         "it may be truncated — rerun the stage that wrote it") from None
    except RecursionError:
        raise UsageError(f"{what} {path} is nested too deeply to be a JSON stage file") from None
    except (ValueError, OverflowError) as exc:  # e.g. an integer beyond Python's 4300-digit limit
        raise UsageError(f"{what} {path} is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{what} {path} does not hold a JSON object")
    return obj


def check_schema(obj: dict, expected: str, path: Path, what: str) -> None:
    if obj.get("schema") != expected:
        raise UsageError(f"{what} {path} has schema {show(obj.get('schema'))}, expected {expected!r}; "
                         "rerun the stage that wrote it with this version of tasa-deploy")


# ----------------------------------------------------------------------------------------- field checks
@dataclass(frozen=True)
class Loc:
    """Where a JSON value sits, for one-line errors: "plan p.json: modules['x'].bits"."""

    text: str
    root: bool = False  # the file itself: its fields read "plan p.json: modules", not "plan p.json.modules"

    def key(self, key: str) -> "Loc":
        return Loc(f"{self.text}: {key}" if self.root else f"{self.text}.{key}")

    def item(self, index: int | str) -> "Loc":
        return Loc(f"{self.text}[{index!r}]")

    def fail(self, message: str) -> UsageError:
        return UsageError(f"{self.text} {message}")


# JSON kind -> (Python types json.loads gives it, how errors name it); bool is never an integer or a number.
_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "string": ((str,), "a string"), "integer": ((int,), "an integer"), "number": ((int, float), "a number"),
    "boolean": ((bool,), "true or false"), "object": ((dict,), "an object"), "array": ((list,), "an array")}


def show(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_value(value: Any, loc: Loc, kind: str, *, choices: tuple | None = None, lo: float | None = None,
                hi: float | None = None, nonempty: bool = True) -> Any:
    """`value` checked to be of JSON `kind`, finite (numbers), within [lo, hi], among `choices`, non-empty
    (strings, arrays, objects unless nonempty=False); returns it unchanged."""
    types, name = _KINDS[kind]
    if not isinstance(value, types) or (isinstance(value, bool) and kind != "boolean"):
        raise loc.fail(f"must be {name}, got {show(value)}")
    if kind == "number" and not math.isfinite(value):
        raise loc.fail(f"must be a finite number, got {value}")
    if choices is not None and value not in choices:
        raise loc.fail(f"must be one of {', '.join(map(repr, choices))}, got {show(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = (f"in [{lo}, {hi}]" if lo is not None and hi is not None
                  else f">= {lo}" if lo is not None else f"<= {hi}")
        raise loc.fail(f"must be {bounds}, got {value}")
    if nonempty and kind in ("string", "array", "object") and not value:
        raise loc.fail("must not be empty")
    return value


def get_field(obj: Mapping, key: str, loc: Loc, kind: str, *, optional: bool = False, nullable: bool = False,
              **limits: Any) -> Any:
    """obj[key] checked by `check_value`; a missing key is an error unless `optional` (-> None), null only if
    `nullable`."""
    if key not in obj:
        if optional:
            return None
        raise loc.key(key).fail("is missing")
    if obj[key] is None and nullable:
        return None
    return check_value(obj[key], loc.key(key), kind, **limits)


def get_items(obj: Mapping, key: str, loc: Loc, kind: str, *, distinct: bool = False, **limits: Any) -> list:
    """obj[key] as a non-empty array whose items are each checked by `check_value`; `distinct` refuses repeats."""
    values = get_field(obj, key, loc, "array")
    items = [check_value(value, loc.key(key).item(i), kind, **limits) for i, value in enumerate(values)]
    if distinct and len(set(items)) != len(items):
        repeated = next(item for i, item in enumerate(items) if item in items[:i])
        raise loc.key(key).fail(f"lists {show(repeated)} twice")
    return items


def get_keyed(obj: Mapping, key: str, loc: Loc, names: tuple[str, ...]) -> dict:
    """obj[key] as an object whose keys are exactly `names` (one entry per objective, no more, no less)."""
    entries = get_field(obj, key, loc, "object")
    missing = [name for name in names if name not in entries]
    if missing:
        raise loc.key(key).fail(f"has no entry for {missing[0]!r} (expected one per objective: {', '.join(names)})")
    extra = [name for name in entries if name not in names]
    if extra:
        raise loc.key(key).fail(f"has an entry for {extra[0]!r}, which is not an objective ({', '.join(names)})")
    return entries


def name_mismatch(expected: Any, actual: Any, expected_what: str, actual_what: str) -> str | None:
    """None when the two name sets are equal, else 'missing from A: x, y, z (+N more); not in B: ...'."""
    missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
    parts = [f"{what}: {', '.join(names[:3])}{f' (+{len(names) - 3} more)' if len(names) > 3 else ''}"
             for what, names in ((f"in {expected_what} only", missing), (f"in {actual_what} only", extra)) if names]
    return "; ".join(parts) or None
