"""kNN-LM from the ResMem memory (`distribution="knn-lm"`): forward, evaluation, tuning, generate, save/load."""

import math

import numpy as np
import pytest
import torch
from lm_helpers import VOCAB, cached_and_uncached_greedy, run_smollm2_recipe_smoke, hook_keys, np_softmax, reference_entries, tiny_base

import resmem
from resmem import ResMemForCausalLM, ResMemWrapper
from resmem.evaluation_lm import evaluate_lm

WINDOW, STRIDE = 32, 24  # one window per sequence: every key has its full prefix as context
KS, TAUS, LAMS = [1, 3, 8], [0.05, 1.0, 20.0], [0.25, 0.9]


def few_token_sequences(n_seq: int, length: int, seed: int) -> torch.Tensor:
    """Sequences over only 6 token ids, so many neighbours share their next token; first tokens differ (distinct keys)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 9, (n_seq, length), generator=g)
    ids[:, 0] = torch.arange(n_seq) + 10 + 4 * seed
    return ids


@pytest.fixture(scope="module")
def problem():
    """A tiny Llama with a memory of 4 few-token sequences, queries of the same kind, and the memory's entries."""
    base = tiny_base("llama")
    model = ResMemWrapper.from_base(base, k=8, sigma=1.0)
    memory_text = few_token_sequences(4, 20, seed=0)
    model.build_memory(memory_text, window=WINDOW, stride=STRIDE, residual_top_m=16)
    queries = few_token_sequences(3, 12, seed=1)
    return model, memory_text, queries


def numpy_knn_lm(model, memory_text, queries, k, tau, lam):
    """Independent kNN-LM: keys from a plain forward hook, brute-force plain L2 over every stored key, softmax of
    -d / tau over the k nearest, their next tokens summed with np.add.at, mixed with softmax(f(x)) (float64)."""
    layer = model.config.layer
    mem_keys, _, mem_labels = reference_entries(model.base, layer, memory_text, WINDOW, STRIDE)
    q_keys, q_logits = hook_keys(model.base, layer, queries)
    q_keys, q_logits = q_keys.reshape(-1, q_keys.shape[-1]), q_logits.reshape(-1, q_logits.shape[-1])
    d = np.sqrt(((q_keys[:, None, :] - mem_keys[None, :, :]) ** 2).sum(-1))  # (Q, N)
    nn = np.argsort(d, axis=1, kind="stable")[:, :k]  # (Q, k)
    w = np_softmax(-np.take_along_axis(d, nn, axis=1) / tau)  # (Q, k)
    p_knn = np.zeros_like(q_logits)
    np.add.at(p_knn, (np.repeat(np.arange(len(nn)), k), mem_labels[nn].reshape(-1)), w.reshape(-1))
    p = lam * p_knn + (1 - lam) * np_softmax(q_logits)
    return p.reshape(*queries.shape, -1), mem_labels[nn]


def forward_in_mode(model, ids, k, tau, lam, **kwargs):
    config = model.config
    saved = config.k, config.knn_temperature, config.mixture_lambda, config.distribution
    config.k, config.knn_temperature, config.mixture_lambda, config.distribution = k, tau, lam, "knn-lm"
    try:
        with torch.no_grad():
            return model(ids, **kwargs)
    finally:
        config.k, config.knn_temperature, config.mixture_lambda, config.distribution = saved


@pytest.mark.parametrize("k,tau,lam", [(8, 1.0, 0.25), (3, 0.05, 0.9), (8, 20.0, 1.0)])
def test_forward_matches_numpy_knn_lm(problem, k, tau, lam):
    model, memory_text, queries = problem
    expected, neighbour_tokens = numpy_knn_lm(model, memory_text, queries, k, tau, lam)
    # The case the scatter-add must handle: several of a query's k neighbours carry the same next token.
    duplicates = [len(set(row)) < len(row) for row in neighbour_tokens.tolist()]
    assert k == 1 or sum(duplicates) > len(duplicates) // 2
    out = forward_in_mode(model, queries, k, tau, lam)
    # float32 keys and distances against float64: at tau = 0.05 a distance error of 1e-7 moves a weight by ~2e-6
    np.testing.assert_allclose(out.scores.double().numpy(), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.logits.exp().double().numpy(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits.exp().sum(-1), torch.ones(queries.shape), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.residual, out.scores - out.base_logits.softmax(-1), atol=0, rtol=0)
    # The ResMem modes ignore knn_temperature; the kNN-LM ignores sigma.
    model.config.sigma = 123.0
    try:
        assert torch.equal(forward_in_mode(model, queries, k, tau, lam).scores, out.scores)
    finally:
        model.config.sigma = 1.0


def test_padded_positions_get_the_base_distribution(problem):
    model, _, queries = problem
    ids = queries[:2].clone()
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    out = forward_in_mode(model, ids, 8, 1.0, 0.5, attention_mask=mask)
    torch.testing.assert_close(out.scores[1, :4], out.base_logits[1, :4].softmax(-1), atol=1e-7, rtol=0)
    assert not torch.allclose(out.scores[1, 4:], out.base_logits[1, 4:].softmax(-1), atol=1e-3)


def brute_force_rows(model, val):
    """(k, tau, lam) -> accuracy, TPR, FPR, perplexity of the forward pass in the knn-lm mode, set on the config."""
    labels = val[:, 1:]
    rows = {}
    for k in KS:
        for tau in TAUS:
            for lam in LAMS:
                out = forward_in_mode(model, val, k, tau, lam)
                ok = out.scores[:, :-1].argmax(-1) == labels
                base_ok = out.base_logits[:, :-1].argmax(-1) == labels
                nll = -out.logits[:, :-1].gather(-1, labels[..., None]).sum().item()
                n = labels.numel()
                rows[k, tau, lam] = {"accuracy": ok.sum().item() / n, "tpr": (ok & ~base_ok).sum().item() / n,
                                     "fpr": (~ok & base_ok).sum().item() / n, "ppl": math.exp(nll / n)}
    return rows


def test_evaluate_lm_and_evaluate_equal_the_forward(problem):
    model, memory_text, queries = problem
    val = torch.cat([queries, memory_text[:2, :12]])  # new text and memorised text
    brute = brute_force_rows(model, val)
    assert len({round(r["accuracy"], 6) for r in brute.values()}) > 2  # the grid matters here
    rows = evaluate_lm(model, val, ks=KS, sigmas=[1.0], lambdas=LAMS, knn_temperatures=TAUS, window=WINDOW,
                       stride=STRIDE, progress=False, chunk_size=7)  # chunks split the batch: sums over chunks
    assert [r["k"] for r in rows] == KS
    for row in rows:
        for tau in TAUS:
            for lam in LAMS:
                got, want = row["knn_lm"][str(tau)][str(lam)], brute[row["k"], tau, lam]
                assert (got["accuracy"], got["tpr"], got["fpr"]) == (want["accuracy"], want["tpr"], want["fpr"])
                assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-5)
    # Without a kNN-LM grid (and not in the knn-lm mode) nothing changes: no knn_lm column.
    assert "knn_lm" not in evaluate_lm(model, val, window=WINDOW, stride=STRIDE, progress=False)[0]
    # resmem.evaluate reports the configured kNN-LM: its argmax and perplexity.
    config = model.config
    config.k, config.knn_temperature, config.mixture_lambda, config.distribution = 3, 1.0, 0.25, "knn-lm"
    try:
        result = resmem.evaluate(model, val, window=WINDOW, stride=STRIDE, progress=False, record=False)
    finally:
        config.k, config.distribution = 8, "clamp"
    want = brute[3, 1.0, 0.25]
    assert (result["resmem_accuracy"], result["tpr"], result["fpr"]) == (want["accuracy"], want["tpr"], want["fpr"])
    assert result["ppl"] == pytest.approx(want["ppl"], rel=1e-5)
    assert (result["distribution"], result["knn_temperature"], result["mixture_lambda"]) == ("knn-lm", 1.0, 0.25)


def test_tune_chooses_knn_lm_by_perplexity_and_evaluate_reproduces_it(problem, tmp_path):
    base = tiny_base("llama")
    model = ResMemWrapper.from_base(base, k=8, sigma=1.0)
    memory_text = few_token_sequences(4, 20, seed=0)
    model.build_memory(memory_text, window=WINDOW, stride=STRIDE, residual_top_m=16)
    # Memorised text: the kNN-LM at lam=0.9 puts ~0.9 on the true token, the base mixture (lam = weight of the
    # base) at most ~0.75, so the kNN-LM has the lowest validation perplexity and is chosen.
    val = memory_text[:, :14]
    result = model.tune(val, k=[1, 3], sigma=[1e-3, 1.0], mixture_lambda=[0.25, 0.9], knn_temperature=[0.05, 1.0],
                        window=WINDOW, stride=STRIDE, progress=False)
    best = result.best
    assert result.grid["knn_temperature"] == [0.05, 1.0]
    # best is the lowest perplexity of the three modes at the chosen (k, sigma)
    row = next(r for r in result.table if (r["k"], r["sigma"]) == (best["k"], best["sigma"]))
    knn_ppls = {(float(t), float(l)): v["ppl"] for t, by in row["knn_lm"].items() for l, v in by.items()}
    assert best["distribution"] == "knn-lm"
    assert best["ppl"] == min(knn_ppls.values()) < min(min(row["ppl_mixture"].values()), row["ppl_clamp"])
    assert knn_ppls[best["knn_temperature"], best["mixture_lambda"]] == best["ppl"]
    config = model.config
    assert (config.distribution, config.knn_temperature, config.mixture_lambda, config.k) == (
        "knn-lm", best["knn_temperature"], best["mixture_lambda"], best["k"])
    # The forward at the set config reproduces tune's numbers, and so does resmem.evaluate.
    labels = val[:, 1:]
    with torch.no_grad():
        out = model(val)
    n = labels.numel()
    assert (out.scores[:, :-1].argmax(-1) == labels).sum().item() / n == best["accuracy"]
    nll = -out.logits[:, :-1].gather(-1, labels[..., None]).sum().item()
    assert math.exp(nll / n) == pytest.approx(best["ppl"], rel=1e-5)
    evaluated = resmem.evaluate(model, val, window=WINDOW, stride=STRIDE, progress=False, split="validation")
    assert evaluated["resmem_accuracy"] == best["accuracy"] and evaluated["ppl"] == pytest.approx(best["ppl"], rel=1e-6)
    # save / load keeps the mode and its settings, and gives the same distribution
    model.save_pretrained(tmp_path / "knn")
    loaded = ResMemForCausalLM.from_pretrained(tmp_path / "knn")
    assert (loaded.config.distribution, loaded.config.knn_temperature, loaded.config.mixture_lambda) == (
        "knn-lm", best["knn_temperature"], best["mixture_lambda"])
    with torch.no_grad():
        assert torch.equal(loaded(val).logits, out.logits)
    assert "knn-lm" in (tmp_path / "knn" / "README.md").read_text()
    # In the knn-lm mode, tune's default keeps the kNN-LM in the running with the sigma grid as temperatures.
    again = model.tune(val, k=[1, 3], sigma=[1e-3, 1.0], mixture_lambda=[0.25, 0.9], window=WINDOW, stride=STRIDE,
                       progress=False)
    assert again.grid["knn_temperature"] == [1e-3, 1.0] and again.best["distribution"] == "knn-lm"
    # Without a kNN-LM grid tune keeps to the ResMem modes (today's default outside the knn-lm mode).
    again = model.tune(val, k=[1, 3], sigma=[1e-3, 1.0], mixture_lambda=[0.25, 0.9], knn_temperature=[],
                       window=WINDOW, stride=STRIDE, progress=False)
    assert again.best["distribution"] in ("clamp", "mixture") and "knn_lm" not in again.table[0]
    assert model.tune(val, k=[1], sigma=[1.0], window=WINDOW, stride=STRIDE, progress=False).grid["knn_temperature"] == []


def test_generate_in_knn_lm_mode_with_cache_equals_uncached_loop(problem):
    model, _, queries = problem
    prompt = queries[:2, :5]
    config = model.config
    saved = config.distribution, config.knn_temperature, config.mixture_lambda
    config.distribution, config.knn_temperature, config.mixture_lambda = "knn-lm", 0.05, 0.9
    try:
        generated, ids = cached_and_uncached_greedy(model, prompt, 6)
        torch.manual_seed(0)
        sampled = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=True,
                                 top_k=0, pad_token_id=0, eos_token_id=None)
    finally:
        config.distribution, config.knn_temperature, config.mixture_lambda = saved
    assert torch.equal(generated, ids)
    assert sampled.shape == (2, 9) and int(sampled.max()) < VOCAB
    # the kNN-LM continues with memory tokens (3..8) where the base model alone would not
    assert ((generated[:, 5:] >= 3) & (generated[:, 5:] <= 8)).float().mean() > 0.5


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), True, "1"])
def test_knn_temperature_is_validated(problem, bad):
    model = problem[0]
    with pytest.raises(ValueError, match="knn_temperature must be a finite number > 0"):
        model.config.knn_temperature = bad
    with pytest.raises(ValueError, match="knn_temperature must be a finite number > 0"):
        resmem.ResMemConfig(base_config=model.config.base_config, task="causal-lm", knn_temperature=bad)
    with pytest.raises(ValueError, match="knn_temperature must be a finite number > 0"):
        model.tune(torch.zeros(1, 4, dtype=torch.long) + 3, knn_temperature=[bad], progress=False)
    assert model.config.knn_temperature == 1.0


def test_distribution_is_checked_on_assignment(problem):
    model = problem[0]
    with pytest.raises(ValueError, match="distribution must be one of .*knn-lm"):
        model.config.distribution = "knnlm"
    assert model.config.distribution == "clamp"


def test_cli_eval_and_tune_with_the_knn_lm(tmp_path, capsys):
    """`resmem eval` of a model saved in the knn-lm mode reports the kNN-LM (checked against its own forward);
    `resmem tune --knn-temperature` puts the kNN-LM in the running."""
    import json

    from test_commands import LM_HELD_OUT, LM_TRAIN, reference_lm_numbers
    from lm_helpers import word_tokenizer

    from resmem.cli import main as cli_main

    tok = word_tokenizer(100)
    m = ResMemWrapper.from_base(tiny_base("llama"), k=2, sigma=1.0)
    m.config.window, m.config.stride = 12, 8
    m.build_memory(LM_TRAIN, tokenizer=tok)
    m.config.distribution, m.config.mixture_lambda, m.config.knn_temperature = "knn-lm", 0.3, 0.7
    m.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    (tmp_path / "heldout.txt").write_text("\n\n".join(LM_HELD_OUT) + "\n")
    assert cli_main(["eval", str(tmp_path / "lm"), "--data", str(tmp_path / "heldout.txt"), "--output-dir",
                     str(tmp_path / "report"), "--no-progress"]) == 0
    result = json.loads((tmp_path / "report" / "eval.json").read_text())
    expected = reference_lm_numbers(tmp_path / "lm", LM_HELD_OUT)
    assert result["ppl"] == pytest.approx(expected["ppl"], rel=1e-5)
    assert result["resmem_accuracy"] == pytest.approx(expected["accuracy"])
    assert (result["distribution"], result["mixture_lambda"], result["knn_temperature"]) == ("knn-lm", 0.3, 0.7)
    assert "distribution=knn-lm" in capsys.readouterr().out
    assert cli_main(["tune", str(tmp_path / "lm"), "--data", str(tmp_path / "heldout.txt"), "--split", "validation",
                     "--k", "1", "2", "--sigma", "0.5", "5", "--lam", "0.3", "0.8", "--knn-temperature", "0.5", "2",
                     "--output-dir", str(tmp_path / "tune"), "--no-plots", "--no-progress"]) == 0
    report = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert report["grid"]["knn_temperature"] == [0.5, 2.0] and "knn_lm" in report["table"][0]


def test_side_by_side_recipe_smoke(tmp_path):
    """recipes/causal_lm/smollm2_knn_lm.py end to end on a tiny saved Llama and word-level text: one memory, the
    settings chosen on validation (the kNN-LM's by its lowest validation perplexity), in- and cross-domain test."""
    result = run_smollm2_recipe_smoke(tmp_path, "smollm2_knn_lm.py", "--k", "2", "8", "--sigma", "0.5", "5",
                                      "--knn-temperature", "0.1", "1", "--lam", "0.25", "0.75")
    assert set(result["splits"]) == {"validation", "test", "cross_domain"}
    knn = result["chosen"]["knn_lm"]
    lowest = min(v["ppl"] for r in result["validation_table"] for by in r["knn_lm"].values() for v in by.values())
    assert result["splits"]["validation"]["knn_lm"]["ppl"] == lowest and knn["knn_temperature"] in (0.1, 1.0)
    assert result["split"]["memory_tokens"] >= 300 and result["splits"]["cross_domain"]["positions"] >= 50
    assert "kNN-LM ppl" in (tmp_path / "results" / "r.md").read_text()
