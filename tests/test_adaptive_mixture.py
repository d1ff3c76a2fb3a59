"""Distance-adaptive mixture (`distribution="adaptive"`): forward vs numpy, the far-memory limit, evaluation and
tuning equal the forward, save/load, generate, validation of its parameters."""

import math

import numpy as np
import pytest
import torch
from lm_helpers import VOCAB, cached_and_uncached_greedy, run_smollm2_recipe_smoke, hook_keys, np_softmax, reference_entries, reference_scores, tiny_base

import resmem
from resmem import ResMemForCausalLM, ResMemWrapper
from resmem.evaluation_lm import evaluate_lm

WINDOW, STRIDE, TOP_M = 32, 24, 16
KS, SIGMAS = [1, 3, 8], [1e-3, 1.0]


def few_token_sequences(n_seq: int, length: int, seed: int) -> torch.Tensor:
    """Sequences over 6 token ids (neighbours share next tokens); first tokens differ, so keys are distinct."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 9, (n_seq, length), generator=g)
    ids[:, 0] = torch.arange(n_seq) + 10 + 4 * seed
    return ids


@pytest.fixture(scope="module")
def problem():
    """A tiny Llama with a memory of 4 sequences; validation = new text plus memorised prefixes (d_1 ~ 0 there)."""
    model = ResMemWrapper.from_base(tiny_base("llama"), k=8, sigma=1.0)
    memory_text = few_token_sequences(4, 20, seed=0)
    model.build_memory(memory_text, window=WINDOW, stride=STRIDE, residual_top_m=TOP_M)
    val = torch.cat([few_token_sequences(3, 12, seed=1), memory_text[:2, :12]])
    return model, memory_text, val


def numpy_adaptive(model, memory_text, queries, k, sigma, lam_max, tau):
    """Independent adaptive mixture (float64): ResMem scores from `reference_scores`, q = renormalised clamp at 0,
    w = lam_max * exp(-d_1 / tau) with d_1 the brute-force plain L2 distance to the nearest stored key."""
    layer = model.config.layer
    mem_keys, mem_logits, mem_labels = reference_entries(model.base, layer, memory_text, WINDOW, STRIDE)
    q_keys, q_logits = hook_keys(model.base, layer, queries)
    q_keys, q_logits = q_keys.reshape(-1, q_keys.shape[-1]), q_logits.reshape(-1, q_logits.shape[-1])
    scores = reference_scores(mem_keys, mem_logits, mem_labels, q_keys, q_logits, k, sigma, 1.0, TOP_M)
    q = np.clip(scores, 0, None)
    q /= q.sum(-1, keepdims=True)
    d1 = np.sqrt(((q_keys[:, None, :] - mem_keys[None, :, :]) ** 2).sum(-1)).min(1)  # (Q,)
    w = lam_max * np.exp(-d1 / tau)
    p = w[:, None] * q + (1 - w[:, None]) * np_softmax(q_logits)
    return p.reshape(*queries.shape, -1), d1


def run_mode(model, ids, k, sigma, lam_max, tau, **kwargs):
    config = model.config
    saved = config.k, config.sigma, config.adaptive_lambda_max, config.adaptive_tau, config.distribution
    config.k, config.sigma, config.adaptive_lambda_max, config.adaptive_tau, config.distribution = k, sigma, lam_max, tau, "adaptive"
    try:
        with torch.no_grad():
            return model(ids, **kwargs)
    finally:
        config.k, config.sigma, config.adaptive_lambda_max, config.adaptive_tau, config.distribution = saved


@pytest.mark.parametrize("k,sigma,lam_max,tau_scale", [(8, 1.0, 0.5, 1.0), (3, 0.3, 1.0, 0.3), (1, 1.0, 0.8, 5.0)])
def test_forward_matches_numpy_adaptive(problem, k, sigma, lam_max, tau_scale):
    model, memory_text, val = problem
    _, d1 = numpy_adaptive(model, memory_text, val, k, sigma, lam_max, 1.0)
    tau = float(np.median(d1[d1 > 1e-3])) * tau_scale  # a scale at which the weights differ between positions
    expected, d1 = numpy_adaptive(model, memory_text, val, k, sigma, lam_max, tau)
    w = lam_max * np.exp(-d1 / tau)
    assert w.max() > 0.5 * lam_max and w.min() < 0.5 * w.max()  # the gate really varies over these positions
    out = run_mode(model, val, k, sigma, lam_max, tau)
    np.testing.assert_allclose(out.scores.double().numpy(), expected, atol=2e-5, rtol=0)
    np.testing.assert_allclose(out.logits.exp().double().numpy(), expected, atol=2e-5, rtol=0)
    torch.testing.assert_close(out.logits.exp().sum(-1), torch.ones(val.shape), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.residual, out.scores - out.base_logits.softmax(-1), atol=0, rtol=0)
    # The differentiable path (a loss on the logits) gives the same distribution.
    with torch.enable_grad():
        config = model.config
        saved = config.k, config.sigma, config.adaptive_lambda_max, config.adaptive_tau, config.distribution
        config.k, config.sigma, config.adaptive_lambda_max, config.adaptive_tau, config.distribution = k, sigma, lam_max, tau, "adaptive"
        try:
            graded = model(val, labels=val)
        finally:
            config.k, config.sigma, config.adaptive_lambda_max, config.adaptive_tau, config.distribution = saved
    assert graded.logits.requires_grad  # the autograd branch ran
    # scores summed in another order (~1e-7): compare probabilities (logs of ~1e-7 tails differ relatively more)
    torch.testing.assert_close(graded.logits.detach().exp(), out.logits.exp(), atol=1e-6, rtol=0)


def test_far_memory_gives_the_base_distribution(problem):
    """The limit: when d_1 / tau is large the memory weight underflows to 0 and the output IS the base's."""
    model, _, val = problem
    new_text = val[:3]  # not in the memory: every d_1 > 0
    out = run_mode(model, new_text, 8, 1.0, 1.0, 1e-6)
    torch.testing.assert_close(out.scores, out.base_logits.softmax(-1), atol=1e-7, rtol=0)
    assert torch.equal(out.scores.argmax(-1), out.base_logits.argmax(-1))
    # ...while the fixed mixture at the same memory weight (base weight 0) moves the same positions.
    config = model.config
    config.distribution, config.mixture_lambda = "mixture", 0.0
    try:
        with torch.no_grad():
            mixed = model(new_text)
    finally:
        config.distribution, config.mixture_lambda = "clamp", 0.5
    assert (mixed.logits.exp() - out.base_logits.softmax(-1)).abs().max() > 1e-2
    # Padded positions (never searched) get the base distribution at any tau.
    mask = torch.ones_like(new_text[:2])
    mask[1, :4] = 0
    padded = run_mode(model, new_text[:2], 8, 1.0, 1.0, 1e6, attention_mask=mask)
    torch.testing.assert_close(padded.scores[1, :4], padded.base_logits[1, :4].softmax(-1), atol=1e-7, rtol=0)
    assert not torch.allclose(padded.scores[1, 4:], padded.base_logits[1, 4:].softmax(-1), atol=1e-3)


def forward_rows(model, val, pairs):
    """(k, sigma, lam_max, tau) -> accuracy, TPR, FPR, perplexity of the forward in the adaptive mode."""
    labels = val[:, 1:]
    n = labels.numel()
    rows = {}
    for k in KS:
        for sigma in SIGMAS:
            for lam_max, tau in pairs:
                out = run_mode(model, val, k, sigma, lam_max, tau)
                ok = out.scores[:, :-1].argmax(-1) == labels
                base_ok = out.base_logits[:, :-1].argmax(-1) == labels
                nll = -out.logits[:, :-1].gather(-1, labels[..., None]).sum().item()
                rows[k, sigma, lam_max, tau] = {"accuracy": ok.sum().item() / n, "tpr": (ok & ~base_ok).sum().item() / n,
                                                "fpr": (~ok & base_ok).sum().item() / n, "ppl": math.exp(nll / n)}
    return rows


@pytest.mark.parametrize("sparse", [True, False])
def test_evaluate_lm_equals_the_forward(problem, sparse):
    model, _, val = problem
    pairs = [(0.5, 0.05), (1.0, 0.3), (1.0, 3.0)]
    want = forward_rows(model, val, pairs)
    assert len({round(r["accuracy"], 6) for r in want.values()}) > 2 and len({round(r["ppl"], 3) for r in want.values()}) > 5
    rows = evaluate_lm(model, val, ks=KS, sigmas=SIGMAS, adaptive=pairs, window=WINDOW, stride=STRIDE,
                       progress=False, chunk_size=7, sparse=sparse)
    for row in rows:
        for lam_max, tau in pairs:
            got, ref = row["adaptive"][str(lam_max)][str(tau)], want[row["k"], row["sigma"], lam_max, tau]
            assert (got["accuracy"], got["tpr"], got["fpr"]) == (ref["accuracy"], ref["tpr"], ref["fpr"])
            assert got["ppl"] == pytest.approx(ref["ppl"], rel=1e-5)
    assert "adaptive" not in evaluate_lm(model, val, window=WINDOW, stride=STRIDE, progress=False)[0]


def test_tune_chooses_adaptive_and_the_model_reproduces_it(problem, tmp_path):
    """Validation = new text + memorised text: the memory is right on one, noise on the other, so a distance gate
    beats any fixed weight; tune sets it, the forward / resmem.evaluate / a saved and loaded model reproduce it."""
    model = ResMemWrapper.from_base(tiny_base("llama"), k=8, sigma=1.0)
    memory_text = problem[1]
    model.build_memory(memory_text, window=WINDOW, stride=STRIDE, residual_top_m=TOP_M)
    val = problem[2]
    result = model.tune(val, k=[1, 3], sigma=[1e-3, 1.0], mixture_lambda=[0.25, 0.75], adaptive_lambda_max=[0.5, 1.0],
                        adaptive_tau=[1e-3, 0.1], window=WINDOW, stride=STRIDE, progress=False)
    best = result.best
    row = next(r for r in result.table if (r["k"], r["sigma"]) == (best["k"], best["sigma"]))
    ada = {(float(a), float(t)): v["ppl"] for a, by in row["adaptive"].items() for t, v in by.items()}
    assert best["distribution"] == "adaptive"
    assert best["ppl"] == min(ada.values()) < min(min(row["ppl_mixture"].values()), row["ppl_clamp"])
    config = model.config
    assert (config.distribution, config.adaptive_lambda_max, config.adaptive_tau) == (
        "adaptive", best["adaptive_lambda_max"], best["adaptive_tau"])
    assert ada[best["adaptive_lambda_max"], best["adaptive_tau"]] == best["ppl"]
    labels = val[:, 1:]
    n = labels.numel()
    with torch.no_grad():
        out = model(val)
    assert (out.scores[:, :-1].argmax(-1) == labels).sum().item() / n == best["accuracy"]
    nll = -out.logits[:, :-1].gather(-1, labels[..., None]).sum().item()
    assert math.exp(nll / n) == pytest.approx(best["ppl"], rel=1e-5)
    evaluated = resmem.evaluate(model, val, window=WINDOW, stride=STRIDE, progress=False, record=False)
    assert evaluated["resmem_accuracy"] == best["accuracy"] and evaluated["ppl"] == pytest.approx(best["ppl"], rel=1e-6)
    model.save_pretrained(tmp_path / "ada")
    loaded = ResMemForCausalLM.from_pretrained(tmp_path / "ada")
    assert (loaded.config.distribution, loaded.config.adaptive_lambda_max, loaded.config.adaptive_tau) == (
        "adaptive", best["adaptive_lambda_max"], best["adaptive_tau"])
    with torch.no_grad():
        assert torch.equal(loaded(val).logits, out.logits)
    # adaptive_lambda_max=[] leaves it out of the running.
    off = model.tune(val, k=[1], sigma=[1e-3], adaptive_lambda_max=[], window=WINDOW, stride=STRIDE, progress=False)
    assert off.grid["adaptive"] == [] and off.best["distribution"] in ("clamp", "mixture")


def test_generate_in_adaptive_mode_with_cache_equals_uncached_loop(problem):
    model, _, val = problem
    prompt = val[3:5, :5]  # memorised prefixes: the gate is open
    config = model.config
    saved = config.distribution, config.adaptive_lambda_max, config.adaptive_tau
    config.distribution, config.adaptive_lambda_max, config.adaptive_tau = "adaptive", 1.0, 0.5
    try:
        generated, ids = cached_and_uncached_greedy(model, prompt, 6)
        torch.manual_seed(0)
        sampled = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=True,
                                 top_k=0, pad_token_id=0, eos_token_id=None)
    finally:
        config.distribution, config.adaptive_lambda_max, config.adaptive_tau = saved
    assert torch.equal(generated, ids)
    assert sampled.shape == (2, 9) and int(sampled.max()) < VOCAB


@pytest.mark.parametrize(
    "name,bad,message",
    [("adaptive_lambda_max", 1.5, "adaptive_lambda_max must be a number in"), ("adaptive_lambda_max", float("nan"), "adaptive_lambda_max must be"),
     ("adaptive_lambda_max", True, "adaptive_lambda_max must be"), ("adaptive_tau", 0.0, "adaptive_tau must be a finite number > 0"),
     ("adaptive_tau", float("inf"), "adaptive_tau must be"), ("adaptive_tau", "1", "adaptive_tau must be")],
)
def test_adaptive_parameters_are_validated(problem, name, bad, message):
    model = problem[0]
    before = getattr(model.config, name)
    with pytest.raises(ValueError, match=message):
        setattr(model.config, name, bad)
    with pytest.raises(ValueError, match=message):
        resmem.ResMemConfig(base_config=model.config.base_config, task="causal-lm", **{name: bad})
    with pytest.raises(ValueError, match=message):
        model.tune(torch.zeros(1, 4, dtype=torch.long) + 3, **{name: [bad]}, progress=False)
    assert getattr(model.config, name) == before


def test_model_card_names_the_adaptive_settings(problem, tmp_path):
    model = ResMemWrapper.from_base(tiny_base("llama"), k=3, sigma=1.0)
    model.build_memory(problem[1], window=WINDOW, stride=STRIDE, residual_top_m=TOP_M)
    model.config.distribution, model.config.adaptive_lambda_max, model.config.adaptive_tau = "adaptive", 0.75, 0.25
    resmem.evaluate(model, problem[2], window=WINDOW, stride=STRIDE, progress=False, split="test")
    model.save_pretrained(tmp_path / "card")
    assert "distribution=adaptive (lambda_max=0.75, tau=0.25)" in (tmp_path / "card" / "README.md").read_text()


def test_adaptive_recipe_smoke(tmp_path):
    """recipes/causal_lm/smollm2_adaptive.py end to end on a tiny saved Llama and word-level text."""
    result = run_smollm2_recipe_smoke(tmp_path, "smollm2_adaptive.py", "--k", "2", "8", "--sigma", "0.5", "5", "--lam",
                                      "0.25", "0.75", "--lam-max", "0.5", "1", "--tau", "0.1", "10", "--distances")
    assert set(result["splits"]) == {"validation", "test", "cross_domain"}
    c = result["chosen"]
    assert c["adaptive_lambda_max"] in (0.5, 1.0) and c["adaptive_tau"] in (0.1, 10.0)
    row = next(r for r in result["validation_table"] if (r["k"], r["sigma"]) == (c["k"], c["sigma"]))
    exp_ppl = [v["ppl"] for by in row["adaptive"].values() for v in by.values()]
    logistic_ppl = [v["ppl"] for by in row["adaptive_logistic"].values() for t in by.values() for v in t.values()]
    assert len(logistic_ppl) == 2 * 2 * len(c["d0_grid"])  # lam_max x tau x d0 (the validation d_1 quantiles)
    val = result["splits"]["validation"]
    assert val["adaptive"]["ppl"] == min(exp_ppl + logistic_ppl)  # chosen on validation only, over both gates
    assert (val["adaptive_exp"]["ppl"], val["adaptive_logistic"]["ppl"]) == (min(exp_ppl), min(logistic_ppl))
    assert c["adaptive_prediction"] in ("mixture", "resmem") and "gated acc" in (tmp_path / "results" / "r.md").read_text()
    assert "adaptive ppl" in (tmp_path / "results" / "r.md").read_text()
    d1 = result["nearest_distance"]
    # the cross-domain text (other words) is farther from the memory than held-out in-domain text
    assert d1["cross_domain"]["q50"] > d1["test"]["q50"] and d1["test"]["q10"] <= d1["test"]["q50"] <= d1["test"]["q90"]
