"""File names, base-weight fingerprints, file resolution (local folder -> cache -> Hub) and upload."""

from __future__ import annotations

import functools
import hashlib
import os
import re

import numpy as np
import torch
from torch import nn

MEMORY_FILE = "resmem_memory.safetensors"
# A trained approximate search index (IVF, HNSW, PQ) saved beside the memory so loading need not retrain it.
INDEX_FILE = "resmem_index.faiss"
# The files a save owns in its folder: those it writes, and those an earlier save in another layout wrote
# (sharded or single weights, `variant=` names, PyTorch .bin weights, an in-RAM or sharded memory). An earlier
# save's owned files that this save does not write again are removed after it succeeds; every other file
# (a user's `model_notes.txt`, `modeling_extra.py`, tokenizer files, README.md) is kept.
OWNED_FILE_PATTERN = re.compile(
    r"config\.json|generation_config\.json"
    r"|model(\.[\w-]+)?\.safetensors|model(\.[\w-]+)?-\d{5}-of-\d{5}\.safetensors|model\.safetensors\.index(\.[\w-]+)?\.json"
    r"|pytorch_model(\.[\w-]+)?\.bin|pytorch_model(\.[\w-]+)?-\d{5}-of-\d{5}\.bin|pytorch_model\.bin\.index(\.[\w-]+)?\.json"
    r"|resmem_memory\.safetensors|resmem_index\.faiss|resmem_memory\.index\.json|resmem_memory-\d{5,9}\.safetensors"
)
CARD_FILE = "README.md"


def is_owned_file(name: str) -> bool:
    """True for a file name a save writes or replaces (see `OWNED_FILE_PATTERN`)."""
    return OWNED_FILE_PATTERN.fullmatch(name) is not None


# Version prefix of the sampled fingerprint. Bump it whenever what is hashed changes (the constants below,
# the row formula, the header), so that an old stored value is never compared with a new one.
FINGERPRINT_VERSION = "v2"
# The flat (logical, row-major) view of a tensor is read as rows of FINGERPRINT_BLOCK consecutive elements
# (a block spans one or two cache lines, so a sample costs ~140 memory accesses, not ~2,000) ...
FINGERPRINT_BLOCK = 16
# ... of which this many evenly spaced rows (the first and the last included) ...
FINGERPRINT_STRIDED = 128
# ... plus this many rows derived from the tensor's name by SHAKE-256 (not from torch's RNG, whose streams
# are not promised to stay the same across torch versions or devices), plus the last BLOCK elements.
FINGERPRINT_RANDOM = 8
# Tensors of at most this many elements (biases, norms, small heads) are hashed whole.
FINGERPRINT_WHOLE = FINGERPRINT_BLOCK * (FINGERPRINT_STRIDED + FINGERPRINT_RANDOM)


@functools.lru_cache(maxsize=65536)
def _sample_rows(name: str, numel: int) -> np.ndarray | None:
    """Rows (of FINGERPRINT_BLOCK elements of the flat view) sampled from a tensor, or None to hash it whole.

    Returns:
        `(FINGERPRINT_STRIDED + FINGERPRINT_RANDOM,)` int64, read-only: `i * (rows - 1) // (S - 1)` for `i < S`,
        then SHAKE-256 of the name read as little-endian uint64, mod `rows`; `rows = numel // FINGERPRINT_BLOCK`.
        Cached: the same names and sizes come back at every build, save, add and load.
    """
    if numel <= FINGERPRINT_WHOLE:
        return None
    s, r, rows = FINGERPRINT_STRIDED, FINGERPRINT_RANDOM, numel // FINGERPRINT_BLOCK
    strided = np.arange(s, dtype=np.int64) * (rows - 1) // (s - 1)  # (S,), no overflow below 2**55 rows
    raw = hashlib.shake_256(f"resmem-fingerprint|{name}".encode()).digest(8 * r)
    hashed = np.frombuffer(raw, dtype="<u8") % np.uint64(rows)  # (R,) little-endian: the same on every platform
    out = np.concatenate([strided, hashed.astype(np.int64)])  # (S + R,)
    out.flags.writeable = False
    return out


def _sample(name: str, tensor: torch.Tensor, on_host: bool | None = None) -> list:
    """The bytes of the sampled elements of `tensor`, in a fixed order: numpy uint8 arrays for a CPU tensor
    (numpy indexing: no torch dispatch or OpenMP start per tensor), 1-D uint8 tensors on its device otherwise.
    `on_host=False` takes the device path for a CPU tensor too (tests check that both give the same bytes)."""
    flat = tensor.detach().reshape(-1)  # a view for contiguous tensors; logical order either way
    n = flat.numel()
    if n == 0:
        return []
    rows = _sample_rows(name, n)
    raw = flat.view(torch.uint8)  # (n * element_size,): the bytes, on the tensor's device
    if raw.device.type == "cpu" if on_host is None else on_host:
        raw = raw.numpy()
    if rows is None:
        return [raw]
    width = FINGERPRINT_BLOCK * flat.element_size()  # bytes per row
    table = raw[: (n // FINGERPRINT_BLOCK) * width].reshape(-1, width)  # (n // BLOCK, width)
    if isinstance(table, np.ndarray):
        blocks = table[rows]  # (S + R, width)
    else:
        blocks = table.index_select(0, torch.from_numpy(rows.copy()).to(table.device)).view(-1)  # (S + R) * width
    return [blocks, raw[-width:]]  # + the last BLOCK elements


def base_fingerprint(model: nn.Module) -> str:
    """A cheap fingerprint of the base model's weights: `"v2:"` + SHA-256 hex digest.

    For each state-dict entry, in name order: `name|dtype|shape`, then the bytes of a fixed sample of its
    elements: every element for tensors of at most 2,176 elements; otherwise 137 blocks of 16 consecutive
    elements of the flat view (128 evenly spaced over the tensor, 8 at positions derived from the name,
    and the last 16 elements). The sample is gathered on each tensor's own device and only the samples are
    copied to the CPU (one copy per device), so a call costs O(number of tensors x 2,192 elements), not
    O(weight bytes): ~0.4M elements for a 1.1B-parameter model instead of 1.1G. The value depends on the
    logical values only, not on the device, the device placement or the memory layout.

    What it detects: any change of name, dtype or shape, and any change that touches a whole tensor or a
    large part of it (an optimizer step, a merged LoRA delta, a re-initialised, swapped or rescaled
    tensor, another dtype) - such a change alters about every sampled element, and one changed sampled
    element is enough. What it can miss: a change confined to a few elements or rows of a large tensor
    that avoids every sampled block (e.g. a sparse update of a few embedding rows); compare
    `legacy_base_fingerprint` (a full hash) when that matters.

    Stored with the memory and checked (through `fingerprint_matches`) at save, add and load time so that
    a memory never loads silently onto weights it was not built from.
    """
    parts: list = []  # in hashing order: header bytes, numpy arrays (CPU samples), uint8 tensors on accelerators
    # keep_vars: the parameters themselves (no per-tensor `detach` copy of the Python object); read only.
    for name, t in sorted(model.state_dict(keep_vars=True).items()):
        parts.append(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        parts.extend(_sample(name, t))
    # One device->CPU copy per accelerator (not per tensor: each copy from a GPU is a synchronisation); the
    # bytes are then hashed in name order whatever the devices, so the value does not depend on the placement.
    by_device: dict[torch.device, list[int]] = {}
    for i, part in enumerate(parts):
        if isinstance(part, torch.Tensor):
            by_device.setdefault(part.device, []).append(i)
    for device, positions in by_device.items():
        host = torch.cat([parts[i] for i in positions]).cpu().numpy()
        start = 0
        for i in positions:
            parts[i], start = host[start : start + parts[i].numel()], start + parts[i].numel()
    digest = hashlib.sha256(
        f"resmem-fingerprint-{FINGERPRINT_VERSION}|{FINGERPRINT_BLOCK}|{FINGERPRINT_STRIDED}|{FINGERPRINT_RANDOM}".encode()
    )
    digest.update(b"".join(parts))  # one update over ~1 MB: a few hundred small updates cost more
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
