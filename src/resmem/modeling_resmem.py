"""`ResMemWrapper`: a `PreTrainedModel` that adds a residual memory to any HF base model."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForImageClassification, PreTrainedModel
from transformers.utils import ModelOutput, logging

from .configuration_resmem import TASK_CAUSAL_LM, TASK_IMAGE_CLASSIFICATION, ResMemConfig, validate_hyperparameters
from .data import dataset_length, image_batches
from .hooks import EmbeddingCapture, default_classifier_layer, per_example_keys, resolve_module
from .distributed import gather_rows, process_info, shard_dataset
from .hub import CARD_FILE, INDEX_FILE, MEMORY_FILE, OWNED_FILE_PREFIXES, base_fingerprint, resolve_file, upload_files
from .memory import MemoryFileError, ResidualMemory
from .memory_disk import MANIFEST_FILE, OnDiskMemory, shard_file_names
from .residuals import resmem_scores, scores_to_logits

logger = logging.get_logger(__name__)

# Arguments of `from_pretrained` that locate files; forwarded when fetching the memory file.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
# Arguments of `save_pretrained(push_to_hub=True)` that go to the upload, not to the files.
_PUSH_KWARGS = ("repo_id", "token", "private", "revision", "create_pr", "commit_message", "commit_description")


@dataclass
class ResMemImageClassifierOutput(ModelOutput):
    """Output of [`ResMemForImageClassification`].

    Args:
        loss: negative log-likelihood of `labels` under `logits` (when labels are given).
        logits: `(B, C)` `log(renormalise(clamp(scores, score_floor)))`; its argmax is the scores' argmax.
        scores: `(B, C)` paper eq. 3, `softmax(base_logits / T) + residual`.
        base_logits: `(B, C)` the base model's logits.
        residual: `(B, C)` the weighted residual of the k nearest memory entries.
        hidden_states, attentions: passed through from the base model when requested.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    scores: torch.FloatTensor | None = None
    base_logits: torch.FloatTensor | None = None
    residual: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def infer_task(base_model: nn.Module) -> str:
    """`"causal-lm"` for models that can generate, `"image-classification"` otherwise."""
    can_generate = getattr(base_model, "can_generate", None)
    return TASK_CAUSAL_LM if callable(can_generate) and can_generate() else TASK_IMAGE_CLASSIFICATION


class ResMemWrapper(PreTrainedModel):
    r"""
    A base model plus a k-nearest-neighbour memory of its residuals on the training set
    (Yang et al., "ResMem: Learn what you can and memorize the rest").

    `ResMemWrapper(config)`, `ResMemWrapper.from_base(...)` and `ResMemWrapper.from_pretrained(...)`
    return the task's subclass ([`ResMemForImageClassification`] or `ResMemForCausalLM`) chosen by
    `config.task`.

    Example:

    ```python
    >>> import resmem
    >>> from resmem import ResMemWrapper
    >>> model = ResMemWrapper.from_base(base_model, k=53, sigma=0.7, temperature=1.4)
    >>> model.build_memory(train_dataset, batch_size=256)
    >>> out = model(pixel_values=x)           # out.scores, out.logits, out.base_logits, out.residual
    >>> model.save_pretrained("my-resmem")    # weights + config + memory
    >>> model = ResMemWrapper.from_pretrained("my-resmem")
    ```
    """

    config_class = ResMemConfig
    base_model_prefix = "base"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __new__(cls, config: ResMemConfig | None = None, *args, **kwargs):
        # `ResMemWrapper(config)` builds the task's subclass; `config` is optional so that
        # copy.deepcopy / pickle (which call `cls.__new__(cls)`) keep working.
        if cls is ResMemWrapper and config is not None:
            cls = task_class(config.task)
        return super().__new__(cls)

    def __init__(self, config: ResMemConfig, base_model: PreTrainedModel | None = None):
        super().__init__(config)
        if base_model is None:
            base_model = self.auto_class_for_base().from_config(config.base_config)
        else:
            # The base is already trained: keep `post_init` from re-initialising any of its modules.
            for module in base_model.modules():
                module._is_hf_initialized = True
        self.base = base_model
        self.memory = ResidualMemory()
        self.memory.attach(self)
        self.post_init()

    # ------------------------------------------------------------------ construction
    @classmethod
    def auto_class_for_base(cls):
        raise NotImplementedError

    @classmethod
    def default_layer(cls, base_model: nn.Module, config: ResMemConfig) -> str:
        raise NotImplementedError

    @classmethod
    def from_base(
        cls,
        base_model: PreTrainedModel,
        k: int = 50,
        sigma: float = 1.0,
        temperature: float = 1.0,
        layer: str | None = None,
        task: str | None = None,
        **config_kwargs,
    ) -> "ResMemWrapper":
        """Wrap a trained base model (its weights are used as they are, never copied or re-initialised).

        Args:
            base_model: any `AutoModelForImageClassification` / `AutoModelForCausalLM` model.
            k, sigma, temperature: ResMem hyperparameters (see [`ResMemConfig`]).
            layer: module whose output (or `":input"`) is the key; `None` = the task default.
            task: `"image-classification"` or `"causal-lm"`; inferred from the base when `None`.
        """
        if not isinstance(base_model, PreTrainedModel):
            raise TypeError(
                f"base_model must be a transformers PreTrainedModel, got {type(base_model).__name__}. "
                "Wrap your torch module in a PreTrainedModel subclass with its own config."
            )
        task = task or infer_task(base_model)
        target = task_class(task)
        if cls is not ResMemWrapper and not issubclass(target, cls):
            raise TypeError(f"{cls.__name__}.from_base got a {task} model; use ResMemWrapper.from_base.")
        # Deep-copy: sharing the base's config object resets its attention implementation (STACK-NOTES).
        base_config = copy.deepcopy(base_model.config)
        config = ResMemConfig(
            base_config=base_config, task=task, k=k, sigma=sigma, temperature=temperature, layer=layer, **config_kwargs
        )
        config.id2label, config.label2id = base_config.id2label, base_config.label2id
        config.layer = layer if layer is not None else target.default_layer(base_model, config)
        resolve_module(base_model, config.layer)
        wrapper = target(config, base_model=base_model)
        return wrapper.to(base_model.device).train(base_model.training)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, check_memory_fingerprint: bool = True, **kwargs):
        """Load weights, config and memory saved by `save_pretrained` (local folder, HF cache or Hub).

        Args:
            check_memory_fingerprint: refuse a memory whose stored fingerprint differs from the loaded
                base weights (default). Set to `False` only when you changed the weights on purpose
                (e.g. loading in another dtype) and accept residuals computed with the old ones.
        """
        hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
        if cls is ResMemWrapper:
            config = kwargs.pop("config", None)
            if not isinstance(config, ResMemConfig):
                config = ResMemConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
            return task_class(config.task).from_pretrained(
                pretrained_model_name_or_path,
                *model_args,
                config=config,
                check_memory_fingerprint=check_memory_fingerprint,
                **kwargs,
            )
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model._load_memory(pretrained_model_name_or_path, hub_kwargs, check_memory_fingerprint)
        return model

    def _load_memory(self, path_or_repo, hub_kwargs: dict, check_fingerprint: bool) -> None:
        self.memory.to(self.device)
        if not self.config.memory_size:
            return
        manifest = resolve_file(str(path_or_repo), MANIFEST_FILE, **hub_kwargs)
        if manifest is not None:  # a sharded, memory-mapped memory
            with open(manifest) as f:
                names = shard_file_names(json.load(f)) + [INDEX_FILE]
            files = {MANIFEST_FILE: manifest}
            for name in names:
                local = resolve_file(str(path_or_repo), name, **hub_kwargs)
                if local is not None:
                    files[name] = local
            self.memory = OnDiskMemory.open(os.path.dirname(manifest), files=files)
            self.memory.attach(self)
            path = manifest
        else:
            path = resolve_file(str(path_or_repo), MEMORY_FILE, **hub_kwargs)
        if path is None:
            raise MemoryFileError(
                f"{path_or_repo} has a config for a {self.config.memory_size}-entry memory but no {MEMORY_FILE}. "
                "Copy the memory file next to the weights (on the Hub: upload it to the repo, e.g. with "
                "`model.push_to_hub(repo_id)`), or rebuild it with `model.build_memory(dataset)`."
            )
        if manifest is None:
            index_path = resolve_file(str(path_or_repo), INDEX_FILE, **hub_kwargs)
            self.memory.load(path, index_path=index_path)
        if len(self.memory) != self.config.memory_size:
            raise MemoryFileError(
                f"{MEMORY_FILE} holds {len(self.memory)} entries but the config says {self.config.memory_size}: "
                "the files come from different saves. Save the model again."
            )
        if check_fingerprint:
            actual = base_fingerprint(self.base)
            if actual != self.memory.fingerprint:
                raise MemoryFileError(
                    f"The memory in {path_or_repo} was built for base weights with fingerprint "
                    f"{self.memory.fingerprint[:12]}..., but the loaded weights have {actual[:12]}... . A memory only "
                    "fits the weights it was built from: rebuild it with `model.build_memory(dataset)`, or pass "
                    "`check_memory_fingerprint=False` if you changed the weights on purpose (e.g. another dtype)."
                )

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self,
        save_directory,
        is_main_process: bool = True,
        push_to_hub: bool = False,
        model_card: bool = True,
        model_card_template: str | None = None,
        **kwargs,
    ):
        """Save weights, config, memory and model card into `save_directory` without ever damaging an earlier save there.

        Everything is written to a temporary folder beside the target first and moved in only when
        every file has been written, so an exception during the save leaves the earlier files intact.

        Args:
            push_to_hub: then upload the files of this save in ONE commit to `repo_id` (default: the
                folder's name); `token`, `private`, `revision`, `create_pr`, `commit_message` are honoured.
            model_card: write `README.md` (settings, memory, data, latest evaluation; see `resmem.model_card`).
            model_card_template: path of a custom Jinja2 card template.
        """
        hub_args = {key: kwargs.pop(key, None) for key in _PUSH_KWARGS}
        tags = kwargs.pop("tags", None)
        if not is_main_process:
            return
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory} is a file; pass a folder path.")
        if len(self.memory) and self.memory.fingerprint != base_fingerprint(self.base):
            raise ValueError(
                "The base weights changed since `build_memory`, so the stored residuals no longer match them. "
                "Call `model.build_memory(dataset)` again before saving."
            )
        self.config.memory_size = len(self.memory)
        self.config.base_config = copy.deepcopy(self.base.config)
        target = os.path.abspath(save_directory)
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        repo_id = hub_args["repo_id"] or (os.path.basename(target) if push_to_hub else None)
        staging = tempfile.mkdtemp(prefix=".resmem-save-", dir=parent)
        try:
            super().save_pretrained(staging, is_main_process=True, push_to_hub=False, token=hub_args["token"], **kwargs)
            if isinstance(self.memory, OnDiskMemory):
                self.memory.save_folder(staging)
            elif len(self.memory):
                self.memory.save(os.path.join(staging, MEMORY_FILE), index_path=os.path.join(staging, INDEX_FILE))
            if model_card:
                from .model_card import write_card

                write_card(self, os.path.join(staging, CARD_FILE), template=model_card_template, repo_id=repo_id, tags=tags)
            written = _move_into(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if push_to_hub:
            # Upload only now that every file exists (super().save_pretrained(push_to_hub=True) would
            # upload before the memory file and the card are written).
            from huggingface_hub import HfApi

            repo_id = HfApi(token=hub_args["token"]).create_repo(
                repo_id, private=hub_args["private"], token=hub_args["token"], exist_ok=True
            ).repo_id
            return upload_files(
                target,
                written,
                repo_id,
                token=hub_args["token"],
                revision=hub_args["revision"],
                create_pr=bool(hub_args["create_pr"]),
                commit_message=hub_args["commit_message"],
                commit_description=hub_args["commit_description"],
            )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
        model_card_template: str | None = None,
    ):
        """Upload weights, config, memory file and model card to the Hub in ONE commit.

        Unlike `transformers`' `push_to_hub`, the card is this model's own (settings, memory, data,
        latest evaluation), written by `save_pretrained`, not the generic or remote one.

        Args:
            repo_id: `"org/name"` (created if missing).
            tags: extra tags for the card's metadata.
        Returns:
            The `huggingface_hub.CommitInfo` of the commit.
        """
        from huggingface_hub import HfApi

        repo_id = HfApi(token=token).create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(
                folder, max_shard_size=max_shard_size, repo_id=repo_id, tags=tags, model_card_template=model_card_template
            )
            return upload_files(
                folder,
                os.listdir(folder),
                repo_id,
                token=token,
                revision=revision,
                create_pr=create_pr,
                commit_message=commit_message,
                commit_description=commit_description,
            )

    # ------------------------------------------------------------------ editing the memory
    def add_to_memory(self, dataset, example_ids=None, **embed_kwargs) -> ResidualMemory:
        """Embed `dataset` and append its entries to the memory (see `ResidualMemory.add`).

        Args:
            example_ids: ids of the new entries (default: after the largest existing id).
            embed_kwargs: as for `build_memory` (`batch_size`, `label_column`, `image_processor`, ...).
        """
        self.memory.attach(self)
        if len(self.memory) and self.memory.fingerprint != base_fingerprint(self.base):
            raise ValueError(
                "The base weights changed since the memory was built, so new residuals would not match the stored "
                "ones. Rebuild the memory with `model.build_memory(dataset)` instead."
            )
        if len(self.memory) == 0:
            self.memory.fingerprint, self.memory.layer = base_fingerprint(self.base), self.config.layer
        self.memory.add(dataset, example_ids=example_ids, **embed_kwargs)
        self.config.memory_size = len(self.memory)
        return self.memory

    def remove_from_memory(self, example_ids) -> int:
        """Forget the entries built from the given source example ids; returns how many were removed."""
        removed = self.memory.remove(example_ids)
        self.config.memory_size = len(self.memory)
        return removed

    # ------------------------------------------------------------------ shared helpers
    def _record_build(self, dataset) -> None:
        """Note the new memory's size and source on the config (for the model card)."""
        from .model_card import describe_dataset

        self.config.memory_size = len(self.memory)
        self.config.memory_dataset = describe_dataset(dataset)
        self.config.last_evaluation = None  # measured with the previous memory

    def _check_ready(self) -> None:
        validate_hyperparameters(self.config.k, self.config.sigma, self.config.temperature)
        if len(self.memory) == 0:
            raise ValueError("The memory is empty: call `model.build_memory(train_dataset)` before the forward pass.")
        if self.memory.layer and self.memory.layer != self.config.layer:
            raise ValueError(
                f"The memory was built with keys from layer {self.memory.layer!r} but config.layer is "
                f"{self.config.layer!r}: set it back or rebuild the memory."
            )

    def _progress(self, iterable, total: int | None, desc: str, main_process: bool = True):
        from transformers.utils.logging import is_progress_bar_enabled, tqdm

        return tqdm(iterable, total=total, desc=desc, unit="batch", disable=not (is_progress_bar_enabled() and main_process))


def _move_into(staging: str, target: str) -> list[str]:
    """Move every file of `staging` into `target`, drop files an earlier save left that this one did not write;
    return the names written."""
    os.makedirs(target, exist_ok=True)
    written = set(os.listdir(staging))
    for name in written:
        os.replace(os.path.join(staging, name), os.path.join(target, name))
    for name in os.listdir(target):
        if name not in written and name.startswith(OWNED_FILE_PREFIXES) and os.path.isfile(os.path.join(target, name)):
            os.remove(os.path.join(target, name))
    return sorted(written)


class ResMemForImageClassification(ResMemWrapper):
    """ResMem over any `AutoModelForImageClassification` base; keys default to the pre-logit features."""

    main_input_name = "pixel_values"

    @classmethod
    def auto_class_for_base(cls):
        return AutoModelForImageClassification

    @classmethod
    def default_layer(cls, base_model, config) -> str:
        return default_classifier_layer(base_model, base_model.config.num_labels)

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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, base logits, labels and row numbers of every example of `dataset`, in dataset order.

        Under several processes (an `accelerator`, or an initialised `torch.distributed` group) each
        rank embeds a contiguous shard and the shards are gathered in rank order, so every rank gets
        exactly what a single process would compute. Arguments as for `build_memory`.

        Returns:
            `keys (N, D)`, `base_logits (N, C)` float32, `labels (N,)`, `row_ids (N,)` int64, on the model's device.
        """
        info = process_info(accelerator)
        length = dataset_length(dataset)
        if length == 0:
            raise ValueError("The dataset is empty: the memory needs at least one example.")
        shard, first_row = shard_dataset(dataset, info)
        num_labels = self.base.config.num_labels
        capture = EmbeddingCapture(self.base, self.config.layer)
        was_training = self.training
        self.eval()
        keys, logits, labels, example_ids = [], [], [], []
        shard_length = dataset_length(shard)
        total = math.ceil(shard_length / batch_size) if shard_length else None
        try:
            if shard_length != 0:
                batches = image_batches(shard, batch_size, label_column, image_column, image_processor, transform)
                for batch in self._progress(batches, total, "Embedding for ResMem memory", info.is_main_process):
                    bad = (batch.labels < 0) | (batch.labels >= num_labels)
                    if bad.any():
                        raise ValueError(
                            f"Labels must lie in [0, {num_labels}) for this base model; found {batch.labels[bad][:5].tolist()} "
                            f"in column {label_column!r}. Map them to class ids first (e.g. `dataset.class_encode_column`)."
                        )
                    with capture:
                        out = self.base(pixel_values=batch.pixel_values.to(self.device, self.dtype))
                    z = per_example_keys(capture.get(), batch.labels.shape[0], self.config.layer)  # (B, D)
                    if not torch.isfinite(z).all() or not torch.isfinite(out.logits).all():
                        ids = batch.example_ids + first_row
                        raise ValueError(
                            f"Layer {self.config.layer!r} or the logits contain NaN/inf for examples "
                            f"{ids[0].item()}..{ids[-1].item()}; check the inputs' "
                            "normalisation and the model's dtype, or pick another layer."
                        )
                    keys.append(z.float())
                    logits.append(out.logits.float())
                    labels.append(batch.labels)
                    example_ids.append(batch.example_ids + first_row)
        finally:
            self.train(was_training)
        parts = [torch.cat(p) if p else None for p in (keys, logits, labels, example_ids)]
        if info.distributed:
            parts = [gather_rows(p, info) for p in parts]
        return tuple(p.to(self.device) for p in parts)

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
        Returns:
            The filled [`ResidualMemory`] (`len(model.memory)` entries). An exception leaves the
            previous memory untouched.
        """
        keys, logits, labels, example_ids = self.embed_dataset(
            dataset, batch_size, label_column, image_column, image_processor, transform, accelerator
        )
        self.memory.set_entries(
            keys, logits, labels, example_ids, fingerprint=base_fingerprint(self.base), layer=self.config.layer
        )
        self.memory.attach(self)
        self._record_build(dataset)
        return self.memory

    @torch.inference_mode()
    def build_memory_on_disk(
        self, dataset, folder: str, chunk_rows: int = 100_000, shard_size: int = 500_000, accelerator=None, **embed_kwargs
    ) -> OnDiskMemory:
        """Like `build_memory`, for memories larger than RAM: entries are written to safetensors shards in
        `folder` as chunks of `chunk_rows` examples are embedded, and the memory is then memory-mapped.

        Under several processes each chunk is embedded by all ranks (contiguous shards) and written by
        the main process only. `embed_kwargs` as for `build_memory`.
        """
        from .distributed import process_info
        from .memory_disk import MemoryWriter

        info = process_info(accelerator)
        length = dataset_length(dataset)
        if not length:
            raise ValueError("build_memory_on_disk needs a non-empty map-style dataset (its length must be known).")
        writer = None
        if info.is_main_process:
            writer = MemoryWriter(folder, base_fingerprint(self.base), self.config.layer, shard_size=shard_size)
        for start in range(0, length, chunk_rows):
            chunk = dataset.select(range(start, min(length, start + chunk_rows)))
            keys, logits, labels, rows = self.embed_dataset(chunk, accelerator=accelerator, **embed_kwargs)
            if writer is not None:
                writer.add(keys, logits, labels, rows + start)
        if writer is not None:
            writer.close()
        if info.distributed:
            torch.distributed.barrier()
        self.memory = OnDiskMemory.open(folder)
        self.memory.attach(self)
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
        for every argument (`objective="accuracy"` or `"conservative"`: max TPR with FPR < `max_fpr`).

        Example:

        ```python
        >>> result = model.tune(val_ds, k=[10, 20, 50], sigma=[0.3, 0.7, 1.0], temperature=[1.0, 1.4])
        >>> result.best["k"] == model.config.k
        True
        ```
        """
        from .tuning import tune

        return tune(self, val_dataset, k, sigma, temperature, objective, max_fpr, batch_size, **kwargs)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ResMemImageClassifierOutput:
        """
        Args:
            pixel_values: `(B, C, H, W)` as the base model expects them.
            labels: `(B,)` optional class ids; then `loss` is their NLL under `logits`.
        Returns:
            [`ResMemImageClassifierOutput`] with `scores`, `logits`, `base_logits`, `residual` `(B, C)`.
        """
        self._check_ready()
        config = self.config
        capture = EmbeddingCapture(self.base, config.layer)
        base_kwargs = dict(kwargs)
        if output_hidden_states is not None:
            base_kwargs["output_hidden_states"] = output_hidden_states
        if output_attentions is not None:
            base_kwargs["output_attentions"] = output_attentions
        with capture:
            base_out = self.base(pixel_values=pixel_values, **base_kwargs)
        base_logits = base_out.logits  # (B, C)
        queries = per_example_keys(capture.get(), base_logits.shape[0], config.layer)  # (B, D)
        residual = self.memory.residual_for(
            queries, config.k, config.sigma, config.temperature, config.index, config.index_params
        )  # (B, C)
        scores = resmem_scores(base_logits, residual, config.temperature)  # (B, C)
        logits = scores_to_logits(scores, config.score_floor)  # (B, C)
        loss = None
        if labels is not None:
            loss = nn.functional.nll_loss(logits, labels.to(logits.device).long())
        output = ResMemImageClassifierOutput(
            loss=loss,
            logits=logits,
            scores=scores,
            base_logits=base_logits,
            residual=residual,
            hidden_states=getattr(base_out, "hidden_states", None),
            attentions=getattr(base_out, "attentions", None),
        )
        return output if return_dict is not False else output.to_tuple()


_TASK_CLASSES: dict[str, type[ResMemWrapper]] = {TASK_IMAGE_CLASSIFICATION: ResMemForImageClassification}


def task_class(task: str) -> type[ResMemWrapper]:
    """The `ResMemWrapper` subclass for a task name."""
    if task not in _TASK_CLASSES:
        raise ValueError(f"Unsupported task {task!r}; supported: {sorted(_TASK_CLASSES)}.")
    return _TASK_CLASSES[task]


def register_task_class(task: str, model_class: type[ResMemWrapper]) -> None:
    _TASK_CLASSES[task] = model_class
