"""Bounded-memory validation of an untrusted GGUF header, run before gguf-py or transformers touch the file.

The threat: a GGUF header is a list of *claimed* sizes (key/value count, tensor count, string lengths, array
element counts, tensor shapes) that readers trust. gguf-py's `GGUFReader` (and transformers' GGUF loader,
which uses it) walks a claimed array count item by item, and past the end of the file its reads silently return
empty slices, so a 448-byte file whose header says an array holds 2^40 items makes it allocate without bound
(gigabytes of RSS before a MemoryError, or an OOM kill).

The rule: every claimed count or length is checked against the bytes that really remain in the file *before*
anything is read or allocated for it (a claim of `n` items needs at least `n * smallest item size` bytes); any
single key, tensor name or string value is capped at `MAX_STRING` bytes; arrays nest at most `MAX_ARRAY_DEPTH`
deep; keys, tensor names and string values are UTF-8 and keys unique; tensors (unique names) have at most 4
dims, a known GGML type (gguf-py's `GGMLQuantizationType` / `GGML_QUANT_SIZES`) and their data (offset + size,
aligned to `general.alignment`, default 32) must end inside the file. The file is read as a stream (small
reads and seeks), so memory is bounded by what is actually in the file, never by what the header claims.
Anything wrong raises `UsageError` (exit code 2) with one line naming the file, the byte offset and the problem.
Spec: ggml docs/gguf.md (little-endian GGUF v2 and v3).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple

import gguf

from tasa_deploy import UsageError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MIN_FILE_SIZE = 24  # magic + version + tensor_count + kv_count
MAX_STRING = 1 << 20  # one key, tensor name or string value (strings inside arrays are only bounded by the file)
MAX_ARRAY_DEPTH = 2  # an array of arrays is allowed, an array of arrays of arrays is not
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
STRING, ARRAY = 8, 9
# value type id -> (name, struct format) for the fixed-size scalar types
SCALARS = {0: ("UINT8", "<B"), 1: ("INT8", "<b"), 2: ("UINT16", "<H"), 3: ("INT16", "<h"), 4: ("UINT32", "<I"),
           5: ("INT32", "<i"), 6: ("FLOAT32", "<f"), 7: ("BOOL", "<?"), 10: ("UINT64", "<Q"), 11: ("INT64", "<q"),
           12: ("FLOAT64", "<d")}
TYPE_NAMES = {**{t: name for t, (name, _) in SCALARS.items()}, STRING: "STRING", ARRAY: "ARRAY"}
MIN_VALUE_SIZE = {**{t: struct.calcsize(fmt) for t, (_, fmt) in SCALARS.items()}, STRING: 8, ARRAY: 12}
MIN_KV_SIZE = 8 + 4 + 1  # key length, value type, smallest value
MIN_TENSOR_INFO_SIZE = 8 + 4 + 4 + 8  # name length, n_dims, ggml type, offset


class GGUFTensor(NamedTuple):
    name: str
    type_name: str  # gguf.GGMLQuantizationType name: "F32", "Q4_K", ...
    shape: tuple[int, ...]  # GGUF order (ne0 first), as GGUFReader's ReaderTensor.shape
    n_bytes: int
    data_offset: int  # absolute byte offset of the tensor's data in the file


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    tensor_count: int
    kv_count: int
    kvs: dict[str, object] = field(hash=False)  # scalars and strings as values; arrays as (item type name, count)
    tensors: tuple[GGUFTensor, ...] = ()
    alignment: int = DEFAULT_ALIGNMENT
    data_offset: int = 0  # where tensor data starts (tensor offsets are relative to it)


class _Stream:
    """A file read front to back that refuses to read or skip more bytes than remain in it."""

    def __init__(self, f: BinaryIO, path: Path, size: int):
        self.f, self.path, self.size, self.pos = f, path, size, 0

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def fail(self, offset: int, problem: str) -> UsageError:
        return UsageError(f"{self.path}: at byte {offset}, {problem}; the GGUF file is corrupt or hostile")

    def need(self, n: int, what: str) -> None:
        if n > self.remaining:
            raise self.fail(self.pos, f"{what} needs {n} bytes but only {self.remaining} remain")

    def read(self, n: int, what: str) -> bytes:
        self.need(n, what)
        data = self.f.read(n)
        if len(data) != n:  # the file shrank while we read it
            raise self.fail(self.pos, f"{what}: short read")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.f.seek(n, os.SEEK_CUR)
        self.pos += n

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.read(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        start = self.pos
        n = self.unpack("<Q", f"length of {what}")
        if n > MAX_STRING:
            raise self.fail(start, f"{what} claims {n} bytes (limit {MAX_STRING})")
        try:
            return self.read(n, what).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(start, f"{what} is not valid UTF-8") from None


def _value(s: _Stream, vtype: int, what: str, depth: int = 0) -> object:
    """Read (or, inside arrays, skip) one value of type `vtype`; arrays come back as (item type name, count)."""
    if vtype in SCALARS:
        return s.unpack(SCALARS[vtype][1], what)
    if vtype == STRING:
        return s.string(what)
    if vtype != ARRAY:
        raise s.fail(s.pos - 4, f"{what} has unknown value type {vtype}")
    start = s.pos
    itype, count = s.unpack("<I", f"item type of {what}"), s.unpack("<Q", f"item count of {what}")
    if itype not in TYPE_NAMES:
        raise s.fail(start, f"array {what} has unknown item type {itype}")
    if itype == ARRAY and depth + 1 >= MAX_ARRAY_DEPTH:
        raise s.fail(start, f"array {what} nests arrays deeper than {MAX_ARRAY_DEPTH} levels")
    if count * MIN_VALUE_SIZE[itype] > s.remaining:
        raise s.fail(start, f"array {what} claims {count} items but only {s.remaining} bytes remain")
    if itype in SCALARS:
        s.skip(count * MIN_VALUE_SIZE[itype], f"items of {what}")
    elif itype == STRING:
        for i in range(count):
            item_start = s.pos
            n = s.unpack("<Q", f"length of string {i} of {what}")
            if n > s.remaining:
                raise s.fail(item_start, f"string {i} of {what} claims {n} bytes but only {s.remaining} remain")
            s.skip(n, f"string {i} of {what}")
    else:
        for i in range(count):
            _value(s, ARRAY, f"{what}[{i}]", depth + 1)
    return (TYPE_NAMES[itype], count)


def _kvs(s: _Stream, kv_count: int) -> dict[str, object]:
    kvs: dict[str, object] = {}
    for i in range(kv_count):
        start = s.pos
        key = s.string(f"key #{i}")
        if key in kvs:
            raise s.fail(start, f"duplicate key {key[:80]!r}")
        vtype = s.unpack("<I", f"value type of {key[:80]!r}")
        if key == "general.alignment" and vtype != 4:
            raise s.fail(start, f"general.alignment has value type {vtype} (must be UINT32)")
        kvs[key] = _value(s, vtype, repr(key[:80]))
    return kvs


def _tensor_info(s: _Stream, i: int) -> tuple[str, gguf.GGMLQuantizationType, tuple[int, ...], int, int]:
    """(name, GGML type, shape, data offset relative to the data section, info start) of tensor info #i."""
    start = s.pos
    name = s.string(f"name of tensor #{i}")
    label = f"tensor {name[:80]!r}"
    n_dims = s.unpack("<I", f"n_dims of {label}")
    if n_dims > MAX_DIMS:
        raise s.fail(start, f"{label} claims {n_dims} dims (at most {MAX_DIMS})")
    shape = struct.unpack(f"<{n_dims}Q", s.read(8 * n_dims, f"dims of {label}"))
    ggml_type = s.unpack("<I", f"type of {label}")
    try:
        qtype = gguf.GGMLQuantizationType(ggml_type)
    except ValueError:
        qtype = None
    if qtype not in gguf.GGML_QUANT_SIZES:
        raise s.fail(start, f"{label} has unknown GGML type {ggml_type}")
    return name, qtype, shape, s.unpack("<Q", f"data offset of {label}"), start


def _alignment(s: _Stream, kvs: dict[str, object]) -> int:
    align = kvs.get("general.alignment", DEFAULT_ALIGNMENT)  # a UINT32 (checked as the KV was read)
    if align == 0 or align & (align - 1):
        raise s.fail(s.pos, f"general.alignment {align!r} is not a positive power of two")
    return align


def _tensors(s: _Stream, tensor_count: int, alignment: int) -> tuple[tuple[GGUFTensor, ...], int]:
    infos = [_tensor_info(s, i) for i in range(tensor_count)]
    data_offset = -(-s.pos // alignment) * alignment
    tensors, names = [], set()
    for name, qtype, shape, offset, start in infos:
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        label = f"tensor {name[:80]!r}"
        if name in names:
            raise s.fail(start, f"duplicate {label}")
        names.add(name)
        if shape and shape[0] % block_size:
            raise s.fail(start, f"{label} row length {shape[0]} is not a multiple of the {qtype.name} block "
                                f"{block_size}")
        if offset % alignment:
            raise s.fail(start, f"{label} data offset {offset} is not a multiple of the alignment {alignment}")
        n_elements = 1
        for dim in shape:
            n_elements *= dim
        n_bytes = n_elements // block_size * type_size
        if data_offset + offset + n_bytes > s.size:
            raise s.fail(start, f"{label} data ({n_bytes} bytes at data offset {offset}) runs past the end of the "
                                f"file ({s.size} bytes)")
        tensors.append(GGUFTensor(name, qtype.name, tuple(shape), n_bytes, data_offset + offset))
    return tuple(tensors), data_offset


def check_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Validate `path`'s GGUF header with bounded memory; raise `UsageError` (one line) if anything is off."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(MIN_FILE_SIZE)
        if size < MIN_FILE_SIZE or head[:4] != MAGIC:
            raise UsageError(f"{path}: not a GGUF file ({size} bytes, magic {head[:4]!r})")
        s = _Stream(f, path, size)
        s.pos = MIN_FILE_SIZE
        version, tensor_count, kv_count = struct.unpack("<IQQ", head[4:])
        if version not in SUPPORTED_VERSIONS:
            raise s.fail(4, f"unsupported GGUF version {version} (supported: 2, 3; big-endian files are not)")
        if kv_count > s.remaining // MIN_KV_SIZE:
            raise s.fail(16, f"kv_count {kv_count} needs at least {kv_count * MIN_KV_SIZE} bytes but only "
                             f"{s.remaining} remain")
        if tensor_count > s.remaining // MIN_TENSOR_INFO_SIZE:
            raise s.fail(8, f"tensor_count {tensor_count} needs at least {tensor_count * MIN_TENSOR_INFO_SIZE} "
                            f"bytes but only {s.remaining} remain")
        kvs = _kvs(s, kv_count)
        alignment = _alignment(s, kvs)
        tensors, data_offset = _tensors(s, tensor_count, alignment)
    return GGUFHeader(version, tensor_count, kv_count, kvs, tensors, alignment, data_offset)
