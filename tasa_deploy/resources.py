"""Up-front resource checks: one memory estimator for every stage, host and device, so a run that cannot fit is
refused before it spends hours (with the estimate and the option that lowers it).

Each stage's working memory is written out part by part from the model's shapes and the run's settings
(`estimate_stages`); the biggest part names the knob. Weights live on the host (at the run's dtype); with a
CUDA device the block being worked on, its activations and accumulators are on the device and the host keeps
the weights and the results. The formulas follow the code:
  mix     `stream.stream_block_stats` + `mix.trace_spectrum`: boundary states (spilled to disk past 2 GiB), kept
          throughout; then either the head pass (logits in chunks) or, later, the backward walk (three sources'
          gradients and Grams of one block, the spectrum of the costliest input): phases, the larger counts.
  profile `profile._run_layers`: every probe batch's hidden states (current + next block), per-objective
          second moments (`moments.SecondMoment`), one block's fake-quantized weights, logits in chunks of 512.
  gptq    `sequential.quantize_model`: calibration activations in and out of one block, one Hessian per shared
          input, GPTQ's float32 copies for the widest module, and one block's codes (each block's codes go to
          disk as soon as it is done: `sequential.BlockFiles`).
Checked against measured peaks on Llama-3-8B / 70B shapes by `benchmarks/scale.py` (estimate beside measure).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from tasa_deploy import TasaError, UsageError

GIB = 1024**3
SPILL_BUDGET = 2 * GIB  # stream.stream_block_stats keeps boundary states in memory up to this
OVERHEAD = 1 * GIB  # interpreter, libraries, tokenizer, allocator slack: SmolLM2's whole quantize peaked at
# 2.17 GiB against 2.19 predicted with this (benchmarks/results/forecast_smollm2-135m.md)
HOST_ONLY = ("codes", "boundary")  # parts that stay on the host when blocks run on a CUDA device
KNOBS = {"activations": "--calib-samples/--seq-len", "hessians": "a bigger machine (Hessians scale with width)",
         "gptq_work": "a bigger machine (the widest module's Hessian inverse)", "codes": "a bigger machine",
         "boundary": "--mix-samples", "grads": "a bigger machine", "grams": "a bigger machine",
         "spectrum": "--mix-samples (fewer tokens than the width keeps the spectrum small)",
         "hidden": "--probe-samples/--probe-seq-len", "moments": "--probe-samples/--probe-seq-len",
         "logits": "a bigger machine", "block": "a bigger machine", "forward": "--calib-samples/--seq-len"}


@dataclass(frozen=True)
class Shapes:
    hidden: int
    ffn: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def of(cls, config) -> "Shapes":
        config = getattr(config, "text_config", config)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size, heads,
                   getattr(config, "num_key_value_heads", None) or heads, head_dim,
                   bool(getattr(config, "tie_word_embeddings", False)))

    @property
    def block_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 2 * h * q + 2 * h * kv + 3 * h * self.ffn

    @property
    def params(self) -> int:
        return self.layers * self.block_params + self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def gram_floats(self) -> int:
        """One Gram per shared input of a block: qkv and gate_up (hidden), o (heads x head_dim), down (ffn)."""
        return 2 * self.hidden**2 + (self.heads * self.head_dim) ** 2 + self.ffn**2


@dataclass(frozen=True)
class StageEstimate:
    stage: str
    parts: dict[str, int] = field(default_factory=dict)  # working memory by part, bytes
    phases: tuple[tuple[str, ...], ...] = ()  # groups of parts alive at different times (only the largest counts)

    @property
    def total(self) -> int:
        """Parts alive throughout + the largest phase (all parts when the stage has no phases)."""
        phased = {name for phase in self.phases for name in phase}
        always = sum(v for k, v in self.parts.items() if k not in phased)
        return always + max((sum(self.parts[k] for k in phase) for phase in self.phases), default=0)

    @property
    def largest(self) -> str:
        return max(self.parts, key=self.parts.get)


def estimate_stages(config, *, calib_rows: int, seq_len: int, mix_rows: int = 8, mix_seq_len: int = 256,
                    probe_rows: int = 16, probe_seq_len: int = 128, objectives: int = 3, weight_bytes: int = 4,
                    batch_size: int = 8) -> dict[str, StageEstimate]:
    """Working memory (beyond the weights) of each stage for an HF config, part by part."""
    s = Shapes.of(config)
    h, f, widest = s.hidden, s.ffn, max(s.hidden, s.ffn, s.heads * s.head_dim)
    forward = 4 * batch_size * seq_len * (3 * f + 4 * h) + 4 * batch_size * s.heads * seq_len**2
    gptq = StageEstimate("gptq", {
        "activations": 2 * calib_rows * seq_len * h * weight_bytes,
        "hessians": 4 * s.gram_floats,
        "gptq_work": 4 * (5 * widest**2 + 3 * h * widest),
        "codes": s.block_params,  # one block's uint8 codes; each block's file is written before the next
        "forward": forward})
    mix_tokens = mix_rows * mix_seq_len

    def spectrum(k: int) -> int:  # mix.trace_spectrum(_rows) of one input of width k
        if 2 * mix_tokens < k:  # rows: the stacked rows and the basis (K x r), float64 r x r matrices
            return 2 * 8 * k * 2 * mix_tokens + 8 * 8 * (2 * mix_tokens) ** 2
        return 8 * 8 * k * k  # full rank: float64 copies of the three Grams and the factor work

    def moment(k: int) -> int:  # moments.InputHessian: rows while the source has <= K tokens, else K x K
        return 4 * k * min(mix_tokens, k)

    mix = StageEstimate("mix", {
        "boundary": min(3 * mix_tokens * h * 4 * (s.layers + 1), SPILL_BUDGET),
        "grads": 3 * s.block_params * 4 + 4 * 4 * mix_seq_len * (12 * h + 4 * f),
        "grams": 3 * sum(moment(k) for k in (h, s.heads * s.head_dim, h, s.ffn)),  # qkv, o, gate_up, down inputs
        "spectrum": max(spectrum(k) for k in (h, s.heads * s.head_dim, f)),
        "logits": 3 * 4 * 512 * s.vocab},
        phases=(("logits",), ("grads", "grams", "spectrum")))  # the head pass, then the backward walk
    probe_tokens = probe_rows * probe_seq_len
    moments = sum(k * min(probe_tokens, k) for k in (h, h, s.heads * s.head_dim, f)) * 4 * objectives
    profile = StageEstimate("profile", {
        "hidden": 2 * objectives * probe_tokens * h * weight_bytes,
        "moments": moments + (4 * widest**2 if probe_tokens > widest else 0),
        "block": s.block_params * weight_bytes + 2 * 4 * h * widest,
        "logits": 3 * 4 * 512 * s.vocab,
        "forward": 4 * batch_size * probe_seq_len * (3 * f + 4 * h) + 4 * batch_size * s.heads * probe_seq_len**2})
    return {"mix": mix, "profile": profile, "gptq": gptq}


def weights_bytes(config, weight_bytes: int = 4) -> int:
    return Shapes.of(config).params * weight_bytes


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes), capped by $TASA_MEMORY_LIMIT_GB when set."""
    limit = os.environ.get("TASA_MEMORY_LIMIT_GB")
    try:
        cap = int(float(limit) * GIB) if limit else 1 << 62
        if cap <= 0:
            raise ValueError
    except (ValueError, OverflowError):
        raise UsageError(f"TASA_MEMORY_LIMIT_GB={limit!r} is not a positive number of GiB") from None
    return min(cap, _meminfo_available())


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def check_memory(weights: int, stages: dict[str, StageEstimate], available: int | None = None) -> None:
    """Refuse (TasaError) when weights + overhead + the hungriest stage exceed the available host memory."""
    available = available_memory() if available is None else available
    worst = max(stages.values(), key=lambda e: e.total)
    need = weights + OVERHEAD + worst.total
    if need > available:
        raise TasaError(f"this run needs about {need / GIB:.1f} GiB of memory (weights {weights / GIB:.1f}, "
                        f"{worst.stage} {worst.total / GIB:.1f}, mostly {worst.largest} "
                        f"{worst.parts[worst.largest] / GIB:.1f}) but only {available / GIB:.1f} GiB is available; "
                        f"lower {KNOBS.get(worst.largest, 'the calibration size')} or use a bigger machine")
