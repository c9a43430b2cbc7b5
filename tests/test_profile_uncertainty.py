"""Standard errors and the KL objective of the sensitivity profile, on test_profile's tiny random Llama.

References: per-row losses from plain full-model forwards of a model whose block is RTN-quantized directly
(`objectives.objective_row_losses`), paired by `stats.paired_ratio_delta`; the KL objective against
torch's own `kl_div` over the full vocabulary.
"""

from __future__ import annotations


import pytest
import torch

from test_profile import N_LAYERS, make_tiny, rtn_block_copy
from tasa_deploy import UsageError
from tasa_deploy.artifacts import SensitivityProfile
from tasa_deploy.objectives import build_probe_set, evaluate_objective, objective_row_losses, scored_loss_sums
from tasa_deploy.profile import measure_profile
from tasa_deploy.stats import paired_ratio_delta

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    return make_tiny()


@pytest.fixture(scope="module")
def probes(tiny):
    _, tokenizer, base = tiny
    math_rows = [{"question": "one plus two ?", "answer": "three"}, {"question": "two and two ?", "answer": "four"},
                 {"question": "how many apples ?", "answer": "five apples and one cat"}]
    kl = build_probe_set("kl:math", tokenizer, math_rows, seq_len=32, max_batch_tokens=96)
    return {**base, "kl:math": kl}


@pytest.fixture(scope="module")
def profile(tiny, probes, tmp_path_factory):
    model, tokenizer, _ = tiny
    path = tmp_path_factory.mktemp("profile-se") / "partial.json"
    return measure_profile(model, tokenizer, objectives=tuple(probes), probes=probes, partial_path=path,
                           progress=False)


@pytest.mark.parametrize("layer", [0, N_LAYERS - 1])
def test_row_deltas_and_standard_errors_match_direct_forwards(tiny, probes, profile, layer):
    model = tiny[0]
    quantized = rtn_block_copy(model, layer)
    for name, probe in probes.items():
        reference = model if name.startswith("kl:") else None
        base = objective_row_losses(model, probe, reference)
        new = objective_row_losses(quantized, probe, reference)
        delta, se = paired_ratio_delta(base.num.tolist(), new.num.tolist(), base.den.tolist())
        assert profile.layer_deltas[name][layer] == pytest.approx(delta, abs=1e-5)
        assert profile.layer_se[name][layer] == pytest.approx(se, abs=1e-5, rel=1e-3)
        assert se > 0
        assert profile.row_deltas[name][layer] == pytest.approx((new.num - base.num).tolist(), abs=1e-4)
        assert profile.row_weights[name] == pytest.approx(base.den.tolist())


def test_kl_objective_is_zero_at_baseline_and_the_divergence_of_the_quantized_model(tiny, probes, profile):
    model = tiny[0]
    assert profile.baselines["kl:math"] == 0.0
    assert all(d > 0 for d in profile.layer_deltas["kl:math"])
    direct = evaluate_objective(rtn_block_copy(model, 1), probes["kl:math"], reference_model=model)
    assert profile.layer_deltas["kl:math"][1] == pytest.approx(direct, rel=1e-4)
    with pytest.raises(UsageError, match="KL divergence"):
        evaluate_objective(model, probes["kl:math"])


def test_kl_sums_match_torch_kl_div_over_the_full_vocabulary(tiny, probes):
    model = tiny[0]
    quantized = rtn_block_copy(model, 0)
    batch = probes["kl:math"].batches[0]
    with torch.no_grad():
        p_logits = model(input_ids=batch.tokens).logits  # [B, T, V]
        q_logits = quantized(input_ids=batch.tokens).logits
    rows, cols = batch.score_mask[:, 1:].nonzero(as_tuple=True)
    sums = scored_loss_sums(lambda h: h, q_logits, batch, reference=p_logits[rows, cols], chunk=3)
    per_token = torch.nn.functional.kl_div(torch.log_softmax(q_logits[rows, cols].double(), -1),
                                           torch.log_softmax(p_logits[rows, cols].double(), -1),
                                           log_target=True, reduction="none").sum(-1)  # [P]
    expected = torch.zeros(batch.tokens.shape[0], dtype=torch.float64).index_add_(0, rows, per_token)
    assert torch.allclose(sums, expected, atol=1e-5)


def test_profile_round_trips_its_uncertainty(profile, tmp_path):
    path = tmp_path / "profile.json"
    profile.save(path)
    assert SensitivityProfile.load(path) == profile
    assert set(profile.settings) >= {"shrinkage", "unit_error_proxy"}


def test_probe_rows_double_until_the_target_snr(tiny, tmp_path):
    """measure_profile_to_snr stops at the first size whose every objective reaches the target, and at the
    maximum otherwise; each size is a real measurement (its SNR is recorded from its own profile)."""
    from test_profile import _rows
    import random

    from tasa_deploy.profile import measure_profile_to_snr
    from tasa_deploy.stats import signal_to_noise

    model, tokenizer, _ = tiny
    rows = _rows(random.Random(0))
    loader = lambda n: {name: build_probe_set(name, tokenizer, rows[name][:n], seq_len=32, max_batch_tokens=96)  # noqa: E731
                        for name in ("ppl", "math")}
    paths = lambda n: tmp_path / f"partial.{n}.json"  # noqa: E731
    easy = measure_profile_to_snr(model, tokenizer, target_snr=1e-9, max_probe=4, n_probe=2, probe_loader=loader,
                                  partial_path=paths, progress=False)
    assert [t["rows"] for t in easy.settings["probe_sizes"]] == [2] and easy.settings["n_probe"] == 2
    hard = measure_profile_to_snr(model, tokenizer, target_snr=1e9, max_probe=5, n_probe=2, probe_loader=loader,
                                  partial_path=paths, progress=False)
    assert [t["rows"] for t in hard.settings["probe_sizes"]] == [2, 4, 5] and hard.settings["n_probe"] == 5
    last = hard.settings["probe_sizes"][-1]["snr"]
    assert last["math"] == pytest.approx(signal_to_noise(hard.layer_deltas["math"], hard.layer_se["math"]))
    with pytest.raises(UsageError, match="max probe rows"):
        measure_profile_to_snr(model, tokenizer, target_snr=3, max_probe=1, n_probe=2, probe_loader=loader)
