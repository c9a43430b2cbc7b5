"""Block-streamed statistics (tasa_deploy.stream) against full-model autograd (`mix_reference.measure_source`), and the
one-factorization trace spectrum against a direct Cholesky solve per alpha."""

import pytest
import torch

from tasa_deploy import mix
import mix_reference
from tasa_deploy.stream import stream_block_stats
from test_mix import VOCAB, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sources():
    gen = torch.Generator().manual_seed(3)
    return {"general": torch.randint(0, VOCAB, (5, 24), generator=gen),
            "task": torch.randint(0, VOCAB, (6, 24), generator=gen)}


@pytest.mark.parametrize("spill", [False, True])
def test_streamed_gradients_and_grams_equal_full_autograd(sources, spill):
    model = tiny_llama(seed=1)
    flags = [p.requires_grad for p in model.parameters()]
    reference = {name: mix_reference.measure_source(model, tokens, batch_size=4) for name, tokens in sources.items()}
    losses = {}
    blocks = list(stream_block_stats(model, sources, batch_size=4, losses=losses,
                                     memory_budget=0 if spill else 1 << 40))
    assert [b.index for b in blocks] == [1, 0]  # last block first
    for name, ref in reference.items():
        assert losses[name] == pytest.approx(ref.loss, rel=1e-6)
        for block in blocks:
            torch.testing.assert_close(block.grads[name], ref.block_grads[block.index], rtol=1e-4, atol=1e-7)
            for group, gram in block.grams[name].items():
                torch.testing.assert_close(gram.matrix(), ref.grams[f"model.layers.{block.index}.{group}"],
                                           rtol=1e-5, atol=1e-6)
    assert [p.requires_grad for p in model.parameters()] == flags  # restored
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated into .grad


def test_stream_rejects_an_empty_source():
    from tasa_deploy import UsageError

    with pytest.raises(UsageError, match="token batch"):
        list(stream_block_stats(tiny_llama(), {"general": torch.zeros(0, 8, dtype=torch.long)}))


def _gram(x):
    return 2.0 / x.shape[0] * x.T @ x


@pytest.mark.parametrize("n_tokens", [200, 12])  # full rank, and fewer tokens than K (restricted to the span)
def test_trace_spectrum_equals_a_solve_per_alpha_on_a_fine_grid(n_tokens):
    rng = torch.Generator().manual_seed(n_tokens)
    k = 40
    gen, task, test = (torch.randn(n_tokens, k, generator=rng, dtype=torch.float64) * s for s in (1.0, 2.0, 1.5))
    h_gen, h_task, h_test = _gram(gen), _gram(task), _gram(test + 0.3)
    alphas = [i / 20 for i in range(21)]
    c, lam = mix.trace_spectrum(h_test, h_gen, h_task, 0.01, data_tokens=2 * n_tokens)
    got = mix.traces_from_spectrum(c, lam, alphas)
    if 2 * n_tokens < k:
        basis = mix.data_span(h_gen, h_task)
        h_test, h_gen, h_task = (basis.T @ h @ basis for h in (h_test, h_gen, h_task))
    direct = [mix.hessian_trace_proxy(h_test, h_gen, h_task, a, 0.01) for a in alphas]
    assert got == pytest.approx(direct, rel=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streamed_statistics_on_cuda_match_the_cpu(sources):
    model = tiny_llama(seed=1)
    cpu = {b.index: b for b in stream_block_stats(model, sources)}
    gpu = {b.index: b for b in stream_block_stats(model, sources, device=torch.device("cuda"))}
    assert next(model.model.layers[0].parameters()).device.type == "cpu"  # blocks go home after onloading
    for index, block in cpu.items():
        for name in sources:
            torch.testing.assert_close(gpu[index].grads[name].cpu(), block.grads[name], rtol=1e-3, atol=1e-6)


def test_randomized_data_span_equals_the_full_eigendecomposition():
    """Few tokens, wide input: the range finder's basis spans the same space, so the restricted traces agree."""
    rng = torch.Generator().manual_seed(7)
    k, n = 300, 20
    gen = torch.randn(n, k, generator=rng, dtype=torch.float64) * torch.linspace(0.1, 3, k, dtype=torch.float64)
    task = torch.randn(n, k, generator=rng, dtype=torch.float64)
    h_gen, h_task = _gram(gen), _gram(task)
    full = mix.data_span(h_gen, h_task)
    fast = mix.data_span(h_gen, h_task, rank_bound=2 * n)
    assert full.shape == fast.shape == (k, 2 * n)
    torch.testing.assert_close(fast @ fast.T, full @ full.T, rtol=0, atol=1e-8)  # same projector
    h_test = _gram(torch.randn(n, k, generator=rng, dtype=torch.float64) + 0.5)
    alphas = [0.0, 0.3, 1.0]
    direct = []
    for a in alphas:
        p = [full.T @ h @ full for h in (h_test, h_gen, h_task)]
        direct.append(mix.hessian_trace_proxy(*p, a, 0.01))
    assert mix.traces_from_spectrum(*mix.trace_spectrum(h_test, h_gen, h_task, 0.01, 2 * n), alphas) == \
        pytest.approx(direct, rel=1e-8)


@pytest.mark.parametrize("n_rows", [10, 30, 200])  # rows form, the switch to the Gram mid-way, Gram form
def test_second_moment_energy_equals_the_trace_with_the_gram(n_rows):
    from tasa_deploy.moments import SecondMoment

    rng = torch.Generator().manual_seed(n_rows)
    k = 48
    x = torch.randn(n_rows, k, generator=rng)
    moment = SecondMoment(k)
    for chunk in x.split(7):
        moment.add(chunk)
    h = (x.double().T @ x.double()) / n_rows
    torch.testing.assert_close(moment.matrix().double(), h, rtol=1e-5, atol=1e-6)
    assert (moment.gram is None) == (n_rows <= k)
    delta = torch.randn(16, k, generator=rng)
    expected = float(torch.trace(delta.double() @ h @ delta.double().T))
    assert moment.energy(delta) == pytest.approx(expected, rel=1e-5)
