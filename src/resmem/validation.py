"""Checks that a memory's contents and its saved search index can be trusted before they are used.

A memory file (or the entries handed to `memory.add`) is data from outside the process: a damaged
download, a file edited by hand or by another tool, a different save. Shapes and row counts alone
do not catch what makes predictions silently wrong (NaN keys, inf logits, labels out of range,
sparse indices narrower than their values) or what fails only later inside a forward pass. The
functions here check every value once, at load and at add, and raise an error that names where the
data came from (`source`) and how to fix it.

All checks are vectorised tensor reductions that allocate no temporary the size of a tensor:
finiteness is one `torch.aminmax` pass (NaN propagates through min/max, inf shows in one of them;
25x faster than `torch.isfinite(x).all()` on 2 CPU cores, which also builds an N x D bool tensor), and
only when it fails are the bad rows located, over row chunks of `CHUNK_ELEMENTS` elements. Example-id
uniqueness needs O(N) (one comparison, or a sort of the ids when they are not increasing).

The saved faiss index (`resmem_index.faiss`) is bound to the memory it was built from by a record
(`index_record`, in `resmem.index`) of the file's SHA-256, size, factory, dimension and entry count,
stored in the memory's metadata. `verify_index_file` checks the record BEFORE faiss reads the file:
faiss trusts its input (a corrupted list count makes it try a huge allocation; an index over other
keys loads and silently changes the neighbours), so only the exact bytes written at save reach it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping

import numpy as np
import torch

# Elements per chunk of the finiteness check: bounds its temporary bool tensor to 4 MiB.
CHUNK_ELEMENTS = 1 << 22

ADD_SOURCE = "the entries passed to add"
ADD_FIX = "Compute entries with the model that owns the memory (e.g. `model.add_to_memory(dataset)`)."
FILE_FIX = "The file is damaged or was edited: download or save the model again, or rebuild the memory with `model.build_memory(dataset)`."

# Metadata keys of the index record (strings in safetensors metadata, also stored in an on-disk memory's manifest).
INDEX_RECORD_KEYS = ("index_factory", "index_sha256", "index_bytes", "index_dim", "index_count")


def _tensor(x) -> torch.Tensor:
    """`x` as a tensor without copying or changing its dtype (lists, numpy arrays and memmaps included)."""
    if isinstance(x, torch.Tensor):
        return x
    with warnings.catch_warnings():  # a read-only numpy array (e.g. a memmap): we only read it
        warnings.simplefilter("ignore", UserWarning)
        return torch.as_tensor(np.asarray(x) if not isinstance(x, np.ndarray) else x)


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


class _Checker:
    """Raises `error(f"{source}: {problem}. {fix}")`; one per validated source."""

    def __init__(self, source: str, error: type[Exception], fix: str):
        self.source, self.error, self.fix = source, error, fix

    def fail(self, problem: str):
        raise self.error(f"{self.source}: {problem}. {self.fix}")

    def rank(self, t: torch.Tensor, name: str, ndim: int, shape: str) -> None:
        if t.dim() != ndim:
            self.fail(f"`{name}` must be a {ndim}-D tensor {shape}, got shape {tuple(t.shape)}")

    def floating(self, t: torch.Tensor, name: str) -> None:
        if not t.is_floating_point():
            self.fail(f"`{name}` must hold floating-point numbers, got dtype {t.dtype}")

    def integer(self, t: torch.Tensor, name: str, what: str) -> None:
        if not _is_integer(t):
            self.fail(
                f"`{name}` must hold integers ({what}), got dtype {t.dtype}; float values are refused rather than "
                "truncated"
            )

    def finite(self, t: torch.Tensor, name: str) -> None:
        """Every value finite: one min/max pass; the bad rows are located (in chunks) only on failure."""
        if t.numel() == 0:
            return
        low, high = torch.aminmax(t)  # NaN anywhere makes both NaN; +-inf shows as the max or min
        if bool(torch.isfinite(low) & torch.isfinite(high)):
            return
        width = max(1, t[0].numel())
        rows = max(1, CHUNK_ELEMENTS // width)
        for start in range(0, t.shape[0], rows):
            chunk = t[start : start + rows]
            ok = torch.isfinite(chunk)
            if not ok.all():
                bad_rows = (~ok).reshape(chunk.shape[0], -1).any(dim=1).nonzero().flatten()[:5] + start
                self.fail(f"`{name}` contains NaN or inf (rows {bad_rows.tolist()}...)")

    def in_range(self, t: torch.Tensor, name: str, high: int, what: str) -> None:
        """Every value in `[0, high)`; min/max reductions need no temporary."""
        if t.numel() == 0:
            return
        low_v, high_v = (int(v) for v in torch.aminmax(t))
        if low_v < 0 or high_v >= high:
            flat = t.reshape(-1)
            bad = flat[(flat < 0) | (flat >= high)][:5].tolist()
            self.fail(f"`{name}` must lie in [0, {high}) ({what}), found {bad}")

    def unique(self, t: torch.Tensor, name: str, max_repeats: int = 1) -> None:
        if t.numel() < 2 or bool((t[1:] > t[:-1]).all()):  # ids in build order: increasing, hence unique
            return
        if max_repeats > 1:  # an augmented memory (resmem.augmentation): each source example gives `max_repeats` entries
            values, counts = np.unique(t.cpu().numpy(), return_counts=True)
            if (counts > max_repeats).any():
                self.fail(f"`{name}` may repeat at most {max_repeats} times (one entry per view of a source example), "
                          f"repeated more: {values[counts > max_repeats][:5].tolist()}")
            return
        # numpy's sort is ~25x faster than torch.unique / torch.sort on CPU (measured, 400k ids)
        s = np.sort(t.numpy()) if t.device.type == "cpu" else torch.sort(t).values
        repeated = s[1:][s[1:] == s[:-1]]
        if len(repeated):
            self.fail(f"`{name}` must be unique (each entry names one source example), repeated: {repeated[:5].tolist()}")

    def rows(self, tensors: Mapping[str, torch.Tensor], n: int) -> None:
        shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        if any(s[0] != n if s else True for s in shapes.values()):
            self.fail(f"every tensor must have {n} rows, found shapes {shapes}")


def check_classifier_entries(
    tensors: Mapping,
    num_classes: int | None = None,
    source: str = ADD_SOURCE,
    *,
    dim: int | None = None,
    error: type[Exception] = ValueError,
    fix: str = ADD_FIX,
    max_repeats: int = 1,
) -> dict[str, torch.Tensor]:
    """Validate classifier memory entries (a memory file's tensors, or the entries passed to `add`).

    Args:
        tensors: `keys` `(N, D)` float, `base_logits` `(N, C)` float, `labels` `(N,)` integer,
            `example_ids` `(N,)` integer (tensors, numpy arrays or lists; never copied or cast).
        num_classes: `C` the model expects, when known (else the width of `base_logits`).
        source: names the data in the message, e.g. `"The memory file /x/resmem_memory.safetensors"`.
        dim: key dimension the entries must have (that of the memory they join), when known.
        error: the exception type (`MemoryFileError` at load, `ValueError` at add); fix: how to fix it.
        max_repeats: how many entries may share an example id (2 in a memory with flipped copies).
    Returns:
        The four values as tensors (same dtypes and devices).
    Raises:
        `error` when keys or logits are not 2-D floating point or not finite, labels are not integers in
        `[0, C)`, example ids are not unique integers, or the row counts / widths disagree.
    """
    check = _Checker(source, error, fix)
    t = {name: _tensor(tensors[name]) for name in ("keys", "base_logits", "labels", "example_ids")}
    keys, logits, labels, ids = t["keys"], t["base_logits"], t["labels"], t["example_ids"]
    check.rank(keys, "keys", 2, "(N, D)")
    check.rank(logits, "base_logits", 2, "(N, C)")
    check.rank(labels, "labels", 1, "(N,)")
    check.rank(ids, "example_ids", 1, "(N,)")
    check.rows(t, keys.shape[0])
    if dim is not None and keys.shape[1] != dim:
        check.fail(f"keys have dimension {keys.shape[1]} but the memory's have {dim}; embed them with the same model and layer")
    classes = logits.shape[1] if num_classes is None else int(num_classes)
    if logits.shape[1] != classes:
        check.fail(f"base_logits have {logits.shape[1]} columns but the model has {classes} classes")
    check.floating(keys, "keys")
    check.floating(logits, "base_logits")
    check.integer(labels, "labels", "class ids")
    check.integer(ids, "example_ids", "source example ids")
    check.in_range(labels, "labels", classes, "class ids of this model")
    check.finite(keys, "keys")
    check.finite(logits, "base_logits")
    check.unique(ids, "example_ids", max_repeats)
    return t


def check_token_entries(
    tensors: Mapping,
    vocab_size: int,
    source: str,
    *,
    top_m: int | None | str = "any",
    dim: int | None = None,
    error: type[Exception] = ValueError,
    fix: str = "Build them with `model.build_memory(...)`.",
) -> dict[str, torch.Tensor]:
    """Validate causal-LM memory entries (`TokenResidualMemory`).

    Args:
        tensors: `keys` `(N, D)` float, `values` `(N, m)` float, `indices` `(N, m)` integer, or empty or
            `None` (dense, then `m == V`), `labels`, `example_ids`, `positions` `(N,)` integer.
        vocab_size: `V`; labels and indices must lie in `[0, V)`.
        top_m: the `m` the metadata records (`None` = dense); `"any"` skips this check.
        source, dim, error, fix: as in [`check_classifier_entries`].
    Returns:
        The values as tensors (same dtypes and devices).
    """
    check = _Checker(source, error, fix)
    names = ("keys", "values", "indices", "labels", "example_ids", "positions")
    t = {name: torch.empty(0, 0) if tensors[name] is None else _tensor(tensors[name]) for name in names}  # indices None: dense
    keys, values, indices = t["keys"], t["values"], t["indices"]
    if not isinstance(vocab_size, int) or vocab_size < 1:
        check.fail(f"the vocabulary size must be a positive integer, got {vocab_size!r}")
    check.rank(keys, "keys", 2, "(N, D)")
    check.rank(values, "values", 2, "(N, m)")
    for name in ("labels", "example_ids", "positions"):
        check.rank(t[name], name, 1, "(N,)")
    sparse = indices.numel() > 0
    check.rows({n: v for n, v in t.items() if n != "indices" or sparse}, keys.shape[0])
    if dim is not None and keys.shape[1] != dim:
        check.fail(f"keys have dimension {keys.shape[1]} but the memory's have {dim}; embed them with the same model and layer")
    if sparse and tuple(indices.shape) != tuple(values.shape):
        check.fail(f"`indices` {tuple(indices.shape)} must have the shape of `values` {tuple(values.shape)} (one vocabulary id per stored value)")
    if not sparse and values.shape[1] != vocab_size and keys.shape[0]:
        check.fail(f"dense `values` must have one column per vocabulary item ({vocab_size}), got {values.shape[1]}")
    if top_m != "any":
        if top_m is None and sparse:
            check.fail("the metadata says the residuals are dense (no top_m) but the file stores sparse `indices`")
        if top_m is not None and (not sparse or values.shape[1] != top_m) and keys.shape[0]:
            check.fail(f"the metadata says top_m={top_m} but `values` has shape {tuple(values.shape)} and `indices` {tuple(indices.shape)}")
    check.floating(keys, "keys")
    check.floating(values, "values")
    for name, what in (("labels", "next-token ids"), ("example_ids", "source example ids"), ("positions", "token positions")):
        check.integer(t[name], name, what)
    if sparse:
        check.integer(indices, "indices", "vocabulary ids")
        check.in_range(indices, "indices", vocab_size, "vocabulary ids")
    check.in_range(t["labels"], "labels", vocab_size, "vocabulary ids")
    if t["positions"].numel() and int(t["positions"].min()) < 0:
        check.fail("`positions` must be >= 0")
    check.finite(keys, "keys")
    check.finite(values, "values")
    return t


def parse_token_metadata(metadata: Mapping[str, str], source: str, error: type[Exception] = ValueError) -> dict:
    """`vocab_size`, `top_m` (None = dense) and `temperature` of a token memory file's metadata, checked."""
    check = _Checker(source, error, FILE_FIX)
    try:
        vocab_size = int(metadata["vocab_size"])
        top_m = int(metadata["top_m"]) if metadata.get("top_m") else None
        temperature = float(metadata["temperature"])
    except (KeyError, TypeError, ValueError) as err:
        check.fail(f"its metadata lacks a valid vocab_size / top_m / temperature ({err!r})")
    if vocab_size < 1 or (top_m is not None and not 1 <= top_m <= vocab_size):
        check.fail(f"its metadata has vocab_size={vocab_size} and top_m={top_m}; expected 1 <= top_m <= vocab_size")
    if not (np.isfinite(temperature) and temperature > 0):
        check.fail(f"its metadata has temperature={temperature}; expected a finite positive number")
    return {"vocab_size": vocab_size, "top_m": top_m, "temperature": temperature}


def check_num_classes(memory_classes: int, model_classes: int, source: str, error: type[Exception] = ValueError) -> None:
    """The memory's logits width must equal the model's number of labels."""
    if memory_classes != model_classes:
        raise error(
            f"{source} stores base logits over {memory_classes} classes, but the model has {model_classes} labels: "
            "the memory was built for another model. Rebuild it with `model.build_memory(dataset)`."
        )


# ------------------------------------------------------------------ on-disk shards (header only)
def check_manifest(manifest, path: str, error: type[Exception] = ValueError) -> None:
    """An on-disk memory's manifest (any task): the fields `OnDiskMemory.open` relies on, with sane types.

    Shard file names are checked by `resmem.memory_disk.shard_file_names` (plain `resmem_memory-N.safetensors`)."""
    check = _Checker(f"The memory manifest {path}", error, "Rebuild the memory (the manifest is damaged or was edited).")
    if not isinstance(manifest, dict):
        check.fail("it is not a JSON object")
    for name, kind in (("build_id", str), ("shards", list), ("num_entries", int), ("dim", int)):
        if not isinstance(manifest.get(name), kind) or isinstance(manifest.get(name), bool):
            check.fail(f"field {name!r} must be a {kind.__name__}, got {manifest.get(name)!r}")
    classes = manifest.get("num_classes", 1)  # classifier memories only
    if manifest["dim"] < 1 or not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
        check.fail(f"dim and num_classes must be positive integers, got {manifest['dim']!r} and {classes!r}")
    for entry in manifest["shards"]:
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("num_entries"), int)):
            check.fail(f"shard entry {entry!r} must hold a 'file' name and an integer 'num_entries'")
    if sum(entry["num_entries"] for entry in manifest["shards"]) != manifest["num_entries"]:
        check.fail(f"its shards hold {sum(e['num_entries'] for e in manifest['shards'])} entries, it says {manifest['num_entries']}")
    if "num_classes" in manifest and manifest.get("fields", {}).get("base_logits", [None, [classes]])[1][:1] != [classes]:
        check.fail(f"num_classes {classes} disagrees with its base_logits field {manifest['fields'].get('base_logits')}")


def check_shard_layout(layout: Mapping[str, tuple], fields, manifest: Mapping, path: str, error: type[Exception] = ValueError) -> None:
    """One on-disk shard's tensors, from its safetensors header only (no data is read), for any task.

    Args:
        layout: `{name: (offset, numpy dtype, shape)}` of the shard's tensors.
        fields: the schema's `(name, torch dtype, ndim)` (`resmem.memory.MemorySchema.fields`).
        manifest: the memory's manifest: `dim`, `num_classes` (classifiers) and `fields` (each stored
            field's `[dtype code, row shape]`) give the widths every shard must have.

    Each schema field the shard stores must have a floating or integer dtype as the schema says, its
    rank, the manifest's width, and the same number of rows as the others (an optional field may be
    stored empty). Values are not read here: scanning a multi-GB memory at every open would cost
    O(memory); they are checked when written (`MemoryWriter.add`).
    """
    check = _Checker(f"The memory shard {path}", error, "Rebuild the memory (the shard is damaged or was edited).")
    widths = {name: (spec[1] or [None])[0] for name, spec in (manifest.get("fields") or {}).items() if isinstance(spec, list) and len(spec) == 2}
    widths["keys"] = manifest.get("dim")
    if "num_classes" in manifest:
        widths["base_logits"] = manifest["num_classes"]
    rows = {}
    for name, dtype, ndim in fields:
        if name not in layout:
            continue
        _, stored, shape = layout[name]
        kind = np.floating if dtype.is_floating_point else np.integer
        if not np.issubdtype(np.dtype(stored), kind):
            check.fail(f"`{name}` has dtype {np.dtype(stored).name}, expected {kind.__name__}")
        if len(shape) != ndim:
            check.fail(f"`{name}` has shape {list(shape)}, expected {ndim} dimensions")
        if ndim == 2 and widths.get(name) is not None and shape[0] and shape[1] != widths[name]:
            check.fail(f"`{name}` has {shape[1]} columns but the manifest says {widths[name]}")
        if shape and (shape[0] or name == "keys"):
            rows[name] = shape[0]
    if len(set(rows.values())) > 1:
        check.fail(f"its tensors have different row counts {rows}")


# ------------------------------------------------------------------ the saved index file
def check_index_file(path: str, record: Mapping, dim: int, num_entries: int) -> str | None:
    """Why the index file at `path` must not be used, or `None` when it is the file recorded at save.

    Args:
        record: the memory's metadata (or manifest) holding the `INDEX_RECORD_KEYS` written by
            `resmem.index.index_record`.
        dim, num_entries: the memory's key dimension and entry count, which the index must cover.

    Cheap checks come first (record present, dimension, count, file size); the SHA-256 of the file
    costs one sequential read of it (see `resmem.index.file_sha256`), paid once per load.
    """
    from .index import file_sha256

    missing = [key for key in INDEX_RECORD_KEYS if not record.get(key)]
    if missing:
        return f"the memory has no checksum record of it (missing {missing}; saved by an older resmem?)"
    try:
        rec_dim, rec_count, rec_bytes = int(record["index_dim"]), int(record["index_count"]), int(record["index_bytes"])
    except (TypeError, ValueError):
        return f"its record is malformed ({ {k: record.get(k) for k in INDEX_RECORD_KEYS} })"
    if rec_dim != dim or rec_count != num_entries:
        return f"it was recorded for {rec_count} keys of dimension {rec_dim}, the memory has {num_entries} of dimension {dim}"
    size = os.path.getsize(path)
    if size != rec_bytes:
        return f"it has {size} bytes, {rec_bytes} were recorded at save"
    if file_sha256(path) != str(record["index_sha256"]):
        return "its SHA-256 differs from the one recorded at save (the file was changed or comes from another save)"
    return None


def verify_index_file(path: str, record: Mapping, dim: int, num_entries: int) -> bool:
    """`True` when the index file may be handed to faiss; otherwise warn (naming the file) and return `False`.

    Policy: a file that does not match its record is never read. The index is a cache derived from
    the keys, so the memory stays correct without it: the caller leaves it unused and the index is
    rebuilt from the (validated) keys at the first search. Refusing to load instead would make a
    model unusable because of a cache file, and would break every save made before the record existed.
    """
    reason = check_index_file(path, record, dim, num_entries)
    if reason is None:
        return True
    warnings.warn(
        f"Ignoring the saved search index {path}: {reason}. It is rebuilt from the memory's keys at the first "
        "search (this trains a new index, which can take minutes for a large memory); save the model again "
        "(or delete the file) to stop this warning.",
        stacklevel=3,
    )
    return False


def check_batch_size(batch_size) -> None:
    """`batch_size` must be a positive integer (examples or windows per forward pass)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer (examples per forward pass), got {batch_size!r}: pass e.g. batch_size=32.")


def id_tensor(ids) -> torch.Tensor:
    """Example ids (an int, a list, an array or a tensor) as a flat int64 tensor; non-integers are refused.

    `remove([3.9])` must not silently remove id 3, so floating-point ids raise instead of being truncated.
    """
    if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
        ids = [int(ids)]
    t = _tensor(ids.cpu() if isinstance(ids, torch.Tensor) else ids)
    if t.numel() and not _is_integer(t):
        raise ValueError(
            f"Example ids must be integers, got dtype {t.dtype} ({t.reshape(-1)[:5].tolist()}): pass the ids as ints "
            "(see `memory.example_ids`)."
        )
    return t.to(torch.long).reshape(-1)


__all__ = [
    "CHUNK_ELEMENTS",
    "INDEX_RECORD_KEYS",
    "check_batch_size",
    "check_classifier_entries",
    "check_index_file",
    "check_manifest",
    "check_num_classes",
    "check_shard_layout",
    "check_token_entries",
    "id_tensor",
    "parse_token_metadata",
    "verify_index_file",
]
