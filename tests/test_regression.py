"""ResMem for regressors (paper Remark 3.1): residuals y - f(x), prediction f(x) + sum_i w_i r_i.

Every number is checked against an independent numpy computation: the keys and base outputs are
recomputed from the tiny model's weights, neighbours by brute force over all stored keys.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

import resmem
from resmem import ResMemWrapper
from resmem.regression import RegressionMemory, is_regression
from resmem.scoring import regression_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyRegressorConfig(PreTrainedConfig):
    model_type = "resmem_test_tiny_regressor"
    input_dim: int = 3
    hidden_size: int = 6


class TinyRegressor(PreTrainedModel):
    """x (B, input_dim) -> tanh(Linear `body`) -> Linear `head` (num_labels real outputs)."""

    config_class = TinyRegressorConfig
    main_input_name = "pixel_values"

    def __init__(self, config):
        super().__init__(config)
        self.body = nn.Linear(config.input_dim, config.hidden_size)
        self.head = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module):
        pass  # keep torch's default initialisation (seeded by the caller)

    def forward(self, pixel_values, labels=None, **kwargs):
        return ImageClassifierOutput(logits=self.head(torch.tanh(self.body(pixel_values.flatten(1)))))


AutoConfig.register(TinyRegressorConfig.model_type, TinyRegressorConfig, exist_ok=True)
AutoModelForImageClassification.register(TinyRegressorConfig, TinyRegressor, exist_ok=True)


def make_base(num_labels=2, problem_type="regression", seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        config = TinyRegressorConfig(num_labels=num_labels, problem_type=problem_type)
        return TinyRegressor(config).eval()


def make_data(n, num_labels=2, seed=0, input_dim=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, input_dim)).astype(np.float32)
    y = np.stack([np.sin(2 * x[:, 0]) + 0.1 * j * x[:, 1] ** 2 for j in range(num_labels)], axis=1).astype(np.float32)
    y = y + 0.05 * rng.normal(size=y.shape).astype(np.float32)
    labels = y[:, 0].tolist() if num_labels == 1 else y.tolist()  # one float per row for num_labels = 1
    return datasets.Dataset.from_dict({"pixel_values": x.tolist(), "label": labels}), x, y


def numpy_reference(base, x_train, y_train, x_query, k, sigma):
    """Independent ResMem regression: keys = tanh(body(x)), f = head(keys), brute-force kNN, softmax(-d/sigma)."""
    w1, b1 = base.body.weight.detach().double().numpy(), base.body.bias.detach().double().numpy()
    w2, b2 = base.head.weight.detach().double().numpy(), base.head.bias.detach().double().numpy()
    keys = lambda x: np.tanh(x.astype(np.float64) @ w1.T + b1)  # noqa: E731
    f = lambda z: z @ w2.T + b2  # noqa: E731
    z_train, z_query = keys(x_train), keys(x_query)
    residuals = y_train.reshape(len(y_train), -1) - f(z_train)  # (N, C)
    d = np.sqrt(((z_query[:, None, :] - z_train[None, :, :]) ** 2).sum(-1))  # (B, N) every pair
    nearest = np.argsort(d, axis=1, kind="stable")[:, :k]  # (B, k)
    dk = np.take_along_axis(d, nearest, axis=1)
    w = np.exp(-(dk - dk[:, :1]) / sigma)
    w /= w.sum(axis=1, keepdims=True)
    residual = np.einsum("bk,bkc->bc", w, residuals[nearest])
    return f(z_query), residual, f(z_query) + residual


@pytest.fixture
def fitted():
    base = make_base()
    train, x_train, y_train = make_data(60, seed=1)
    model = ResMemWrapper.from_base(base, k=5, sigma=0.3)
    model.build_memory(train, batch_size=16, progress=False)
    return model, base, x_train, y_train


def test_regression_detected_from_problem_type_and_num_labels():
    assert is_regression(make_base(2, "regression").config)
    assert is_regression(make_base(1, None).config)  # transformers' rule: num_labels == 1 without a problem type
    assert not is_regression(make_base(2, None).config)
    assert not is_regression(make_base(3, "multi_label_classification").config)


def test_memory_stores_float_targets_and_base_outputs(fitted):
    model, base, x_train, y_train = fitted
    assert isinstance(model.memory, RegressionMemory) and len(model.memory) == 60
    np.testing.assert_array_equal(model.memory.labels.numpy(), y_train)  # floats, not truncated class ids
    with torch.no_grad():
        f = base(pixel_values=torch.from_numpy(x_train)).logits
    torch.testing.assert_close(model.memory.base_logits, f)


def test_forward_matches_numpy_bruteforce(fitted):
    model, base, x_train, y_train = fitted
    _, x_query, _ = make_data(17, seed=2)
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(x_query))
    f, residual, pred = numpy_reference(base, x_train, y_train, x_query, k=5, sigma=0.3)
    assert out.scores is None  # no softmax, no scores (Remark 3.1)
    np.testing.assert_allclose(out.base_logits.double().numpy(), f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.residual.double().numpy(), residual, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.logits.double().numpy(), pred, rtol=1e-4, atol=1e-5)
    assert np.abs(residual).max() > 1e-2  # the memory changes the prediction


def test_k1_small_sigma_memorises_training_targets(fitted):
    model, _, x_train, y_train = fitted
    model.config.k, model.config.sigma = 1, 1e-3
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(x_train))
    np.testing.assert_allclose(out.logits.numpy(), y_train, atol=1e-5)


def test_loss_is_mse_of_prediction(fitted):
    model, _, x_train, y_train = fitted
    labels = torch.from_numpy(y_train[:8])
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(x_train[:8]), labels=labels)
    expected = ((out.logits.double().numpy() - y_train[:8]) ** 2).mean()
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_num_labels_1_regressor_one_float_per_row():
    base = make_base(1, None, seed=3)
    train, x_train, y_train = make_data(30, num_labels=1, seed=4)
    model = ResMemWrapper.from_base(base, k=4, sigma=0.5)
    model.build_memory(train, batch_size=7, progress=False)
    assert model.memory.labels.shape == (30, 1)
    _, x_query, _ = make_data(5, num_labels=1, seed=5)
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(x_query))
    np.testing.assert_allclose(out.logits.double().numpy(), numpy_reference(base, x_train, y_train, x_query, 4, 0.5)[2],
                               rtol=1e-4, atol=1e-5)


def test_regression_metrics_against_numpy():
    rng = np.random.default_rng(0)
    y, base, pred = rng.normal(size=(50, 3)), rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    m = regression_metrics(torch.from_numpy(base), torch.from_numpy(pred), torch.from_numpy(y))
    sst = ((y - y.mean(axis=0)) ** 2).sum()
    for prefix, p in (("base_", base), ("", pred)):
        assert m[prefix + "mse"] == pytest.approx(((p - y) ** 2).mean())
        assert m[prefix + "rmse"] == pytest.approx(np.sqrt(((p - y) ** 2).mean()))
        assert m[prefix + "mae"] == pytest.approx(np.abs(p - y).mean())
        assert m[prefix + "r2"] == pytest.approx(1 - ((p - y) ** 2).sum() / sst)
    one = regression_metrics(base[:, 0], pred[:, 0], y[:, 0])  # (N,) inputs: plain R^2
    assert one["r2"] == pytest.approx(1 - ((pred[:, 0] - y[:, 0]) ** 2).sum() / ((y[:, 0] - y[:, 0].mean()) ** 2).sum())


def test_evaluate_reports_mse_of_forward_outputs(fitted):
    model, base, x_train, y_train = fitted
    test, x_test, y_test = make_data(23, seed=6)
    result = resmem.evaluate(model, test, split="test", batch_size=5, progress=False)
    f, _, pred = numpy_reference(base, x_train, y_train, x_test, 5, 0.3)
    assert result["num_examples"] == 23 and "base_accuracy" not in result
    assert result["base_mse"] == pytest.approx(((f - y_test) ** 2).mean(), rel=1e-5)
    assert result["mse"] == pytest.approx(((pred - y_test) ** 2).mean(), rel=1e-4)
    assert result["mae"] == pytest.approx(np.abs(pred - y_test).mean(), rel=1e-4)
    assert result["r2"] == pytest.approx(1 - ((pred - y_test) ** 2).sum() / ((y_test - y_test.mean(0)) ** 2).sum(), rel=1e-4)
    assert model.config.evaluations["test"]["mse"] == result["mse"]  # recorded for the card


def test_tune_picks_the_validation_mse_minimiser(fitted):
    model, base, x_train, y_train = fitted
    val, x_val, y_val = make_data(40, seed=7)
    ks, sigmas = [1, 3, 10, 30], [0.03, 0.3, 3.0]
    result = model.tune(val, k=ks, sigma=sigmas, batch_size=9, progress=False)
    assert len(result) == len(ks) * len(sigmas)
    mse = {}
    for row in result:
        pred = numpy_reference(base, x_train, y_train, x_val, row["k"], row["sigma"])[2]
        mse[(row["k"], row["sigma"])] = ((pred - y_val) ** 2).mean()
        assert row["mse"] == pytest.approx(mse[(row["k"], row["sigma"])], rel=1e-4)
    best = min(mse, key=mse.get)
    assert (result.best["k"], result.best["sigma"]) == best == (model.config.k, model.config.sigma)
    assert len(set(np.round(list(mse.values()), 6))) > 3  # the grid really differs
    assert model.config.evaluations["validation"]["mse"] == pytest.approx(mse[best], rel=1e-4)
    auto = model.tune(val, k=[3], sigma="auto", progress=False)  # the classifier's sigma grid, from float-label data
    scale = model.sigma_scale(val)
    assert auto.grid["sigma"] == pytest.approx([scale * m for m in (0.25, 0.5, 1.0, 2.0, 4.0)])


def test_tune_refuses_classifier_objectives_and_temperature(fitted):
    model, _, _, _ = fitted
    val, _, _ = make_data(10, seed=8)
    with pytest.raises(ValueError, match="tuned by validation MSE"):
        model.tune(val, k=[1, 2], objective="conservative", progress=False)
    with pytest.raises(ValueError, match="no temperature"):
        model.tune(val, k=[1, 2], temperature=[1.0, 2.0], progress=False)


def test_bad_targets_name_the_fix():
    model = ResMemWrapper.from_base(make_base(2), k=3, sigma=1.0)
    data = datasets.Dataset.from_dict({"pixel_values": [[0.0, 1.0, 2.0]] * 4, "label": [1.0, 2.0, 3.0, 4.0]})
    with pytest.raises(ValueError, match="must give 2 number"):
        model.build_memory(data, progress=False)
    bad = datasets.Dataset.from_dict({"pixel_values": [[0.0, 1.0, 2.0]] * 2, "label": [[1.0, float("nan")], [0.0, 0.0]]})
    with pytest.raises(ValueError, match="NaN or inf"):
        model.build_memory(bad, progress=False)
    with pytest.raises(ValueError, match="use `model.build_memory"):
        model.build_memory_on_disk(bad, "/nonexistent-resmem-folder")


def test_save_load_round_trip_identical(fitted, tmp_path):
    model, _, _, _ = fitted
    test, x_query, _ = make_data(11, seed=9)
    result = resmem.evaluate(model, test, split="test", progress=False)
    model.save_pretrained(tmp_path / "m")
    card = (tmp_path / "m" / "README.md").read_text()
    assert "ResMem MSE" in card and f"{result['mse']:.6g}" in card  # the card shows the regression metrics
    for loader in (ResMemWrapper, AutoModelForImageClassification):
        loaded = loader.from_pretrained(tmp_path / "m")
        assert isinstance(loaded.memory, RegressionMemory)
        for name in ("keys", "base_logits", "labels", "example_ids"):
            assert torch.equal(getattr(loaded.memory, name), getattr(model.memory, name))
        assert loaded.config.evaluations["test"]["mse"] == result["mse"]
        with torch.no_grad():
            a, b = model(pixel_values=torch.from_numpy(x_query)), loaded(pixel_values=torch.from_numpy(x_query))
        for name in ("logits", "base_logits", "residual"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_add_and_remove_regression_entries(fitted):
    model, base, x_train, y_train = fitted
    extra, x_extra, y_extra = make_data(5, seed=10)
    model.add_to_memory(extra, progress=False)
    assert len(model.memory) == 65
    np.testing.assert_array_equal(model.memory.labels[-5:].numpy(), y_extra)
    _, x_query, _ = make_data(6, seed=11)
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(x_query))
    ref = numpy_reference(base, np.concatenate([x_train, x_extra]), np.concatenate([y_train, y_extra]), x_query, 5, 0.3)[2]
    np.testing.assert_allclose(out.logits.double().numpy(), ref, rtol=1e-4, atol=1e-5)
    assert model.remove_from_memory([60, 61]) == 2 and len(model.memory) == 63


def test_memory_files_of_the_two_kinds_are_not_mixed_up(fitted, tmp_path):
    from resmem.memory import MemoryFileError, ResidualMemory

    model, _, _, _ = fitted
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(MemoryFileError, match="resmem-regression-memory"):
        ResidualMemory().load(str(tmp_path / "m" / "resmem_memory.safetensors"))


def test_command_line_tune_and_eval_of_a_regressor(fitted, tmp_path):
    """`resmem tune` / `resmem eval` on a saved regressor: MSE objective, tune.json / eval.json with MSE numbers."""
    import json

    from resmem.cli import main as cli_main

    model, base, x_train, y_train = fitted
    model.save_pretrained(tmp_path / "m")
    val, x_val, y_val = make_data(30, seed=12)
    datasets.DatasetDict({"validation": val, "test": make_data(20, seed=13)[0]}).save_to_disk(str(tmp_path / "ds"))
    assert cli_main(["tune", str(tmp_path / "m"), "--dataset", str(tmp_path / "ds"), "--split", "validation", "--k", "1", "4",
                     "--sigma", "0.1", "1", "--output-dir", str(tmp_path / "out"), "--no-progress", "--save"]) == 0
    tuned = json.loads((tmp_path / "out" / "tune.json").read_text())
    assert tuned["objective"] == "mse" and len(tuned["table"]) == 4
    best = min(tuned["table"], key=lambda r: r["mse"])
    pred = numpy_reference(base, x_train, y_train, x_val, best["k"], best["sigma"])[2]
    assert tuned["best"]["mse"] == pytest.approx(((pred - y_val) ** 2).mean(), rel=1e-4)
    assert cli_main(["eval", str(tmp_path / "m"), "--dataset", str(tmp_path / "ds"), "--split", "test",
                     "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 0
    evaluated = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert (evaluated["k"], evaluated["sigma"]) == (best["k"], best["sigma"]) and evaluated["mse"] > 0
    assert cli_main(["tune", str(tmp_path / "m"), "--dataset", str(tmp_path / "ds"), "--split", "validation",
                     "--temperature", "1", "2", "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 2  # refused


def test_regression_theory_recipe_smoke(tmp_path):
    """recipes/regression_theory/run.py --smoke: a few sample sizes, two seeds, writes its JSON/markdown/plot."""
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.join(REPO, "recipes", "regression_theory", "run.py"), "--smoke", "--out-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True, text=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, output
    import json

    results = json.loads((tmp_path / "regression_theory.json").read_text())
    rows = results["rows"]
    assert len(rows) >= 3 and all(r["resmem_excess_mean"] > 0 for r in rows)
    # out of the linear class: the base model's excess risk stays put while ResMem's falls below it
    assert rows[-1]["resmem_excess_mean"] < rows[-1]["base_excess_mean"]
    assert (tmp_path / "regression_theory.md").exists() and (tmp_path / "regression_theory.png").exists()


def test_tune_refuses_a_relative_sigma_mode_naming_the_fix(fitted):
    model, val = fitted[0], make_data(20, seed=7)[0]
    with pytest.raises(ValueError, match="drop sigma_mode from tune"):
        model.tune(val, k=[2], sigma=[0.5], sigma_mode=["absolute", "relative"])
    result = model.tune(val, k=[2], sigma=[0.5], sigma_mode="absolute")  # the regressor's own (absolute) kernel
    assert result.best["k"] == 2
