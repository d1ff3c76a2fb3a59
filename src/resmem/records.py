"""What a model records about itself for its card: the data its memory was built from, and evaluations per split.

`describe_dataset` says what identifies a dataset (builder, config, split, rows, fingerprint, the
folder of a `save_to_disk` copy). `record_evaluation` keeps one evaluation per split on
`model.config.evaluations` (saved in config.json, shown in the model card), each with the settings
it was measured at: a record measured at other settings than the model's current ones is dropped
when a new evaluation is recorded (e.g. by a `tune` that changed them), and left out of the card,
so a card never pairs numbers with settings they were not measured at.

How results get here:

* `model.tune(val_data, ...)` records its validation numbers (source `"tune (<objective>)"`): the card
  labels them "used to choose the settings";
* `resmem.evaluate(model, test_data, split="test")` records a held-out result (source `"evaluate"`);
* `model.record_evaluation(result, split="test", dataset=test_data)` records numbers computed elsewhere.
"""

from __future__ import annotations

import datetime
import os

# Metric keys copied from a result into its record (the rest of a result, e.g. per-class rows, stays out of config.json).
METRIC_KEYS = (
    "task", "unit", "num_examples", "base_accuracy", "resmem_accuracy", "tpr", "fpr", "gain",
    # causal LMs: perplexity of the base, of the configured distribution (`ppl`), and of each mode (tune's grid)
    "base_ppl", "ppl", "ppl_clamp", "ppl_mixture",
    # regressors (resmem.regression)
    "base_mse", "mse", "base_rmse", "rmse", "base_mae", "mae", "base_r2", "r2",
    # classifiers: calibration (top-label ECE, NLL) of ResMem's `logits` and of the base
    "ece", "nll", "base_ece", "base_nll",
)
# Split name of a record whose data names no split: the card says it is unnamed.
UNNAMED_SPLIT = "unnamed"


def describe_dataset(dataset) -> dict:
    """What identifies a dataset, JSON-safe: builder, config, split, rows, fingerprint, folder.

    For a `datasets.Dataset`: `builder_name` and `config_name` (`"imagefolder"`, `"text"`, or the
    builder of a Hub dataset), `dataset_name` when it differs from the builder (a Hub dataset's name),
    `split`, `num_rows`, `fingerprint` (changes with every transform, `select`, ...) and `path`, the
    folder of a dataset loaded with `load_from_disk`. Anything else (token-id lists or tensors handed
    to a causal LM) is described by its type and length: `{"type": "list", "num_rows": 30}`.
    """
    import datasets

    if not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        described = {"type": type(dataset).__name__}
        try:
            described["num_rows"] = len(dataset)
        except TypeError:
            pass
        return described
    info = getattr(dataset, "info", None)
    builder = getattr(info, "builder_name", None)
    name = getattr(info, "dataset_name", None)
    described = {
        "builder_name": builder,
        "config_name": getattr(info, "config_name", None),
        "dataset_name": name if name != builder else None,
        "split": str(dataset.split) if getattr(dataset, "split", None) is not None else None,
        "fingerprint": getattr(dataset, "_fingerprint", None),
        "path": _saved_folder(dataset),
    }
    try:
        described["num_rows"] = len(dataset)
    except TypeError:  # streaming datasets
        described["num_rows"] = None
    return {key: value for key, value in described.items() if value is not None}


def _saved_folder(dataset) -> str | None:
    """The folder of a `save_to_disk` copy (it holds `state.json` beside its Arrow files), else None.

    The Arrow files of `load_dataset` live in the datasets cache under a hashed name, which says
    nothing about where the data came from, so they are not recorded.
    """
    files = [f.get("filename") for f in getattr(dataset, "cache_files", None) or [] if f.get("filename")]
    folders = {os.path.dirname(f) for f in files}
    if len(folders) == 1:
        folder = folders.pop()
        if os.path.isfile(os.path.join(folder, "state.json")):
            return os.path.abspath(folder)
    return None


def dataset_label(info: dict | None) -> str:
    """A short human name for a `describe_dataset` result, e.g. "`imagefolder` (config `default`)"."""
    if not info:
        return "data not recorded"
    if "type" in info:
        return f"a Python `{info['type']}`"
    name = info.get("dataset_name") or info.get("builder_name")
    if name:
        label = f"`{name}`"
        if info.get("config_name") not in (None, "", "default"):
            label += f" (config `{info['config_name']}`)"
        return label
    if info.get("path"):
        return f"the dataset saved in `{info['path']}`"
    return "an in-memory `datasets.Dataset`"


# Options that change predictions, recorded with an evaluation only when not at their default (older records lack them).
KEY_VARIANT_DEFAULTS = {"sigma_mode": "absolute", "key_normalization": "none"}


def current_settings(model_or_config) -> dict:
    """The settings an evaluation depends on, from the model's config (and memory, when given a model).

    `k`, `sigma`, `temperature` (ResMem's T), `memory_entries`; for a causal LM also `distribution`
    and, in the `"mixture"` mode, `mixture_lambda` (perplexities depend on them, accuracies do not); in the
    `"knn-lm"` mode `mixture_lambda` and `knn_temperature` (the kNN-LM's accuracy depends on them too); with
    `index="auto"` and a measured approximate index in use, `search_index` (`"IVF1024,Flat|nprobe=8"`).
    """
    config = getattr(model_or_config, "config", model_or_config)
    settings = {"k": config.k, "sigma": config.sigma, "temperature": config.residual_temperature}
    memory = getattr(model_or_config, "memory", None)
    settings["memory_entries"] = len(memory) if memory is not None else config.memory_size
    from .configuration_resmem import TASK_CAUSAL_LM

    if config.task == TASK_CAUSAL_LM:
        settings["distribution"] = config.distribution
        if config.distribution in ("mixture", "knn-lm"):
            settings["mixture_lambda"] = config.mixture_lambda
        if config.distribution == "knn-lm":
            settings["knn_temperature"] = config.knn_temperature
        if config.distribution == "adaptive":
            settings["adaptive_lambda_max"], settings["adaptive_tau"] = config.adaptive_lambda_max, config.adaptive_tau
            if config.adaptive_gate != "exp" or config.adaptive_prediction != "mixture":  # not named at the defaults
                settings["adaptive_gate"], settings["adaptive_prediction"] = config.adaptive_gate, config.adaptive_prediction
                if config.adaptive_gate != "exp":
                    settings["adaptive_d0"] = config.adaptive_d0
    elif getattr(config, "residual_space", "probability") != "probability":  # logit-space residuals (classifiers)
        settings["residual_space"] = config.residual_space
        settings["label_smoothing"] = config.label_smoothing
    if getattr(config, "query_augmentation", "none") != "none":  # flipped queries change predictions (resmem.augmentation)
        settings["query_augmentation"] = config.query_augmentation
    for key, default in KEY_VARIANT_DEFAULTS.items():  # key variants: named only when not the paper's
        if getattr(config, key, default) != default:
            settings[key] = getattr(config, key)
    from .index_choice import search_index_setting  # index="auto" with a measured approximate index

    search_index = search_index_setting(config, settings["memory_entries"])
    if search_index is not None:
        settings["search_index"] = search_index
    return settings


def measured_at_current_settings(record: dict, settings: dict) -> bool:
    """True when every setting the record names equals the current one (records of older versions name fewer).

    `mixture_lambda` counts only when both the record and the model use the `"mixture"` mode: a record of
    the clamp mode may name the lambda of its `ppl_mixture` column, which the card labels with it.
    """
    for key in ("k", "sigma", "temperature", "memory_entries", "distribution", "label_smoothing", "adaptive_lambda_max",
                "adaptive_tau", "adaptive_d0"):
        if key in record and key in settings and record[key] != settings[key]:
            return False
    if record.get("distribution") == "adaptive" == settings.get("distribution") and any(  # absent = the default
        record.get(key, default) != settings.get(key, default)
        for key, default in (("adaptive_gate", "exp"), ("adaptive_prediction", "mixture"))
    ):
        return False
    if record.get("residual_space", "probability") != settings.get("residual_space", "probability"):
        return False
    if record.get("query_augmentation", "none") != settings.get("query_augmentation", "none") or any(
        record.get(key, default) != settings.get(key, default) for key, default in KEY_VARIANT_DEFAULTS.items()
    ):
        return False
    if record.get("search_index") != settings.get("search_index"):  # measured with another (approximate) index
        return False
    both_mixture = record.get("distribution") == settings.get("distribution") and settings.get("distribution") in ("mixture", "knn-lm")
    if both_mixture and record.get("knn_temperature", settings.get("knn_temperature")) != settings.get("knn_temperature"):
        return False
    return not both_mixture or record.get("mixture_lambda") == settings.get("mixture_lambda")


def record_split(split: str | None, source: str, dataset_info: dict | None) -> str:
    """The split a record is filed under: `split`, else the dataset's own split, else "validation" for `tune`."""
    if split:
        return str(split)
    if dataset_info and dataset_info.get("split"):
        return str(dataset_info["split"])
    return "validation" if str(source).startswith("tune") else UNNAMED_SPLIT


def record_evaluation(model, metrics: dict, dataset=None, split: str | None = None, source: str = "evaluate") -> dict:
    """Store an evaluation on `model.config.evaluations[split]` (saved in config.json, shown in the model card).

    Args:
        model: the ResMem model the numbers were measured with, at its current settings.
        metrics: a result of `resmem.evaluate` or `tune`: `base_accuracy`, `resmem_accuracy`, `tpr`, `fpr`,
            `gain`, `num_examples` (and `unit`, `base_ppl`, `ppl`, ... for a causal LM). If it names `k`,
            `sigma`, `temperature`, `distribution` or `mixture_lambda`, they must equal the model's.
        dataset: the data measured on (described with [`describe_dataset`]).
        split: name of the split (`"test"`, `"validation"`); default: the dataset's split, else `"validation"`
            for `tune`, else `"unnamed"`.
        source: what measured it: `"evaluate"`, `"tune (<objective>)"`, or your own words.
    Returns:
        The stored record. Records of other splits measured at other settings (e.g. before a `tune`
        changed them) are dropped; one of the same split is replaced.
    Raises:
        ValueError: `metrics` were measured at other settings than the model's current ones.
    """
    settings = current_settings(model)
    claimed = {"temperature": metrics.get("temperature", metrics.get("residual_temperature"))}
    claimed.update({key: metrics.get(key) for key in ("k", "sigma", "distribution")})
    if settings.get("distribution") in ("mixture", "knn-lm"):
        claimed["mixture_lambda"] = metrics.get("mixture_lambda")
    if settings.get("distribution") == "knn-lm":
        claimed["knn_temperature"] = metrics.get("knn_temperature")
    if settings.get("distribution") == "adaptive":
        claimed.update({key: metrics.get(key) for key in ("adaptive_lambda_max", "adaptive_tau", "adaptive_gate",
                                                           "adaptive_d0", "adaptive_prediction")})
    wrong = {key: value for key, value in claimed.items() if value is not None and key in settings and value != settings[key]}
    if wrong:
        raise ValueError(
            f"These numbers were measured at {wrong}, but the model is set to "
            f"{ {key: settings[key] for key in wrong} }: a card would pair them with the wrong settings. Set the model "
            "to the settings they were measured at (e.g. `model.config.k = ...`) or evaluate again with "
            "`resmem.evaluate(model, data, split=...)`."
        )
    info = describe_dataset(dataset) if dataset is not None else None
    record = {key: metrics[key] for key in METRIC_KEYS if metrics.get(key) is not None}
    if "mixture_lambda" in metrics and "ppl_mixture" in metrics:  # tune's grid: the lambda its mixture perplexity is at
        record["mixture_lambda"] = metrics["mixture_lambda"]
    record.update(settings)
    name = record_split(split, source, info)
    record.update(
        split=name,
        source=source,
        dataset=info,
        recorded_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"),
    )
    previous = (model.config.evaluations or {}).get(name)
    if (isinstance(previous, dict) and chose_settings(previous) and not chose_settings(record)
            and measured_at_current_settings(previous, settings)):
        # Re-evaluating the split `tune` chose the settings on (same data, or data we cannot tell apart):
        # the new numbers are no more held out than tune's were.
        old_fp, new_fp = (previous.get("dataset") or {}).get("fingerprint"), (info or {}).get("fingerprint")
        if old_fp is None or new_fp is None or old_fp == new_fp:
            record["chose_settings"] = True
    kept = {
        key: value
        for key, value in (model.config.evaluations or {}).items()
        if key != name and measured_at_current_settings(value, settings)
    }
    kept[name] = record
    model.config.evaluations = kept
    return record


def chose_settings(record: dict) -> bool:
    """True for numbers measured on the data the settings were chosen on (`tune`'s own, or a re-evaluation of them)."""
    return str(record.get("source", "")).startswith("tune") or bool(record.get("chose_settings"))


def latest_evaluation(evaluations: dict | None) -> dict | None:
    """The most recently recorded of `evaluations` (by `recorded_at`), or None."""
    records = [r for r in (evaluations or {}).values() if isinstance(r, dict)]
    if not records:
        return None
    return max(records, key=lambda r: str(r.get("recorded_at") or ""))


def file_legacy_evaluation(evaluations: dict | None, record: dict | None) -> dict:
    """`evaluations` with `record` (a `last_evaluation` of a config saved by an earlier version) filed under its split.

    `None` (what `build_memory` used to set, and what old configs without an evaluation hold) clears them.
    """
    if record is None:
        return {}
    info = record.get("dataset") if isinstance(record.get("dataset"), dict) else None
    name = record_split(record.get("split"), str(record.get("source", "evaluate")), info)
    filed = dict(evaluations or {})
    filed[name] = {**record, "split": name}
    return filed


__all__ = [
    "chose_settings",
    "current_settings",
    "dataset_label",
    "describe_dataset",
    "file_legacy_evaluation",
    "latest_evaluation",
    "measured_at_current_settings",
    "record_evaluation",
]
