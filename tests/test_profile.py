"""Sensitivity profile (tasa_deploy.profile) and objectives (tasa_deploy.objectives) on a tiny random Llama.

References: each objective's loss from plain full-model forwards (and, for the reducers, from one unbatched
forward per sequence); each layer delta from a model whose block is RTN-quantized directly (no caching); the
unit split from block outputs of plain forwards with one unit quantized, and the width ratio from Gram matrices
captured on a plain full-model forward.
"""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from tasa_deploy import UsageError
from tasa_deploy.capture import linear_input_hooks
from tasa_deploy.model import FUSED_GROUPS, decoder_blocks, quantizable_modules
from tasa_deploy.stats import shrink
from tasa_deploy.objectives import (build_probe_set, evaluate_objective, get_objective, sample_rows,
                                    prompt_continuation_ids)
from tasa_deploy.profile import measure_profile, profile_settings
from tasa_deploy.quant.rtn import quantize_rtn
from tasa_deploy.quant.spec import QuantSpec, default_group_size

WORDS = ("the a cat dog sat ran on under mat tree red blue big small and then it was very happy sad "
         "one two three four five plus minus equals apples has how many what is answer question").split()
N_LAYERS = 3


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", *WORDS, ":", "?", ".", "\n", "Question", "Answer"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<pad>")


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _rows(rng: random.Random) -> dict[str, list[dict]]:
    prose = [{"text": _sentence(rng, rng.randint(6, 40))} for _ in range(6)]
    math = [{"question": _sentence(rng, rng.randint(5, 15)) + " ?", "answer": _sentence(rng, rng.randint(3, 12))}
            for _ in range(5)]
    arc = [{"query": f"Question: {_sentence(rng, rng.randint(4, 10))} ?\nAnswer:",
            "choices": [_sentence(rng, rng.randint(1, 4)) for _ in range(4)], "label": rng.randint(0, 3)}
           for _ in range(5)]
    return {"ppl": prose, "math": math, "arc": arc}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    return make_tiny()


def make_tiny():
    """(tiny random Llama, its word-level tokenizer, probe sets for ppl / math / arc)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so quantization noise moves the losses
        for param in model.parameters():
            param.mul_(4.0 if param.ndim == 2 else 1.0)
    rows = _rows(random.Random(0))
    # max_batch_tokens=96 forces several padded batches per objective
    probes = {name: build_probe_set(name, tokenizer, rows[name], seq_len=32, max_batch_tokens=96)
              for name in ("ppl", "math", "arc")}
    return model, tokenizer, probes


@pytest.fixture(scope="module")
def profile(tiny, tmp_path_factory):
    model, tokenizer, probes = tiny
    path = tmp_path_factory.mktemp("profile") / "partial.json"
    return measure_profile(model, tokenizer, probes=probes, partial_path=path, progress=False)


def rtn_block_copy(model, layer: int, bits: int = 3):
    """A copy of `model` with block `layer`'s linears RTN-quantized at the probe grid (the direct reference)."""
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for name, linear in quantizable_modules(quantized).items():
            if name.startswith(f"model.layers.{layer}."):
                spec = QuantSpec(bits, default_group_size(linear.in_features))
                linear.weight.copy_(quantize_rtn(linear.weight, spec).dequantize(torch.float32))
    return quantized


def _unbatched_logprobs(model, ids: tuple[int, ...], start: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) for t >= start, from one unpadded forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]  # [T, V]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return float(sum(logprobs[t - 1, ids[t]] for t in range(start, len(ids))))


def test_reducers_match_unbatched_reference(tiny):
    model, tokenizer, probes = tiny
    rows = _rows(random.Random(0))
    for name in ("math", "ppl"):
        sequences = get_objective(name).encode(tokenizer, rows[name], 32)
        total = sum(_unbatched_logprobs(model, s.ids, s.scored_from) for s in sequences)
        count = sum(len(s.ids) - s.scored_from for s in sequences)
        assert evaluate_objective(model, probes[name]) == pytest.approx(-total / count, abs=1e-5)
    sequences = get_objective("arc").encode(tokenizer, rows["arc"], 32)
    losses = []
    for row_index, row in enumerate(rows["arc"]):
        scores = torch.tensor([_unbatched_logprobs(model, s.ids, s.scored_from)
                               for s in sequences if s.row == row_index], dtype=torch.float64)
        losses.append(-torch.log_softmax(scores, 0)[row["label"]])
    assert evaluate_objective(model, probes["arc"]) == pytest.approx(float(torch.stack(losses).mean()), abs=1e-5)


def test_task_objectives_agree_with_the_eval_package_losses(tiny):
    """The eval helpers compute the same task losses with their own (unbatched-prompt) code path."""
    multiple_choice = pytest.importorskip("tasa_deploy.eval.multiple_choice")
    gsm8k = pytest.importorskip("tasa_deploy.eval.gsm8k")
    model, tokenizer, _ = tiny
    rows = _rows(random.Random(0))
    arc = evaluate_objective(model, build_probe_set("arc", tokenizer, rows["arc"], seq_len=64))
    math = evaluate_objective(model, build_probe_set("math", tokenizer, rows["math"], seq_len=64))
    assert arc == pytest.approx(multiple_choice.choice_nll(model, tokenizer, rows["arc"]), abs=1e-5)
    assert math == pytest.approx(gsm8k.gsm8k_answer_nll(model, tokenizer, rows["math"]), abs=1e-5)


def test_prompt_truncation_keeps_the_continuation_end_within_seq_len(tiny):
    _, tokenizer, _ = tiny
    ids, start = prompt_continuation_ids(tokenizer, "the cat sat on the mat .", " one two three", 5)
    assert len(ids) == 5 and start == 2  # the prompt's start is dropped first
    assert tokenizer.decode(ids[start:]).split() == ["one", "two", "three"]
    rows = [{"text": str(i)} for i in range(10)]
    assert sample_rows(rows, 4, seed=1) == sample_rows(rows, 4, seed=1) != sample_rows(rows, 4, seed=2)
    assert sample_rows(rows, 20, seed=1) == rows


def test_profile_has_one_delta_per_layer_and_exact_baselines(tiny, profile):
    model, _, probes = tiny
    assert profile.objectives == ("ppl", "math", "arc")
    for name, probe in probes.items():
        assert len(profile.layer_deltas[name]) == N_LAYERS
        assert profile.baselines[name] == pytest.approx(evaluate_objective(model, probe), abs=1e-5)
    assert any(abs(d) > 1e-3 for deltas in profile.layer_deltas.values() for d in deltas)


@pytest.mark.parametrize("layer", [0, N_LAYERS - 1])
def test_layer_delta_matches_direct_quantized_forward(tiny, profile, layer):
    model, _, probes = tiny
    quantized = rtn_block_copy(model, layer)
    for name, probe in probes.items():
        direct = evaluate_objective(quantized, probe) - evaluate_objective(model, probe)
        assert profile.layer_deltas[name][layer] == pytest.approx(direct, abs=1e-5)


def test_vllm_units_tie_fused_groups_and_cover_every_module(tiny, profile):
    model, _, _ = tiny
    assert len(profile.units) == N_LAYERS * len(FUSED_GROUPS)
    covered = [m for unit in profile.units for m in unit.modules]
    assert sorted(covered) == sorted(quantizable_modules(model))
    modules = quantizable_modules(model)
    for unit in profile.units:
        group = unit.name.rsplit(".", 1)[1]
        assert unit.modules == tuple(f"model.layers.{unit.layer}.{m}" for m in FUSED_GROUPS[group])
        assert unit.n_weights == sum(modules[m].weight.numel() for m in unit.modules)
        group_size = default_group_size(unit.in_features)
        assert sorted(unit.errors) == sorted(f"int{b}g{group_size}" for b in (3, 4, 8))


def _block_outputs(model, layer: int, probe) -> list[torch.Tensor]:
    """Block `layer`'s output hidden states [B, T, H] for each probe batch, from plain full-model forwards."""
    seen = []
    hook = decoder_blocks(model)[layer].register_forward_hook(
        lambda _m, _a, out: seen.append((out[0] if isinstance(out, tuple) else out).detach()))
    try:
        with torch.no_grad():
            for batch in probe.batches:
                model(input_ids=batch.tokens, use_cache=False)
    finally:
        hook.remove()
    return seen


def test_unit_errors_split_the_layer_delta_by_block_output_error(tiny, profile):
    """Probe-width errors sum to the block's shrunk delta (stats.shrink over the objective's blocks, with their
    standard errors) and split it by each unit's relative block-output error, measured here with plain
    full-model forwards of a copy whose unit alone is RTN-quantized."""
    model, _, probes = tiny
    layer, obj = 1, "math"
    units = [u for u in profile.units if u.layer == layer]
    shrunk = {k: shrink(profile.layer_deltas[k], profile.layer_se[k])[layer] for k in profile.objectives}
    for k in profile.objectives:
        probe_total = sum(u.errors[f"int3g{default_group_size(u.in_features)}"][k] for u in units)
        assert probe_total == pytest.approx(shrunk[k], rel=1e-6, abs=1e-12)
    assert shrunk[obj] > 0
    reference = _block_outputs(model, layer, probes[obj])
    direct = []
    for unit in units:
        quantized = copy.deepcopy(model)
        with torch.no_grad():
            for name in unit.modules:
                linear = quantizable_modules(quantized)[name]
                spec = QuantSpec(3, default_group_size(linear.in_features))
                linear.weight.copy_(quantize_rtn(linear.weight, spec).dequantize(torch.float32))
        error = 0.0
        for batch, y, yq in zip(probes[obj].batches, reference, _block_outputs(quantized, layer, probes[obj])):
            y, dy = y[batch.token_mask].double(), (yq - y)[batch.token_mask].double()
            error += float((dy.pow(2).sum(-1) / y.pow(2).sum(-1)).sum())
        direct.append(error)
    for unit, error in zip(units, direct):
        share = unit.errors[f"int3g{default_group_size(unit.in_features)}"][obj] / shrunk[obj]
        assert share == pytest.approx(error / sum(direct), rel=1e-4)


def test_unit_widths_are_related_by_gram_weighted_rtn_error(tiny, profile):
    """Within a unit, the cost ratio between widths equals tr(dW H dW^T) from a plain forward's inputs."""
    model, _, probes = tiny
    layer = 1
    down = next(u for u in profile.units if u.layer == layer and u.name.endswith(".down"))
    linear = quantizable_modules(model)[down.modules[0]]
    gram = torch.zeros(linear.in_features, linear.in_features, dtype=torch.float64)
    probe = probes["math"]

    def add(_name, x):
        nonlocal gram
        rows = x[mask].double()  # [n, K]
        gram += rows.T @ rows

    with torch.no_grad(), linear_input_hooks({"down": linear}, add):
        for batch in probe.batches:
            mask = batch.token_mask
            model(input_ids=batch.tokens, use_cache=False)

    def energy(bits):
        spec = QuantSpec(bits, default_group_size(linear.in_features))
        weight = linear.weight.detach()
        delta = (weight - quantize_rtn(weight, spec).dequantize(torch.float32)).double()  # [N, K]
        return float(torch.trace(delta @ gram @ delta.T))

    errors = down.errors
    assert shrink(profile.layer_deltas["math"], profile.layer_se["math"])[layer] > 0
    ratio = errors["int4g128"]["math"] / errors["int3g128"]["math"]
    assert ratio == pytest.approx(energy(4) / energy(3), rel=1e-4)
    assert errors["int8g128"]["math"] < errors["int4g128"]["math"] < errors["int3g128"]["math"]


def test_resume_after_interruption_is_byte_identical(tiny, profile, tmp_path):
    model, tokenizer, probes = tiny
    path = tmp_path / "partial.json"

    class Interrupt(Exception):
        pass

    def stop_after_layer_1(layer):
        if layer == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        measure_profile(model, tokenizer, probes=probes, partial_path=path, progress=False,
                        on_layer=stop_after_layer_1)
    assert len(json.loads(path.read_text())["layers"]) == 2
    seen = []
    resumed = measure_profile(model, tokenizer, probes=probes, partial_path=path, progress=False,
                              on_layer=seen.append)
    assert seen == [2]  # only the missing block was measured
    assert json.dumps(resumed.to_json()) == json.dumps(profile.to_json())
    cached = measure_profile(model, tokenizer, probes=probes, partial_path=path, progress=False,
                             on_layer=seen.append)
    assert seen == [2] and cached == resumed  # a rerun reuses the complete state


def test_partial_from_other_settings_is_replaced_not_reused(tiny, profile, tmp_path, capsys):
    model, tokenizer, probes = tiny
    path = tmp_path / "partial.json"
    measure_profile(model, tokenizer, probes=probes, partial_path=path, progress=False)
    first_hash = json.loads(path.read_text())["settings_hash"]
    measured = []
    other = measure_profile(model, tokenizer, probes=probes, partial_path=path, progress=True, probe_bits=4,
                            on_layer=measured.append)
    assert measured == list(range(N_LAYERS)) and "starting over" in capsys.readouterr().err
    assert json.loads(path.read_text())["settings_hash"] == other.settings["settings_hash"] != first_hash
    assert other.layer_deltas != profile.layer_deltas  # 4-bit probe deltas, not the cached 3-bit ones
    path.write_text('{"schema": "tasa-profile-partial/1", "settings_h')  # a corrupt state is an error
    with pytest.raises(UsageError, match="not valid JSON"):
        measure_profile(model, tokenizer, probes=probes, partial_path=path, progress=False)


def test_default_cache_is_keyed_by_model_data_and_settings(tiny, monkeypatch, tmp_path):
    model, tokenizer, probes = tiny
    monkeypatch.setenv("TASA_CACHE", str(tmp_path))
    subset = {"ppl": probes["ppl"]}
    first = measure_profile(model, tokenizer, objectives=("ppl",), probes=subset, progress=False)
    assert len(list((tmp_path / "profiles").glob("*.json"))) == 1
    calls = []
    again = measure_profile(model, tokenizer, objectives=("ppl",), probes=subset, progress=False,
                            on_layer=calls.append)
    assert calls == [] and again == first
    measure_profile(model, tokenizer, objectives=("ppl",), probes=subset, progress=False, candidate_bits=(2, 4))
    assert len(list((tmp_path / "profiles").glob("*.json"))) == 2


def test_gguf_target_has_one_unit_per_module_with_fitting_ggml_types(tiny, tmp_path):
    pytest.importorskip("tasa_deploy.exporters.ggml_grids")
    from tasa_deploy.bits import gguf_candidates

    model, tokenizer, probes = tiny
    subset = {"arc": probes["arc"]}
    profile = measure_profile(model, tokenizer, objectives=("arc",), target="gguf", probes=subset,
                              partial_path=tmp_path / "p.json", progress=False)
    modules = quantizable_modules(model)
    assert [u.modules[0] for u in profile.units] == list(modules)
    for unit in profile.units:
        assert unit.name == unit.modules[0]
        assert list(unit.errors) == gguf_candidates(modules[unit.name].in_features)


def test_gguf_profiles_are_not_keyed_by_candidate_widths():
    """A GGUF profile measures every fitting GGML type, so a plan's --candidates must not force a re-profile."""
    assert profile_settings(target="gguf", candidate_bits=(3, 4, 8)) == \
        profile_settings(target="gguf", candidate_bits=(3, 4, 5, 6, 8))
    assert profile_settings(target="vllm", candidate_bits=(3, 4, 8)) != \
        profile_settings(target="vllm", candidate_bits=(3, 4, 5, 8))


def test_bad_settings_are_usage_errors():
    with pytest.raises(UsageError, match="objective"):
        profile_settings(objectives=("ppl", "nope"))
    with pytest.raises(UsageError, match="target"):
        profile_settings(target="onnx")
    with pytest.raises(UsageError, match="2..8"):
        profile_settings(candidate_bits=(1, 4))


@pytest.mark.slow
def test_smollm2_profile_first_blocks(smollm2, calibration_data, tmp_path):
    """Real SmolLM2 cut to 3 blocks and real probe data: baselines equal plain forwards, structure is complete."""
    pytest.importorskip("tasa_deploy.data")
    from tasa_deploy.objectives import load_probe_set

    model = copy.deepcopy(smollm2.model)
    model.model.layers = model.model.layers[:3]
    model.config.num_hidden_layers = 3
    probes = {name: load_probe_set(name, smollm2.tokenizer, 4, 96) for name in ("ppl", "math", "arc")}
    profile = measure_profile(model, smollm2.tokenizer, n_probe=4, seq_len=96, partial_path=tmp_path / "p.json",
                              progress=False)
    assert profile.settings["probe_data"]["arc"]["rows"] == 4 and len(profile.units) == 3 * len(FUSED_GROUPS)
    for name, probe in probes.items():
        assert len(profile.layer_deltas[name]) == len(decoder_blocks(model))
        assert profile.baselines[name] == pytest.approx(evaluate_objective(model, probe), abs=1e-4)
