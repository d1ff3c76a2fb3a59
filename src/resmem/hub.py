"""File names, base-weight fingerprints, file resolution (local folder -> cache -> Hub) and upload."""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np
import torch
from torch import nn

MEMORY_FILE = "resmem_memory.safetensors"
# A trained approximate search index (IVF, HNSW, PQ) saved beside the memory so loading need not retrain it.
INDEX_FILE = "resmem_index.faiss"
# Files a save owns in its folder; stale ones from an earlier save are removed after a successful save.
OWNED_FILE_PREFIXES = ("model", "resmem_", "config.json", "generation_config.json")
CARD_FILE = "README.md"


# Version prefix of the sampled fingerprint. Bump it whenever what is hashed changes (the sample sizes
# below, the index formula, the header), so that an old stored value is never compared with a new one.
FINGERPRINT_VERSION = "v2"
# Per tensor: this many evenly spaced positions over the flat (logical, row-major) view ...
FINGERPRINT_STRIDED = 4096
# ... plus this many pseudo-random positions derived from the tensor's name (not from torch's RNG, whose
# streams are not promised to stay the same across torch versions or devices).
FINGERPRINT_RANDOM = 256


def _sample_positions(name: str, numel: int) -> torch.Tensor | None:
    """Flat positions sampled from a tensor of `numel` elements, or None to hash every element.

    Returns:
        `(FINGERPRINT_STRIDED + FINGERPRINT_RANDOM,)` int64 on the CPU: `i * (numel - 1) // (S - 1)` for
        `i < S` (first and last element included), then positions from SHAKE-256 of the name, mod `numel`.
    """
    s, r = FINGERPRINT_STRIDED, FINGERPRINT_RANDOM
    if numel <= s + r:
        return None  # small tensors (biases, norms, small heads) are hashed whole: exact for them
    strided = torch.arange(s, dtype=torch.int64) * (numel - 1) // (s - 1)  # (S,), no overflow below 2**51 elements
    raw = hashlib.shake_256(f"resmem-fingerprint|{name}".encode()).digest(8 * r)
    hashed = np.frombuffer(raw, dtype="<u8") % np.uint64(numel)  # (R,) little-endian: the same on every platform
    return torch.cat([strided, torch.from_numpy(hashed.astype(np.int64))])  # (S + R,)


def base_fingerprint(model: nn.Module) -> str:
    """A cheap fingerprint of the base model's weights: `"v2:"` + SHA-256 hex digest.

    For each state-dict entry, in name order: `name|dtype|shape`, then the bytes of a fixed sample of its
    elements (every element for tensors of at most 4,352 elements; otherwise 4,096 evenly spaced positions
    of the flat view plus 256 pseudo-random ones derived from the name). The sample is gathered on the
    tensor's own device and only it is copied to the CPU, so the cost is O(number of tensors x 4,352
    elements), not O(weight bytes) (~1M elements hashed for a 1.1B-parameter model instead of 2.2 GB).
    The value depends on the logical values only, not on the device or memory layout.

    What it detects: any change of name, dtype or shape, and any change that touches a whole tensor or a
    large part of it (an optimizer step, a merged LoRA delta, a re-initialised, swapped or rescaled
    tensor, another dtype) - such a change alters about every sampled element, and a 1-element change of
    a sampled position is enough. What it can miss: a change confined to a few elements or rows of a large
    tensor that avoids all 4,352 sampled positions (e.g. a sparse update of a few embedding rows); use
    `legacy_base_fingerprint` (a full hash) when that matters.

    Stored with the memory and checked (through `fingerprint_matches`) at save, add and load time so that
    a memory never loads silently onto weights it was not built from.
    """
    digest = hashlib.sha256()
    digest.update(f"resmem-fingerprint-{FINGERPRINT_VERSION}|{FINGERPRINT_STRIDED}|{FINGERPRINT_RANDOM}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach()
        digest.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if not t.numel():
            continue
        flat = t.reshape(-1)  # a view for contiguous tensors; logical order either way
        positions = _sample_positions(name, flat.numel())
        # index_select, not flat[positions]: advanced indexing starts an OpenMP parallel region that costs
        # ~10 ms per tensor on a busy CPU, index_select a few microseconds.
        sample = flat if positions is None else flat.index_select(0, positions.to(flat.device))  # (<= S + R,)
        digest.update(sample.contiguous().view(torch.uint8).cpu().numpy())
    return f"{FINGERPRINT_VERSION}:{digest.hexdigest()}"


def legacy_base_fingerprint(model: nn.Module) -> str:
    """The fingerprint of resmem-hf before v2: SHA-256 over every byte of the state dict (names, dtypes, shapes, bytes).

    O(weight bytes) and a full copy to the CPU: used only to check memories saved by earlier versions,
    whose stored fingerprint has no version prefix (see `fingerprint_matches`).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def is_legacy_fingerprint(stored: str | None) -> bool:
    """Whether `stored` is a pre-v2 full hash (64 hex digits, no version prefix)."""
    return bool(stored) and ":" not in stored and bool(_LEGACY_PATTERN.fullmatch(stored))


_LEGACY_PATTERN = re.compile(r"[0-9a-f]{64}")


def fingerprint_matches(model: nn.Module, stored: str | None) -> bool:
    """Whether the fingerprint `stored` with a memory was computed from `model`'s current weights.

    A versioned value (`"v2:..."`) is compared with `base_fingerprint(model)`; an unversioned 64-digit hex
    value (saved by resmem-hf before v2) with `legacy_base_fingerprint(model)` (a full hash, slow, done
    once at load). Anything else (empty, `"synthetic"`, an unknown version) matches nothing.
    """
    if not stored:
        return False
    if stored.startswith(f"{FINGERPRINT_VERSION}:"):
        return stored == base_fingerprint(model)
    if is_legacy_fingerprint(stored):
        return stored == legacy_base_fingerprint(model)
    return False


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
