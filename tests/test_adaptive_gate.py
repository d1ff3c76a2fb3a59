"""Sharper gates for the adaptive mixture (`adaptive_gate="logistic"`, `adaptive_d0`) and the gated ResMem argmax
(`adaptive_prediction="resmem"`): forward, evaluation and tune against an independent numpy computation, the default
unchanged, save/load, records/staleness, errors."""

import math

import numpy as np
import pytest
import torch
from lm_helpers import hook_keys, np_softmax, reference_entries, reference_scores, tiny_base
from test_adaptive_mixture import STRIDE, TOP_M, WINDOW, few_token_sequences

import resmem
from resmem import ResMemForCausalLM, ResMemWrapper
from resmem.adaptive_mixture import adaptive_outputs, adaptive_weight
from resmem.evaluation_lm import adaptive_entry, evaluate_lm
from resmem.records import current_settings, measured_at_current_settings


@pytest.fixture(scope="module")
def problem():
    """A tiny Llama, a memory of 4 sequences; validation = new text (far) plus memorised prefixes (d_1 ~ 0), and the
    numpy reference pieces: ResMem scores per (k, sigma), d_1, base logits, labels (float64, no resmem code)."""
    model = ResMemWrapper.from_base(tiny_base("llama"), k=8, sigma=1.0)
    memory_text = few_token_sequences(4, 20, seed=0)
    model.build_memory(memory_text, window=WINDOW, stride=STRIDE, residual_top_m=TOP_M)
    val = torch.cat([few_token_sequences(3, 12, seed=1), memory_text[:2, :12]])
    layer = model.config.layer
    mem_keys, mem_logits, mem_labels = reference_entries(model.base, layer, memory_text, WINDOW, STRIDE)
    q_keys, q_logits = hook_keys(model.base, layer, val)
    q_keys, q_logits = q_keys.reshape(-1, q_keys.shape[-1]), q_logits.reshape(-1, q_logits.shape[-1])
    ref = {"d1": np.sqrt(((q_keys[:, None, :] - mem_keys[None, :, :]) ** 2).sum(-1)).min(1), "logits": q_logits}
    ref["scores"] = {(k, s): reference_scores(mem_keys, mem_logits, mem_labels, q_keys, q_logits, k, s, 1.0, TOP_M)
                     for k in (1, 3, 8) for s in (0.3, 1.0)}
    return model, val, ref


def np_gate(d1, tau, gate, d0):
    """The gate value in float64: exp(-d1/tau) or the logistic 1 / (1 + exp((d1 - d0) / tau))."""
    return np.exp(-d1 / tau) if gate == "exp" else 1.0 / (1.0 + np.exp((d1 - d0) / tau))


def np_adaptive(ref, k, sigma, lam_max, tau, gate, d0, prediction):
    """`(p, prediction scores)` `(Q, V)` of the adaptive mixture in numpy (module docstring of resmem.adaptive_mixture)."""
    scores = ref["scores"][k, sigma]
    q = np.clip(scores, 0, None)
    q /= q.sum(-1, keepdims=True)
    g = np_gate(ref["d1"], tau, gate, d0)
    w = lam_max * g
    p = w[:, None] * q + (1 - w[:, None]) * np_softmax(ref["logits"])
    pred = np.where((g >= 0.5)[:, None], scores, p) if prediction == "resmem" else p
    return p, pred


def np_rates(ref, val, k, sigma, lam_max, tau, gate, d0, prediction):
    """Validation accuracy / TPR / FPR / perplexity of one setting at the positions with a next token, in numpy."""
    p, pred = np_adaptive(ref, k, sigma, lam_max, tau, gate, d0, prediction)
    b, t = val.shape
    p, pred, base = p.reshape(b, t, -1)[:, :-1], pred.reshape(b, t, -1)[:, :-1], ref["logits"].reshape(b, t, -1)[:, :-1]
    y = val[:, 1:].numpy()
    ok, base_ok = pred.argmax(-1) == y, base.argmax(-1) == y
    n = y.size
    nll = -np.log(np.take_along_axis(p, y[..., None], -1)).sum()
    return {"accuracy": ok.sum() / n, "tpr": (ok & ~base_ok).sum() / n, "fpr": (~ok & base_ok).sum() / n,
            "ppl": math.exp(nll / n)}


def set_mode(config, **values):
    """Set config fields, returning the previous values (for a `finally:` restore)."""
    saved = {name: getattr(config, name) for name in values}
    for name, value in values.items():
        setattr(config, name, value)
    return saved


def run(model, val, **values):
    saved = set_mode(model.config, **{"distribution": "adaptive", **values})
    try:
        with torch.no_grad():
            return model(val)
    finally:
        set_mode(model.config, **saved)


def between_distances(ref) -> float:
    """A d0 halfway between two distinct middle d_1 values (no position sits on the gate's threshold)."""
    d = np.unique(np.round(ref["d1"], 4))
    i = len(d) // 2
    return float((d[i - 1] + d[i]) / 2)


@pytest.mark.parametrize("k,sigma,lam_max,tau", [(8, 1.0, 0.8, 0.05), (3, 0.3, 1.0, 0.5), (1, 1.0, 0.5, 3.0)])
@pytest.mark.parametrize("prediction", ["mixture", "resmem"])
def test_logistic_gate_forward_matches_numpy(problem, k, sigma, lam_max, tau, prediction):
    model, val, ref = problem
    d0 = between_distances(ref)
    p, pred = np_adaptive(ref, k, sigma, lam_max, tau, "logistic", d0, prediction)
    g = np_gate(ref["d1"], tau, "logistic", d0)
    assert (g >= 0.5).any() and (g < 0.5).any()  # the gate is open at some positions and closed at others
    out = run(model, val, k=k, sigma=sigma, adaptive_lambda_max=lam_max, adaptive_tau=tau, adaptive_gate="logistic",
              adaptive_d0=d0, adaptive_prediction=prediction)
    shape = (*val.shape, -1)
    np.testing.assert_allclose(out.logits.exp().double().numpy(), p.reshape(shape), atol=2e-5, rtol=0)
    np.testing.assert_allclose(out.scores.double().numpy(), pred.reshape(shape), atol=2e-5, rtol=0)
    torch.testing.assert_close(out.residual, out.logits.exp() - out.base_logits.softmax(-1), atol=2e-6, rtol=0)
    if prediction == "resmem":  # where open the paper's scores (argmax), elsewhere the mixture
        open_ = torch.from_numpy(g.reshape(val.shape) >= 0.5)
        resmem_scores = run(model, val, k=k, sigma=sigma, distribution="clamp").scores
        assert torch.equal(out.scores[open_], resmem_scores[open_])


def test_logistic_gate_is_sharper_than_exp_and_closes_far_text(problem):
    """The point of the option: with a small width the logistic weight is ~lam_max below d0 and ~0 beyond it, where
    exp(-d_1/tau) at any tau is either small near the memory or large far from it; far text gets the base exactly."""
    model, val, ref = problem
    d0 = between_distances(ref)
    d1 = torch.from_numpy(ref["d1"]).float()
    w = adaptive_weight(d1, 1.0, 0.01, "logistic", d0)
    near, far = d1 < d0 - 0.1, d1 > d0 + 0.1
    assert near.any() and far.any()
    assert w[near].min() > 0.99 and w[far].max() < 1e-3
    for tau in (0.01, 0.1, 1.0, 10.0, 100.0):  # no exp gate separates the same positions as well
        e = adaptive_weight(d1, 1.0, tau)
        assert not (e[near].min() > 0.99 and e[far].max() < 1e-3)
    out = run(model, val[:3], adaptive_lambda_max=1.0, adaptive_tau=1e-4, adaptive_gate="logistic", adaptive_d0=0.0,
              adaptive_prediction="resmem")  # new text: every d_1 > 0 -> closed -> the base distribution
    torch.testing.assert_close(out.scores, out.base_logits.softmax(-1), atol=1e-7, rtol=0)


def test_default_is_the_exp_gate_bit_for_bit(problem):
    """Defaults: exp gate, d0 = 0, mixture prediction; the outputs equal the formula of the earlier implementation
    bit for bit, and the default tune grid holds exp settings only and writes no new field."""
    model, val, ref = problem
    config = resmem.ResMemConfig(base_config=model.config.base_config, task="causal-lm")
    assert (config.adaptive_gate, config.adaptive_d0, config.adaptive_prediction) == ("exp", 0.0, "mixture")
    g = torch.Generator().manual_seed(0)
    scores, logits = torch.randn(6, 11, generator=g).softmax(-1) - 0.05, torch.randn(6, 11, generator=g)
    d1 = torch.tensor([0.0, 0.3, 1.0, 2.5, 7.0, float("inf")])
    p, lg, res = adaptive_outputs(scores, logits, d1, 0.7, 1.3)
    p_lm = torch.softmax(logits.float(), dim=-1)  # the earlier implementation, verbatim
    q = scores.float().clamp_min(0)
    q = q / q.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    w = (torch.exp(-d1.float() / 1.3) * 0.7).unsqueeze(1)
    old = w * q + (1.0 - w) * p_lm
    assert torch.equal(p, old) and torch.equal(lg, old.clamp_min(1e-30).log()) and torch.equal(res, old - p_lm)
    tuned = model.tune(val, k=[3], sigma=[1.0], adaptive_lambda_max=[0.5, 1.0], adaptive_tau=[0.1, 1.0], window=WINDOW,
                       stride=STRIDE, progress=False, set_best=False)
    assert {key[2] for key in tuned.grid["adaptive"]} == {"exp"} and tuned.grid["adaptive_prediction"] == ["mixture"]
    assert "adaptive_logistic" not in tuned.table[0]
    assert tuned.best["adaptive_best"]["adaptive_prediction"] == "mixture"


def forward_rates(model, val, **values):
    out = run(model, val, **values)
    labels = val[:, 1:]
    n = labels.numel()
    ok, base_ok = out.scores[:, :-1].argmax(-1) == labels, out.base_logits[:, :-1].argmax(-1) == labels
    nll = -out.logits[:, :-1].gather(-1, labels[..., None]).sum().item()
    return {"accuracy": ok.sum().item() / n, "tpr": (ok & ~base_ok).sum().item() / n,
            "fpr": (~ok & base_ok).sum().item() / n, "ppl": math.exp(nll / n)}


@pytest.mark.parametrize("sparse", [True, False])
def test_evaluate_lm_scores_both_gates_and_predictions_as_the_forward(problem, sparse):
    model, val, ref = problem
    d0 = between_distances(ref)
    settings = [(1.0, 0.05, "logistic", d0), (0.1, 0.5, "logistic", d0 + 0.5), (0.1, 0.3)]
    rows = evaluate_lm(model, val, ks=[1, 8], sigmas=[1.0], adaptive=settings, window=WINDOW, stride=STRIDE,
                       progress=False, chunk_size=7, sparse=sparse)
    gated_vs_mixture = []
    for row in rows:
        for setting in settings:
            lam_max, tau, gate, d0_ = (*setting, "exp", 0.0) if len(setting) == 2 else setting
            got = adaptive_entry(row, setting)
            for prediction, prefix in (("mixture", ""), ("resmem", "gated_")):
                values = dict(k=row["k"], sigma=row["sigma"], adaptive_lambda_max=lam_max, adaptive_tau=tau,
                              adaptive_gate=gate, adaptive_d0=d0_, adaptive_prediction=prediction)
                want = forward_rates(model, val, **values)
                ref_rates = np_rates(ref, val, row["k"], row["sigma"], lam_max, tau, gate, d0_, prediction)
                assert (got[prefix + "accuracy"], got[prefix + "tpr"], got[prefix + "fpr"]) == (
                    want["accuracy"], want["tpr"], want["fpr"])
                assert got[prefix + "accuracy"] == pytest.approx(ref_rates["accuracy"], abs=1e-12)
                assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-5)
                assert got["ppl"] == pytest.approx(ref_rates["ppl"], rel=2e-3)  # float32 vs float64 (small p_y)
            gated_vs_mixture.append(got["gated_accuracy"] != got["accuracy"])
    assert any(gated_vs_mixture)  # the gated ResMem argmax really differs from the mixture's somewhere
    assert set(rows[0]["adaptive_logistic"]["1.0"]) == {str(float(d0))}


def tune_grid(ref, lams, taus):
    d0s = [between_distances(ref), between_distances(ref) + 1.0]
    keys = [(lm, tau, "exp", 0.0) for lm in lams for tau in taus] + [
        (lm, tau, "logistic", d0) for lm in lams for tau in taus for d0 in d0s]
    return d0s, keys


def test_tune_picks_gate_and_prediction_as_numpy(problem):
    """One search scores every (lam_max, tau, gate, d0): tune's best is the numpy perplexity minimum, and the
    prediction with the higher numpy validation accuracy (here ResMem's gated argmax: a small memory weight keeps the
    mixture's argmax at the base's)."""
    model, val, ref = problem
    lams, taus = [0.1], [0.05, 0.5]
    d0s, keys = tune_grid(ref, lams, taus)
    result = model.tune(val, k=[8], sigma=[1.0], adaptive_lambda_max=lams, adaptive_tau=taus,
                        adaptive_gate=["exp", "logistic"], adaptive_d0=d0s, adaptive_prediction=["mixture", "resmem"],
                        window=WINDOW, stride=STRIDE, progress=False, set_best=False)
    assert sorted(map(tuple, result.grid["adaptive"])) == sorted(keys)
    ada = result.best["adaptive_best"]
    got = (ada["adaptive_lambda_max"], ada["adaptive_tau"], ada["adaptive_gate"], ada["adaptive_d0"])
    ppl = {key: np_rates(ref, val, 8, 1.0, *key, "mixture")["ppl"] for key in keys}
    assert ppl[got] == pytest.approx(min(ppl.values()), rel=1e-6) and got[2] == "logistic"
    assert ada["ppl"] == pytest.approx(ppl[got], rel=2e-3)
    acc = {pred: np_rates(ref, val, 8, 1.0, *got, pred)["accuracy"] for pred in ("mixture", "resmem")}
    assert acc["resmem"] > acc["mixture"] and ada["adaptive_prediction"] == "resmem"
    assert ada["gated_accuracy"] == pytest.approx(acc["resmem"], abs=1e-12)
    assert model.config.adaptive_gate == "exp"  # set_best=False: nothing written


def test_tune_sets_the_gate_and_the_model_reproduces_it(problem, tmp_path):
    model, val, ref = problem
    model = ResMemWrapper.from_base(tiny_base("llama"), k=8, sigma=1.0)
    model.build_memory(few_token_sequences(4, 20, seed=0), window=WINDOW, stride=STRIDE, residual_top_m=TOP_M)
    lams, taus = [0.5, 1.0], [0.05, 0.5]
    d0s, keys = tune_grid(ref, lams, taus)
    result = model.tune(val, k=[3], sigma=[1.0], adaptive_lambda_max=lams, adaptive_tau=taus,
                        adaptive_gate=["exp", "logistic"], adaptive_d0=d0s, adaptive_prediction="resmem",
                        window=WINDOW, stride=STRIDE, progress=False)
    best = result.best
    got = (best["adaptive_lambda_max"], best["adaptive_tau"], best["adaptive_gate"], best["adaptive_d0"])
    ppl = {key: np_rates(ref, val, 3, 1.0, *key, "mixture")["ppl"] for key in keys}
    assert best["distribution"] == "adaptive" and got[2] == "logistic"  # a sharp gate wins on this data
    assert ppl[got] == pytest.approx(min(ppl.values()), rel=1e-6)
    assert best["accuracy"] == pytest.approx(np_rates(ref, val, 3, 1.0, *got, "resmem")["accuracy"], abs=1e-12)
    config = model.config
    assert (config.adaptive_gate, config.adaptive_d0, config.adaptive_prediction) == ("logistic", got[3], "resmem")
    record = config.evaluations["validation"]
    assert (record["adaptive_gate"], record["adaptive_d0"], record["adaptive_prediction"]) == ("logistic", got[3], "resmem")
    evaluated = resmem.evaluate(model, val, window=WINDOW, stride=STRIDE, progress=False, record=False)
    assert evaluated["resmem_accuracy"] == best["accuracy"] and evaluated["ppl"] == pytest.approx(best["ppl"], rel=1e-6)
    # save / load: the three fields come back and the outputs are the same
    with torch.no_grad():
        out = model(val)
    model.save_pretrained(tmp_path / "gate")
    loaded = ResMemForCausalLM.from_pretrained(tmp_path / "gate")
    assert (loaded.config.adaptive_gate, loaded.config.adaptive_d0, loaded.config.adaptive_prediction) == (
        "logistic", got[3], "resmem")
    with torch.no_grad():
        again = loaded(val)
    assert torch.equal(again.logits, out.logits) and torch.equal(again.scores, out.scores)
    assert f"logistic gate at d0={got[3]}" in (tmp_path / "gate" / "README.md").read_text()
    # a record measured at the logistic gate is stale once the gate, d0 or the prediction changes
    for name, value in (("adaptive_d0", got[3] + 0.25), ("adaptive_gate", "exp"), ("adaptive_prediction", "mixture")):
        saved = set_mode(config, **{name: value})
        try:
            assert not measured_at_current_settings(record, current_settings(model)), name
        finally:
            set_mode(config, **saved)
    assert measured_at_current_settings(record, current_settings(model))


def test_exp_gate_record_is_stale_under_the_logistic_gate(problem):
    """A record of the default (exp) gate names no gate; a model switched to the logistic gate must not show it."""
    model, val, _ = problem
    saved = set_mode(model.config, distribution="adaptive", adaptive_lambda_max=0.5, adaptive_tau=0.5)
    try:
        record = dict(current_settings(model), distribution="adaptive")
        assert "adaptive_gate" not in record and measured_at_current_settings(record, current_settings(model))
        model.config.adaptive_gate, model.config.adaptive_d0 = "logistic", 1.0
        assert not measured_at_current_settings(record, current_settings(model))
        model.config.adaptive_gate, model.config.adaptive_prediction = "exp", "resmem"
        assert not measured_at_current_settings(record, current_settings(model))
    finally:
        set_mode(model.config, adaptive_gate="exp", adaptive_d0=0.0, adaptive_prediction="mixture", **saved)


@pytest.mark.parametrize(
    "name,bad,message",
    [("adaptive_gate", "step", "adaptive_gate must be one of"), ("adaptive_gate", None, "adaptive_gate must be one of"),
     ("adaptive_d0", -1.0, "adaptive_d0 must be a finite number >= 0"), ("adaptive_d0", float("nan"), "adaptive_d0 must"),
     ("adaptive_d0", True, "adaptive_d0 must"), ("adaptive_prediction", "argmax", "adaptive_prediction must be one of")],
)
def test_gate_parameters_are_validated(problem, name, bad, message):
    model = problem[0]
    before = getattr(model.config, name)
    with pytest.raises(ValueError, match=message):
        setattr(model.config, name, bad)
    with pytest.raises(ValueError, match=message):
        resmem.ResMemConfig(base_config=model.config.base_config, task="causal-lm", **{name: bad})
    if bad is not None:  # the same check on a tune grid (before any base pass)
        grid = {"adaptive_gate": ["logistic"], name: [bad]}
        with pytest.raises(ValueError, match=message):
            model.tune(torch.zeros(1, 4, dtype=torch.long) + 3, **grid, progress=False)
    assert getattr(model.config, name) == before


def test_sparse_adaptive_argmax_from_the_pareto_front_equals_the_dense_argmax():
    """`evaluation_lm._adaptive_sparse` keeps only the touched columns on the (p_1, q) Pareto front: its argmax, label
    log-probability and gated correctness equal a float64 numpy computation over the whole vocabulary, for random
    rows with many touched columns and settings from w ~ 0 to w = 1, both gates."""
    from resmem.evaluation_lm import _adaptive_sparse

    n, v, u = 64, 50, 30
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(n, v, generator=g) * 2
    p_t = torch.softmax(logits, -1)  # the build temperature T = 1 here
    tokens = torch.stack([torch.randperm(v, generator=g)[:u] for _ in range(n)])  # (n, U) distinct touched ids
    used = torch.rand(n, u, generator=g) > 0.2
    residual = torch.zeros(n, v).scatter_(1, tokens, torch.randn(n, u, generator=g) * 0.05 * used)
    scores = p_t + residual  # (n, V): untouched columns keep p_T
    q = scores.clamp_min(0) / scores.clamp_min(0).sum(-1, keepdim=True)
    untouched = ~torch.zeros(n, v, dtype=torch.bool).scatter_(1, tokens, used)  # unused slots: untouched (residual 0)
    rest_tok = p_t.masked_fill(~untouched, -1).argmax(-1)  # best untouched token by base probability
    labels = torch.randint(0, v, (n,), generator=g)
    d1 = torch.rand(n, generator=g) * 4
    resmem_ok = scores.argmax(-1) == labels
    base_ok = logits.argmax(-1) == labels
    settings = [(1.0, 0.3, "exp", 0.0), (0.5, 3.0, "exp", 0.0), (0.9, 0.2, "logistic", 2.0), (0.3, 1e-3, "logistic", 5.0)]
    seen = {}

    class Capture:
        def add_adaptive(self, key, base_ok, ok, logp_y, gated_ok):
            seen[key] = (ok, logp_y, gated_ok)

    _adaptive_sparse(Capture(), settings, d1, logits, labels, base_ok, tokens, used, q.gather(1, tokens),
                     q.gather(1, labels[:, None]).squeeze(1), q.gather(1, rest_tok[:, None]).squeeze(1), rest_tok, resmem_ok)
    qn, p1n, yn = q.double().numpy(), np_softmax(logits.double().numpy()), labels.numpy()
    for key in settings:
        lam_max, tau, gate, d0 = key
        gv = np_gate(d1.double().numpy(), tau, gate, d0)
        mix = lam_max * gv[:, None] * qn + (1 - lam_max * gv[:, None]) * p1n  # (n, V) dense, float64
        ok, logp_y, gated_ok = seen[key]
        np.testing.assert_array_equal(ok.numpy(), mix.argmax(-1) == yn)
        np.testing.assert_allclose(logp_y.double().numpy(), np.log(mix[np.arange(n), yn]), rtol=1e-5)
        np.testing.assert_array_equal(gated_ok.numpy(), np.where(gv >= 0.5, resmem_ok.numpy(), mix.argmax(-1) == yn))
    front_sizes = []  # the cut is real: most touched columns are off the front
    for i in range(n):
        t = tokens[i][used[i]]
        pq = np.stack([p1n[i, t], qn[i, t]], 1)
        front_sizes.append(sum(not ((pq >= a).all(1) & (pq > a).any(1)).any() for a in pq))
    assert max(front_sizes) < used.sum(1).min().item() / 2
