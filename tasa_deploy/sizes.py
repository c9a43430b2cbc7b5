"""Whole-file sizes: what the exported file of a plan will weigh, and the linear-layer budget a file size leaves.

`--bits` budgets the quantized linear layers only (bits per weight, `bits.py`). Users think in files ("fit in
4 GB"), and the file also holds what the plan does not choose: the embeddings, an untied lm_head, norms and
biases, and the header (for GGUF the tokenizer: every token string and merge). `--size` counts everything:

  file bytes = fixed bytes (the parts below) + the plan's linear bytes (`bits.plan_total_bits` / 8)

  vllm  (compressed-tensors `model.safetensors`): dense tensors in float16 or bfloat16 (2 bytes), each module's `weight_shape` (2 x int64), and the JSON header;
  gguf  (llama.cpp): 2-D dense tensors as f16 (the exporters' default embedding type; a tied head is not
        stored), the others as f32, the tokenizer metadata (token strings, types, scores and merges from
        tokenizer.json) and the tensor infos with their alignment padding.

The parameter list comes from the model built on the meta device (no memory, no weights), so this works before
any weights are loaded (`quantize --dry-run`). Sizes are decimal (MB = 10^6, GB = 10^9, as the hub and
llama.cpp print them) or binary with an i (MiB, GiB).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from tasa_deploy import UsageError

UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
         "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
FORMATS = ("vllm", "gguf")
GGUF_ALIGNMENT = 32
SAFETENSORS_ENTRY = 96  # header bytes per tensor besides its name (an upper bound: --size is a cap):
#   "name":{"dtype":"F16","shape":[N,K],"data_offsets":[start,end]},
GGUF_METADATA = 8192  # the non-tokenizer key/values of a GGUF header (architecture, sizes, names), generously


def parse_size(text: str) -> int:
    """'120MB' -> 120_000_000, '4GiB' -> 4 * 2**30, '1.5G' -> 1_500_000_000."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in UNITS or float(match.group(1)) <= 0:
        raise UsageError(f"--size must be a positive size such as 120MB, 4GB or 3.5GiB, got '{text}'")
    return int(float(match.group(1)) * UNITS[unit])


def human(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.1f} MB"


@dataclass(frozen=True)
class FileLayout:
    """The part of an exported file that the plan does not choose, by part (bytes)."""

    format: str
    parts: Mapping[str, int] = field(default_factory=dict)
    linear_weights: int = 0  # weights of the quantizable linears (what --bits averages over)

    @property
    def fixed_bytes(self) -> int:
        return sum(self.parts.values())

    def file_bytes(self, linear_bits: int) -> int:
        """Predicted file size for linear layers of `linear_bits` storage bits in all."""
        return self.fixed_bytes + math.ceil(linear_bits / 8)

    def linear_budget_bytes(self, size: int) -> int:
        """What a whole-file `size` leaves for the quantized linears; an error when the rest does not fit."""
        budget = size - self.fixed_bytes
        if budget <= 0:
            raise UsageError(f"--size {human(size)} is below what the {self.format} file holds besides the quantized "
                             f"layers ({human(self.fixed_bytes)}: " + ", ".join(f"{k} {human(v)}" for k, v in
                                                                              self.parts.items()) + ")")
        return budget


_MEMO: dict[tuple, object] = {}  # one meta model and tokenizer parse per (model, format) and process


def _memo(key: tuple, build):
    """`build()` once per key: a --size run asks for the layout at its size check, its plan and its summary."""
    if key not in _MEMO:
        if len(_MEMO) >= 16:
            _MEMO.clear()
        _MEMO[key] = build()
    return _MEMO[key]


def file_layout(model_dir: Path, config, fmt: str) -> FileLayout:
    """The fixed parts of the `fmt` export of the model in `model_dir` (config: its HF config)."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown file format '{fmt}'; choose one of {', '.join(FORMATS)}")
    tokenizer = Path(model_dir) / "tokenizer.json"
    stamp = tokenizer.stat().st_mtime_ns if tokenizer.is_file() else None
    return _memo(("layout", str(Path(model_dir).resolve()), stamp, fmt, config.to_json_string()),
                 lambda: _file_layout(Path(model_dir), config, fmt))


def _file_layout(model_dir: Path, config, fmt: str) -> FileLayout:
    params, linears = meta_parameters(config)
    dense = {name: shape for name, shape in params.items() if name.removesuffix(".weight") not in linears}
    if getattr(config, "tie_word_embeddings", False):
        dense.pop("lm_head.weight", None)
    n_linear = sum(rows * cols for rows, cols in linears.values())
    if fmt == "vllm":
        width = 2  # the export is always float16 or bfloat16 (exporters.vllm.export_dtype_name)
        names = [*dense, *(f"{n}.{k}" for n in linears for k in ("weight_packed", "weight_scale", "weight_shape"))]
        parts = {"dense tensors": width * sum(_numel(s) for s in dense.values()), "weight shapes": 16 * len(linears),
                 "header": 8 + sum(len(n) + SAFETENSORS_ENTRY for n in names)}
        return FileLayout(fmt, parts, n_linear)
    two_d = [s for s in dense.values() if len(s) == 2]
    parts = {"embeddings": 2 * sum(_numel(s) for s in two_d),
             "norms and biases": 4 * sum(_numel(s) for s in dense.values() if len(s) != 2),
             "tokenizer": tokenizer_metadata_bytes(Path(model_dir)),
             "tensor infos": GGUF_METADATA + sum(24 + 8 * len(s) + 32 + GGUF_ALIGNMENT - 1
                                                 for s in [*dense.values(), *linears.values()])}
    return FileLayout(fmt, parts, n_linear)


def meta_parameters(config) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, int]]]:
    """({parameter name: shape}, {quantizable linear: (N, K)}) of the model `config` describes, built on the meta
    device (no memory), once per config. Read-only: the dicts are shared between callers."""
    return _memo(("meta", config.to_json_string()), lambda: _meta_parameters(config))


def _meta_parameters(config) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, int]]]:
    import torch
    from transformers import AutoModelForCausalLM

    from tasa_deploy.model import quantizable_modules

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    linears = {name: tuple(m.weight.shape) for name, m in quantizable_modules(model).items()}
    return params, linears


def tokenizer_metadata_bytes(model_dir: Path) -> int:
    """Bytes of GGUF's tokenizer.ggml.* arrays for the tokenizer.json in `model_dir`: per token its string (u64
    length + bytes) and a type (i32), plus a score (f32) for SentencePiece vocabularies (a tokenizer.model
    beside it; byte-level BPE has none); per merge its string. 0 without a tokenizer.json."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return 0
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    vocab = model.get("vocab") or {}
    tokens = list(vocab) if isinstance(vocab, dict) else [item[0] for item in vocab]
    tokens += [t.get("content", "") for t in data.get("added_tokens") or [] if t.get("content") not in vocab]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    per_token = 8 + 4 + (4 if (model_dir / "tokenizer.model").is_file() else 0)
    return sum(per_token + len(t.encode()) for t in tokens) + sum(8 + len(m.encode()) for m in merges)


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
