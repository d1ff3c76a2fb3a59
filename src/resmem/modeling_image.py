"""`ResMemForImageClassification`: ResMem over any `AutoModelForImageClassification` base."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers import AutoModelForImageClassification
from transformers.loss.loss_utils import fixed_cross_entropy
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import can_return_tuple

from .augmentation import check_augmentation, describe_residual_models, hflip, other_model_logits, read_folds, residual_models
from .data import dataset_length, image_batches
from .distributed import DistributedBuild, gather_parts, process_info, shard_batches
from .hooks import EmbeddingCapture, default_classifier_layer, per_example_keys
from .hub import MEMORY_FILE, base_fingerprint
from .key_variants import STATISTICS_MODES, check_memory_key_space, fit_key_statistics, key_space_id, normalize_keys
from .memory import MemoryFileError, ResidualMemory
from .memory_disk import OnDiskMemory
from .modeling_resmem import ResMemWrapper
from .regression import RegressionMemory, check_regression_targets, is_regression, memory_class, regression_loss, regression_prediction
from .residuals import resmem_scores, scores_to_logits
from .validation import check_batch_size, check_num_classes


@dataclass
class ResMemImageClassifierOutput(ImageClassifierOutput):
    """Output of [`ResMemForImageClassification`]: transformers' `ImageClassifierOutput` plus ResMem's fields.

    Args:
        loss: negative log-likelihood of `labels` under `logits` (when labels are given); regressors: their MSE.
        logits: `(B, C)` `log(renormalise(clamp(scores, score_floor)))`; its argmax is the scores' argmax.
            Regressors (`problem_type="regression"`, see `resmem.regression`): the prediction
            `base_logits + residual` (no softmax), and `scores` is `None`.
        hidden_states, attentions: passed through from the base model when requested.
        scores: `(B, C)` paper eq. 3, `softmax(base_logits / T) + residual` (`residual_space="logit"`:
            `exp(logits)`, a distribution; see `resmem.logit_residuals`).
        base_logits: `(B, C)` the base model's logits.
        residual: `(B, C)` the weighted residual of the k nearest memory entries.
        neighbor_ids, neighbor_distances, neighbor_weights, neighbor_contributions: `(B, k)`, only with
            `output_neighbors=True`: each query's neighbours' `example_ids`, plain L2 distances, weights
            `softmax(-d / sigma)` (`sigma * d_k` with `sigma_mode="relative"`) and contributions `weight * residual[predicted class]` (they sum to
            `residual[predicted class]`); also `neighbor_residuals` (each neighbour's residual at the predicted
            class) and `neighbor_labels`. See `resmem.explain`.

    `to_tuple()` (and `return_dict=False`) keep this order and skip `None` fields, as in transformers.
    """

    scores: torch.FloatTensor | None = None
    base_logits: torch.FloatTensor | None = None
    residual: torch.FloatTensor | None = None
    neighbor_ids: torch.LongTensor | None = None
    neighbor_distances: torch.FloatTensor | None = None
    neighbor_weights: torch.FloatTensor | None = None
    neighbor_contributions: torch.FloatTensor | None = None
    neighbor_residuals: torch.FloatTensor | None = None
    neighbor_labels: torch.LongTensor | None = None


class ResMemForImageClassification(ResMemWrapper):
    """ResMem over any `AutoModelForImageClassification` base; keys default to the pre-logit features."""

    main_input_name = "pixel_values"

    def __init__(self, config, base_model=None):
        super().__init__(config, base_model)
        if is_regression(self.base.config):  # float targets: residuals y - f(x) (resmem.regression)
            self.memory = RegressionMemory()

    @classmethod
    def auto_class_for_base(cls):
        return AutoModelForImageClassification

    @classmethod
    def default_layer(cls, base_model, config) -> str:
        return default_classifier_layer(base_model, base_model.config.num_labels)

    def _load_memory(self, path_or_repo, hub_kwargs, check_fingerprint):
        super()._load_memory(path_or_repo, hub_kwargs, check_fingerprint)
        if len(self.memory):  # a logits width other than the model's fails only inside the forward otherwise
            on_disk = isinstance(self.memory, OnDiskMemory)
            width = self.memory.manifest["num_classes"] if on_disk else self.memory.base_logits.shape[1]
            source = f"The memory {'manifest resmem_memory.index.json' if on_disk else 'file ' + MEMORY_FILE} in {path_or_repo}"
            check_num_classes(width, self.base.config.num_labels, source, MemoryFileError)
            check_memory_key_space(getattr(self.memory, "key_space", "none"), self.config, MemoryFileError)  # e.g. no statistics

    @torch.inference_mode()
    def embed_dataset(
        self,
        dataset,
        batch_size: int = 256,
        label_column: str = "label",
        image_column: str | None = None,
        image_processor=None,
        transform=None,
        accelerator=None,
        progress: bool = True,
        residual_model=None,
        augment: str = "none",
        residual_fold: str | None = None,
        **read_kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, base logits, labels and row numbers of every example of `dataset`, in dataset order.

        Under several processes (an `accelerator`, or an initialised `torch.distributed` group) each
        rank embeds a contiguous shard and the shards are gathered in rank order, so every rank gets
        exactly what a single process would compute. Arguments as for `build_memory`.

        Returns:
            `keys (N, D)`, `base_logits (N, C)` float32, `labels (N,)`, `row_ids (N,)` int64, on the model's device.
            `residual_model`: the logits are its logits (keys stay the base's); a list of models with `residual_fold`
            (a column name): row r's logits are `residual_model[fold[r]]`'s. `augment="hflip"`: `2N` rows, the N
            examples and then their horizontally flipped copies (same labels and row numbers).
        """
        check_batch_size(batch_size)
        check_augmentation(augment, "augment", self.config.task)
        models = residual_models(residual_model, residual_fold, self.base)  # None, or a checked list
        folds = read_folds(dataset, residual_fold, len(models)) if models is not None and len(models) > 1 else None
        info = process_info(accelerator)
        # Every rank checks first that all see the same data (same error everywhere on a mismatch), and any
        # exception on one rank reaches the others at their next gather instead of leaving them waiting.
        with DistributedBuild(info, dataset, what="memory build") as build:
            if dataset_length(dataset) == 0:
                raise ValueError("The dataset is empty: the memory needs at least one example.")
            make_batches = self._batch_reader(
                batch_size, label_column, image_column, image_processor, transform, **read_kwargs
            )
            capture = EmbeddingCapture(self.base, self.config.layer)
            was_training = self.training
            self.eval()
            keys, logits, labels, example_ids = [], [], [], []
            flipped_keys, flipped_logits = [], []  # augment="hflip": the flipped copies, appended after all originals
            try:
                batches, first_row = shard_batches(
                    dataset, info, make_batches, batch_size, "Embedding for ResMem memory", progress=progress
                )
                for batch in batches:
                    batch_logits, z = self.embed_batch(batch, capture, label_column)  # (B, C), (B, D)
                    if not torch.isfinite(z).all() or not torch.isfinite(batch_logits).all():
                        ids = batch.example_ids + first_row
                        raise ValueError(
                            f"Layer {self.config.layer!r} or the logits contain NaN/inf for examples "
                            f"{ids[0].item()}..{ids[-1].item()}; check the inputs' "
                            "normalisation and the model's dtype, or pick another layer."
                        )
                    if models is not None:  # out-of-sample residuals: another model's logits, same keys
                        batch_logits = other_model_logits(models, folds, self._base_inputs(batch), batch.example_ids + first_row)
                    keys.append(z)
                    logits.append(batch_logits)
                    labels.append(batch.labels)
                    example_ids.append(batch.example_ids + first_row)
                    if augment == "hflip":
                        flip_logits, flip_z = self._embed_flipped(batch, capture, models, folds, first_row)  # (B, C), (B, D)
                        flipped_keys.append(flip_z)
                        flipped_logits.append(flip_logits)
            finally:
                self.train(was_training)
            # the flipped lists only when there are some: a distributed gather of lists empty on every rank fails
            flipped = [flipped_keys, flipped_logits] if augment == "hflip" else []
            parts = gather_parts([keys, logits, labels, example_ids, *flipped], info, build)
        keys, logits, labels, example_ids = parts[:4]
        if augment == "hflip":  # the originals keep rows 0..N-1 as without augmentation; copies follow
            keys, logits = torch.cat([keys, parts[4]]), torch.cat([logits, parts[5]])
            labels, example_ids = torch.cat([labels, labels]), torch.cat([example_ids, example_ids])
        return tuple(p.to(self.device) for p in (keys, logits, labels, example_ids))

    def _embed_flipped(self, batch, capture, models, folds, first_row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(logits (B, C), keys (B, D))` of the batch's horizontally flipped images (base keys; logits of the base
        or of the residual model(s) `models`, row r's from `models[folds[r]]` when cross-fitted)."""
        inputs = self._base_inputs(batch)
        inputs["pixel_values"] = hflip(inputs["pixel_values"])
        with capture:
            out = self.base(**inputs)
        z = per_example_keys(capture.get(), batch.labels.shape[0], self.config.layer)  # (B, D)
        rows = batch.example_ids + first_row
        logits = out.logits.float() if models is None else other_model_logits(models, folds, inputs, rows)  # (B, C)
        if not torch.isfinite(z).all() or not torch.isfinite(logits).all():
            ids = batch.example_ids + first_row
            raise ValueError(f"The flipped copies of examples {ids[0].item()}..{ids[-1].item()} give NaN/inf keys or "
                             "logits; check the inputs' normalisation, or build without augment=.")
        return logits, z

    def embed_batch(self, batch, capture, label_column: str = "label", role: str = "Labels"):
        """Check a batch's labels, run the base model with the key hook attached.

        Args:
            batch: an `ImageBatch` from `resmem.data.image_batches`.
            capture: an `EmbeddingCapture` on `self.base` for `config.layer`.
            role: how the error message calls the labels (e.g. "Validation labels").
        Returns:
            `(logits (B, C) float32, keys (B, D) float32)`.
        """
        num_labels = self.base.config.num_labels
        regression = is_regression(self.base.config)
        if regression:  # float targets (B, C): any finite value is valid
            check_regression_targets(batch.labels, num_labels, label_column, role)
        bad = (batch.labels < 0) | (batch.labels >= num_labels)
        if not regression and bad.any():
            raise ValueError(
                f"{role} must lie in [0, {num_labels}) for this model; found {batch.labels[bad][:5].tolist()} in column "
                f"{label_column!r}. Map them to class ids first (e.g. `dataset.class_encode_column`, `model.config.label2id`)."
            )
        with capture:
            out = self.base(**self._base_inputs(batch))
        return out.logits.float(), per_example_keys(capture.get(), batch.labels.shape[0], self.config.layer)

    # ------------------------------------------------------------------ key space (resmem.key_variants)
    def _check_key_variants(self) -> None:
        """Regressors and logit-space residuals run the paper's settings only (not built for them yet)."""
        config = self.config
        if is_regression(self.base.config) and (config.sigma_mode != "absolute" or config.key_normalization != "none"):
            raise ValueError("sigma_mode='relative' and key_normalization are implemented for classifiers; a regressor uses "
                             "model.config.sigma_mode = 'absolute' and key_normalization = 'none'.")
        if config.sigma_mode != "absolute" and config.residual_space != "probability":
            raise ValueError("sigma_mode='relative' is implemented for residual_space='probability' only: set "
                             "model.config.sigma_mode = 'absolute' for logit-space residuals.")

    def _check_ready(self) -> None:
        super()._check_ready()
        self._check_key_variants()
        check_memory_key_space(getattr(self.memory, "key_space", "none"), self.config)
        self._check_augmentation_matches()

    def _fit_key_space(self, keys: torch.Tensor, statistics: dict | None = None) -> tuple[torch.Tensor, dict | None]:
        """Raw memory keys `(N, D)` -> the keys to store, in the config's key space, and the statistics used
        (`"standardize"` / `"whiten"`: fitted on `keys` unless `statistics` are given; else `None`). Changes nothing on
        the model."""
        self._check_key_variants()
        mode = self.config.key_normalization
        if mode in STATISTICS_MODES and statistics is None:
            statistics = fit_key_statistics(keys, mode)
        statistics = statistics if mode in STATISTICS_MODES else None
        return normalize_keys(keys, mode, statistics), statistics

    def _set_key_space(self, statistics: dict | None) -> None:
        """Record on the config and the (new) memory the key space its keys were stored in."""
        if self.config.key_statistics is not None or statistics is not None:
            self.config.key_statistics = statistics
        if hasattr(self.memory, "key_space"):
            self.memory.key_space = key_space_id(self.config.key_normalization, statistics)

    def _keys_for_memory(self, keys: torch.Tensor, fit: bool = False) -> torch.Tensor:
        """Keys `(n, D)` to append to the memory (`add_to_memory`): in its key space; `fit`: the memory is empty,
        so they define it (as a build does)."""
        if not fit:
            return self.memory_queries(keys)
        keys, statistics = self._fit_key_space(keys)
        self._set_key_space(statistics)
        return keys

    def memory_queries(self, keys: torch.Tensor) -> torch.Tensor:
        """Raw keys `(B, D)` of inputs -> queries in the memory's key space (`config.key_normalization`); the raw
        keys themselves by default. Refuses (naming `build_memory`) a memory stored in another key space."""
        config = self.config
        if config.key_normalization == "none" and getattr(self.memory, "key_space", "none") == "none":
            return keys
        check_memory_key_space(getattr(self.memory, "key_space", "none"), config)
        return normalize_keys(keys, config.key_normalization, config.key_statistics)

    @torch.inference_mode()
    def build_memory(
        self,
        dataset,
        batch_size: int = 256,
        label_column: str = "label",
        image_column: str | None = None,
        image_processor=None,
        transform=None,
        accelerator=None,
        progress: bool = True,
        residual_model=None,
        augment: str | None = None,
        residual_fold: str | None = None,
        **read_kwargs,
    ) -> ResidualMemory:
        """Embed every training example and store its key, base logits and label.

        Args:
            dataset: `datasets.Dataset` (or `IterableDataset`) with `label_column` and either
                `pixel_values` or images (then pass `image_processor` or `transform`).
            batch_size: examples per forward pass.
            accelerator: an `accelerate.Accelerator` (or `PartialState`) to split the work over its
                processes; detected from `torch.distributed` when omitted. Every rank embeds a
                contiguous shard and ends with the same full memory (identical to a one-process
                build); save with `model.save_pretrained(folder, is_main_process=accelerator.is_main_process)`.
            progress: show a progress bar (main process only; also hidden by
                `transformers.utils.logging.disable_progress_bar()`).
            read_kwargs: how the text / audio subclasses read their inputs (`tokenizer=`, `text_column=`;
                `feature_extractor=`, `audio_column=`); an image classifier takes none.
            residual_model: another classifier with the same labels (e.g. an earlier checkpoint of the base, or a
                model fitted on other data): the stored logits, hence the residuals, are its logits on each example
                (out-of-sample residuals); keys stay the base's. Recorded in `config.memory_dataset["residual_model"]`;
                `add_to_memory` then needs the same model again. See `resmem.augmentation`. Cross-fitting: a list
                `[model_a, model_b]` with `residual_fold="fold"`, an integer column of the data: rows with fold 0 get
                `model_a`'s logits, fold 1 `model_b`'s (e.g. each model trained on the other half).
            augment: `"hflip"` also stores each image's horizontally flipped copy (same label and example id);
                `"none"` the paper's memory; `None` (default) keeps `config.memory_augmentation`, which is set to it.
        Returns:
            The filled [`ResidualMemory`] (`len(model.memory)` entries). An exception leaves the
            previous memory untouched.
        """
        augment = self.config.memory_augmentation if augment is None else augment
        check_augmentation(augment, "augment", self.config.task)
        if augment != "none" and is_regression(self.base.config):
            raise ValueError("augment= applies to classifier memories; for a regression model build with augment=\"none\".")
        keys, logits, labels, example_ids = self.embed_dataset(
            dataset, batch_size, label_column, image_column, image_processor, transform, accelerator, progress,
            residual_model=residual_model, augment=augment, residual_fold=residual_fold, **read_kwargs
        )
        new_memory = memory_class(self.base.config)  # ResidualMemory, or RegressionMemory for a regressor
        # an on-disk one is replaced, and so is one with another id rule (augmentation), so a failure leaves it untouched
        reuse = isinstance(self.memory, new_memory) and self.memory.augmentation == augment
        memory = self.memory if reuse else new_memory()
        memory.augmentation = augment
        # The final keys of ALL entries (N, D) into the config's key space ("standardize": statistics fitted on them);
        # unchanged for "none". Keep it right before set_entries: entries added to `keys` above must be included.
        keys, key_statistics = self._fit_key_space(keys)
        memory.set_entries(
            keys, logits, labels, example_ids, fingerprint=base_fingerprint(self.base), layer=self.config.layer
        )
        self.memory = memory
        self._set_key_space(key_statistics)
        self._record_build(dataset)
        self.config.memory_augmentation = augment
        if augment != "none":
            self.config.memory_dataset["augmentation"] = augment
        if residual_model is not None:
            models = residual_models(residual_model, residual_fold, self.base)
            self.config.memory_dataset["residual_model"] = describe_residual_models(models, residual_fold)
        return self.memory

    def add_to_memory(self, dataset, example_ids=None, residual_model=None, **embed_kwargs):
        """Embed `dataset` and append its entries, as `build_memory` built the memory's (see [`ResMemWrapper.add_to_memory`]).

        A memory whose residuals came from a `residual_model` needs that same model again (checked by its weights
        fingerprint); an augmented memory (`config.memory_augmentation="hflip"`) also gets the flipped copies.
        """
        from .augmentation import check_residual_model_for_add

        check_residual_model_for_add(self.config.memory_dataset, residual_model, embed_kwargs.get("residual_fold"))
        if len(self.memory) == 0 and not isinstance(self.memory, OnDiskMemory):  # an empty memory takes the config's rule
            self.memory.augmentation = self.config.memory_augmentation
        self._check_augmentation_matches()
        return super().add_to_memory(
            dataset, example_ids, residual_model=residual_model, augment=self.config.memory_augmentation, **embed_kwargs
        )

    def _check_augmentation_matches(self) -> None:
        """The memory's entries must have been built with `config.memory_augmentation` (never mix the two)."""
        built = getattr(self.memory, "augmentation", "none")
        if built != self.config.memory_augmentation:
            raise ValueError(
                f"config.memory_augmentation is {self.config.memory_augmentation!r} but the memory was built with "
                f"augment={built!r}: set it back (`model.config.memory_augmentation = {built!r}`) or rebuild with "
                f"`model.build_memory(dataset, augment={self.config.memory_augmentation!r})`."
            )

    @torch.inference_mode()
    def build_memory_on_disk(
        self, dataset, folder: str, chunk_rows: int = 100_000, shard_size: int = 500_000, accelerator=None, **embed_kwargs
    ) -> OnDiskMemory:
        """Like `build_memory`, for memories larger than RAM: entries are written to safetensors shards in
        `folder` as chunks of `chunk_rows` examples are embedded, and the memory is then memory-mapped.

        Under several processes each chunk is embedded by all ranks (contiguous shards) and written by
        the main process only. `embed_kwargs` as for `build_memory`.
        """
        from .memory_disk import MemoryWriter

        if embed_kwargs.get("residual_model") is not None or embed_kwargs.get("augment", "none") != "none" or (
            self.config.memory_augmentation != "none"
        ):
            raise ValueError("build_memory_on_disk does not yet store residuals of a residual_model or augmented copies: "
                             "use `model.build_memory(dataset, residual_model=..., augment=...)` (in RAM), or set "
                             "`model.config.memory_augmentation = \"none\"`.")
        if is_regression(self.base.config):
            raise ValueError("build_memory_on_disk stores classifier memories only; for a regression model use "
                             "`model.build_memory(dataset)` (in RAM).")
        check_batch_size(embed_kwargs.get("batch_size", 256))
        info = process_info(accelerator)
        length = dataset_length(dataset)
        # The same-data check runs before the folder is touched; each step below exchanges ok/error flags,
        # so a failure on any rank (a bad label in its shard, a full disk on the writer) stops every rank.
        settings = {"chunk_rows": chunk_rows, "shard_size": shard_size}  # a chunk count per rank would desync them
        with DistributedBuild(info, dataset, what="on-disk memory build", settings=settings) as build:
            if not length:
                raise ValueError("build_memory_on_disk needs a non-empty map-style dataset (its length must be known).")
            writer = None
            if info.is_main_process:
                writer = MemoryWriter(folder, base_fingerprint(self.base), self.config.layer, shard_size=shard_size)
            key_statistics = None
            for start in range(0, length, chunk_rows):
                chunk = dataset.select(range(start, min(length, start + chunk_rows)))
                keys, logits, labels, rows = self.embed_dataset(chunk, accelerator=info, **embed_kwargs)
                # "standardize" / "whiten": the statistics of the FIRST chunk (up to chunk_rows entries) serve every chunk,
                # since the earlier chunks are already on disk when later ones are embedded.
                keys, key_statistics = self._fit_key_space(keys, key_statistics if start else None)
                if writer is not None and start == 0 and self.config.key_normalization != "none":
                    writer.metadata["key_space"] = key_space_id(self.config.key_normalization, key_statistics)  # manifest
                if writer is not None:
                    writer.add(keys, logits, labels, rows + start)
            if writer is not None:
                writer.close()
            build.sync(step="memory written")  # the other ranks open the folder only once the manifest exists
            memory = OnDiskMemory.open(folder)  # inside the guard: a rank that cannot read the folder stops all
        self.memory = memory
        self._set_key_space(key_statistics)
        self._record_build(dataset)
        return self.memory

    def tune(
        self,
        val_dataset,
        k=None,
        sigma=None,
        temperature=None,
        objective: str = "accuracy",
        max_fpr: float = 0.05,
        batch_size: int = 256,
        **kwargs,
    ):
        """Grid-search `k`, `sigma`, `temperature` on a validation set with ONE neighbour search.

        Sets the best values on `self.config` and returns the full table; see [`resmem.tuning.tune`]
        for every argument (`objective="accuracy"` or `"conservative"`: max TPR with FPR < `max_fpr`;
        `sigma="auto"`: `sigma_scale(val_dataset) * (0.25, 0.5, 1, 2, 4)`; `progress=False` hides the bar).

        Example:

        ```python
        >>> result = model.tune(val_ds, k=[10, 20, 50], sigma=[0.3, 0.7, 1.0], temperature=[1.0, 1.4])
        >>> result.best["k"] == model.config.k
        True
        ```
        """
        if is_regression(self.base.config):  # validation MSE; the classifier default "accuracy" means "the default"
            from .regression import tune_regression

            if self.config.query_augmentation != "none":
                raise ValueError("tune of a regressor does not score query_augmentation='hflip': set "
                                 "model.config.query_augmentation = 'none' to tune it.")
            if kwargs.get("sigma_mode") not in (None, "absolute", ["absolute"]):
                raise ValueError("sigma_mode='relative' is implemented for classifiers; a regressor is tuned with the "
                                 "absolute sigma: drop sigma_mode from tune.")
            kwargs.pop("sigma_mode", None)
            return tune_regression(self, val_dataset, k, sigma, temperature, "mse" if objective == "accuracy" else objective,
                                   batch_size=batch_size, **kwargs)
        from .tuning import tune

        return tune(self, val_dataset, k, sigma, temperature, objective, max_fpr, batch_size, **kwargs)

    def _sample_queries(
        self, data, sample_size, generator, batch_size: int = 256, progress: bool = False, **read_kwargs
    ) -> torch.Tensor:
        """Keys `(S, D)` of up to `sample_size` rows of `data` (seeded random rows; a stream's first rows)."""
        length = dataset_length(data)
        if length is None:
            subset = data.take(sample_size)  # a streaming dataset: its first rows
        elif length > sample_size:
            rows = torch.randperm(length, generator=generator)[:sample_size].sort().values  # (S,)
            subset = data.select(rows.tolist()) if hasattr(data, "select") else [data[i] for i in rows.tolist()]
        else:
            subset = data
        keys = self.embed_dataset(subset, batch_size, progress=progress, **read_kwargs)[0]  # (S, D)
        return self.memory_queries(keys)  # (S, D) in the memory's key space

    # Reading inputs: the only part the text and audio classifiers (modeling_text.py, modeling_audio.py) override.
    def _batch_reader(
        self, batch_size: int, label_column: str = "label", image_column=None, image_processor=None, transform=None,
        **read_kwargs,
    ):
        """A function `dataset -> iterator of batches` (`resmem.data.ImageBatch`) for `embed_dataset`, `tune`, `predict`."""
        if read_kwargs:
            raise ValueError(
                f"{', '.join(sorted(read_kwargs))} do not apply to an image classifier: pass `pixel_values` or images "
                "with `image_processor=` / `transform=` (text and audio classifiers take `tokenizer=` / `feature_extractor=`)."
            )
        return functools.partial(
            image_batches, batch_size=batch_size, label_column=label_column, image_column=image_column,
            image_processor=image_processor, transform=transform, float_labels=is_regression(self.base.config),
        )

    def _base_inputs(self, batch) -> dict:
        """The base model's keyword inputs for one batch of `_batch_reader`, on the model's device."""
        return {"pixel_values": batch.pixel_values.to(self.device, self.dtype)}

    def _check_channels(self, pixel_values: torch.Tensor | None) -> None:
        """Name the fix when pixel values have another channel count than the base model's `num_channels`."""
        expected = getattr(self.base.config, "num_channels", None)
        if pixel_values is None or pixel_values.dim() != 4 or expected is None or pixel_values.shape[1] == expected:
            return
        raise ValueError(
            f"pixel_values have {pixel_values.shape[1]} channels but the base model expects {expected}. "
            + (
                "`pipeline(\"image-classification\")` converts every PIL image or path to RGB before the image "
                "processor: pass the images as (H, W, 1) numpy arrays instead, which the pipeline hands to the "
                "processor unchanged, e.g. `pipe([np.asarray(im.convert(\"L\"))[..., None] for im in images])`, with "
                "an image processor whose image_mean / image_std have one value each. "
                if expected == 1
                else ""
            )
            + "Use the image processor (and channel layout) the base model was trained with."
        )

    def _flipped_queries(self, pixel_values: torch.Tensor | None, capture) -> torch.Tensor:
        """Keys `(B, D)` of the horizontally flipped queries (`config.query_augmentation="hflip"`)."""
        if pixel_values is None:
            raise ValueError("query_augmentation='hflip' flips pixel_values: pass them, or set "
                             "model.config.query_augmentation = 'none'.")
        with capture:
            self.base(pixel_values=hflip(pixel_values))
        return per_example_keys(capture.get(), pixel_values.shape[0], self.config.layer)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_neighbors: bool = False,
        **kwargs,
    ) -> ResMemImageClassifierOutput:
        """
        Args:
            pixel_values: `(B, C, H, W)` as the base model expects them.
            labels: `(B,)` optional class ids; then `loss` is their NLL under `logits` (mean over the batch, or
                the sum divided by `num_items_in_batch` when the `Trainer` passes it for gradient accumulation).
            output_neighbors: also return each query's k neighbours (`neighbor_*` fields, `(B, k)`), taken from
                the forward's own search; off by default (then nothing extra is computed).
            return_dict: `False` returns `to_tuple()` (default `config.return_dict`).
        Returns:
            [`ResMemImageClassifierOutput`] with `scores`, `logits`, `base_logits`, `residual` `(B, C)`.
        """
        self._check_ready()
        self._warn_if_training()
        config = self.config
        self._check_channels(pixel_values)
        capture = EmbeddingCapture(self.base, config.layer)
        base_kwargs = dict(kwargs)
        if output_hidden_states is not None:
            base_kwargs["output_hidden_states"] = output_hidden_states
        if output_attentions is not None:
            base_kwargs["output_attentions"] = output_attentions
        if pixel_values is not None:  # text / audio subclasses pass their inputs in `kwargs` instead
            base_kwargs["pixel_values"] = pixel_values
        with capture:
            base_out = self.base(**base_kwargs)
        base_logits = base_out.logits  # (B, C)
        queries = self.memory_queries(per_example_keys(capture.get(), base_logits.shape[0], config.layer))  # (B, D)
        neighbors = {}
        regression = is_regression(self.base.config)
        if regression and config.residual_space != "probability":
            raise ValueError("residual_space='logit' applies to classifiers; a regressor adds y - f(x) to f(x): set "
                             "model.config.residual_space = 'probability'.")
        if config.query_augmentation != "none" and (output_neighbors or config.residual_space == "logit"):
            raise ValueError("query_augmentation='hflip' is available without output_neighbors and with "
                             "residual_space='probability' only: call the forward without output_neighbors=True, or set "
                             "model.config.query_augmentation = 'none'.")
        if output_neighbors and (regression or config.residual_space == "logit"):
            raise ValueError("output_neighbors=True is available for classifiers with residual_space='probability' only "
                             "(not yet for regressors or logit-space residuals): call the forward without it.")
        if config.residual_space == "logit":  # log-likelihood-ratio residuals: scores = exp(logits), no clamp
            from .logit_residuals import logit_outputs

            residual, scores, logits = logit_outputs(self.memory, queries, base_logits, config)  # (B, C) each
        else:
            if output_neighbors:  # the same residual plus the neighbours, from the same single search
                from .explain import classifier_residual_and_neighbors, neighbor_fields

                residual, found = classifier_residual_and_neighbors(
                    self.memory, queries, config.k, config.sigma, config.residual_temperature, config.index,
                    config.index_params, sigma_mode=config.sigma_mode,
                )  # (B, C)
            elif config.query_augmentation == "hflip":  # mean residual of x and flip(x), from ONE search of 2B queries
                flipped = self.memory_queries(self._flipped_queries(pixel_values, capture))  # (B, D), same key space
                residual = self.memory.residual_for(
                    torch.cat([queries, flipped]), config.k, config.sigma, config.residual_temperature, config.index,
                    config.index_params, **({} if config.sigma_mode == "absolute" else {"sigma_mode": config.sigma_mode}),
                ).view(2, queries.shape[0], -1).mean(dim=0)  # (B, C)
            else:
                residual = self.memory.residual_for(
                    queries, config.k, config.sigma, config.residual_temperature, config.index, config.index_params,
                    **({} if config.sigma_mode == "absolute" else {"sigma_mode": config.sigma_mode}),
                )  # (B, C)
            if regression:  # paper Remark 3.1: f(x) + r_kNN(x), no softmax
                prediction = regression_prediction(base_logits, residual)  # (B, C)
                loss = None if labels is None else regression_loss(prediction, labels, kwargs.get("num_items_in_batch"))
                return ResMemImageClassifierOutput(
                    loss=loss, logits=prediction, base_logits=base_logits, residual=residual,
                    hidden_states=getattr(base_out, "hidden_states", None),
                    attentions=getattr(base_out, "attentions", None),
                )
            scores = resmem_scores(base_logits, residual, config.residual_temperature)  # (B, C)
            if output_neighbors:
                neighbors = neighbor_fields(found, scores.argmax(dim=-1), scores.shape[:1])  # (B, k) each
            logits = scores_to_logits(scores, config.score_floor)  # (B, C)
        loss = None
        if labels is not None:
            # `logits` are log-probabilities (each row's logsumexp is 0), so the cross-entropy transformers'
            # classifiers use is their NLL.
            loss = fixed_cross_entropy(
                logits, labels.to(logits.device).long(), num_items_in_batch=kwargs.get("num_items_in_batch")
            )
        return ResMemImageClassifierOutput(
            loss=loss,
            logits=logits,
            scores=scores,
            base_logits=base_logits,
            residual=residual,
            hidden_states=getattr(base_out, "hidden_states", None),
            attentions=getattr(base_out, "attentions", None),
            **neighbors,
        )
