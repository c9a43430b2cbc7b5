"""What tensors a model's config.json implies, and a check every writer runs on its output before success.

A writer that drops a tensor makes a file that still loads yet computes something else: a quantized Qwen2
without its q/k/v biases loads in llama.cpp and scores a WikiText-2 perplexity of ten million (issue #14).
So `quantize`, both exporters and the dense-GGUF writer compare what they are about to write with the
parameters `transformers` builds from the same config (on the meta device: no memory, any model size), and
refuse with one line naming the first missing, unexpected or mis-shaped tensors.

A tied `lm_head.weight` is optional (the runtime re-ties it); everything else the config implies is required.
"""

from __future__ import annotations

import functools
import json
from typing import Mapping

from tasa_deploy import UsageError


@functools.lru_cache(maxsize=8)
def _expected_from_json(config_json: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(json.loads(config_json))
    model_type = config.pop("model_type", None)
    if not model_type:
        raise UsageError("config.json has no model_type; cannot tell which tensors the model needs")
    try:
        hf_config = AutoConfig.for_model(model_type, **config)
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"config.json cannot be read as a '{model_type}' config: {str(exc).splitlines()[0]}") from None
    with torch.device("meta"):  # shapes only: no weights are allocated
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=False)
    return tuple((name, tuple(tensor.shape)) for name, tensor in model.state_dict().items())


def expected_parameters(config: Mapping) -> dict[str, tuple[int, ...]]:
    """{HF parameter name: shape} that `config` (a config.json dict) implies, buffers included."""
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    return dict(_expected_from_json(json.dumps(config, sort_keys=True)))


def optional_parameters(config: Mapping) -> set[str]:
    """Names a writer may leave out: the lm_head of a model with tied embeddings."""
    return {"lm_head.weight"} if config.get("tie_word_embeddings", False) else set()


def weights_mismatch(config: Mapping, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """None when `shapes` ({name: shape}) is what `config` implies; else a short description of the first
    differences (missing tensors, unexpected ones, wrong shapes)."""
    expected = expected_parameters(config)
    optional = optional_parameters(config)
    missing = sorted(set(expected) - set(shapes) - optional)
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(name for name in set(shapes) & set(expected) if tuple(shapes[name]) != expected[name])
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} (first: {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} (first: {', '.join(unexpected[:3])})")
    if wrong:
        problems.append("wrong shape " + ", ".join(f"{n} {list(shapes[n])} != {list(expected[n])}" for n in wrong[:3]))
    return "; ".join(problems) or None


def check_weights(config: Mapping, shapes: Mapping[str, tuple[int, ...]], where: str,
                  consequence: str = "nothing was written") -> None:
    """A one-line UsageError when `shapes` is not what `config` implies; `where` names the file or output."""
    problem = weights_mismatch(config, shapes)
    if problem:
        raise UsageError(f"{where}: the tensors do not match the model's config.json ({problem}); {consequence}")


__all__ = ["expected_parameters", "optional_parameters", "weights_mismatch", "check_weights"]
