"""Trainer integration: a `transformers.TrainerCallback` that builds a ResMem memory over the model being trained
and logs base vs ResMem metrics next to the Trainer's own, plus a `compute_metrics` helper.

How the memory relates to the model being trained (see docs/design.md, "Trainer integration"):

- The callback wraps the Trainer's model itself (`ResMemWrapper.from_base(model)`, no copy: a second copy of an
  LM's weights would double its memory), switches it to eval mode, builds the memory from those weights (a
  snapshot of the residuals at that step), optionally tunes on a validation set, evaluates with
  `resmem.evaluate`, and puts the model back in the mode it was in, with the torch / numpy / Python RNG states
  it found. Training then goes on unchanged (a test checks that the trained weights and losses of a model with
  dropout are bitwise those of a run without the callback).
- Once the base trains further, the memory no longer matches its weights: its stored base fingerprint is stale,
  and `callback.resmem_model.save_pretrained` refuses to save it (naming the fix). With `at_train_end=True`
  (default) the memory is rebuilt over the final weights in `on_train_end` (after `load_best_model_at_end` has
  loaded the best checkpoint), so after `trainer.train()` returns, `callback.resmem_model.save_pretrained(folder)`
  saves the final model with its memory, and `ResMemWrapper.from_pretrained(folder)` reloads it.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.utils import logging

from .scoring import decompose, prediction_counts, rates_from_counts

logger = logging.get_logger(__name__)

# resmem.evaluate's result key -> the name logged (after the Trainer's metric prefix, e.g. "eval_resmem_accuracy").
LOGGED_KEYS = {
    "base_accuracy": "base_accuracy",
    "resmem_accuracy": "resmem_accuracy",
    "tpr": "resmem_tpr",
    "fpr": "resmem_fpr",
    "gain": "resmem_gain",
    "base_ppl": "base_ppl",  # causal LMs
    "ppl": "resmem_ppl",  # causal LMs: perplexity of the configured `distribution`
    "k": "resmem_k",
    "sigma": "resmem_sigma",
    "mixture_lambda": "resmem_mixture_lambda",  # causal LMs in the mixture mode
}


def _as_kwargs(name: str, value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict of keyword arguments (or None), got {type(value).__name__}.")
    return dict(value)


class ResMemCallback(TrainerCallback):
    r"""
    Builds (or rebuilds) a ResMem memory over the model being trained, evaluates base vs ResMem with
    [`resmem.evaluate`] and adds the ResMem numbers to the Trainer's evaluation metrics and `state.log_history`.

    When it runs: at every `every_n_evaluations`-th evaluation of the Trainer (`on_evaluate`; `None`: never
    during training) and, with `at_train_end=True`, once at the end of training (`on_train_end`, on the final
    weights; skipped if the last ResMem run was at that step on the same weights).

    What it logs, with the Trainer's metric prefix (`eval` unless `metric_key_prefix` says otherwise):
    `eval_base_accuracy`, `eval_resmem_accuracy`, `eval_resmem_tpr`, `eval_resmem_fpr`, `eval_resmem_gain`,
    `eval_resmem_k`, `eval_resmem_sigma`; causal LMs also `eval_base_ppl`, `eval_resmem_ppl` (the perplexity of
    the configured `distribution`) and, in the mixture mode, `eval_resmem_mixture_lambda`. For LMs the
    accuracies and rates are over next-token positions. In `on_evaluate` they are added to the evaluation's
    `metrics` (so `trainer.evaluate()` returns them and, with `every_n_evaluations=1`,
    `metric_for_best_model="resmem_accuracy"` works: every evaluation must carry the metric) and to
    that evaluation's entry of `state.log_history`; at the end of training a new `state.log_history` entry
    holds them. Every run is also kept in `callback.history` (`{"step", "epoch", "event", "result"}`, `result`
    being `resmem.evaluate`'s full dict). Reporting integrations (TensorBoard, W&B, ...) receive the Trainer's
    logs in `on_log`, which transformers calls before `on_evaluate`: to have them log the ResMem numbers too,
    add the callback with `callback.install(trainer)` instead of `Trainer(callbacks=[...])` (see [`install`]).
    The end-of-training numbers are in `state.log_history` and `callback.history` only.

    The memory and the model: see the module docstring. After `trainer.train()`,
    `callback.resmem_model.save_pretrained(folder)` saves the final weights with their memory.

    Args:
        train_dataset: the data the memory is built from (as for `build_memory`: `pixel_values` + `label`, images
            with `data_kwargs["image_processor"]`, or text with `data_kwargs["tokenizer"]`).
        eval_dataset: the data ResMem is evaluated (reported) on, in a form `resmem.evaluate` reads.
        every_n_evaluations: run at every N-th `on_evaluate` (N >= 1), or `None` for the end of training only.
        at_train_end: also run in `on_train_end`, so `resmem_model` holds the final weights' memory.
        validation_dataset: the data `tune` selects on; required with `tune`, and never the `eval_dataset`.
        tune: keyword arguments of `model.tune` (e.g. `{"k": [10, 50], "sigma": "auto"}`), or `None` to use the
            configured `k`, `sigma`, `T` (from `resmem_kwargs`) as they are. Settings are chosen on
            `validation_dataset` only; the numbers logged are measured on `eval_dataset`.
        resmem_kwargs: keyword arguments of `ResMemWrapper.from_base` (`k`, `sigma`, `temperature`, `layer`, ...).
        data_kwargs: how to read all three datasets, passed to `build_memory`, `tune` and `resmem.evaluate`
            (`batch_size`, `label_column`, `image_processor`, `transform`; LMs: `tokenizer`, `text_column`,
            `window`, `stride`).
        build_kwargs: extra keyword arguments of `build_memory` only (e.g. `residual_top_m` for LMs).
        metric_key_prefix: prefix of the logged names; default: the prefix of the Trainer's evaluation
            (`eval`, or `eval_<name>` for a dict of evaluation datasets), `"eval"` at the end of training.
        record: let `resmem.evaluate` record each result on the model's config (shown in its model card).
        progress: show progress bars of the builds and evaluations.

    Example:

    ```python
    >>> from resmem.trainer import ResMemCallback, compute_metrics
    >>> callback = ResMemCallback(train_ds, eval_ds, every_n_evaluations=2, resmem_kwargs={"k": 20, "sigma": 0.7})
    >>> trainer = Trainer(model=base, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
    ...                   compute_metrics=compute_metrics, callbacks=[callback])
    >>> trainer.train()
    >>> [e["eval_resmem_accuracy"] for e in trainer.state.log_history if "eval_resmem_accuracy" in e]
    >>> callback.resmem_model.save_pretrained("my-resmem")   # final weights + their memory
    ```
    """

    def __init__(
        self,
        train_dataset,
        eval_dataset,
        *,
        every_n_evaluations: int | None = None,
        at_train_end: bool = True,
        validation_dataset=None,
        tune: dict | None = None,
        resmem_kwargs: dict | None = None,
        data_kwargs: dict | None = None,
        build_kwargs: dict | None = None,
        metric_key_prefix: str | None = None,
        record: bool = True,
        progress: bool = False,
    ):
        if every_n_evaluations is not None and (
            isinstance(every_n_evaluations, bool) or not isinstance(every_n_evaluations, int) or every_n_evaluations < 1
        ):
            raise ValueError(
                f"every_n_evaluations must be an integer >= 1 (run at every N-th evaluation) or None (end of training "
                f"only), got {every_n_evaluations!r}."
            )
        if every_n_evaluations is None and not at_train_end:
            raise ValueError(
                "With every_n_evaluations=None and at_train_end=False the callback would never run: set "
                "every_n_evaluations=N, or keep at_train_end=True."
            )
        if train_dataset is None or eval_dataset is None:
            raise ValueError("ResMemCallback needs train_dataset (for the memory) and eval_dataset (to report on).")
        self.tune_kwargs = _as_kwargs("tune", tune)
        if tune is not None:
            if validation_dataset is None:
                raise ValueError(
                    "tune= needs validation_dataset=: the settings are chosen on validation data, never on the "
                    "eval_dataset the callback reports on."
                )
            if validation_dataset is eval_dataset or _same_fingerprint(validation_dataset, eval_dataset):
                raise ValueError(
                    "validation_dataset is the eval_dataset: tuning on the data the callback reports on would overstate "
                    "ResMem. Pass a separate validation split (e.g. split the training data) as validation_dataset."
                )
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.validation_dataset = validation_dataset
        self.every_n_evaluations = every_n_evaluations
        self.at_train_end = bool(at_train_end)
        self.resmem_kwargs = _as_kwargs("resmem_kwargs", resmem_kwargs)
        self.data_kwargs = _as_kwargs("data_kwargs", data_kwargs)
        self.build_kwargs = _as_kwargs("build_kwargs", build_kwargs)
        self.metric_key_prefix = metric_key_prefix
        self.record = bool(record)
        self.progress = bool(progress)
        self.resmem_model = None  # the ResMemWrapper around the trained model, created at the first run
        self.history: list[dict] = []
        self.num_evaluations = 0
        self._last_prefix = None
        self._in_on_log = False  # set by `install`

    # ------------------------------------------------------------------ the events
    def install(self, trainer):
        """Add this callback to `trainer` ahead of its reporting callbacks, so that they log the ResMem numbers too.

        `Trainer(callbacks=[...])` places user callbacks after the reporting integrations (TensorBoard, W&B, the
        printer, ...), and transformers calls `on_log` before `on_evaluate`, so by default those never see the
        numbers. Installed right after `DefaultFlowCallback`, the callback does its work in `on_log` of each
        evaluation instead, adding the numbers to the logged dict before the integrations receive it (also to the
        `state.log_history` entry and to the metrics `trainer.evaluate()` returns). Returns `trainer`.

        Example:

        ```python
        >>> trainer = Trainer(model=base, args=args, train_dataset=train_ds, eval_dataset=eval_ds)
        >>> ResMemCallback(train_ds, eval_ds, every_n_evaluations=1).install(trainer)
        ```
        """
        from transformers.trainer_callback import DefaultFlowCallback

        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        first = next((i + 1 for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)), 0)
        callbacks.insert(first, self)
        self._in_on_log = True
        return trainer

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        """Installed with `install`: an evaluation's logs (`<prefix>_runtime`, not `train_`) get the ResMem numbers."""
        if not self._in_on_log:
            return
        prefix = _trainer_prefix(logs)
        if prefix is None or prefix == "train":
            return
        # `logs` is the evaluation's own metrics dict (Trainer.log adds "epoch" to it in place), so this also
        # reaches the dict trainer.evaluate() returns; the history entry is a copy, updated as well.
        self._on_evaluation(state, logs, model)

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        """At every `every_n_evaluations`-th evaluation: build, (tune,) evaluate; add to `metrics` and its log entry."""
        if self._in_on_log:
            return  # done in on_log, before the reporting integrations
        self._on_evaluation(state, metrics, model)

    def _on_evaluation(self, state, metrics, model):
        self.num_evaluations += 1
        if self.every_n_evaluations is None or self.num_evaluations % self.every_n_evaluations:
            return
        prefix = self.metric_key_prefix or _trainer_prefix(metrics) or "eval"
        self._last_prefix = prefix
        entries = self._run(model, state, "evaluate", prefix)
        if metrics is not None:
            metrics.update(entries)  # the dict `trainer.evaluate()` returns and `metric_for_best_model` reads
        # Trainer.log has just appended this evaluation's entry (`{**metrics, "step": step}`, a copy) to the
        # history: put the ResMem numbers into that same entry, next to eval_loss.
        entry = _evaluation_entry(state, prefix)
        if entry is not None:
            entry.update(entries)
        else:
            state.log_history.append(self._new_entry(state, entries))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        """Rebuild over the final weights (unless the last run already used them) and log a new history entry."""
        if not self.at_train_end:
            return
        from .hub import fingerprint_matches

        last = self.history[-1] if self.history else None
        if (
            last is not None
            and last["step"] == state.global_step
            and self.resmem_model is not None
            and self.resmem_model.base is model
            and fingerprint_matches(model, self.resmem_model.memory.fingerprint)
        ):
            return  # the evaluation at the last step built the memory on these very weights
        prefix = self.metric_key_prefix or self._last_prefix or "eval"
        entries = self._run(model, state, "train_end", prefix)
        state.log_history.append(self._new_entry(state, entries))

    # ------------------------------------------------------------------ the work
    def _run(self, model, state, event: str, prefix: str) -> dict:
        """Build (tune) and evaluate over `model` as it is now; return the prefixed entries to log."""
        if model is None:
            raise ValueError("ResMemCallback got no model from the Trainer: add it with Trainer(callbacks=[...]).")
        was_training = model.training
        # The build, tuning and evaluation must not change the training that follows: a random `transform` in
        # data_kwargs (augmentation) or any other draw would otherwise shift later dropout masks and shuffles.
        devices = [model.device.index or 0] if model.device.type == "cuda" else []
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=devices):
                result = self._build_and_evaluate(model)
        finally:
            model.train(was_training)  # the Trainer's model goes back to the mode it was in (train mode in training)
            random.setstate(py_state)
            np.random.set_state(np_state)
        self.history.append({"step": state.global_step, "epoch": state.epoch, "event": event, "result": result})
        entries = {f"{prefix}_{LOGGED_KEYS[key]}": float(result[key]) for key in LOGGED_KEYS if result.get(key) is not None}
        logger.info(f"ResMem at step {state.global_step} ({event}): {entries}")
        return entries

    def _build_and_evaluate(self, model) -> dict:
        import resmem

        from .modeling_resmem import ResMemWrapper

        if self.resmem_model is None or self.resmem_model.base is not model:
            # Wraps the trained model itself (no copy); from_base returns it in eval mode.
            self.resmem_model = ResMemWrapper.from_base(model, **self.resmem_kwargs)
        wrapper = self.resmem_model.eval()
        wrapper.build_memory(self.train_dataset, progress=self.progress, **self.data_kwargs, **self.build_kwargs)
        if self.tune_kwargs:
            wrapper.tune(self.validation_dataset, progress=self.progress, **self.data_kwargs, **self.tune_kwargs)
        return resmem.evaluate(wrapper, self.eval_dataset, progress=self.progress, record=self.record, **self.data_kwargs)

    @staticmethod
    def _new_entry(state, entries: dict) -> dict:
        entry = dict(entries)
        if state.epoch is not None:
            entry["epoch"] = state.epoch
        entry["step"] = state.global_step
        return entry


def _trainer_prefix(metrics: dict | None) -> str | None:
    """The Trainer's `metric_key_prefix` of an evaluation, from the `<prefix>_runtime` key it always writes."""
    for key in metrics or {}:
        if key.endswith("_runtime"):
            return key[: -len("_runtime")]
    return None


def _evaluation_entry(state, prefix: str) -> dict | None:
    """The `state.log_history` entry of the evaluation at the current step (the newest one, without ResMem keys)."""
    for entry in reversed(state.log_history):
        if entry.get("step") != state.global_step:
            return None
        if f"{prefix}_runtime" in entry and f"{prefix}_resmem_accuracy" not in entry:
            return entry
    return None


def _same_fingerprint(a, b) -> bool:
    fa, fb = getattr(a, "_fingerprint", None), getattr(b, "_fingerprint", None)
    return fa is not None and fa == fb


# ---------------------------------------------------------------------- compute_metrics
def _same_shape_arrays(predictions) -> list:
    """The prediction arrays that have the first one's shape, in order.

    A plain model's predictions are its logits `(N, C)` / `(N, T, V)` (or class ids after
    [`preprocess_logits_for_metrics`]); a ResMem model's are a tuple starting `(logits, scores, base_logits[,
    residual])`, each of that shape, while other outputs (a cache, hidden states) are nested tuples or other shapes.
    """
    items = list(predictions) if isinstance(predictions, (tuple, list)) else [predictions]
    if not items or not hasattr(items[0], "shape"):
        raise ValueError(
            "compute_metrics expects the model's logits (an array, or a tuple starting with them) as predictions, got "
            f"{type(items[0]).__name__ if items else 'an empty tuple'}."
        )
    shape = tuple(items[0].shape)
    return [item for item in items if hasattr(item, "shape") and tuple(item.shape) == shape]


def preprocess_logits_for_metrics(logits, labels):
    """For `Trainer(preprocess_logits_for_metrics=...)`: keep only the predicted ids of the logits-shaped outputs.

    A causal LM's `(B, T, V)` logits (three such tensors for a ResMem model) would otherwise be gathered over
    the whole evaluation set; this keeps `(B, T)` ids of each (`(B,)` for classifiers), which
    [`compute_metrics`] reads the same way.

    Returns:
        one `(B, ...)` int64 tensor, or a tuple of them for a ResMem model (logits, scores, base_logits, ...).
    """
    ids = tuple(t.argmax(dim=-1) for t in _same_shape_arrays(logits))
    return ids[0] if len(ids) == 1 else ids


def compute_metrics(eval_pred, shift_labels: bool | None = None) -> dict:
    """For `Trainer(compute_metrics=...)`: accuracy of a plain model; base/ResMem accuracy, TPR, FPR, Gain of a ResMem one.

    Every number comes from `resmem.scoring` (the one metrics module).

    Args:
        eval_pred: a `transformers.EvalPrediction` (or `(predictions, label_ids)`). `predictions`: a plain model's
            logits `(N, C)` / `(N, T, V)`, or a ResMem model's output tuple `(logits, scores, base_logits, ...)`
            (each of that shape), or the ids [`preprocess_logits_for_metrics`] kept. `label_ids`: `(N,)` class ids,
            or `(N, T)` token ids with `-100` at ignored positions.
        shift_labels: compare the prediction at position t with the label at t+1, as a causal LM's loss does;
            `None`: when the labels are 2-D (token sequences).
    Returns:
        a plain model: `{"accuracy"}`; a ResMem model: `{"base_accuracy", "resmem_accuracy", "resmem_tpr",
        "resmem_fpr", "resmem_gain"}` (ResMem's class is the argmax of its `scores`, base's of `base_logits`). The
        Trainer adds its prefix (`eval_accuracy`, `eval_resmem_gain`, ...).
    """
    predictions, labels = (eval_pred.predictions, eval_pred.label_ids) if hasattr(eval_pred, "label_ids") else eval_pred
    if labels is None:
        raise ValueError("compute_metrics needs labels: the evaluation dataset must have a label column.")
    if isinstance(labels, (tuple, list)):
        labels = labels[0]
    labels = np.asarray(labels)
    ids = [np.asarray(a) for a in _same_shape_arrays(predictions)]
    ids = [a if a.ndim == labels.ndim else a.argmax(axis=-1) for a in ids]  # logits -> class / token ids
    if ids[0].shape != labels.shape:
        raise ValueError(f"Predictions of shape {ids[0].shape} do not match labels of shape {labels.shape}.")
    if labels.ndim > 1 and (shift_labels is None or shift_labels):
        ids, labels = [a[:, :-1] for a in ids], labels[:, 1:]  # position t predicts token t+1
    keep = labels.reshape(-1) != -100  # (N,) ignored positions (padding, prompts) are not scored
    labels = torch.as_tensor(labels.reshape(-1)[keep])
    ids = [torch.as_tensor(a.reshape(-1)[keep]) for a in ids]
    if len(ids) >= 3:  # a ResMem output: (logits, scores, base_logits, ...)
        rates = decompose(ids[2], ids[1], labels)
        return {
            "base_accuracy": rates["base_accuracy"],
            "resmem_accuracy": rates["resmem_accuracy"],
            "resmem_tpr": rates["tpr"],
            "resmem_fpr": rates["fpr"],
            "resmem_gain": rates["gain"],
        }
    counts = prediction_counts(ids[0], ids[0], labels)
    return {"accuracy": rates_from_counts(*counts)["base_accuracy"]}


__all__ = ["LOGGED_KEYS", "ResMemCallback", "compute_metrics", "preprocess_logits_for_metrics"]
