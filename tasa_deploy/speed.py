"""Speed-aware GGUF plans: what each GGML type costs to decode on this machine, and the time budget of a plan.

Smaller is not faster: llama.cpp's CPU backend repacks some types into faster layouts and not others, so a
plan that saves bits with a slow type can decode slower than llama.cpp's own preset of the same size (TASA's
Q4_1-heavy plan ran at 111 tok/s against Q3_K_M's 155 on SmolLM2). So the allocator gets a second budget.

Cost model (measured once per machine, llama.cpp build, model and thread count; cached as JSON under the cache
dir): for each candidate type T a GGUF of the model with every linear row that fits T stored as T and the rest as
q8_0 (RTN: the values do not change the speed), one all-q8_0 file and llama.cpp's reference preset, decoded by
`llama-bench` (tg64) in interleaved rounds (`measure`). The time per token of file T minus that of the q8_0 file is w_T (c_T - c_q8) (w_T: the weights
stored as T), so each type's per-weight cost is known relative to q8_0, and a plan's time per token is predicted
as t_q8 + sum over units of n_weights x (c_type - c_q8).

Constraint: that prediction at most `max_slowdown` x the measured time per token of llama.cpp's own preset file
of the same size (llama-quantize from the base model, `_preset_gguf`, embeddings and head kept f16 as our
exporter writes them, so the two differ only in their linear layers); the same benchmark also reports what
the model predicts for the preset's own layout when all its types were measured (the model's error, in the
plan's info). Only measured quantities enter: no assumption about the runtime's speed per byte.
"""

from __future__ import annotations

import json
import platform
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

from tasa_deploy import UsageError

ANCHOR = "q8_0"
PRESET_FOR_BITS = (("q2_k", 3.0), ("q3_k_s", 3.6), ("q3_k_m", 4.0), ("q3_k_l", 4.3), ("q4_k_s", 4.7),
                   ("q4_k_m", 5.0), ("q5_k_m", 5.8), ("q6_k", 6.7), ("q8_0", 99.0))  # by the bpw they reach
PRESETS = tuple(name for name, _ in PRESET_FOR_BITS)


@dataclass(frozen=True)
class TypeCosts:
    """Per-weight decode seconds of each GGML type relative to q8_0, on one machine / build / model / threads."""

    delta_s_per_weight: Mapping[str, float]  # c_T - c_q8 (0 for q8_0)
    anchor_s: float  # seconds per token of the all-q8_0 file
    tok_s: Mapping[str, float]  # measured decode tok/s of each single-type file
    key: Mapping[str, str]  # machine, llama.cpp build, model fingerprint, threads, preset, types (the cache key)

    def delta(self, type_name: str, n_weights: int) -> float:
        if type_name not in self.delta_s_per_weight:
            raise UsageError(f"no measured decode cost for {type_name}; measured: {sorted(self.delta_s_per_weight)}")
        return n_weights * self.delta_s_per_weight[type_name]

    def predict(self, type_weights: Mapping[str, int]) -> float:
        """Seconds per token of a file whose linears hold `type_weights` ({type: weights})."""
        return self.anchor_s + sum(self.delta(t, n) for t, n in type_weights.items())


def cache_path(key: Mapping[str, str]) -> Path:
    from tasa_deploy.model import cache_root

    name = "-".join(str(key[k]).replace("/", "_") for k in sorted(key))
    return cache_root() / "bench" / f"type-costs-{name}.json"


def machine_key(fingerprint: str, threads: int) -> dict[str, str]:
    from tasa_deploy.exporters.llamacpp import LLAMACPP_VERSION

    return {"machine": f"{platform.machine()}-{platform.processor() or 'cpu'}-{_cpu_model()}",
            "llamacpp": LLAMACPP_VERSION, "model": fingerprint[:16], "threads": str(threads)}


def _cpu_model() -> str:
    try:
        line = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
        return "".join(ch for ch in line.split(":", 1)[1].strip() if ch.isalnum())[:40]
    except (OSError, StopIteration):
        return "unknown"


def measure(loaded, fingerprint: str, types: list[str], preset: str, *, threads: int = 2, rounds: int = 3,
            reps: int = 2, n_gen: int = 64, log=lambda m: None) -> tuple[TypeCosts, dict]:
    """The cost model over `types` and llama.cpp's `preset` file, measured together: every file is benchmarked
    once per round, round-robin, so drift of the machine hits all alike (separate sessions differed by more
    than the type differences on a 2-core box). Cached per machine key, types and preset."""
    from tasa_deploy.exporters.gguf_pack import GGUF_QTYPE

    wanted = sorted(set(types) | {ANCHOR})
    unknown = [t for t in wanted if t not in GGUF_QTYPE]
    if unknown:
        raise UsageError(f"cannot measure {unknown[0]}: not a GGML type we write")
    key = {**machine_key(fingerprint, threads), "preset": preset, "types": "+".join(wanted)}
    path = cache_path(key)
    if path.is_file():
        cached = json.loads(path.read_text())
        costs = cached["costs"]
        return TypeCosts(costs["delta_s_per_weight"], costs["anchor_s"], costs["tok_s"], costs["key"]), cached["reference"]
    with tempfile.TemporaryDirectory(prefix="tasa-speed-") as tmp:
        files, stored = {}, {}
        for type_name in wanted:
            files[type_name], stored[type_name] = _single_type_gguf(loaded, type_name, Path(tmp))
        files[f"preset:{preset}"], reference_weights = _preset_gguf(loaded, preset, Path(tmp), log)
        runs: dict[str, list[float]] = {name: [] for name in files}
        for round_index in range(rounds):
            log(f"llama-bench round {round_index + 1}/{rounds} over {len(files)} files (decode speed per type)")
            for name, gguf_path in files.items():
                runs[name].append(_decode_tok_s(gguf_path, threads, reps, n_gen))
    tok_s = {name: sum(values) / len(values) for name, values in runs.items()}
    anchor = 1.0 / tok_s[ANCHOR]
    deltas = {t: 0.0 if t == ANCHOR else (1.0 / tok_s[t] - anchor) / max(stored[t], 1) for t in wanted}
    costs = TypeCosts(deltas, anchor, {t: tok_s[t] for t in wanted}, key)
    reference = {"preset": preset, "tok_s": tok_s[f"preset:{preset}"], "seconds": 1.0 / tok_s[f"preset:{preset}"],
                 "type_weights": reference_weights, "rounds": runs[f"preset:{preset}"]}
    from tasa_deploy.outputs import write_json_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"schema": "tasa-type-costs/1", "costs": asdict(costs), "reference": reference,
                             "runs": runs}, force=True)
    return costs, reference


def _single_type_gguf(loaded, type_name: str, tmp: Path) -> tuple[Path, int]:
    """A GGUF of the model with every linear that fits `type_name` stored as it (RTN), others as q8_0, written
    straight from the tensors (`exporters.gguf.gguf_tensors`, no artifact round trip); returns (path, weights
    stored as type_name)."""
    from tasa_deploy.exporters.gguf import gguf_tensors, write_gguf
    from tasa_deploy.model import quantizable_modules
    from tasa_deploy.pipeline import unquantized_tensors
    from tasa_deploy.quant.ggml_types import fits_row
    from tasa_deploy.quant.rtn import quantize_rtn
    from tasa_deploy.quant.spec import QuantSpec
    from tasa_deploy.schema import read_json

    modules, stored = {}, 0
    for name, linear in quantizable_modules(loaded.model).items():
        chosen = type_name if fits_row(type_name, linear.in_features) else ANCHOR
        stored += linear.weight.numel() if chosen == type_name else 0
        modules[name] = quantize_rtn(linear.weight.detach().float(), QuantSpec.for_ggml(chosen))
    config = read_json(Path(loaded.model_dir) / "config.json", "model config", allow_nonfinite=True)
    tensors, _, _ = gguf_tensors(config, modules, unquantized_tensors(loaded.model, modules))
    path = tmp / f"{type_name}.gguf"
    write_gguf(path, config, loaded.model_dir, tensors, force=True)
    return path, stored


def _decode_tok_s(path: Path, threads: int, reps: int, n_gen: int) -> float:
    from tasa_deploy.exporters.llamacpp import llama_bench

    return llama_bench(path, n_prompt=16, n_gen=n_gen, threads=threads, reps=reps).decode_tok_s


def reference_preset(average_bits: float) -> str:
    """llama.cpp's preset whose NOMINAL size matches a GGUF budget of `average_bits` (true bpw over the linears).
    Approximate: where rows cannot take k-quants (K % 256 != 0) llama.cpp falls back to wider types and a preset
    grows (SmolLM2's Q3_K_M is 4.63 bpw), so name the preset with `--speed-reference` when it matters."""
    return next(name for name, upper in PRESET_FOR_BITS if average_bits <= upper)


def _preset_gguf(loaded, preset: str, tmp: Path, log) -> tuple[Path, dict[str, int]]:
    """llama-quantize's `preset` of the base model (embeddings and head f16, as our exporter writes them, so the
    files differ only in their linear layers) and its {type: weights} over the linear layers."""
    import gguf

    from tasa_deploy.exporters.gguf import export_dense_gguf
    from tasa_deploy.exporters.llamacpp import llama_quantize

    dense = export_dense_gguf(loaded.model_dir, tmp / "f16.gguf")
    log(f"llama-quantize {preset.upper()} of this model: the speed reference")
    out = llama_quantize(dense, tmp / f"{preset}.gguf", preset.upper(), embedding_type="f16")
    dense.unlink()
    weights: dict[str, int] = {}
    for tensor in gguf.GGUFReader(out).tensors:
        if tensor.name.startswith("blk.") and len(tensor.shape) == 2:
            name = tensor.tensor_type.name.lower()
            weights[name] = weights.get(name, 0) + int(tensor.n_elements)
    return out, weights


def speed_constraint(loaded, profile, unit_keys: Mapping[str, list[str]], average_bits: float, max_slowdown: float,
                     *, preset: str | None = None, threads: int = 2, log=lambda m: None) -> tuple[dict, float, dict]:
    """(seconds[unit][key] relative to q8_0, the limit on their sum, info for the plan) for GGUF candidates
    `unit_keys` at a budget of `average_bits`: no slower than `max_slowdown` x llama.cpp's `preset` (default: the
    preset whose nominal size matches the budget, `reference_preset`)."""
    from tasa_deploy.quant.spec import QuantSpec

    types = sorted({QuantSpec.from_key(k).fmt for keys in unit_keys.values() for k in keys})
    preset = preset or reference_preset(average_bits)
    costs, reference = measure(loaded, profile.model_fingerprint, types, preset, threads=threads, log=log)
    weights = {u.name: u.n_weights for u in profile.units}
    seconds = {u: {k: costs.delta(QuantSpec.from_key(k).fmt, weights[u]) for k in keys} for u, keys in unit_keys.items()}
    predicted_reference = (costs.predict(reference["type_weights"])
                           if set(reference["type_weights"]) <= set(costs.delta_s_per_weight) else None)
    info = {"reference": preset, "reference_tok_s": reference["tok_s"], "max_slowdown": max_slowdown,
            "anchor_tok_s": costs.tok_s[ANCHOR], "type_tok_s": dict(costs.tok_s),
            "reference_predicted_tok_s": None if predicted_reference is None else 1.0 / predicted_reference}
    return seconds, max_slowdown * reference["seconds"] - costs.anchor_s, info


def tools_available() -> bool:
    from tasa_deploy.exporters.llamacpp import find_llamacpp_bin

    return find_llamacpp_bin(("llama-bench", "llama-quantize"), build=False) is not None
