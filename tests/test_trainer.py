"""Trainer integration: `ResMemCallback` in a real `transformers.Trainer` run, and the `compute_metrics` helper.

The logged ResMem numbers are checked against an independent numpy ResMem (tests/reference.py) computed on a
copy of the weights taken at the same step; a run without the callback checks that training is unchanged.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import PRE_LOGIT_LAYER, dataset_arrays, make_base, make_pixel_dataset
from reference import hooked_forward, np_resmem
from transformers import EvalPrediction, Trainer, TrainerCallback, TrainingArguments

import resmem
from resmem import ResMemWrapper
from resmem.trainer import ResMemCallback, compute_metrics, preprocess_logits_for_metrics

ARCH = "vit"  # with dropout: a draw from the RNG during a build would change the training that follows
RESMEM = {"k": 3, "sigma": 0.5, "temperature": 1.0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: on a loaded 2-core machine, tiny convolutions with 2 threads spin-wait for seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _args(tmp_path, max_steps=6, eval_steps=2, learning_rate=0.05, **kw):
    return TrainingArguments(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], max_steps=max_steps,
        per_device_train_batch_size=8, per_device_eval_batch_size=8, eval_strategy="steps", eval_steps=eval_steps,
        logging_steps=eval_steps, save_strategy="no", learning_rate=learning_rate, seed=0, disable_tqdm=True, **kw,
    )


class Snapshots(TrainerCallback):
    """Copies the weights at every evaluation and at the end of training (runs after ResMemCallback)."""

    def __init__(self):
        self.at = {}
        self.training_at_end = None

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.at[("evaluate", state.global_step)] = copy.deepcopy(model.state_dict())

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.at[("train_end", state.global_step)] = copy.deepcopy(model.state_dict())


def _base():
    return make_base(ARCH, seed=0, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def _data():
    return make_pixel_dataset(40, seed=0), make_pixel_dataset(20, seed=1)


def _train(tmp_path, callbacks, **arg_kw):
    train, ev = _data()
    base = _base()
    trainer = Trainer(
        model=base, args=_args(tmp_path, **arg_kw), train_dataset=train, eval_dataset=ev,
        compute_metrics=compute_metrics, callbacks=callbacks,
    )
    trainer.train()
    return trainer


def _numpy_rates(state_dict, train, ev, k, sigma, temperature):
    """Base vs ResMem rates of a model with `state_dict`, by numpy (paper eq. 3 + sec. 4.2), no resmem code."""
    model = _base()
    model.load_state_dict(state_dict)
    model.eval()
    layer = PRE_LOGIT_LAYER[ARCH]
    train_x, train_y = dataset_arrays(train)
    ev_x, ev_y = dataset_arrays(ev)
    mem_keys, mem_logits = hooked_forward(model, layer, train_x)
    q_keys, q_logits = hooked_forward(model, layer, ev_x)
    scores, _ = np_resmem(q_keys, q_logits, mem_keys, mem_logits, train_y, k, sigma, temperature)
    base_ok, resmem_ok = q_logits.argmax(1) == ev_y, scores.argmax(1) == ev_y
    return {
        "base_accuracy": base_ok.mean(),
        "resmem_accuracy": resmem_ok.mean(),
        "resmem_tpr": (~base_ok & resmem_ok).mean(),
        "resmem_fpr": (base_ok & ~resmem_ok).mean(),
        "resmem_gain": resmem_ok.mean() - base_ok.mean(),
    }


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """6 steps, an evaluation every 2 steps, ResMem at every 2nd evaluation (step 4) and at the end (step 6)."""
    train, ev = _data()
    callback = ResMemCallback(train, ev, every_n_evaluations=2, resmem_kwargs=RESMEM)
    snapshots = Snapshots()
    trainer = _train(tmp_path_factory.mktemp("run"), [callback, snapshots])
    return trainer, callback, snapshots


def test_log_history_has_resmem_metrics_at_the_right_steps(image_run):
    trainer, callback, _ = image_run
    history = trainer.state.log_history
    evals = [e for e in history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [2, 4, 6]
    # every_n_evaluations=2: only the 2nd evaluation (step 4) carries ResMem numbers, in the same entry as eval_loss
    assert ["eval_resmem_accuracy" in e for e in evals] == [False, True, False]
    with_resmem = [e for e in history if "eval_resmem_accuracy" in e]
    assert [e["step"] for e in with_resmem] == [4, 6]
    assert "eval_loss" not in with_resmem[1]  # the end-of-training entry is a new one
    for entry in with_resmem:
        for key in ("base_accuracy", "resmem_accuracy", "resmem_tpr", "resmem_fpr", "resmem_gain"):
            assert isinstance(entry[f"eval_{key}"], float)
        assert entry["eval_resmem_k"] == 3 and entry["eval_resmem_sigma"] == 0.5
    assert [(h["step"], h["event"]) for h in callback.history] == [(4, "evaluate"), (6, "train_end")]
    # the Trainer's own accuracy of the base (compute_metrics) and the callback's agree on the same weights
    assert with_resmem[0]["eval_base_accuracy"] == with_resmem[0]["eval_accuracy"]


def test_logged_values_equal_a_numpy_resmem_on_the_same_snapshot(image_run):
    trainer, _, snapshots = image_run
    train, ev = _data()
    with_resmem = [e for e in trainer.state.log_history if "eval_resmem_accuracy" in e]
    for entry, key in zip(with_resmem, [("evaluate", 4), ("train_end", 6)], strict=True):
        expected = _numpy_rates(snapshots.at[key], train, ev, **RESMEM)
        for name, value in expected.items():
            assert entry[f"eval_{name}"] == pytest.approx(value, abs=1e-12), (key, name)
    # the two snapshots differ (the base kept training between them), so the check is not of one model twice
    assert not torch.equal(snapshots.at[("evaluate", 4)]["classifier.weight"], snapshots.at[("train_end", 6)]["classifier.weight"])


def test_callback_does_not_change_training(image_run, tmp_path):
    trainer, _, _ = image_run
    plain = _train(tmp_path, [])
    with_cb, without = trainer.model.state_dict(), plain.model.state_dict()
    assert with_cb.keys() == without.keys()
    for name in with_cb:
        assert torch.equal(with_cb[name], without[name]), name
    losses = lambda t: [e["loss"] for e in t.state.log_history if "loss" in e]  # noqa: E731
    assert losses(trainer) == losses(plain)


def test_final_memory_saves_and_reloads_with_identical_scores(image_run, tmp_path):
    trainer, callback, _ = image_run
    _, ev = _data()
    model = callback.resmem_model
    assert model.base is trainer.model  # the wrapper shares the trained model, rebuilt on its final weights
    model.save_pretrained(tmp_path / "final")
    loaded = ResMemWrapper.from_pretrained(tmp_path / "final")
    pixels = torch.from_numpy(dataset_arrays(ev)[0])
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels).scores, model.eval()(pixel_values=pixels).scores)
    result = resmem.evaluate(loaded, ev, progress=False, record=False)
    final = callback.history[-1]["result"]
    for key in ("base_accuracy", "resmem_accuracy", "tpr", "fpr", "gain"):
        assert result[key] == final[key]


def test_memory_left_stale_by_further_training_is_refused_at_save(tmp_path):
    train, ev = _data()
    callback = ResMemCallback(train, ev, every_n_evaluations=2, at_train_end=False, resmem_kwargs=RESMEM)
    _train(tmp_path, [callback])
    assert [h["step"] for h in callback.history] == [4]  # built at step 4, trained on to step 6
    with pytest.raises(ValueError, match="base weights changed"):
        callback.resmem_model.save_pretrained(tmp_path / "stale")


def test_every_evaluation_and_no_duplicate_at_train_end(tmp_path):
    train, ev = _data()
    callback = ResMemCallback(train, ev, every_n_evaluations=1, resmem_kwargs=RESMEM)
    trainer = _train(tmp_path, [callback], max_steps=4, metric_for_best_model="resmem_accuracy", greater_is_better=True)
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    # the Trainer's best-metric tracking reads the ResMem number from the evaluation's metrics
    assert trainer.state.best_metric == max(e["eval_resmem_accuracy"] for e in evals)
    assert [("eval_resmem_gain" in e, e["step"]) for e in evals] == [(True, 2), (True, 4)]
    # the evaluation at the last step already used the final weights: on_train_end adds nothing
    assert [h["event"] for h in callback.history] == ["evaluate", "evaluate"]
    assert sum("eval_resmem_gain" in e for e in trainer.state.log_history) == 2
    metrics = trainer.evaluate()  # a 3rd evaluation, after training: returned metrics carry the numbers too
    assert metrics["eval_resmem_accuracy"] == callback.history[-1]["result"]["resmem_accuracy"]


class Reporter(TrainerCallback):
    """Records what a reporting integration (TensorBoard, W&B) receives: the logs of each on_log call."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


@pytest.mark.parametrize("installed", [False, True])
def test_reporting_callbacks_see_the_numbers_when_installed(tmp_path, installed):
    train, ev = _data()
    callback = ResMemCallback(train, ev, every_n_evaluations=1, at_train_end=False, resmem_kwargs=RESMEM)
    reporter = Reporter()
    trainer = Trainer(
        model=_base(), args=_args(tmp_path, max_steps=2), train_dataset=train, eval_dataset=ev,
        compute_metrics=compute_metrics, callbacks=[reporter] if installed else [reporter, callback],
    )
    if installed:
        assert callback.install(trainer) is trainer
        names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
        assert names.index("ResMemCallback") == names.index("DefaultFlowCallback") + 1 < names.index("Reporter")
    trainer.train()
    (reported,) = [logs for logs in reporter.logs if "eval_loss" in logs]
    (entry,) = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert entry["eval_resmem_accuracy"] == callback.history[0]["result"]["resmem_accuracy"]  # both ways
    # installed: the reporter got the ResMem numbers in the same logs as eval_loss; not installed: it cannot
    assert ("eval_resmem_accuracy" in reported) == installed
    if installed:
        assert reported == {key: value for key, value in entry.items() if key != "step"}
        assert len(callback.history) == 1  # one run per evaluation, not one in on_log and one in on_evaluate
    assert trainer.evaluate()["eval_resmem_accuracy"] == callback.history[-1]["result"]["resmem_accuracy"]
    assert len(callback.history) == 2


def test_prefix_of_a_named_evaluation_dataset(tmp_path):
    train, ev = _data()
    callback = ResMemCallback(train, ev, every_n_evaluations=1, resmem_kwargs=RESMEM)
    trainer = Trainer(
        model=_base(), args=_args(tmp_path, max_steps=2), train_dataset=train, eval_dataset={"held": ev},
        compute_metrics=compute_metrics, callbacks=[callback],
    )
    trainer.train()
    (entry,) = [e for e in trainer.state.log_history if "eval_held_loss" in e]
    assert entry["eval_held_resmem_accuracy"] == callback.history[0]["result"]["resmem_accuracy"]
    assert entry["eval_held_base_accuracy"] == entry["eval_held_accuracy"]
    assert not any("eval_resmem_accuracy" in e for e in trainer.state.log_history)


@pytest.mark.filterwarnings("ignore:Every setting of the grid lowers accuracy")  # random labels: expected
def test_tuning_on_validation_only(tmp_path):
    train, ev = _data()
    val = make_pixel_dataset(20, seed=2)
    grid = {"k": [1, 3, 5], "sigma": [0.1, 1.0], "temperature": [1.0]}
    callback = ResMemCallback(train, ev, validation_dataset=val, tune=grid, resmem_kwargs=RESMEM)
    trainer = _train(tmp_path, [callback], max_steps=2)
    (entry,) = [e for e in trainer.state.log_history if "eval_resmem_accuracy" in e]
    # an independent wrapper on a copy of the final weights, tuned on the same validation data, picks the same
    reference = ResMemWrapper.from_base(copy.deepcopy(trainer.model), **RESMEM)
    reference.build_memory(train, progress=False)
    best = reference.tune(val, progress=False, **grid).best
    assert (entry["eval_resmem_k"], entry["eval_resmem_sigma"]) == (best["k"], best["sigma"])
    result = resmem.evaluate(reference, ev, progress=False, record=False)
    assert entry["eval_resmem_accuracy"] == result["resmem_accuracy"]


def test_bad_arguments_name_the_fix():
    train, ev = _data()
    with pytest.raises(ValueError, match="every_n_evaluations must be an integer >= 1"):
        ResMemCallback(train, ev, every_n_evaluations=0)
    with pytest.raises(ValueError, match="would never run"):
        ResMemCallback(train, ev, at_train_end=False)
    with pytest.raises(ValueError, match="tune= needs validation_dataset="):
        ResMemCallback(train, ev, tune={"k": [1, 3]})
    with pytest.raises(ValueError, match="validation_dataset is the eval_dataset"):
        ResMemCallback(train, ev, validation_dataset=ev, tune={"k": [1, 3]})
    with pytest.raises(ValueError, match="validation_dataset is the eval_dataset"):
        ResMemCallback(train, ev, validation_dataset=copy.copy(ev), tune={"k": [1, 3]})  # same datasets fingerprint
    with pytest.raises(TypeError, match="resmem_kwargs must be a dict"):
        ResMemCallback(train, ev, resmem_kwargs=[3])


# ---------------------------------------------------------------------- compute_metrics
def test_compute_metrics_plain_and_resmem_by_hand():
    labels = np.array([0, 0, 1, 2])
    onehot = lambda ids: np.eye(3)[ids]  # noqa: E731  logits whose argmax is `ids`
    base, res = onehot([1, 0, 1, 0]), onehot([0, 1, 1, 2])
    assert compute_metrics(EvalPrediction(base, labels)) == {"accuracy": 0.5}
    out = compute_metrics(EvalPrediction((res, res, base, res - base), labels))
    # base right on examples 1, 2; ResMem right on 0, 2, 3: fixed {0, 3}, broken {1}
    assert out == {"base_accuracy": 0.5, "resmem_accuracy": 0.75, "resmem_tpr": 0.5, "resmem_fpr": 0.25, "resmem_gain": 0.25}


def test_compute_metrics_causal_lm_shift_and_ignored_positions():
    # 2 sequences of 4 tokens; position t predicts label t+1; -100 positions are not scored
    labels = np.array([[5, 6, 7, -100], [1, 2, 3, 4]])
    base_ids = np.array([[6, 0, 9, 9], [2, 3, 0, 9]])  # right at (0,0), (1,0), (1,1)
    resmem_ids = np.array([[6, 7, 9, 9], [0, 3, 4, 9]])  # right at (0,0), (0,1), (1,1), (1,2)
    vocab = 10
    logits = lambda ids: np.eye(vocab)[ids]  # noqa: E731  (2, 4, V)
    out = compute_metrics(EvalPrediction((logits(resmem_ids), logits(resmem_ids), logits(base_ids)), labels))
    # 5 scored positions: base 3/5, ResMem 4/5, fixed (0,1),(1,2) = 2, broken (1,0) = 1
    assert out == pytest.approx({"base_accuracy": 0.6, "resmem_accuracy": 0.8, "resmem_tpr": 0.4, "resmem_fpr": 0.2, "resmem_gain": 0.2})
    ids = preprocess_logits_for_metrics(tuple(torch.from_numpy(logits(i)) for i in (resmem_ids, resmem_ids, base_ids)), None)
    assert compute_metrics(EvalPrediction(tuple(t.numpy() for t in ids), labels)) == out
    with pytest.raises(ValueError, match="do not match labels"):
        compute_metrics(EvalPrediction(logits(base_ids)[:1], labels))


def test_compute_metrics_in_a_trainer_over_a_resmem_model(image_run, tmp_path):
    _, callback, _ = image_run
    _, ev = _data()
    trainer = Trainer(model=callback.resmem_model, args=_args(tmp_path), eval_dataset=ev, compute_metrics=compute_metrics)
    metrics = trainer.evaluate()
    expected = resmem.evaluate(callback.resmem_model, ev, progress=False, record=False)
    assert metrics["eval_base_accuracy"] == expected["base_accuracy"]
    assert metrics["eval_resmem_accuracy"] == expected["resmem_accuracy"]
    for key in ("tpr", "fpr", "gain"):
        assert metrics[f"eval_resmem_{key}"] == pytest.approx(expected[key], abs=1e-12)


# ---------------------------------------------------------------------- causal LMs
def test_causal_lm_trainer_run_logs_perplexities(tmp_path):
    import datasets
    from lm_helpers import reference_entries, reference_scores, tiny_base, word_tokenizer

    tokenizer = word_tokenizer(120)
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{i}" for i in rng.integers(0, 120, 16)) for _ in range(24)]
    text = datasets.Dataset.from_dict({"text": texts})
    train_text, eval_text = text.select(range(16)), text.select(range(16, 24))

    def tokenize(batch):
        enc = tokenizer(batch["text"])
        return {"input_ids": enc["input_ids"], "labels": enc["input_ids"]}

    train_ids = train_text.map(tokenize, batched=True, remove_columns=["text"])
    eval_ids = eval_text.map(tokenize, batched=True, remove_columns=["text"])
    base = tiny_base("gpt2", seed=0)
    callback = ResMemCallback(
        train_text, eval_text, every_n_evaluations=1, resmem_kwargs={"k": 4, "sigma": 1.0, "window": 32, "stride": 16},
        data_kwargs={"tokenizer": tokenizer},
    )
    trainer = Trainer(
        model=base, args=_args(tmp_path, max_steps=4, eval_steps=4, learning_rate=0.01), train_dataset=train_ids,
        eval_dataset=eval_ids, compute_metrics=compute_metrics, preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        callbacks=[callback],
    )
    trainer.train()
    (entry,) = [e for e in trainer.state.log_history if "eval_resmem_ppl" in e]
    assert entry["step"] == 4 and "eval_loss" in entry
    result = callback.history[-1]["result"]
    assert result["unit"] == "token positions" and result["num_examples"] == 8 * 15
    # independent numpy ResMem (tests/lm_helpers.py) on the final weights, in the configured "clamp" mode
    config = callback.resmem_model.config
    layer, floor, top_m = config.layer, config.score_floor, config.residual_top_m
    model = trainer.model.eval()
    train_tok = tokenizer(train_text["text"][:])["input_ids"]
    eval_tok = tokenizer(eval_text["text"][:])["input_ids"]
    mem_keys, mem_logits, mem_labels = reference_entries(model, layer, train_tok, 32, 16)
    q_keys, q_logits, q_labels = reference_entries(model, layer, eval_tok, 32, 16)
    scores = reference_scores(mem_keys, mem_logits, mem_labels, q_keys, q_logits, 4, 1.0, 1.0, top_m)  # (120, V)
    clamped = np.maximum(scores, floor)
    probs = clamped / clamped.sum(-1, keepdims=True)
    rows = np.arange(len(q_labels))
    base_logp = q_logits - q_logits.max(-1, keepdims=True)
    base_logp = base_logp - np.log(np.exp(base_logp).sum(-1, keepdims=True))
    assert entry["eval_base_ppl"] == pytest.approx(math.exp(-base_logp[rows, q_labels].mean()), rel=1e-5)
    assert entry["eval_resmem_ppl"] == pytest.approx(math.exp(-np.log(probs[rows, q_labels]).mean()), rel=1e-4)
    base_ok, resmem_ok = q_logits.argmax(-1) == q_labels, scores.argmax(-1) == q_labels
    assert entry["eval_base_accuracy"] == pytest.approx(base_ok.mean(), abs=1e-12)
    assert entry["eval_resmem_accuracy"] == pytest.approx(resmem_ok.mean(), abs=1e-12)
    assert entry["eval_resmem_tpr"] == pytest.approx((~base_ok & resmem_ok).mean(), abs=1e-12)
    assert entry["eval_resmem_fpr"] == pytest.approx((base_ok & ~resmem_ok).mean(), abs=1e-12)
    # the Trainer's compute_metrics (with preprocess_logits_for_metrics) scores the same next-token positions
    assert entry["eval_base_accuracy"] == pytest.approx(entry["eval_accuracy"], abs=1e-12)
    # compute_metrics over the ResMem LM itself in a Trainer (its output tuple holds logits, scores, base_logits),
    # on the memory's own text, where ResMem recalls most next tokens: the same numbers as resmem.evaluate
    expected = resmem.evaluate(callback.resmem_model, train_text, tokenizer=tokenizer, progress=False, record=False)
    assert expected["resmem_accuracy"] > expected["base_accuracy"] + 0.3
    for pre in (preprocess_logits_for_metrics, None):
        metrics = Trainer(
            model=callback.resmem_model, args=_args(tmp_path), eval_dataset=train_ids, compute_metrics=compute_metrics,
            preprocess_logits_for_metrics=pre,
        ).evaluate()
        for key in ("base_accuracy", "resmem_accuracy"):
            assert metrics[f"eval_{key}"] == pytest.approx(expected[key], abs=1e-12)
        for key in ("tpr", "fpr", "gain"):
            assert metrics[f"eval_resmem_{key}"] == pytest.approx(expected[key], abs=1e-12)
