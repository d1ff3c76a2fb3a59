"""File names, base-weight fingerprints, file resolution (local folder -> cache -> Hub) and upload."""

from __future__ import annotations

import hashlib
import os

import torch
from torch import nn

MEMORY_FILE = "resmem_memory.safetensors"
# A trained approximate search index (IVF, HNSW, PQ) saved beside the memory so loading need not retrain it.
INDEX_FILE = "resmem_index.faiss"
# Files a save owns in its folder; stale ones from an earlier save are removed after a successful save.
OWNED_FILE_PREFIXES = ("model", "resmem_", "config.json", "generation_config.json")
CARD_FILE = "README.md"


def base_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the base model's state dict (names, dtypes, shapes, bytes).

    Stored with the memory and checked at load time so that a memory never loads silently onto
    weights it was not built from.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def resmem_cache_dir() -> str:
    """Folder for files resmem derives at run time (trained search indexes of on-disk memories).

    `$RESMEM_CACHE` if set, else `$HF_HOME/resmem` (`~/.cache/huggingface/resmem` by default). Nothing
    derived at run time is ever written into a loaded model's folder or into the Hugging Face cache's
    snapshots.
    """
    env = os.environ.get("RESMEM_CACHE")
    if env:
        return os.path.expanduser(env)
    from huggingface_hub import constants

    return os.path.join(constants.HF_HOME, "resmem")


def check_model_location(path_or_repo) -> None:
    """Raise `FileNotFoundError` naming the fix when `path_or_repo` is meant as a local folder that does not exist.

    A `pathlib.Path`, an absolute path, `./x`, `~/x` or anything that is not a valid Hub repo id
    (`org/name`) is a local path: without this check transformers would report a misleading
    "not a valid model identifier" Hub error for it.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = os.fspath(path_or_repo)
    if os.path.isdir(text):
        return
    if os.path.exists(text):
        raise NotADirectoryError(f"{text} is a file, not a model folder: pass the folder `save_pretrained` wrote.")
    local = isinstance(path_or_repo, os.PathLike) or os.path.isabs(text) or text.startswith((".", "~"))
    if not local:
        try:
            validate_repo_id(text)
        except HFValidationError:
            local = True
    if local:
        raise FileNotFoundError(
            f"The model folder {text} does not exist (relative paths start at {os.getcwd()}). Pass the folder "
            "`save_pretrained` wrote, or a Hub repo id such as 'org/name'."
        )


def base_reference(model: nn.Module) -> tuple[str | None, str | None]:
    """`(repo id or path, commit hash)` the base model was loaded from, as transformers records them (or None)."""
    config = getattr(model, "config", None)
    name = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None) or None
    revision = getattr(config, "_commit_hash", None) or None
    return name, revision


def resolve_file(path_or_repo: str, filename: str, **hub_kwargs) -> str | None:
    """Local path of `filename` from a folder or Hub repo (cache and offline mode included), or None."""
    from transformers.utils import cached_file

    return cached_file(path_or_repo, filename, _raise_exceptions_for_missing_entries=False, **hub_kwargs)


def upload_files(
    folder: str,
    names: list[str],
    repo_id: str,
    token=None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    commit_description: str | None = None,
):
    """Upload `names` (files directly inside `folder`) to a Hub model repo in ONE commit.

    Returns the `CommitInfo` of `HfApi.create_commit`. Creates the branch `revision` if needed.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name))
        for name in sorted(names)
        if os.path.isfile(os.path.join(folder, name))
    ]
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
    return api.create_commit(
        repo_id=repo_id,
        operations=operations,
        commit_message=commit_message or "Upload ResMem model (weights, config, memory, model card)",
        commit_description=commit_description,
        token=token,
        create_pr=create_pr,
        revision=revision,
    )
