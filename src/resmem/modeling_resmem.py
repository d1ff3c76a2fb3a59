"""`ResMemWrapper`: a `PreTrainedModel` that adds a residual memory to any HF base model.

This file holds what every task shares (construction, loading, saving, the task registry); the
task subclasses live in `modeling_image.py` and `modeling_causal_lm.py`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile

from torch import nn
from transformers import PreTrainedModel
from transformers.utils import logging

from .configuration_resmem import TASK_CAUSAL_LM, TASK_IMAGE_CLASSIFICATION, ResMemConfig, validate_hyperparameters
from .hooks import resolve_module
from .hub import CARD_FILE, INDEX_FILE, MEMORY_FILE, OWNED_FILE_PREFIXES, base_fingerprint, fingerprint_matches, resolve_file, upload_files
from .memory import MemoryFileError, ResidualMemory
from .memory_disk import MANIFEST_FILE, OnDiskMemory, shard_file_names

logger = logging.get_logger(__name__)

# Arguments of `from_pretrained` that locate files; forwarded when fetching the memory file.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
# Arguments of `save_pretrained(push_to_hub=True)` that go to the upload, not to the files.
_PUSH_KWARGS = ("repo_id", "token", "private", "revision", "create_pr", "commit_message", "commit_description")


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
        temperature: float | None = None,
        layer: str | None = None,
        task: str | None = None,
        residual_temperature: float | None = None,
        **config_kwargs,
    ) -> "ResMemWrapper":
        """Wrap a trained base model (its weights are used as they are, never copied or re-initialised).

        Args:
            base_model: any `AutoModelForImageClassification` / `AutoModelForCausalLM` model.
            k, sigma, temperature: ResMem hyperparameters (see [`ResMemConfig`]); `temperature` is ResMem's `T`,
                stored as `config.residual_temperature` (default 1.0; `residual_temperature=` is the same argument).
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
        if temperature is not None and residual_temperature is not None and temperature != residual_temperature:
            raise ValueError("Pass ResMem's T once: `temperature=` and `residual_temperature=` are the same argument.")
        t = temperature if temperature is not None else residual_temperature if residual_temperature is not None else 1.0
        config = ResMemConfig(
            base_config=base_config, task=task, k=k, sigma=sigma, residual_temperature=t, layer=layer, **config_kwargs
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
            # memory_size 0 with a memory file there: never drop a memory silently (an edited or mixed-up config).
            stray = [name for name in (MEMORY_FILE, MANIFEST_FILE) if resolve_file(str(path_or_repo), name, **hub_kwargs)]
            if stray:
                raise MemoryFileError(
                    f"{path_or_repo} has {stray[0]} but its config.json says memory_size 0, so the memory would be ignored. "
                    f"Set \"memory_size\" in config.json to the memory's number of entries to load it, or delete "
                    f"{stray[0]} to load the model without a memory."
                )
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
            if not fingerprint_matches(self.base, self.memory.fingerprint):
                actual = base_fingerprint(self.base)
                raise MemoryFileError(
                    f"The memory in {path_or_repo} was built for base weights with fingerprint "
                    f"{self.memory.fingerprint[:12]}..., but the loaded weights have {actual[:12]}... . A memory only "
                    "fits the weights it was built from: rebuild it with `model.build_memory(dataset)`, or pass "
                    "`check_memory_fingerprint=False` if you changed the weights on purpose (e.g. another dtype)."
                )
            self.memory.fingerprint = base_fingerprint(self.base)  # a matching pre-v2 full hash -> the cheap v2 one

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
        if len(self.memory) and not fingerprint_matches(self.base, self.memory.fingerprint):
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
        if len(self.memory) and not fingerprint_matches(self.base, self.memory.fingerprint):
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
        validate_hyperparameters(self.config.k, self.config.sigma, self.config.residual_temperature)
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


# Filled by the task modules (modeling_image.py, modeling_causal_lm.py) through `register_task_class`.
_TASK_CLASSES: dict[str, type[ResMemWrapper]] = {}


def task_class(task: str) -> type[ResMemWrapper]:
    """The `ResMemWrapper` subclass for a task name."""
    if task not in _TASK_CLASSES:
        raise ValueError(f"Unsupported task {task!r}; supported: {sorted(_TASK_CLASSES)}.")
    return _TASK_CLASSES[task]


def register_task_class(task: str, model_class: type[ResMemWrapper]) -> None:
    _TASK_CLASSES[task] = model_class
