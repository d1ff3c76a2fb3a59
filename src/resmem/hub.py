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
