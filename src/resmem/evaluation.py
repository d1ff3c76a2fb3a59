"""Evaluating a ResMem model at its configured setting: `evaluate` (both tasks) and `predict` (classifiers).

`evaluate` reports base vs ResMem accuracy and the paper's TPR / FPR / Gain (sec. 4.2; computed in
`resmem.scoring`, the one metrics module) and, for causal LMs, perplexities, with the model's
configured `k`, `sigma`, `T` (and `distribution` / `mixture_lambda`). It never picks a setting on
the data it reports: choosing is `model.tune`'s job, on validation data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .configuration_resmem import TASK_AUDIO_CLASSIFICATION, TASK_CAUSAL_LM, TASK_TEXT_CLASSIFICATION
from .distributed import gather_parts, process_info, shard_batches
from .regression import is_regression
from .scoring import calibration_from, decompose, format_table, per_class_gain, regression_metrics
from .validation import check_batch_size


@dataclass
class Predictions:
    """Class ids predicted for every example of a dataset, in dataset order.

    Args:
        base: `(N,)` int64, argmax of the base model's logits.
        resmem: `(N,)` int64, argmax of the ResMem scores (paper eq. 3).
        labels: `(N,)` int64, the dataset's labels.
        confidence, label_log_prob: `(N,)` float32 top-label probability and log-probability of the label under
            ResMem's `logits`; base_confidence, base_label_log_prob: the same for `softmax(base_logits)` (T = 1).
            Per example, not `(N, C)`: calibration metrics need no more (`resmem.scoring.calibration_from`).
    For a regressor (`resmem.regression`) all three are `(N, C)` float32: `f(x)`, `f(x) + r_kNN(x)`, the targets.
    """

    base: torch.Tensor
    resmem: torch.Tensor
    labels: torch.Tensor
    confidence: torch.Tensor | None = None
    label_log_prob: torch.Tensor | None = None
    base_confidence: torch.Tensor | None = None
    base_label_log_prob: torch.Tensor | None = None


def predict(
    model,
    dataset,
    batch_size: int = 256,
    label_column: str = "label",
    image_column: str | None = None,
    image_processor=None,
    transform=None,
    progress: bool = True,
    progress_desc: str = "Evaluating ResMem",
    accelerator=None,
    **read_kwargs,
) -> Predictions:
    """Run a ResMem classifier over a dataset in batches; return base and ResMem predictions with the labels.

    Runs in eval mode under `torch.inference_mode()` (the model's train/eval mode is restored
    afterwards); the memory is used as configured on `model.config` (`k`, `sigma`, `temperature`).

    Args:
        model: a [`ResMemForImageClassification`] whose memory has been built or loaded.
        dataset: `datasets.Dataset` / `IterableDataset` with `label_column` and either `pixel_values`
            `(C, H, W)` or images plus `image_processor` / `transform` (as in `build_memory`).
        batch_size: examples per forward pass.
        accelerator: an `accelerate.Accelerator` (or `PartialState`) to split the dataset over its
            processes (detected from `torch.distributed` when omitted): each rank predicts a contiguous
            shard with the full memory, and every rank gets all N predictions in dataset order.
        progress: show a progress bar (also hidden by `transformers.utils.logging.disable_progress_bar()`).
        read_kwargs: text / audio classifiers: `tokenizer=`, `text_column=`, ... / `feature_extractor=`,
            `audio_column=` (as for their `build_memory`).
    Returns:
        [`Predictions`] with `base`, `resmem` and `labels`, each `(N,)` int64 on the CPU.

    Example:

    ```python
    >>> from resmem.evaluation import decompose, predict
    >>> preds = predict(model, test_dataset, batch_size=256)
    >>> decompose(preds.base, preds.resmem, preds.labels)["gain"]
    ```
    """
    check_batch_size(batch_size)
    info = process_info(accelerator)
    regression = is_regression(model.base.config)  # then base/resmem are the (B, C) outputs, not class ids
    make_batches = model._batch_reader(batch_size, label_column, image_column, image_processor, transform, **read_kwargs)
    from .distributed import DistributedBuild

    base, resmem, labels = [], [], []
    calib = [[], [], [], []]  # confidence, label_log_prob, base_confidence, base_label_log_prob: (B,) each
    was_training = model.training
    model.eval()
    # Same data on every process (checked first); the gathers exchange ok/error flags, so none is left waiting.
    with DistributedBuild(info, dataset, what="evaluation") as build:
        try:
            with torch.inference_mode():
                batches, _ = shard_batches(dataset, info, make_batches, batch_size, progress_desc, progress)
                for batch in batches:
                    out = model(**model._base_inputs(batch))
                    # (B,) class ids; a regressor: (B, C) outputs f(x) and f(x) + r_kNN(x)
                    base.append(out.base_logits.float().cpu() if regression else out.base_logits.argmax(dim=-1).cpu())
                    resmem.append(out.logits.float().cpu() if regression else out.scores.argmax(dim=-1).cpu())
                    labels.append(batch.labels)  # (B,)
                    if regression:
                        continue
                    y = batch.labels.to(out.logits.device).long()[:, None]  # (B, 1)
                    for i, log_probs in enumerate((out.logits.float(), torch.log_softmax(out.base_logits.float(), dim=-1))):
                        calib[2 * i].append(log_probs.max(dim=-1).values.exp().cpu())  # (B,) top-label probability
                        calib[2 * i + 1].append(log_probs.gather(1, y).squeeze(1).cpu())  # (B,) log p(label)
        finally:
            model.train(was_training)
        parts = [None if p is None else p.cpu() for p in gather_parts([base, resmem, labels] + ([] if regression else calib), info, build)]
    return Predictions(*parts)




def _pick_split(data, split: str | None):
    """`data[split]` for a `DatasetDict` / `IterableDatasetDict`; any other data as it is."""
    import datasets

    if not isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return data
    if split is None:
        raise ValueError(
            f"The data is a DatasetDict with splits {sorted(data)}: pass split= naming the one to evaluate "
            "(e.g. split=\"test\"), or pass that split's Dataset."
        )
    if split not in data:
        raise ValueError(f"Split {split!r} is not in the DatasetDict; its splits are {sorted(data)}.")
    return data[split]


def evaluate(
    model,
    data,
    *,
    split: str | None = None,
    batch_size: int | None = None,
    tokenizer=None,
    text_column: str = "text",
    label_column: str = "label",
    image_column: str | None = None,
    image_processor=None,
    transform=None,
    max_tokens: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    accelerator=None,
    progress: bool = True,
    record: bool = True,
    feature_extractor=None,
    audio_column: str | None = None,
    text_pair_column: str | None = None,
    max_length: int | None = None,
) -> dict:
    """Evaluate a ResMem model (image classifier or causal LM) at its configured setting.

    Uses `model.config`'s `k`, `sigma`, `residual_temperature` and, for causal LMs, `distribution` and
    `mixture_lambda` exactly as they are: no grid, no selection (tune on validation data with
    `model.tune` first). The model's train/eval mode is restored afterwards.

    Args:
        model: a [`ResMemForImageClassification`] or [`ResMemForCausalLM`] with a built or loaded memory.
        data: a `datasets.Dataset` / `IterableDataset`, or a `DatasetDict` with `split=` naming the split to
            evaluate (`resmem.evaluate(model, data, split="test")`). Images: `label_column` plus `pixel_values` or images
            with `image_processor` / `transform` (as in `build_memory`). Causal LMs: texts in `text_column`
            with `tokenizer`, or `input_ids`; a list of strings or a `(B, T)` id tensor also works.
        split: name of the evaluated split, stored with the result (and in the model card); with a
            `DatasetDict` (or `IterableDatasetDict`), also the split that is evaluated.
        batch_size: examples per forward pass (default 256 images / 8 texts).
        tokenizer, text_column, max_tokens, window, stride: causal LMs only (as in [`evaluate_lm`]);
            `max_tokens` stops after that many evaluated positions.
        label_column, image_column, image_processor, transform: image classifiers only.
        tokenizer, text_column, text_pair_column, max_length: text classifiers (`ResMemForSequenceClassification`):
            texts read with `tokenizer`, or `input_ids` columns (see `resmem.data_classifiers.text_batches`).
        feature_extractor, audio_column: audio classifiers (`ResMemForAudioClassification`): audio read with
            `feature_extractor`, or `input_values` / `input_features` columns.
        accelerator: an `accelerate.Accelerator` to split the data over its processes (every process gets the
            same result).
        progress: show a progress bar (also hidden by `transformers.utils.logging.disable_progress_bar()`).
        record: store the result as the model's latest evaluation (saved with the config, shown in the card).
    Returns:
        a JSON-safe dict: `task`, `split`, `unit` (`"examples"` or `"token positions"`), `num_examples`,
        `base_accuracy`, `resmem_accuracy`, `tpr`, `fpr`, `gain`, `k`, `sigma`, `temperature`; image
        classifiers add `per_class` (see [`resmem.scoring.per_class_gain`]), `ece`, `nll` (ResMem's `logits`) and
        `base_ece`, `base_nll` (the base model at T = 1; see [`resmem.scoring.calibration`]), and with
        `residual_space="logit"` also `residual_space` and `label_smoothing`; causal LMs add `base_ppl`, `ppl`
        (the perplexity of the configured `distribution`), `distribution`, and `mixture_lambda` when the
        distribution is `"mixture"`.

    Example:

    ```python
    >>> import resmem
    >>> result = resmem.evaluate(model, test_dataset, split="test")
    >>> result["base_accuracy"], result["resmem_accuracy"], result["gain"]
    ```
    """
    config = model.config
    data = _pick_split(data, split)
    # Text and audio classifiers' readers check these themselves (an image or audio classifier names its inputs).
    read = {
        name: value
        for name, value in (("feature_extractor", feature_extractor), ("audio_column", audio_column),
                            ("text_pair_column", text_pair_column), ("max_length", max_length))
        if value is not None
    }
    if config.task == TASK_CAUSAL_LM and read:
        raise ValueError(f"{', '.join(sorted(read))} apply to text / audio classifiers only; for a causal LM pass "
                         "text (with tokenizer=) or input_ids.")
    if config.task == TASK_CAUSAL_LM:
        given = {"image_column": image_column, "image_processor": image_processor, "transform": transform}
        wrong = sorted(name for name, value in given.items() if value is not None)
        if wrong:
            raise ValueError(f"{', '.join(wrong)} apply to image classifiers only; for a causal LM pass text "
                             "(with tokenizer=) or input_ids.")
        result = _evaluate_causal_lm(
            model, data, batch_size or 8, tokenizer, text_column, max_tokens, window, stride, accelerator, progress
        )
    else:
        given = {"tokenizer": tokenizer, "max_tokens": max_tokens, "window": window, "stride": stride}
        if config.task == TASK_TEXT_CLASSIFICATION:  # a text classifier reads texts with the tokenizer
            read.update(tokenizer=given.pop("tokenizer"), text_column=text_column)
        wrong = sorted(name for name, value in given.items() if value is not None)
        if wrong and config.task == TASK_AUDIO_CLASSIFICATION:
            raise ValueError(f"{', '.join(wrong)} do not apply to an audio classifier: pass audio with feature_extractor= "
                             "(and audio_column=), or input_values / input_features.")
        if wrong:
            fix = ("drop them for a text classifier (it reads texts with tokenizer=, text_column=, max_length=, or "
                   "input_ids)." if config.task == TASK_TEXT_CLASSIFICATION else "drop them for an image classifier.")
            raise ValueError(f"{', '.join(wrong)} apply to causal LMs only; {fix}")
        preds = predict(
            model, data, batch_size=batch_size or 256, label_column=label_column, image_column=image_column,
            image_processor=image_processor, transform=transform, progress=progress, accelerator=accelerator, **read,
        )
        if is_regression(model.base.config):  # MSE / RMSE / MAE / R^2 of f(x) and of f(x) + r_kNN(x)
            result = {"task": config.task, "split": split, "unit": "examples", "problem_type": "regression",
                      **regression_metrics(preds.base, preds.resmem, preds.labels), "k": config.k, "sigma": config.sigma}
        else:
            result = {"task": config.task, "split": split, "unit": "examples", **decompose(preds.base, preds.resmem, preds.labels)}
            result.update(k=config.k, sigma=config.sigma, temperature=config.residual_temperature)
            # Calibration (top-label ECE, 15 bins; NLL) of ResMem's `logits` and of the base model at T = 1.
            result.update(calibration_from(preds.confidence, preds.resmem == preds.labels, preds.label_log_prob))
            base_cal = calibration_from(preds.base_confidence, preds.base == preds.labels, preds.base_label_log_prob)
            result.update({f"base_{key}": value for key, value in base_cal.items()})
            if config.residual_space != "probability":
                result.update(residual_space=config.residual_space, label_smoothing=config.label_smoothing)
            result["per_class"] = per_class_gain(
                preds.base, preds.resmem, preds.labels, model.base.config.num_labels, getattr(config, "id2label", None)
            )
    result["split"] = split
    if record:
        from .records import record_evaluation

        record_evaluation(model, result, dataset=data, split=split, source="evaluate")
    return result


def _evaluate_causal_lm(model, data, batch_size, tokenizer, text_column, max_tokens, window, stride, accelerator, progress):
    """`evaluate` for a causal LM: `evaluate_lm` on a one-point grid, the configured distribution's perplexity."""
    from .evaluation_lm import adaptive_entry, config_adaptive_key, evaluate_lm

    config = model.config
    lam = float(config.mixture_lambda)
    (row,) = evaluate_lm(
        model, data, tokenizer, text_column, ks=[config.k], sigmas=[config.sigma], lambdas=[lam],
        batch_size=batch_size, window=window, stride=stride, max_tokens=max_tokens, accelerator=accelerator,
        progress=progress,
        adaptive=[config_adaptive_key(config)] if config.distribution == "adaptive" else [],
    )
    result = {
        "task": config.task,
        "split": None,
        "unit": "token positions",
        "num_examples": row["positions"],
        "base_accuracy": row["base_accuracy"],
        "resmem_accuracy": row["accuracy"],
        "tpr": row["tpr"],
        "fpr": row["fpr"],
        "gain": row["gain"],
        "k": config.k,
        "sigma": config.sigma,
        "temperature": config.residual_temperature,
        "base_ppl": row["base_ppl"],
        "ppl": row["ppl_clamp"] if config.distribution == "clamp" else row["ppl_mixture"][str(lam)],  # knn-lm: below
        "distribution": config.distribution,
    }
    if config.distribution == "mixture":
        result["mixture_lambda"] = lam
    if config.distribution == "knn-lm":  # the kNN-LM's own argmax and perplexity (resmem.knn_lm)
        knn = row["knn_lm"][str(float(config.knn_temperature))][str(lam)]
        result.update(resmem_accuracy=knn["accuracy"], tpr=knn["tpr"], fpr=knn["fpr"], gain=knn["gain"], ppl=knn["ppl"])
        result.update(mixture_lambda=lam, knn_temperature=float(config.knn_temperature))
    if config.distribution == "adaptive":  # the distance-gated mixture's argmax and perplexity (resmem.adaptive_mixture)
        lm, tau = float(config.adaptive_lambda_max), float(config.adaptive_tau)
        ada = adaptive_entry(row, config_adaptive_key(config))
        pre = "gated_" if config.adaptive_prediction == "resmem" else ""  # the rates of the model's own prediction
        result.update(resmem_accuracy=ada[pre + "accuracy"], tpr=ada[pre + "tpr"], fpr=ada[pre + "fpr"],
                      gain=ada[pre + "gain"], ppl=ada["ppl"])
        result.update(adaptive_lambda_max=lm, adaptive_tau=tau)
        if config.adaptive_gate != "exp" or config.adaptive_prediction != "mixture":  # named only when not the default
            result.update(adaptive_gate=config.adaptive_gate, adaptive_prediction=config.adaptive_prediction)
            if config.adaptive_gate != "exp":
                result["adaptive_d0"] = float(config.adaptive_d0)
    return result


def results_markdown(title: str | None, rows: list[tuple[str, dict]], paper: dict | None = None) -> str:
    """A markdown table of `decompose` results, one row per split, optionally with the paper's row.

    Args:
        title: a `### title` line above the table (none when `None`).
        rows: `(name, decompose(...) dict)` pairs.
        paper: `{"dataset", "model", "base_accuracy", "resmem_accuracy"}` of the published result.
    """
    table = [{**r, "split": name} for name, r in rows]
    if paper:
        table.append({
            "split": f"paper ({paper['dataset']}, {paper['model']})",
            "base_accuracy": paper["base_accuracy"],
            "resmem_accuracy": paper["resmem_accuracy"],
            "gain": paper["resmem_accuracy"] - paper["base_accuracy"],
        })
    return format_table(table, columns=("split", "base_accuracy", "resmem_accuracy", "tpr", "fpr", "gain"), title=title)


__all__ = ["Predictions", "decompose", "evaluate", "predict", "results_markdown"]
