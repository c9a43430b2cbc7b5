"""KL divergence and top-1 agreement against a reference model (tasa_deploy.eval.kld), on test_profile's tiny
random Llama and an RTN-quantized copy. Reference: torch's kl_div and argmax over full logits from plain
forwards. (The llama.cpp cross-check is test_llamacpp.py::test_llamacpp_kl_divergence_matches_pytorch.)"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from test_profile import WORDS, make_tiny
from tasa_deploy import UsageError
from tasa_deploy.eval.kld import ReferenceStates, kl_on_rows, kl_on_text
from tasa_deploy.model import quantizable_modules
from tasa_deploy.quant.rtn import quantize_rtn
from tasa_deploy.quant.spec import QuantSpec
from tasa_deploy.stats import ratio_mean_se

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SEQ = 16


@pytest.fixture(scope="module")
def models():
    model, tokenizer, _ = make_tiny()
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for linear in quantizable_modules(quantized).values():
            linear.weight.copy_(quantize_rtn(linear.weight, QuantSpec(3, 32)).dequantize(torch.float32))
    return model, quantized, tokenizer


def _brute_force(model, reference, windows: torch.Tensor, first: int) -> tuple[float, float, float, float]:
    kl_rows, agree_rows, counts = [], [], []
    with torch.no_grad():
        for window in windows:
            p = torch.log_softmax(reference(input_ids=window[None]).logits[0, first:-1].double(), -1)  # [n, V]
            q = torch.log_softmax(model(input_ids=window[None]).logits[0, first:-1].double(), -1)
            kl = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1)  # [n]
            kl_rows.append(float(kl.sum()))
            agree_rows.append(float((p.argmax(-1) == q.argmax(-1)).sum()))
            counts.append(float(kl.numel()))
    return (*ratio_mean_se(kl_rows, counts), *ratio_mean_se(agree_rows, counts))


@pytest.mark.parametrize("protocol", ["standard", "llamacpp"])
def test_kl_on_text_matches_full_logit_reference(models, protocol):
    model, quantized, tokenizer = models
    rng = random.Random(0)
    text = " ".join(rng.choice(WORDS) for _ in range(200))
    result = kl_on_text(quantized, model, tokenizer, text, seq_len=SEQ, max_windows=5, protocol=protocol,
                        batch_size=2)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    windows = ids[: 5 * SEQ].view(5, SEQ)
    first = 0 if protocol == "standard" else SEQ // 2  # the tiny tokenizer adds no BOS
    expected = _brute_force(quantized, model, windows, first)
    assert (result.kld, result.kld_se, result.top1, result.top1_se) == pytest.approx(expected, abs=1e-6)
    assert result.n == 5 and result.tokens == 5 * (SEQ - 1 - first) and result.kld > 1e-3
    same = kl_on_text(model, model, tokenizer, text, seq_len=SEQ, max_windows=5, protocol=protocol)
    assert same.kld == pytest.approx(0.0, abs=1e-6) and same.top1 == 1.0


def test_kl_on_rows_scores_the_answer_tokens(models):
    model, quantized, tokenizer = models
    rows = [{"question": "one plus two ?", "answer": "three apples"}, {"question": "how many ?", "answer": "five"}]
    result = kl_on_rows(quantized, model, tokenizer, rows)
    kl_rows, counts = [], []
    with torch.no_grad():
        for row in rows:
            prompt = tokenizer(f"Question: {row['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
            answer = tokenizer(" " + row["answer"], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + answer])
            p = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1:-1].double(), -1)
            q = torch.log_softmax(quantized(input_ids=ids).logits[0, len(prompt) - 1:-1].double(), -1)
            kl_rows.append(float((p.exp() * (p - q)).sum()))
            counts.append(len(answer))
    assert (result.kld, result.kld_se) == pytest.approx(ratio_mean_se(kl_rows, counts), abs=1e-6)
    assert result.n == 2 and result.tokens == sum(counts)
    with pytest.raises(UsageError, match="cannot score KL"):
        kl_on_rows(quantized, model, tokenizer, [{"text": "a b c"}])


def test_reference_states_run_the_reference_once_and_change_nothing(models):
    """Scoring twice against one ReferenceStates gives the plain reference's figures exactly, and the second
    scoring runs no reference forward pass."""
    model, quantized, tokenizer = models
    rng = random.Random(1)
    text = " ".join(rng.choice(WORDS) for _ in range(120))
    rows = [{"question": "one plus two ?", "answer": "three apples"}, {"question": "how many ?", "answer": "five"}]

    def score(reference):
        return (kl_on_text(quantized, reference, tokenizer, text, seq_len=SEQ, max_windows=3),
                kl_on_rows(quantized, reference, tokenizer, rows))

    plain = score(model)
    calls = []
    hook = model.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        cached = ReferenceStates(model)
        first = score(cached)
        first_passes = len(calls)
        second = score(cached)
    finally:
        hook.remove()
    assert first == plain and second == plain and plain[0].kld > 1e-3
    assert first_passes >= 4 and len(calls) == first_passes  # 3 windows + >= 1 row batch, then none
