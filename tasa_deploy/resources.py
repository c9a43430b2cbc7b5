"""Up-front resource checks: refuse a run that cannot fit in memory before spending hours on it.

The estimate is deliberately simple and errs high: fp32 weights loaded once, the calibration activations of
one block boundary (kept for all calibration rows, as sequential GPTQ does), one Hessian per linear of a
block, and the attention scores of one forward batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tasa_deploy import TasaError, UsageError

GIB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # bytes of fp32 weights
    activations: int  # bytes of block-boundary activations for every calibration row
    hessians: int  # bytes of the largest block's Hessians
    attention: int  # bytes of one batch's attention scores
    overhead: int = 2 * GIB  # interpreter, libraries, tokenizer, allocator slack

    @property
    def total(self) -> int:
        return self.weights + 2 * self.activations + self.hessians + self.attention + self.overhead


def estimate_quantize_memory(config, n_rows: int, seq_len: int, batch_size: int = 8) -> MemoryEstimate:
    """Peak memory of `quantize` for an HF config (LLaMA-family fields)."""
    hidden = config.hidden_size
    inter = config.intermediate_size
    layers = config.num_hidden_layers
    vocab = config.vocab_size
    per_block = 4 * hidden * hidden + 3 * hidden * inter  # q,k,v,o (upper bound) + gate,up,down
    params = layers * per_block + vocab * hidden * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    heads = getattr(config, "num_attention_heads", 1)
    return MemoryEstimate(weights=4 * params, activations=4 * n_rows * seq_len * hidden,
                          hessians=4 * (4 * hidden * hidden + inter * inter),
                          attention=4 * batch_size * heads * seq_len * seq_len + 4 * batch_size * seq_len * vocab)


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


def check_memory(estimate: MemoryEstimate, available: int | None = None) -> None:
    available = available_memory() if available is None else available
    if estimate.total > available:
        raise TasaError(f"this run needs about {estimate.total / GIB:.1f} GiB of memory (weights "
                        f"{estimate.weights / GIB:.1f}, activations {2 * estimate.activations / GIB:.1f}, attention "
                        f"{estimate.attention / GIB:.1f}) but only {available / GIB:.1f} GiB is available; "
                        "lower --calib-samples/--seq-len or use a bigger machine")
