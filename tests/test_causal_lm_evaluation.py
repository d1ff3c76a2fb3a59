"""evaluation_lm: metrics from one base pass over a (k, sigma, lam) grid agree with the model's forward."""

import gzip
import json
import math

import pytest
import torch
from lm_helpers import distinct_sequences, tiny_base, word_tokenizer

from resmem import ResMemForCausalLM, ResMemWrapper
from resmem.evaluation_lm import evaluate_lm
from resmem.scoring import format_table


@pytest.fixture(scope="module")
def model():
    m = ResMemWrapper.from_base(tiny_base("llama"), k=3, sigma=0.7, temperature=1.2)
    m.build_memory(distinct_sequences(4, 20), window=12, stride=8, residual_top_m=16)
    return m


def test_metrics_match_forward(model):
    held_out = distinct_sequences(3, 10, seed=5)  # one window each: every position with a next token
    results = evaluate_lm(model, held_out, ks=[1, 3], sigmas=[0.7, 5.0], lambdas=[0.3], window=12, stride=8)
    assert len(results) == 4
    r = next(x for x in results if x["k"] == 3 and x["sigma"] == 0.7)
    with torch.no_grad():
        out = model(held_out)
    labels = held_out[:, 1:]
    pred, base_pred = out.scores[:, :-1].argmax(-1), out.base_logits[:, :-1].argmax(-1)
    assert r["positions"] == 27
    assert r["accuracy"] == pytest.approx((pred == labels).float().mean().item())
    assert r["base_accuracy"] == pytest.approx((base_pred == labels).float().mean().item())
    tpr = ((pred == labels) & (base_pred != labels)).float().mean().item()
    fpr = ((pred != labels) & (base_pred == labels)).float().mean().item()
    assert (r["tpr"], r["fpr"], r["gain"]) == pytest.approx((tpr, fpr, tpr - fpr))
    nll = -out.logits[:, :-1].gather(2, labels[..., None]).mean().item()
    assert r["ppl_clamp"] == pytest.approx(math.exp(nll), rel=1e-4)
    base_nll = -out.base_logits[:, :-1].log_softmax(-1).gather(2, labels[..., None]).mean().item()
    assert r["base_ppl"] == pytest.approx(math.exp(base_nll), rel=1e-4)
    model.config.distribution, model.config.mixture_lambda = "mixture", 0.3
    try:
        with torch.no_grad():
            mix = model(held_out).logits[:, :-1].gather(2, labels[..., None]).mean().item()
    finally:
        model.config.distribution = "clamp"
    assert r["ppl_mixture"]["0.3"] == pytest.approx(math.exp(-mix), rel=1e-4)
    assert "| 1.2 | 3 | 0.7 |" in format_table(results)


def test_memorised_text_is_predicted_exactly(model):
    results = evaluate_lm(model, distinct_sequences(4, 20), ks=[1], sigmas=[1e-3], window=12, stride=8)
    assert results[0]["accuracy"] == 1.0 and results[0]["positions"] == 4 * 19


def test_several_temperatures_from_one_pass(model):
    seqs = distinct_sequences(4, 20)
    memories = model.build_memories(seqs, [1.0, 1.2], window=12, stride=8, residual_top_m=16)
    assert memories[1.2].keys is memories[1.0].keys
    torch.testing.assert_close(memories[1.2].values, model.memory.values)
    held_out = distinct_sequences(2, 10, seed=6)
    both = evaluate_lm(model, held_out, memories=memories, window=12, stride=8)
    single = evaluate_lm(model, held_out, window=12, stride=8)
    assert [r["temperature"] for r in both] == [1.0, 1.2]
    assert both[1]["accuracy"] == single[0]["accuracy"] and both[1]["ppl_clamp"] == pytest.approx(single[0]["ppl_clamp"])


def test_command_line(model, tmp_path, capsys):
    tok = word_tokenizer(100)
    m = ResMemWrapper.from_base(tiny_base("llama"), k=2, sigma=1.0)
    m.config.window, m.config.stride = 12, 8
    m.build_memory(["w1 w2 w3 w4 w5 w6", "w7 w8 w9 w10"], tokenizer=tok)
    m.save_pretrained(tmp_path / "saved")
    tok.save_pretrained(tmp_path / "saved")
    text = tmp_path / "test.txt.gz"
    with gzip.open(text, "wt") as f:
        f.write("w1 w2 w3 w9\n\nw4 w5 w6 w7 w8\n")
    from resmem.cli import main as cli_main

    # `resmem eval` at the saved setting, old scripts' `--model` spelling (see test_commands.py for the rest)
    out = tmp_path / "report"
    assert cli_main(["eval", "--model", str(tmp_path / "saved"), "--data", str(text), "--output-dir", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["num_examples"] == 3 + 4 and (result["k"], result["distribution"]) == (2, "clamp")
    assert "next-token accuracy" in capsys.readouterr().out


def test_tune_command_for_a_causal_lm(tmp_path, capsys):
    from resmem.cli import main as cli_main

    tok = word_tokenizer(100)
    m = ResMemWrapper.from_base(tiny_base("llama"), k=2, sigma=1.0)
    m.config.window, m.config.stride = 12, 8
    m.build_memory(["w1 w2 w3 w4 w5 w6", "w7 w8 w9 w10", "w3 w4 w5 w11 w12"], tokenizer=tok)
    m.save_pretrained(tmp_path / "saved")
    tok.save_pretrained(tmp_path / "saved")
    val = tmp_path / "val.txt"
    val.write_text("w1 w2 w3 w4 w9\n\nw4 w5 w6 w7 w8\n\nw3 w4 w5 w11 w2\n")
    out = tmp_path / "report"
    assert cli_main(["tune", str(tmp_path / "saved"), "--data", str(val), "--k", "1", "3", "--sigma", "0.5", "5",
                     "--mixture-lambda", "0.3", "0.8", "--output-dir", str(out), "--save"]) == 0
    report = json.loads((out / "tune.json").read_text())
    # the same search through the Python API gives the same table and choice
    direct = ResMemForCausalLM.from_pretrained(tmp_path / "saved", tokenizer=tok)
    from datasets import load_dataset

    data = load_dataset("text", data_files=str(val), sample_by="paragraph", split="train")
    expected = direct.tune(data, tokenizer=tok, k=[1, 3], sigma=[0.5, 5.0], mixture_lambda=[0.3, 0.8], set_best=False)
    assert [(r["k"], r["sigma"], r["accuracy"]) for r in report["table"]] == [
        (r["k"], r["sigma"], r["accuracy"]) for r in expected.table]
    assert (report["best"]["k"], report["best"]["sigma"]) == (expected.best["k"], expected.best["sigma"])
    assert report["best"]["mixture_lambda"] == expected.best["mixture_lambda"]
    assert set(report["sensitivity"]) == {"k", "sigma", "temperature"}
    assert (out / "tune_sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    assert "best (accuracy)" in capsys.readouterr().out
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert (saved["k"], saved["sigma"], saved["mixture_lambda"]) == (
        expected.best["k"], expected.best["sigma"], expected.best["mixture_lambda"])
