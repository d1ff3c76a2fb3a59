"""`ResMemWrapper`: a `PreTrainedModel` that adds a residual memory to any HF base model.

This file holds what every task shares (construction, loading, saving); the task subclasses live in
`modeling_image.py` and `modeling_causal_lm.py`, and `tasks.py` maps each `config.task` to its subclass.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import uuid
import warnings

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import logging

from .atomic import clean_stale_staging, make_staging, publish, set_default_modes, staging_parent
from .configuration_resmem import (
    TASK_CAUSAL_LM,
    TASK_IMAGE_CLASSIFICATION,
    ResMemConfig,
    saved_base_config,
    validate_hyperparameters,
)
from .hooks import resolve_module
from .hub import (
    CARD_FILE,
    INDEX_FILE,
    MEMORY_FILE,
    base_fingerprint,
    base_reference,
    check_model_location,
    fingerprint_matches,
    is_owned_file,
    is_legacy_fingerprint,
    resolve_file,
    upload_files,
)
from .memory import MemoryFileError, ResidualMemory, _as_id_tensor
from .memory_disk import MANIFEST_FILE, OnDiskMemory, read_manifest, shard_file_names

logger = logging.get_logger(__name__)

# Arguments of `from_pretrained` that locate files; forwarded when fetching the memory file.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
# Arguments of `save_pretrained(push_to_hub=True)` that go to the upload, not to the files.
_PUSH_KWARGS = ("repo_id", "token", "private", "revision", "create_pr", "commit_message", "commit_description")


class MixedSaveError(MemoryFileError):
    """config.json and the memory files of a folder come from different saves (their save ids differ)."""


def infer_task(base_model: nn.Module) -> str:
    """`"causal-lm"` for models that can generate; else the classifier task of the base's main input, as its
    `forward` names it (`input_ids`: text, `input_values` / `input_features`: audio, anything else: image).

    The forward's parameters decide, not `main_input_name` alone: `PreTrainedModel` defaults that to `input_ids`,
    so a user's image classifier that does not set it would be taken for a text model.
    """
    can_generate = getattr(base_model, "can_generate", None)
    if callable(can_generate) and can_generate():
        return TASK_CAUSAL_LM
    import inspect

    from .configuration_resmem import TASK_AUDIO_CLASSIFICATION, TASK_TEXT_CLASSIFICATION

    by_input = {"input_ids": TASK_TEXT_CLASSIFICATION, "input_values": TASK_AUDIO_CLASSIFICATION,
                "input_features": TASK_AUDIO_CLASSIFICATION}
    params = inspect.signature(base_model.forward).parameters
    main = getattr(base_model, "main_input_name", None)
    names = [main] if main in params else [name for name in by_input if name in params]
    return by_input.get(names[0], TASK_IMAGE_CLASSIFICATION) if names else TASK_IMAGE_CLASSIFICATION


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
        # `ResMemWrapper(config)` (and `AutoModel.from_config`) builds the task's subclass; `config` is optional
        # so that copy.deepcopy / pickle (which call `cls.__new__(cls)`) keep working.
        if cls is ResMemWrapper and config is not None:
            from .tasks import task_class  # imports the task modules, which import this one

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

        The wrapper is returned in eval mode (as `from_pretrained` returns it), and so is `base_model`, which it
        shares: a base still in train mode (right after a training loop) would use BatchNorm batch statistics,
        apply dropout, and update its running statistics at every forward.

        Defaults: `k=50, sigma=1.0, T=1.0` are the paper's settings for C4 (T5-small) and ImageNet (ResNet-18,
        `k=80`); its CIFAR-100 example uses `k=53, sigma=0.7, T=1.4`. `sigma` is a distance in the key layer's
        units, so no default fits every model: tune it on validation data, e.g.
        `model.tune(val_data, k=[...], sigma="auto")` (a grid in units of [`sigma_scale`]).

        Args:
            base_model: any `AutoModelForImageClassification` / `AutoModelForCausalLM` model.
            k, sigma, temperature: ResMem hyperparameters (see [`ResMemConfig`]); `temperature` is ResMem's `T`,
                stored as `config.residual_temperature` (default 1.0; `residual_temperature=` is the same argument).
            layer: module whose output (or `":input"`) is the key; `None` = the task default.
            task: `"image-classification"`, `"causal-lm"`, `"text-classification"` or `"audio-classification"`;
                inferred from the base when `None`.
        """
        if not isinstance(base_model, PreTrainedModel):
            raise TypeError(
                f"base_model must be a transformers PreTrainedModel, got {type(base_model).__name__}. "
                "Wrap your torch module in a PreTrainedModel subclass with its own config."
            )
        from .tasks import task_class

        task = task or infer_task(base_model)
        target = task_class(task)
        if cls is not ResMemWrapper and not issubclass(target, cls):
            raise TypeError(f"{cls.__name__}.from_base got a {task} model; use ResMemWrapper.from_base.")
        # Deep-copy: sharing the base's config object resets its attention implementation (wrong logits, no error).
        base_config = saved_base_config(base_model.config)
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
        return wrapper.to(base_model.device).eval()

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *model_args,
        check_memory_fingerprint: bool = True,
        base_model: PreTrainedModel | None = None,
        _retry: bool = True,
        **kwargs,
    ):
        """Load config, base weights and memory saved by `save_pretrained` (local folder, HF cache or Hub).

        A memory-only save (`save_pretrained(..., save_base=False)`) holds no base weights: the base is
        loaded from the repo id and revision it records (with this call's `cache_dir`, `token`,
        `local_files_only`, `dtype`, `device_map`, ...), or taken from `base_model`.

        Args:
            check_memory_fingerprint: refuse a memory whose stored fingerprint differs from the loaded
                base weights (default). Set to `False` only when you changed the weights on purpose
                (e.g. loading in another dtype) and accept residuals computed with the old ones.
            base_model: the base model to wrap instead of loading one (any save); it must have the
                weights the memory was built from (checked by fingerprint).
        """
        if pretrained_model_name_or_path is not None:
            check_model_location(pretrained_model_name_or_path)
        hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
        config = kwargs.pop("config", None)
        if not isinstance(config, ResMemConfig):
            config = ResMemConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        from .tasks import task_class

        target = task_class(config.task)
        if cls is not ResMemWrapper and not issubclass(target, cls):
            raise TypeError(
                f"{pretrained_model_name_or_path} holds a ResMem {config.task} model, which {cls.__name__} cannot load: "
                f"use {target.auto_class_for_base().__name__}.from_pretrained or ResMemWrapper.from_pretrained."
            )
        # ResMemWrapper, or a parent of the task's class (the text and audio classes subclass the image one).
        if target is not cls:
            return target.from_pretrained(
                pretrained_model_name_or_path,
                *model_args,
                config=config,
                check_memory_fingerprint=check_memory_fingerprint,
                base_model=base_model,
                _retry=_retry,
                **kwargs,
            )
        try:
            if base_model is None and getattr(config, "base_weights_saved", True) is not False:
                model = super().from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
            else:
                model = cls._from_base_model(pretrained_model_name_or_path, config, base_model, kwargs)
            model._load_memory(pretrained_model_name_or_path, hub_kwargs, check_memory_fingerprint)
        except MixedSaveError:
            # A save that replaced the folder between our reads of config.json and of the memory: read it again,
            # once (a folder left mixed by an interrupted save fails the same way again and raises).
            if not _retry or not os.path.isdir(os.fspath(pretrained_model_name_or_path)):
                raise
            logger.warning(f"{pretrained_model_name_or_path} was replaced by another save while loading; loading it again.")
            return cls.from_pretrained(
                pretrained_model_name_or_path,
                *model_args,
                check_memory_fingerprint=check_memory_fingerprint,
                base_model=base_model,
                _retry=False,
                **kwargs,
            )
        return model

    @classmethod
    def _from_base_model(cls, path_or_repo, config: ResMemConfig, base_model, kwargs: dict) -> "ResMemWrapper":
        """The wrapper of a memory-only save: the base is `base_model`, else loaded from the id the save records."""
        if base_model is None:
            repo = getattr(config, "base_model_id", None)
            revision = getattr(config, "base_revision", None)
            if not repo:
                raise MemoryFileError(
                    f"{path_or_repo} holds no base weights (a memory-only save) and records no base model to load: "
                    "pass the base the memory was built from, `from_pretrained(path, base_model=base)`."
                )
            # The ResMem repo's own location arguments do not apply to the base repo.
            base_kwargs = {key: value for key, value in kwargs.items() if key not in ("revision", "subfolder")}
            try:
                base_model = cls.auto_class_for_base().from_pretrained(repo, revision=revision, **base_kwargs)
            except OSError as err:
                raise OSError(
                    f"{path_or_repo} is a memory-only save; its base model {repo!r} (revision {revision or 'default'}) "
                    f"could not be loaded ({' '.join(str(err).split())}). Make the base available (online, or download "
                    f"it into the cache: `hf download {repo}`), or pass it: `from_pretrained(path, base_model=base)`."
                ) from err
            source = f"{repo!r} (revision {revision or 'default'}, recorded by the save)"
        else:
            if not isinstance(base_model, PreTrainedModel):
                raise TypeError(f"base_model must be a transformers PreTrainedModel, got {type(base_model).__name__}.")
            source = "the base_model passed to from_pretrained"
        # Deep-copy: sharing the base's config object resets its attention implementation (wrong logits, no error).
        config.base_config = copy.deepcopy(base_model.config)
        model = cls(config, base_model=base_model)
        model._base_source = source
        return model.to(base_model.device).eval()

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
            manifest_data = read_manifest(manifest)
            # Checked plain names only: a manifest must never make us read a file outside its folder.
            names = shard_file_names(manifest_data, manifest) + [INDEX_FILE]
            files = {MANIFEST_FILE: manifest}
            for name in names:
                local = resolve_file(str(path_or_repo), name, **hub_kwargs)
                if local is not None:
                    files[name] = local
            self.memory = OnDiskMemory.open(os.path.dirname(manifest), files=files)
            path, saved_id = manifest, manifest_data.get("save_id")
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
            saved_id = self.memory.load(path, index_path=index_path).get("save_id")
        if len(self.memory) != self.config.memory_size:
            raise MemoryFileError(
                f"{MEMORY_FILE} holds {len(self.memory)} entries but the config says {self.config.memory_size}: "
                "the files come from different saves. Save the model again."
            )
        expected_id = getattr(self.config, "save_id", None)
        if (expected_id or saved_id) and saved_id != expected_id:
            raise MixedSaveError(
                f"{path_or_repo} holds files of two different saves: config.json belongs to save "
                f"{(expected_id or 'without id')[:12]}, {os.path.basename(path)} to save {(saved_id or 'without id')[:12]}. "
                "An interrupted save (or copying files of two saves together) leaves such a folder: save the model "
                "again, or copy every file of one save."
            )
        if check_fingerprint:
            if not fingerprint_matches(self.base, self.memory.fingerprint):
                actual = base_fingerprint(self.base)
                source = getattr(self, "_base_source", None)
                if source is not None:  # the base came from elsewhere than the save's own weights
                    raise MemoryFileError(
                        f"The memory in {path_or_repo} was built for base weights with fingerprint "
                        f"{self.memory.fingerprint[:12]}..., but {source} has {actual[:12]}...: it is not the base "
                        "the memory was built from. Pass that exact base (`base_model=`), e.g. the repo and revision "
                        "the memory was built with, or rebuild the memory on this base with `model.build_memory(dataset)`."
                    )
                raise MemoryFileError(
                    f"The memory in {path_or_repo} was built for base weights with fingerprint "
                    f"{self.memory.fingerprint[:12]}..., but the loaded weights have {actual[:12]}... . A memory only "
                    "fits the weights it was built from: rebuild it with `model.build_memory(dataset)`, or pass "
                    "`check_memory_fingerprint=False` if you changed the weights on purpose (e.g. another dtype)."
                )
            if is_legacy_fingerprint(self.memory.fingerprint):  # a matching pre-v2 full hash -> the cheap v2 one
                self.memory.fingerprint = base_fingerprint(self.base)

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self,
        save_directory,
        is_main_process: bool = True,
        push_to_hub: bool = False,
        model_card: bool = True,
        model_card_template: str | None = None,
        save_base: bool = True,
        base_model_id: str | None = None,
        base_revision: str | None = None,
        **kwargs,
    ):
        """Save config, base weights, memory and model card into `save_directory`, atomically as a whole.

        The complete save is written into a hidden staging folder beside the target and then swapped
        in at once (Linux: one `renameat2(RENAME_EXCHANGE)`; see `resmem.atomic`), so a reader or a
        crash sees the earlier save or the new one, never a mix. Files of the folder that a save does
        not own (tokenizer, image processor, sub-folders) are kept. config.json and every memory file
        carry the same `save_id`; loading refuses a folder whose files name different ids.

        Args:
            push_to_hub: then upload the files of this save in ONE commit to `repo_id` (default: the
                folder's name); `token`, `private`, `revision`, `create_pr`, `commit_message` are honoured.
            model_card: write `README.md` (settings, memory, data, evaluations per split; see `resmem.model_card`).
                A README.md already in the folder is updated, not replaced: its text outside the resmem section
                and its other metadata are kept.
            model_card_template: path of a custom Jinja2 card template.
            save_base: `False` writes a memory-only save (config, memory, index, card; no base weights),
                the way a PEFT adapter is shared: it records the base's repo id (`base.name_or_path`),
                `base_revision` and, in the memory, the weights' fingerprint. `from_pretrained` then loads
                the base from that id (or takes `base_model=`) and refuses a base with other weights.
            base_model_id, base_revision: with `save_base=False`, the Hub repo (or folder) and revision to
                load the base from, when `base.name_or_path` is not it or to pin a commit.
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
                "Call `model.build_memory(dataset)` again before saving. If you did not change them on purpose: a "
                "forward pass in train mode updates BatchNorm running statistics (weights of the base) - call "
                "`model.eval()` before running the model, then rebuild the memory."
            )
        reference = (None, None) if save_base else self._base_reference(base_model_id, base_revision)
        self.config.memory_size = len(self.memory)
        self.config.base_config = saved_base_config(self.base.config)
        self.config.save_id = uuid.uuid4().hex
        self.config.base_weights_saved = bool(save_base)
        self.config.base_model_id, self.config.base_revision = reference
        # realpath: a symlinked save folder is replaced where it really lives; the link stays.
        target = os.path.realpath(os.fspath(save_directory))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        parent = staging_parent(target)
        clean_stale_staging(parent)
        repo_id = hub_args["repo_id"] or (os.path.basename(target) if push_to_hub else None)
        staging = make_staging(parent)
        leftover = staging
        try:
            if save_base:
                super().save_pretrained(staging, is_main_process=True, push_to_hub=False, token=hub_args["token"], **kwargs)
            else:
                self.config.architectures = [type(self).__name__]
                self.config.save_pretrained(staging)
            extra = {"save_id": self.config.save_id}
            if isinstance(self.memory, OnDiskMemory):
                self.memory.save_folder(staging, save_id=self.config.save_id)
            elif len(self.memory):
                self.memory.save(
                    os.path.join(staging, MEMORY_FILE), index_path=os.path.join(staging, INDEX_FILE), extra_metadata=extra
                )
            if model_card:
                from .model_card import write_card

                # A README.md already in the folder (a user's, or an earlier card) is updated, not replaced.
                write_card(self, os.path.join(staging, CARD_FILE), template=model_card_template, repo_id=repo_id,
                           tags=tags, existing=os.path.join(target, CARD_FILE))
            written = set(os.listdir(staging))
            set_default_modes(staging, written)

            def owned(name: str) -> bool:  # files of an earlier save that this one replaces or drops
                return is_owned_file(name) and os.path.isfile(os.path.join(target, name))

            leftover = publish(staging, target, written, owned, order=lambda name: (name == "config.json", name))
        finally:
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)
        if push_to_hub:
            # Upload only now that every file exists (super().save_pretrained(push_to_hub=True) would
            # upload before the memory file and the card are written).
            from huggingface_hub import HfApi

            repo_id = HfApi(token=hub_args["token"]).create_repo(
                repo_id, private=hub_args["private"], token=hub_args["token"], exist_ok=True
            ).repo_id
            return upload_files(
                target,
                sorted(written),
                repo_id,
                token=hub_args["token"],
                revision=hub_args["revision"],
                create_pr=bool(hub_args["create_pr"]),
                commit_message=hub_args["commit_message"],
                commit_description=hub_args["commit_description"],
            )

    def _base_reference(self, base_model_id: str | None, base_revision: str | None) -> tuple[str, str | None]:
        """`(repo id or folder, revision)` a memory-only save records for loading its base."""
        name, revision = base_reference(self.base)
        if base_model_id:
            name, revision = base_model_id, None
        if name and name == getattr(self.config, "base_model_id", None):  # loaded from a memory-only save: keep its pin
            revision = revision or getattr(self.config, "base_revision", None)
        if not name:
            raise ValueError(
                "save_pretrained(save_base=False) records where to load the base model from, but this base has no "
                "repo id (it was not loaded with from_pretrained). Pass base_model_id='org/name' (and base_revision=) "
                "naming a Hub repo with exactly these weights, or save the weights with save_base=True."
            )
        if os.path.isdir(name):
            logger.warning(
                f"The base model was loaded from the local folder {name}: this memory-only save loads only where that "
                "folder exists. Pass base_model_id='org/name' to record a Hub repo instead."
            )
            name = os.path.abspath(name)
        return name, base_revision or revision

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
        save_base: bool = True,
        base_model_id: str | None = None,
        base_revision: str | None = None,
    ):
        """Upload weights, config, memory file and model card to the Hub in ONE commit.

        Unlike `transformers`' `push_to_hub`, the card is this model's own (settings, memory, data,
        evaluations per split), written by `save_pretrained`, not the generic one. A README.md the repo already
        has is updated, not replaced: its text outside the resmem section and its other metadata are kept.

        Args:
            repo_id: `"org/name"` (created if missing).
            tags: extra tags for the card's metadata.
            save_base, base_model_id, base_revision: `save_base=False` uploads a memory-only save (see
                `save_pretrained`): no base weights, the base's repo id recorded instead.
        Returns:
            The `huggingface_hub.CommitInfo` of the commit.
        """
        from huggingface_hub import HfApi

        repo_id = HfApi(token=token).create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as root:
            folder = os.path.join(root, "save")
            from .model_card import download_hub_card

            # The repo's README.md (a user's text, or an earlier card) is updated like a local one, not replaced.
            remote_card = download_hub_card(repo_id, token=token, revision=revision, cache_dir=os.path.join(root, "cache"))
            if remote_card is not None:
                os.makedirs(folder)
                shutil.copyfile(remote_card, os.path.join(folder, CARD_FILE))
            save_kwargs = {} if not save_base else {"max_shard_size": max_shard_size}
            self.save_pretrained(
                folder,
                repo_id=repo_id,
                tags=tags,
                model_card_template=model_card_template,
                save_base=save_base,
                base_model_id=base_model_id,
                base_revision=base_revision,
                **save_kwargs,
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
        """Embed `dataset` and append its entries to the memory (the model embeds, the memory stores).

        Args:
            example_ids: ids of the new entries, one per row of `dataset` (default: after the largest existing id).
            embed_kwargs: as for `build_memory` (`batch_size`, `label_column`, `image_processor`, ...).
        Raises:
            ValueError: for an on-disk memory (read-only; the message names the fixes), ids that already
                exist, or base weights changed since the memory was built.
        """
        if isinstance(self.memory, OnDiskMemory):
            self.memory.add(dataset)  # raises: read-only, with the fixes
        self._check_memory_fingerprint_for_edit()
        keys, logits, labels, rows = self.embed_dataset(dataset, **embed_kwargs)
        keys = self._keys_for_memory(keys, fit=len(self.memory) == 0)  # (n, D) in the memory's key space
        entries = {"keys": keys, "base_logits": logits, "labels": labels, "example_ids": self._new_example_ids(rows, example_ids)}
        if len(self.memory) == 0:
            self.memory.fingerprint, self.memory.layer = base_fingerprint(self.base), self.config.layer
        self.memory.add(entries)
        self.config.memory_size = len(self.memory)
        return self.memory

    def _keys_for_memory(self, keys, fit: bool = False):
        """Keys `(n, D)` as the memory stores them; classifiers normalise them (`config.key_normalization`)."""
        return keys

    def remove_from_memory(self, example_ids) -> int:
        """Forget the entries built from the given source example ids; returns how many were removed."""
        removed = self.memory.remove(example_ids)
        self.config.memory_size = len(self.memory)
        return removed

    def _check_memory_fingerprint_for_edit(self) -> None:
        if len(self.memory) and not fingerprint_matches(self.base, self.memory.fingerprint):
            raise ValueError(
                "The base weights changed since the memory was built, so new residuals would not match the stored "
                "ones. Rebuild the memory with `model.build_memory(dataset)` instead. (A forward pass in train mode "
                "updates BatchNorm running statistics: call `model.eval()` before running the model.)"
            )

    def _new_example_ids(self, rows, example_ids=None):
        """Example ids of new entries from their source rows `(n,)` (0-based rows of the added data).

        `example_ids` (one per row of the data) maps row r to `example_ids[r]`; by default rows are numbered
        after the largest id in the memory, so ids stay unique.
        """
        import torch

        rows = torch.as_tensor(rows).reshape(-1).cpu().long()
        if example_ids is None:
            first = int(self.memory.example_ids.max()) + 1 if len(self.memory) else 0
            return rows + first
        ids = _as_id_tensor(example_ids)  # integers only: float ids are refused, not truncated
        if rows.numel() and int(rows.max()) >= ids.numel():
            raise ValueError(
                f"example_ids has {ids.numel()} ids but the data has at least {int(rows.max()) + 1} rows: pass one id "
                "per row (example), or None to number them after the existing ids."
            )
        return ids[rows]

    # ------------------------------------------------------------------ shared helpers
    def _record_build(self, dataset) -> None:
        """Note the new memory's size and source on the config (for the model card)."""
        from .records import describe_dataset

        self.config.memory_size = len(self.memory)
        self.config.memory_dataset = describe_dataset(dataset)
        self.config.evaluations = None  # measured with the previous memory
        from .index_choice import measure_at_build  # index="auto": drops the old choice, measures on held-out entries

        measure_at_build(self)

    def record_evaluation(self, result: dict, split: str | None = None, dataset=None, source: str = "evaluate") -> dict:
        """Record numbers measured elsewhere at the model's current settings, for the model card.

        `resmem.evaluate(model, data, split="test")` records its result itself; use this for a result you
        computed another way. Kept per split in `config.evaluations` (see `resmem.records.record_evaluation`).

        Args:
            result: `base_accuracy`, `resmem_accuracy`, `tpr`, `fpr`, `gain`, `num_examples` (and for a causal
                LM `unit="token positions"`, `base_ppl`, `ppl`).
            split: `"test"`, `"validation"`, ... (default: the dataset's split).
            dataset: the data measured on (its builder, split, rows and fingerprint are recorded).
        Example:

        ```python
        >>> model.record_evaluation({"base_accuracy": 0.91, "resmem_accuracy": 0.93, "tpr": 0.03, "fpr": 0.01,
        ...                          "gain": 0.02, "num_examples": 10000}, split="test", dataset=test_data)
        ```
        """
        from .records import record_evaluation

        return record_evaluation(self, result, dataset=dataset, split=split, source=source)

    def explain(self, inputs, dataset=None, top: int = 5, **kwargs):
        """The training examples that moved each prediction most; see [`resmem.explain.explain`].

        Args:
            inputs: `pixel_values` / `input_ids` tensor, or a dict of forward inputs.
            dataset: the training dataset the memory was built from (attaches each neighbour's row).
            top: neighbours per explanation, by |contribution| to the predicted class's score.
            kwargs: `positions=` and `tokenizer=` for causal LMs, other forward arguments.
        Returns:
            A list of `resmem.explain.Explanation`.
        """
        from .explain import explain

        return explain(self, inputs, dataset=dataset, top=top, **kwargs)

    def _check_ready(self) -> None:
        validate_hyperparameters(self.config.k, self.config.sigma, self.config.residual_temperature)
        from .index_choice import sync_index_choice  # index="auto": the memory searches with the measured choice

        sync_index_choice(self)
        if len(self.memory) == 0:
            raise ValueError("The memory is empty: call `model.build_memory(train_dataset)` before the forward pass.")
        if self.memory.layer and self.memory.layer != self.config.layer:
            raise ValueError(
                f"The memory was built with keys from layer {self.memory.layer!r} but config.layer is "
                f"{self.config.layer!r}: set it back or rebuild the memory."
            )

    def _progress(self, iterable, total: int | None, desc: str, main_process: bool = True, progress: bool = True):
        from transformers.utils.logging import is_progress_bar_enabled, tqdm

        disable = not (progress and is_progress_bar_enabled() and main_process)
        return tqdm(iterable, total=total, desc=desc, unit="batch", disable=disable)

    def _warn_if_training(self) -> None:
        """Warn once per model when a forward runs in train mode (BatchNorm batch statistics, dropout)."""
        if self.training and not getattr(self, "_warned_training", False):
            self._warned_training = True
            warnings.warn(
                "The ResMem model is in train mode: the base model uses BatchNorm batch statistics and dropout, and a "
                "forward updates its BatchNorm running statistics, which changes the base weights the memory was "
                "built from. Call `model.eval()` before predicting (from_base and from_pretrained return eval mode).",
                UserWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ the scale of sigma
    @torch.inference_mode()
    def sigma_scale(self, data=None, sample_size: int = 2048, seed: int = 0, **data_kwargs) -> float:
        """The typical distance from a point to its nearest memory key: a natural unit for `sigma`.

        `sigma` divides plain L2 distances in the key layer (`w_i = softmax(-d_i / sigma)`), so its useful range
        depends on the layer's scale. This returns the median (the lower median, `torch.median`) of the distance
        from each of a seeded random sample of points to its nearest memory key, from ONE search of the sample:

        - `data` given (validation data, as for `tune`): the sample is up to `sample_size` of its queries (images:
          rows; causal LMs: token positions), drawn with `seed`; a streaming image dataset gives its first
          `sample_size` rows;
        - `data=None`: up to `sample_size` memory entries (drawn with `torch.randperm(len(memory), seed)`), each
          to its nearest *other* key.

        `model.tune(val_data, sigma="auto")` searches `sigma` in `sigma_scale(val_data) * (0.25, 0.5, 1, 2, 4)`.

        Args:
            data: validation data as for `tune` / `build_memory`, or `None` for the memory keys themselves.
            sample_size: most points measured (>= 1).
            seed: seed of the sample (a local `torch.Generator`; the global RNG is untouched).
            data_kwargs: how to read `data`, as for `tune` (`batch_size`, `label_column`, `image_processor`,
                `transform`; causal LMs: `tokenizer`, `text_column`, `window`, `stride`, `max_tokens`).
        Returns:
            The median nearest-key distance (a float > 0 unless the points coincide with keys).

        Example:

        ```python
        >>> scale = model.sigma_scale(val_ds)          # e.g. 3.1
        >>> model.config.sigma = 0.5 * scale
        ```
        """
        if isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 1:
            raise ValueError(f"sample_size must be an integer >= 1, got {sample_size!r}.")
        if len(self.memory) == 0:
            raise ValueError("The memory is empty: call `model.build_memory(train_dataset)` before `sigma_scale`.")
        generator = torch.Generator().manual_seed(int(seed))
        index, params = self.config.index, self.config.index_params
        if data is None:
            n = len(self.memory)
            if n < 2:
                raise ValueError(
                    "sigma_scale() of the memory needs 2+ entries (a key's nearest other key): pass `data=`."
                )
            ids = torch.randperm(n, generator=generator)[:sample_size].to(self.memory.keys_device)  # (S,)
            keys = self.memory.field_rows("keys", ids).float()  # (S, D)
            distances, found = self.memory.search(keys, 2, index, params)  # (S, 2): itself and its nearest other key
            # The entry itself is usually first (distance 0); an exact duplicate may come first instead, at 0 too.
            nearest = torch.where(found[:, 0] == ids.to(found.device), distances[:, 1], distances[:, 0])  # (S,)
        else:
            queries = self._sample_queries(data, sample_size, generator, **data_kwargs)  # (S, D)
            if queries.shape[0] == 0:
                raise ValueError("sigma_scale(data) found no query in the data: pass a non-empty validation set.")
            nearest = self.memory.search(queries.float(), 1, index, params)[0][:, 0]  # (S,)
        return float(nearest.median())

    def _sample_queries(self, data, sample_size: int, generator: torch.Generator, **data_kwargs) -> torch.Tensor:
        """Keys `(S, D)` of up to `sample_size` points of `data`, drawn with `generator` (see `sigma_scale`)."""
        raise NotImplementedError
