"""The bundled `evaluate` metrics load by path with HF_HUB_OFFLINE=1 and compute the paper's numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from resmem.metrics import METRICS, metric_path

SCRIPT = textwrap.dedent(
    """
    import json, math, socket
    def no_network(*args, **kwargs):
        raise OSError("network access attempted")
    socket.socket.connect = no_network
    import evaluate
    from resmem.metrics import metric_path
    acc = evaluate.load(metric_path("resmem_accuracy"))
    ppl = evaluate.load(metric_path("resmem_perplexity"))
    out = {
        "acc": acc.compute(predictions=[0, 1, 1, 2], references=[0, 0, 1, 2], base_predictions=[1, 0, 1, 0]),
        "acc_only": acc.compute(predictions=[0, 1], references=[0, 0]),
        "ppl": ppl.compute(log_probs=[math.log(0.5), math.log(0.25)], base_log_probs=[math.log(0.5)] * 2,
                           predicted_ids=[3, 4], target_ids=[3, 5]),
    }
    try:
        acc.compute(predictions=[0], references=[0], base_predictions=[0, 1])
    except ValueError as err:
        out["error"] = str(err)
    print("RESULT" + json.dumps(out))
    """
)


def test_metric_folders_exist_in_the_package():
    for name in METRICS:
        assert os.path.isfile(os.path.join(metric_path(name), f"{name}.py"))
    with pytest.raises(ValueError, match="Unknown resmem metric"):
        metric_path("accuracy")


def _check(out):
    acc = out["acc"]
    assert acc["accuracy"] == 0.75 and acc["base_accuracy"] == 0.5
    assert acc["tpr"] == 0.5 and acc["fpr"] == 0.25 and acc["gain"] == 0.25 and acc["num_examples"] == 4
    assert out["acc_only"] == {"accuracy": 0.5, "num_examples": 2}
    assert out["ppl"]["perplexity"] == pytest.approx(2 ** 1.5)
    assert out["ppl"]["base_perplexity"] == pytest.approx(2.0)
    assert out["ppl"]["accuracy"] == 0.5 and out["ppl"]["num_tokens"] == 2
    assert "base_predictions has 2 entries but there are 1 references" in out["error"]


def test_metrics_load_offline_in_process(tmp_path, monkeypatch, capsys):
    """Same script in this process: offline variables set, sockets refused (evaluate imported once, ~4 s)."""
    for name in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    import socket

    monkeypatch.setattr(socket.socket, "connect", socket.socket.connect)  # restored after the test
    exec(compile(SCRIPT, "<metrics-script>", "exec"), {})
    _check(json.loads(capsys.readouterr().out.split("RESULT", 1)[1]))


@pytest.mark.slow
def test_metrics_load_offline_in_a_fresh_process(tmp_path):
    """HF_HUB_OFFLINE=1 from interpreter start (about 10-25 s: a fresh import of evaluate and datasets)."""
    src = os.path.dirname(os.path.dirname(metric_path("resmem_accuracy")))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_EVALUATE_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH=os.path.dirname(src))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check(json.loads(proc.stdout.split("RESULT", 1)[1]))


@pytest.mark.parametrize("seed", range(3))
def test_metric_scripts_agree_with_scoring(seed):
    """The evaluate metrics use resmem.scoring: same TPR / FPR / Gain and perplexity on random inputs."""
    import math

    import numpy as np

    from resmem.metrics import load
    from resmem.scoring import decompose, perplexity

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 30))
    labels, base, res = (rng.integers(0, 4, n).tolist() for _ in range(3))
    got = load("resmem_accuracy").compute(predictions=res, references=labels, base_predictions=base)
    ref = decompose(base, res, labels)
    assert got == {"accuracy": ref["resmem_accuracy"], **{k: ref[k] for k in ("base_accuracy", "tpr", "fpr", "gain")},
                   "num_examples": n}
    b, r, y = np.array(base), np.array(res), np.array(labels)  # and an independent numpy check
    assert got["tpr"] == pytest.approx(((b != y) & (r == y)).mean()) and got["fpr"] == pytest.approx(((b == y) & (r != y)).mean())
    log_probs = np.log(rng.uniform(0.01, 1.0, n)).tolist()
    base_log_probs = np.log(rng.uniform(0.01, 1.0, n)).tolist()
    out = load("resmem_perplexity").compute(log_probs=log_probs, base_log_probs=base_log_probs, predicted_ids=res,
                                            target_ids=labels)
    assert out["perplexity"] == pytest.approx(perplexity(-sum(log_probs), n), rel=1e-12)
    assert out["perplexity"] == pytest.approx(math.exp(-np.mean(log_probs)), rel=1e-9)
    assert out["base_perplexity"] == pytest.approx(math.exp(-np.mean(base_log_probs)), rel=1e-9)
    assert out["accuracy"] == pytest.approx((r == y).mean())
