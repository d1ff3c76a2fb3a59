"""Configuration of a ResMem-wrapped model: the base model's config plus the memory's settings."""

from __future__ import annotations

import copy
import math
import numbers

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import logging

from .adaptive_mixture import (
    check_adaptive_d0,
    check_adaptive_gate,
    check_adaptive_lambda_max,
    check_adaptive_prediction,
    check_adaptive_tau,
)
from .augmentation import check_augmentation
from .key_variants import check_key_normalization, check_key_statistics, check_sigma_mode
from .knn_lm import check_knn_temperature
from .logit_residuals import check_label_smoothing, check_residual_space

logger = logging.get_logger(__name__)

TASK_IMAGE_CLASSIFICATION = "image-classification"
TASK_CAUSAL_LM = "causal-lm"
TASK_TEXT_CLASSIFICATION = "text-classification"  # AutoModelForSequenceClassification bases (modeling_text.py)
TASK_AUDIO_CLASSIFICATION = "audio-classification"  # AutoModelForAudioClassification bases (modeling_audio.py)
TASKS = (TASK_IMAGE_CLASSIFICATION, TASK_CAUSAL_LM, TASK_TEXT_CLASSIFICATION, TASK_AUDIO_CLASSIFICATION)
DISTRIBUTIONS = ("clamp", "mixture", "knn-lm", "adaptive")


def saved_base_config(base_config):
    """A deep copy of the base's config as the ResMem config stores it.

    A base loaded from a GGUF file holds de-quantised float tensors (transformers converts every GGUF tensor at
    load), but its config keeps `quantization_config = {"quant_method": "gguf", ...}`: saved as is, a reload marks
    the model as GGUF-quantised and transformers then refuses to save it again ("not serializable"). The saved
    weights are plain tensors, so that entry is dropped.
    """
    config = copy.deepcopy(base_config)
    drop_gguf_quantization(config)
    return config


def drop_gguf_quantization(config) -> None:
    """Remove a GGUF `quantization_config` (a dict or a config object) from a base config in place."""
    quantization = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)
    if str(getattr(method, "value", method)).lower() != "gguf":
        return
    if isinstance(config, dict):
        config.pop("quantization_config", None)
    else:
        del config.quantization_config


class ResMemConfig(PreTrainedConfig):
    r"""
    Configuration of a [`ResMemWrapper`]: the wrapped base model's configuration plus the
    hyperparameters of the residual memory (Yang et al., "ResMem: Learn what you can and
    memorize the rest").

    `k`, `sigma` and `residual_temperature` are read at every forward pass, so changing them on
    `model.config` takes effect at the next call without rebuilding the memory. Every value below is checked
    when it is set (at construction, at load and on assignment, e.g. `model.config.sigma = float("nan")`
    raises a `ValueError` naming the valid range).

    Args:
        base_config (`PreTrainedConfig` or `dict`):
            Configuration of the wrapped base model (any image classifier or causal LM that the
            matching `AutoModelFor*` class can build).
        task (`str`, defaults to `"image-classification"`):
            `"image-classification"`, `"causal-lm"`, `"text-classification"` or `"audio-classification"`.
        k (`int`, defaults to 50):
            Number of nearest memory entries whose residuals are combined.
        sigma (`float`, defaults to 1.0):
            Locality of the neighbour weights `w_i ∝ exp(-d_i / sigma)` (plain L2 distance); finite, > 0.
        residual_temperature (`float`, defaults to 1.0):
            ResMem's temperature `T` of the base distribution `softmax(f(x) / T)`, both in the stored
            residuals and in the prediction. Causal LMs store their (sparse) residuals at the build
            temperature, so for them a new `T` needs `build_memory` again (`k` and `sigma` do not).
            Not the sampling temperature of `generate()` (that is `model.generation_config.temperature`).
            Finite and >= `MIN_RESIDUAL_TEMPERATURE` (1e-4), where float32 softmax stays finite.
            Configs saved with its former name `temperature` still load.
        layer (`str`, *optional*):
            Module of the base model whose output is the key embedding (a `named_modules()`
            name); the suffix `":input"` takes the module's first input instead. `None` picks
            the task default from the model's structure (pre-logit features for classifiers).
        score_floor (`float`, defaults to 1e-8):
            Scores are clamped at this floor and renormalised before taking the log for
            `logits`, so that downstream tools see a proper distribution. Must lie in `(0, 1/C)`, `C` the
            number of classes (vocabulary size for causal LMs): finite logits with the scores' argmax.
        index (`str`, defaults to `"auto"`):
            Nearest-neighbour backend: `"exact"` (faiss `IndexFlatL2`, or torch on a GPU without
            faiss-gpu), a faiss factory string (`"IVF1024,Flat"`, `"HNSW32"`, `"IVF1024,PQ16"`), or
            `"auto"` (exact below 200,000 entries, `IVF{4*sqrt(N)},Flat` above).
        index_params (`dict`, *optional*):
            Search-time parameters, applied at the next forward pass: any faiss `ParameterSpace`
            name (`{"nprobe": 16}` for IVF, `{"efSearch": 128}` for HNSW) plus `"rerank_factor"`
            (fetch `rerank_factor * k` candidates and keep the k nearest by exact distance from the
            stored keys; useful with PQ).
        index_choice (`dict`, *optional*):
            With `index="auto"`: the index measured by cost and quality (`resmem.index_choice`) that the forward
            uses: `{"choice": spec, "params", "measured_on": "validation" | "memory (held out)", "queries",
            "memory_entries", "k", "sigma", "temperature", "exact_gain", "measured": [per candidate: speed-up,
            agreement, gain kept, recall], ...}`. Set by `tune` (validation queries) and `build_memory` (held-out
            entries, memories of 16,384+ entries); dropped by `build_memory`; ignored while the memory's size is
            more than 10% away from `memory_entries` or `index` is not `"auto"`. `None` (default): `"auto"` is
            exact below 200,000 entries and IVF above.
        residual_top_m (`int`, *optional*, defaults to 128):
            Causal LMs: residuals over the vocabulary are stored sparse, keeping the `residual_top_m`
            entries of largest magnitude per memory entry (float16 values, int32 indices); `None`
            stores them dense. Read by `build_memory`.
        window (`int`, defaults to 256) and stride (`int`, defaults to 192):
            Causal LMs: texts longer than `window` tokens are processed in sliding windows of
            `window` tokens advancing by `stride`; the first window stores (or evaluates) all its
            positions, later windows only their last `stride`, so every token after the first window
            has at least `window - stride` tokens of context.
        distribution (`str`, defaults to `"clamp"`):
            Causal LMs: how `logits` (a log-distribution) is made from the scores. `"clamp"`:
            `log(renormalise(clamp(scores, score_floor)))`. `"mixture"`:
            `log((1 - mixture_lambda) * renormalise(clamp(scores, 0)) + mixture_lambda * softmax(base_logits))`,
            a proper distribution whose perplexity never explodes (kNN-LM style interpolation).
            `scores` and their argmax are the same in both modes. `"knn-lm"`: the kNN-LM of Khandelwal et al.
            from the same memory, `log(mixture_lambda * p_kNN + (1 - mixture_lambda) * softmax(base_logits))` with
            `p_kNN(v) = sum_{i: y_i = v} softmax_i(-d_i / knn_temperature)` over the k neighbours' next tokens;
            then `scores` is that distribution (its argmax is the prediction), see `resmem.knn_lm`. `"adaptive"`:
            `w * renormalise(clamp(scores, 0)) + (1 - w) * softmax(base_logits)` with a per-position memory weight
            `w = adaptive_lambda_max * exp(-d_1 / adaptive_tau)` (`d_1`: plain L2 distance to the nearest key), so
            far from the memory the output is the base's; `scores` is that distribution, see `resmem.adaptive_mixture`.
        mixture_lambda (`float`, defaults to 0.5):
            Weight of the base model's distribution in the `"mixture"` mode, in `[0, 1]`; tune it on validation text.
            In the `"knn-lm"` mode it is the weight of the kNN distribution (Khandelwal et al.'s lambda).
        knn_temperature (`float`, defaults to 1.0):
            `"knn-lm"` mode only: temperature of the kNN-LM kernel `softmax(-d_i / knn_temperature)` over plain L2
            distances (the units of `sigma`); finite, > 0.
        adaptive_lambda_max (`float`, defaults to 0.5):
            `"adaptive"` mode only: the memory's weight at distance 0, in `[0, 1]`.
        adaptive_tau (`float`, defaults to 1.0):
            `"adaptive"` mode only: distance scale of the memory weight `adaptive_lambda_max * exp(-d_1 / adaptive_tau)`
            (plain L2, the units of `sigma`); finite, > 0. With the logistic gate: the width of its step.
        adaptive_gate (`str`, defaults to `"exp"`):
            `"adaptive"` mode only: the memory weight's shape, `"exp"` (above) or `"logistic"`:
            `adaptive_lambda_max * sigmoid((adaptive_d0 - d_1) / adaptive_tau)` (a sharper cut-off between near and far
            text; `resmem.adaptive_mixture`).
        adaptive_d0 (`float`, defaults to 0.0):
            `adaptive_gate="logistic"` only: the distance `d_1` where the gate is half open; finite, >= 0.
        adaptive_prediction (`str`, defaults to `"mixture"`):
            `"adaptive"` mode only: `"mixture"` predicts the mixture's argmax; `"resmem"` predicts ResMem's own argmax
            (paper eq. 3) where the gate is open (gate value >= 1/2) and the mixture's elsewhere; perplexity unchanged.
        residual_space (`str`, defaults to `"probability"`):
            Image classifiers: `"probability"` is the paper's method (residuals `onehot(y) - softmax(f / T)` added to
            probabilities, `logits` clamped at `score_floor`); `"logit"` memorises log-likelihood-ratio residuals
            `log(smoothed onehot(y)) - log_softmax(f / T)` and adds them to `log_softmax(f / T)`, so `scores` are a
            proper distribution without clamping (`resmem.logit_residuals`). Causal LMs accept only `"probability"`.
        label_smoothing (`float`, defaults to 0.1):
            `residual_space="logit"` only: `eps` of the target `log((1 - eps) * onehot(y) + eps / C)`, in (0, 1);
            smaller values give stronger residuals. Tunable: `model.tune(..., label_smoothing=[...])`.
        memory_augmentation (`str`, defaults to `"none"`):
            Image classifiers: `"hflip"` stores, for every training image, its entry and that of its horizontally
            flipped copy (both with the source example's id; see `resmem.augmentation`). Set by
            `build_memory(..., augment=...)`, read by `add_to_memory`; a value other than the memory's raises at the
            next forward, naming `build_memory`.
        query_augmentation (`str`, defaults to `"none"`):
            Image classifiers: `"hflip"` uses the mean of the residuals of the query and of its flipped copy,
            `(r_kNN(x) + r_kNN(flip(x))) / 2` (base probability from `x` only); read at every forward, no rebuild.
        sigma_mode (`str`, defaults to `"absolute"`):
            Classifiers: `"absolute"` is the paper's `w_i = softmax_i(-d_i / sigma)`; `"relative"` uses
            `softmax_i(-d_i / (sigma * d_k(x)))`, `d_k(x)` the query's k-th (largest used) neighbour distance (clamped
            at 1e-12), so `sigma` is a multiple of each query's own neighbourhood radius. Read at every forward;
            tunable: `model.tune(..., sigma_mode=["absolute", "relative"])`. Causal LMs, regressors and logit-space
            residuals accept only `"absolute"`. See `resmem.key_variants`.
        key_normalization (`str`, defaults to `"none"`):
            Classifiers: the space of the neighbour search. `"none"`: raw keys; `"l2"`: keys and queries scaled to unit
            L2 norm; `"standardize"`: `(z - mean) / std` per dimension with the memory keys' statistics, computed at
            `build_memory` and stored in `key_statistics`; `"whiten"`: PCA whitening `(z - mean) @ V / sqrt(lambda)` over
            the memory keys' non-degenerate principal components (Mahalanobis distances). Applied to the stored keys at build and to every query
            (forward, `tune`, `explain`, `sigma_scale`, `add_to_memory`); a new value needs `build_memory` again (a
            memory of another key space is refused at load and at the next forward). Causal LMs and regressors accept
            only `"none"`.
        key_statistics (`dict`, *optional*):
            `{"mean": [D floats], "std": [D floats]}` (`"standardize"`) or `{"mean": [D], "projection": [D rows of r]}`
            (`"whiten"`) of the memory's raw keys, written by `build_memory` (`None` for the other modes); a memory
            normalised with other statistics is refused.
        memory_size (`int`, defaults to 0):
            Number of entries of the memory saved with this config (0 when none was built);
            written at save time, used to detect a missing memory file at load time.
        memory_dataset (`dict`, *optional*):
            What the memory was built from (builder name, split, fingerprint, number of rows),
            recorded by `build_memory` and shown in the model card.
        evaluations (`dict`, *optional*):
            The recorded evaluations, one per split (`{"validation": {...}, "test": {...}}`): base vs
            ResMem accuracy, TPR, FPR, Gain (perplexities for causal LMs), the settings they were
            measured at, the data and what measured them. Recorded by `tune` (validation, "used to
            choose the settings"), `resmem.evaluate(model, data, split="test")` and
            `model.record_evaluation(...)`; shown in the model card (see `resmem.records`). Reset by
            `build_memory`. `config.last_evaluation` reads the most recent one; configs saved with a
            `last_evaluation` still load (it is filed under its split).

    Example:

    ```python
    >>> from transformers import ResNetConfig
    >>> from resmem import ResMemConfig
    >>> config = ResMemConfig(base_config=ResNetConfig(num_labels=10), k=53, sigma=0.7, residual_temperature=1.4)
    >>> config.k, config.base_config.model_type
    (53, 'resnet')
    ```
    """

    model_type = "resmem"
    sub_configs_defaults = {
        "base_config": SubConfigSpec(config_class=AutoConfig, model_type="resnet"),
    }
    base_config: dict | PreTrainedConfig | None = None
    task: str = TASK_IMAGE_CLASSIFICATION
    k: int = 50
    sigma: float = 1.0
    residual_temperature: float = 1.0
    layer: str | None = None
    score_floor: float = 1e-8
    index: str = "auto"
    residual_top_m: int | None = 128
    window: int = 256
    stride: int = 192
    distribution: str = "clamp"
    mixture_lambda: float = 0.5
    knn_temperature: float = 1.0
    adaptive_lambda_max: float = 0.5
    adaptive_tau: float = 1.0
    adaptive_gate: str = "exp"
    adaptive_d0: float = 0.0
    adaptive_prediction: str = "mixture"
    index_params: dict | None = None
    index_choice: dict | None = None
    residual_space: str = "probability"
    label_smoothing: float = 0.1
    memory_augmentation: str = "none"
    query_augmentation: str = "none"
    sigma_mode: str = "absolute"
    key_normalization: str = "none"
    key_statistics: dict | None = None
    memory_size: int = 0
    memory_dataset: dict | None = None
    evaluations: dict | None = None

    @property
    def last_evaluation(self) -> dict | None:
        """The most recently recorded evaluation (of `evaluations`), or None."""
        from .records import latest_evaluation

        return latest_evaluation(self.evaluations)

    @last_evaluation.setter
    def last_evaluation(self, record: dict | None) -> None:
        # Configs saved before `evaluations` existed carry one `last_evaluation`: file it under its split.
        from .records import file_legacy_evaluation

        self.evaluations = file_legacy_evaluation(self.evaluations, record)

    def __post_init__(self, **kwargs):
        # Former name of `residual_temperature`: configs saved before the rename carry it. It must be taken
        # here, before the parent drops it as a generation parameter (or it would become the sampling one).
        if "temperature" in kwargs:
            self._take_legacy_temperature(kwargs.pop("temperature"))
        super().__post_init__(**kwargs)
        if self.base_config is not None:  # older saves carry the GGUF entry: a reload must not count as quantised
            drop_gguf_quantization(self.base_config)
        if self.task not in TASKS:
            raise ValueError(f"ResMemConfig.task must be one of {TASKS}, got {self.task!r}.")
        validate_hyperparameters(self.k, self.sigma, self.residual_temperature)
        check_distribution(self.distribution)
        check_mixture_lambda(self.mixture_lambda)
        check_knn_temperature(self.knn_temperature)
        check_adaptive_lambda_max(self.adaptive_lambda_max)
        check_adaptive_tau(self.adaptive_tau)
        check_adaptive_gate(self.adaptive_gate)
        check_adaptive_d0(self.adaptive_d0)
        check_adaptive_prediction(self.adaptive_prediction)
        check_score_floor(self.score_floor, self.num_classes())
        check_residual_space(self.residual_space, self.task)
        check_label_smoothing(self.label_smoothing)
        check_augmentation(self.memory_augmentation, "memory_augmentation", self.task)
        check_augmentation(self.query_augmentation, "query_augmentation", self.task)
        check_sigma_mode(self.sigma_mode, self.task)
        check_key_normalization(self.key_normalization, self.task)
        check_key_statistics(self.key_statistics)
        check_index_choice(self.index_choice)

    def _take_legacy_temperature(self, value) -> None:
        default = type(self).__dataclass_fields__["residual_temperature"].default
        if self.residual_temperature != default and value != self.residual_temperature:
            raise ValueError(
                f"Got both `temperature={value!r}` (the former name) and `residual_temperature={self.residual_temperature!r}`: "
                "pass only `residual_temperature` (ResMem's T)."
            )
        logger.warning_once(
            "ResMemConfig: `temperature` is the former name of `residual_temperature` (ResMem's T); read as "
            "`residual_temperature`. Save the model again to store the new name."
        )
        self.residual_temperature = value

    def __setattr__(self, name, value):
        if name == "temperature":
            raise AttributeError(
                "ResMemConfig has no `temperature`: ResMem's T is `config.residual_temperature`; the sampling "
                "temperature of `generate()` is `model.generation_config.temperature`."
            )
        # Grid searches hand over numpy scalars: store plain Python numbers so the config stays JSON-serialisable.
        if name == "k" and isinstance(value, numbers.Integral) and not isinstance(value, bool):
            value = int(value)
        elif name in ("sigma", "residual_temperature", "knn_temperature", "label_smoothing", "adaptive_lambda_max", "adaptive_tau", "adaptive_d0") and isinstance(value, numbers.Real) and not isinstance(value, bool):
            value = float(value)
        # Values set after construction (`model.config.sigma = ...`, a grid search) are checked as they are set,
        # not at the next forward pass; during construction `__post_init__` checks them all at once.
        if self.__dict__.get("_post_init_done") and name in _FIELD_CHECKS:
            _FIELD_CHECKS[name](self, value)
        super().__setattr__(name, value)

    def num_classes(self) -> int | None:
        """C, the size of the score vector: the base's `num_labels` (classifiers) or vocabulary size (causal LMs)."""
        base = self.base_config
        if not isinstance(base, PreTrainedConfig):
            return None
        if self.task == TASK_CAUSAL_LM:
            return getattr(base.get_text_config(decoder=True), "vocab_size", None)
        return getattr(base, "num_labels", None)

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        """The base model's text config: `generate()` builds its KV cache from it."""
        return self.base_config.get_text_config(decoder=decoder, encoder=encoder)


# Smallest residual temperature accepted. softmax(z / T) is computed in float32 after subtracting the max, so
# it stays finite exactly when every z / T is finite: |z| / T < 3.4e38 (float32 max), and T itself must not
# round to 0 in float32 (below 1.4e-45 it does: z / 0 = inf, inf - inf = NaN; T = 1e-300 gave NaN scores).
# With T >= 1e-4, |z| / T <= 6.6e8 even for logits at the float16 limit (65504), far below the float32 max;
# smaller T changes nothing useful (at T = 1e-4 softmax(z / T) is already one-hot for logit gaps above ~0.01).
MIN_RESIDUAL_TEMPERATURE = 1e-4


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be an integer >= 1 (number of neighbours), got {k!r}. Set e.g. `model.config.k = 50`.")


def check_sigma(sigma) -> None:
    if not (_is_real(sigma) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(
            f"sigma must be a finite number > 0 (the neighbour weights are exp(-d / sigma)), got {sigma!r}. "
            "Set e.g. `model.config.sigma = 1.0`."
        )


def check_residual_temperature(temperature) -> None:
    if not (_is_real(temperature) and math.isfinite(temperature) and temperature >= MIN_RESIDUAL_TEMPERATURE):
        raise ValueError(
            f"residual_temperature must be a finite number >= {MIN_RESIDUAL_TEMPERATURE:g} (it divides the logits; "
            f"smaller values overflow float32 and give NaN scores), got {temperature!r}. "
            "Set e.g. `model.config.residual_temperature = 1.0`."
        )


def check_mixture_lambda(lam) -> None:
    if not (_is_real(lam) and math.isfinite(lam) and 0.0 <= lam <= 1.0):
        raise ValueError(f"mixture_lambda must lie in [0, 1] (a finite number), got {lam!r}. Set e.g. `model.config.mixture_lambda = 0.5`.")


def check_distribution(value) -> None:
    if value not in DISTRIBUTIONS:
        raise ValueError(f"ResMemConfig.distribution must be one of {DISTRIBUTIONS}, got {value!r}.")


def check_score_floor(floor, num_classes: int | None) -> None:
    """`0 < floor < 1/C`: logits are `log(renormalise(clamp(scores, floor)))`, so a floor <= 0 (or NaN) gives
    -inf/NaN logits, and a floor >= 1/C can exceed the largest score (>= 1/C when the scores sum to 1) and
    flatten the argmax. `C` is checked only where known (`num_classes` None: only `0 < floor < 1`)."""
    upper = 1.0 / num_classes if num_classes else 1.0
    if not (_is_real(floor) and math.isfinite(floor) and 0.0 < floor < upper):
        where = f"1/C = {upper:.3g} (C = {num_classes} classes or vocabulary entries of the base)" if num_classes else "1"
        raise ValueError(
            f"score_floor must lie strictly between 0 and {where}, got {floor!r}: scores are clamped at it before the "
            "log, so 0 or less gives non-finite logits and a floor that high can change their argmax. Use e.g. 1e-8."
        )


def check_index_choice(value) -> None:
    """`config.index_choice` is None or a measured record naming its `choice` (a spec string) and `memory_entries`."""
    if value is None:
        return
    if not (isinstance(value, dict) and isinstance(value.get("choice"), str) and value["choice"]
            and isinstance(value.get("memory_entries"), int) and isinstance(value.get("params", {}), dict)):
        raise ValueError(
            f"config.index_choice must be None or the record `resmem.index_choice` measures (a dict with a 'choice' "
            f"spec string, 'params' and 'memory_entries'), got {value!r}. Set it to None, or measure one with "
            "`model.tune(validation_data)` (index='auto')."
        )


def validate_hyperparameters(k, sigma, temperature) -> None:
    """Raise a `ValueError` naming the fix for out-of-range ResMem hyperparameters (`temperature`: ResMem's T)."""
    check_k(k)
    check_sigma(sigma)
    check_residual_temperature(temperature)


# Checked on assignment after construction (`ResMemConfig.__setattr__`).
_FIELD_CHECKS = {
    "k": lambda config, v: check_k(v),
    "sigma": lambda config, v: check_sigma(v),
    "residual_temperature": lambda config, v: check_residual_temperature(v),
    "mixture_lambda": lambda config, v: check_mixture_lambda(v),
    "knn_temperature": lambda config, v: check_knn_temperature(v),
    "adaptive_lambda_max": lambda config, v: check_adaptive_lambda_max(v),
    "adaptive_tau": lambda config, v: check_adaptive_tau(v),
    "adaptive_gate": lambda config, v: check_adaptive_gate(v),
    "adaptive_d0": lambda config, v: check_adaptive_d0(v),
    "adaptive_prediction": lambda config, v: check_adaptive_prediction(v),
    "distribution": lambda config, v: check_distribution(v),
    "score_floor": lambda config, v: check_score_floor(v, config.num_classes()),
    "residual_space": lambda config, v: check_residual_space(v, config.task),
    "label_smoothing": lambda config, v: check_label_smoothing(v),
    "memory_augmentation": lambda config, v: check_augmentation(v, "memory_augmentation", config.task),
    "query_augmentation": lambda config, v: check_augmentation(v, "query_augmentation", config.task),
    "sigma_mode": lambda config, v: check_sigma_mode(v, config.task),
    "key_normalization": lambda config, v: check_key_normalization(v, config.task),
    "key_statistics": lambda config, v: check_key_statistics(v),
    "index_choice": lambda config, v: check_index_choice(v),
}


__all__ = [
    "MIN_RESIDUAL_TEMPERATURE",
    "ResMemConfig",
    "TASK_AUDIO_CLASSIFICATION",
    "TASK_CAUSAL_LM",
    "TASK_IMAGE_CLASSIFICATION",
    "TASK_TEXT_CLASSIFICATION",
    "validate_hyperparameters",
]
