"""ResMemForCausalLM.tune, the text-generation pipeline and the model card of a tuned causal-LM wrapper."""

import json

import pytest
import torch
from lm_helpers import distinct_sequences, tiny_base, word_tokenizer
from transformers import pipeline

from resmem import ResMemForCausalLM, ResMemWrapper

WINDOW, STRIDE = 12, 8
KS, SIGMAS = [1, 4, 16], [1e-3, 3.0, 1e3]


@pytest.fixture(scope="module")
def problem():
    """A tiny GPT-2 with a memory of 4 sequences, and validation text that partly repeats the memory."""
    model = ResMemWrapper.from_base(tiny_base("gpt2"), k=3, sigma=1.0, temperature=1.0)
    memory_text = distinct_sequences(4, 20)
    model.build_memory(memory_text, window=WINDOW, stride=STRIDE, residual_top_m=16)
    perturbed = memory_text[:, :10].clone()
    perturbed[:, 3] = (perturbed[:, 3] + 7) % 120 + 3  # contexts near, not equal to, stored ones
    with torch.no_grad():  # text the base model predicts itself, so that the memory can also break predictions
        greedy = model.base.generate(distinct_sequences(3, 3, seed=11), max_new_tokens=7, do_sample=False,
                                     pad_token_id=0, eos_token_id=None)
    val = torch.cat([memory_text[:2, :10], perturbed, distinct_sequences(2, 10, seed=9), greedy])  # (11, 10)
    return model, val


def brute_force(model, val):
    """Each (k, sigma) set on the config and run through the plain forward pass; rows in grid order k, sigma."""
    saved = model.config.k, model.config.sigma
    rows = []
    labels = val[:, 1:]
    try:
        for k in KS:
            for sigma in SIGMAS:
                model.config.k, model.config.sigma = k, sigma
                with torch.no_grad():
                    out = model(val)
                ok = out.scores[:, :-1].argmax(-1) == labels
                base_ok = out.base_logits[:, :-1].argmax(-1) == labels
                n = labels.numel()
                rows.append(
                    {"k": k, "sigma": sigma, "accuracy": ok.sum().item() / n,
                     "tpr": (ok & ~base_ok).sum().item() / n, "fpr": (~ok & base_ok).sum().item() / n}
                )
    finally:
        model.config.k, model.config.sigma = saved
    return rows


def test_tune_matches_brute_force_and_sets_config(problem):
    model, val = problem
    brute = brute_force(model, val)
    assert len({r["accuracy"] for r in brute}) > 1  # the grid matters on this problem
    for objective in ("accuracy", "conservative"):
        # adaptive_lambda_max=[]: the adaptive mode's own argmax would replace the scores' accuracy checked here
        result = model.tune(val, k=KS, sigma=SIGMAS, objective=objective, max_fpr=0.2, window=WINDOW, stride=STRIDE,
                            adaptive_lambda_max=[])
        assert [(r["k"], r["sigma"]) for r in result] == [(r["k"], r["sigma"]) for r in brute]
        for got, want in zip(result, brute):
            assert (got["accuracy"], got["tpr"], got["fpr"]) == pytest.approx((want["accuracy"], want["tpr"], want["fpr"]))
        if objective == "accuracy":  # independent rule: highest accuracy, then lowest FPR, then first in grid order
            expected = max(brute, key=lambda r: (r["accuracy"], -r["fpr"]))
        else:  # highest TPR with FPR < 0.2, then accuracy, then FPR
            feasible = [r for r in brute if r["fpr"] < 0.2]
            assert 0 < len(feasible) < len(brute)
            expected = max(feasible, key=lambda r: (r["tpr"], r["accuracy"], -r["fpr"]))
        assert (result.best["k"], result.best["sigma"]) == (expected["k"], expected["sigma"])
        assert (model.config.k, model.config.sigma) == (expected["k"], expected["sigma"])
        assert result.num_examples == val.shape[0] * (val.shape[1] - 1)
        json.dumps(result.to_dict())
        ev = model.config.last_evaluation
        assert ev["resmem_accuracy"] == pytest.approx(expected["accuracy"]) and ev["source"] == f"tune ({objective})"


def test_tune_mixture_lambda_lowest_perplexity(problem):
    model, val = problem
    result = model.tune(val, k=[2], sigma=[0.3], mixture_lambda=[0.1, 0.5, 0.9], window=WINDOW, stride=STRIDE)
    chosen = model.config.mixture_lambda
    ppl = {}
    old = model.config.distribution, model.config.mixture_lambda
    try:
        model.config.distribution = "mixture"
        for lam in (0.1, 0.5, 0.9):
            model.config.mixture_lambda = lam
            with torch.no_grad():
                ppl[lam] = torch.exp(model(val, labels=val).loss).item()
    finally:
        model.config.distribution = old[0]
    assert result.best["mixture_lambda"] == min(ppl, key=ppl.get) == chosen
    assert sorted(result.best["ppl_mixture"]) == ["0.1", "0.5", "0.9"]
    model.config.mixture_lambda = 0.5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=[]), "k grid is empty"),
        (dict(sigma=[]), "sigma grid is empty"),
        (dict(k=[0]), r"integer >= 1"),
        (dict(sigma=[-1.0]), "finite number > 0"),
        (dict(mixture_lambda=[1.5]), r"mixture_lambda .* in \[0, 1\]"),
        (dict(temperature=[1.0, 2.0]), r"build_memories\(data, temperatures\)"),
        (dict(temperature=2.0), "cannot be tuned"),
        (dict(max_fpr=0.0), r"max_fpr must lie in \(0, 1\)"),
        (dict(max_fpr=1.5), r"max_fpr must lie in \(0, 1\)"),
        (dict(objective="loss"), "objective must be one of"),
    ],
)
def test_tune_bad_input(problem, kwargs, match):
    model, val = problem
    before = model.config.k, model.config.sigma
    with pytest.raises(ValueError, match=match):
        model.tune(val, **kwargs)
    assert (model.config.k, model.config.sigma) == before


def test_tune_with_the_build_temperature_is_allowed(problem):
    model, val = problem
    result = model.tune(val, k=[1], sigma=[1e-3], temperature=[1.0], window=WINDOW, stride=STRIDE)
    assert result.grid["temperature"] == [1.0] and len(result) == 1


# ---------------------------------------------------------------------- pipeline
MEMORISED = "w5 w17 w42 w8 w63 w21 w9 w77 w30 w12 w55 w3 w66 w40"


def test_text_generation_pipeline_returns_resmem_greedy_continuation():
    tok = word_tokenizer(100)
    model = ResMemWrapper.from_base(tiny_base("gpt2"), k=1, sigma=1e-3)
    model.build_memory([MEMORISED], tokenizer=tok, window=32, stride=16)
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    new = 6
    out = pipe("w5 w17 w42", max_new_tokens=new, do_sample=False, return_tensors=True)
    generated = torch.tensor(out[0]["generated_token_ids"])

    prompt = tok("w5 w17 w42", return_tensors="pt")["input_ids"]
    ids, base_ids = prompt, prompt
    with torch.no_grad():
        for _ in range(new):
            ids = torch.cat([ids, model(ids).scores[:, -1].argmax(-1, keepdim=True)], 1)
            base_ids = torch.cat([base_ids, model.base(base_ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, ids[0])
    # k=1, tiny sigma: the memory recites the memorised text (paper Remark 3.2), unlike the base model.
    assert tok.decode(ids[0, prompt.shape[1]:]) == "w8 w63 w21 w9 w77 w30"
    assert not torch.equal(ids, base_ids)
    text = pipe("w5 w17 w42", max_new_tokens=new, do_sample=False)[0]["generated_text"]
    assert text.endswith("w30")  # the decoded text carries the same continuation


# ---------------------------------------------------------------------- model card
def test_saved_card_shows_the_tuned_lm_evaluation(problem, tmp_path):
    model, val = problem
    result = model.tune(val, k=KS, sigma=SIGMAS, mixture_lambda=[0.25, 0.75], window=WINDOW, stride=STRIDE, split="validation")
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    best = result.best
    assert "Base next-token accuracy | ResMem next-token accuracy | TPR | FPR | Gain" in card
    row = (
        f"| {100 * best['base_accuracy']:.2f}% | {100 * best['accuracy']:.2f}% | {100 * best['tpr']:.2f}% "
        f"| {100 * best['fpr']:.2f}% | {100 * best['gain']:.2f}% |"
    )
    assert row in card
    assert f"on {result.num_examples} token positions" in card and "(split `validation`)" in card
    assert f"k={best['k']}, sigma={best['sigma']}" in card
    assert f"Perplexity: base {best['base_ppl']:.2f}" in card
    # The mixture's weight is shown when tune chose the mixture distribution (the lower validation perplexity).
    assert (f"lambda={best['mixture_lambda']}" in card) == (best["distribution"] == "mixture")
    assert "No evaluation recorded" not in card
    loaded = ResMemForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.last_evaluation["resmem_accuracy"] == pytest.approx(best["accuracy"])
    assert loaded.config.distribution == best["distribution"]
    model.config.mixture_lambda, model.config.distribution = 0.5, "clamp"
