"""`ResidualMemory`: the stored keys and what is needed to recompute residuals at any temperature."""

from __future__ import annotations

import json
import os
import warnings

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .index import NeighbourIndex, build_index
from .residuals import neighbour_weights, residuals, weighted_residual

MEMORY_FORMAT = "resmem-memory"
MEMORY_FORMAT_VERSION = "1"


class MemoryFileError(ValueError):
    """A memory file is missing, truncated, or belongs to another base model."""


class ResidualMemory(nn.Module):
    """Keys `z_i = phi(x_i)` with the base logits and labels of each memory entry.

    Residuals `onehot(y_i) - softmax(f(x_i) / T)` are recomputed from the stored logits for
    the neighbours of each query, so `temperature` can change without a rebuild. The tensors
    are non-persistent buffers: they follow `model.to(device)` but are saved in their own file
    (`save` / `load`), not in the model weights.

    Buffers:
        keys: `(N, D)` float32.  base_logits: `(N, C)` float32.  labels: `(N,)` int64.
        example_ids: `(N,)` int64, index of the source example in the dataset it was built from.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("keys", torch.empty(0, 0), persistent=False)
        self.register_buffer("base_logits", torch.empty(0, 0), persistent=False)
        self.register_buffer("labels", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("example_ids", torch.empty(0, dtype=torch.long), persistent=False)
        self.fingerprint: str | None = None
        self.layer: str | None = None
        self._index: NeighbourIndex | None = None
        self._index_key: tuple | None = None

    def __len__(self) -> int:
        return self.keys.shape[0]

    @property
    def dim(self) -> int:
        return self.keys.shape[1] if self.keys.dim() == 2 else 0

    def set_entries(self, keys, base_logits, labels, example_ids, fingerprint: str, layer: str) -> None:
        """Replace the memory's content (shapes as in the class docstring)."""
        n = keys.shape[0]
        if not (base_logits.shape[0] == labels.shape[0] == example_ids.shape[0] == n):
            raise ValueError("keys, base_logits, labels and example_ids must have the same number of rows.")
        self.keys = keys.float().contiguous()
        self.base_logits = base_logits.float().contiguous()
        self.labels = labels.long().contiguous()
        self.example_ids = example_ids.long().contiguous()
        self.fingerprint = fingerprint
        self.layer = layer
        self._index = None

    def _apply(self, fn, recurse=True):
        # A device or dtype move invalidates the search index built over the old keys.
        self._index = None
        return super()._apply(fn, recurse)

    def index(self, spec: str) -> NeighbourIndex:
        """The search index over the keys, built on first use and rebuilt when `spec` or the device changes."""
        key = (spec, self.keys.device, len(self))
        if self._index is None or self._index_key != key:
            self._index = build_index(self.keys, spec)
            self._index_key = key
        return self._index

    def effective_k(self, k: int) -> int:
        """`k` clamped to the memory size (documented behaviour; warns once per call site)."""
        if k > len(self):
            warnings.warn(
                f"k={k} is larger than the memory ({len(self)} entries); using k={len(self)}. "
                "Lower `model.config.k` to silence this warning.",
                stacklevel=3,
            )
            return len(self)
        return k

    def search(self, queries: torch.Tensor, k: int, index_spec: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """k nearest entries of each query.

        Args:
            queries: `(B, D)` float32.
        Returns:
            `(distances, ids)`, each `(B, k)`: plain L2 distances recomputed exactly from the stored
            keys (the index only selects the candidates) and int64 entry ids.
        """
        k = self.effective_k(k)
        _, ids = self.index(index_spec).search(queries, k)  # (B, k)
        ids = ids.to(self.keys.device)
        neighbours = self.keys[ids]  # (B, k, D)
        distances = (neighbours - queries.to(self.keys.device, torch.float32).unsqueeze(1)).norm(dim=-1)  # (B, k)
        return distances, ids

    def neighbour_residuals(self, ids: torch.Tensor, temperature: float) -> torch.Tensor:
        """Residuals of the given entries at temperature `T`: `(B, k)` ids -> `(B, k, C)`."""
        b, k = ids.shape
        flat = ids.reshape(-1)
        return residuals(self.base_logits[flat], self.labels[flat], temperature).view(b, k, -1)

    def residual_for(self, queries: torch.Tensor, k: int, sigma: float, temperature: float, index_spec: str = "auto"):
        """`r_kNN(x) = sum_i w_i r_i` over the k nearest entries.

        Args:
            queries: `(B, D)` key embeddings of the inputs.
        Returns:
            `(B, C)` float32 residual to add to `softmax(f(x) / T)`.
        """
        distances, ids = self.search(queries, k, index_spec)
        weights = neighbour_weights(distances, sigma)  # (B, k)
        return weighted_residual(weights, self.neighbour_residuals(ids, temperature))  # (B, C)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str) -> None:
        """Write the memory to one safetensors file (tensors + metadata, never pickle)."""
        metadata = {
            "format": MEMORY_FORMAT,
            "format_version": MEMORY_FORMAT_VERSION,
            "fingerprint": self.fingerprint or "",
            "layer": self.layer or "",
            "num_entries": str(len(self)),
        }
        tensors = {
            "keys": self.keys,
            "base_logits": self.base_logits,
            "labels": self.labels,
            "example_ids": self.example_ids,
        }
        save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, path, metadata=metadata)

    @staticmethod
    def read_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Read and validate a memory file; raise `MemoryFileError` naming the fix if it is unusable."""
        if not os.path.isfile(path):
            raise MemoryFileError(
                f"The memory file {path} is missing. Copy it next to the weights again, or rebuild the memory "
                "with `model.build_memory(dataset)` and save the model."
            )
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as err:  # safetensors raises its own error types for truncated headers/data
            raise MemoryFileError(
                f"The memory file {path} cannot be read ({err}); it is truncated or corrupt. "
                "Download or save the model again."
            ) from err
        if metadata.get("format") != MEMORY_FORMAT:
            raise MemoryFileError(f"{path} is not a ResMem memory file (metadata {json.dumps(metadata)[:200]}).")
        n = int(metadata.get("num_entries", -1))
        expected = {"keys", "base_logits", "labels", "example_ids"}
        if set(tensors) != expected or any(t.shape[0] != n for t in tensors.values()):
            raise MemoryFileError(
                f"The memory file {path} is inconsistent: expected tensors {sorted(expected)} with {n} rows each, "
                f"found { {k: tuple(v.shape) for k, v in tensors.items()} }. Save the model again."
            )
        return tensors, metadata

    def load(self, path: str) -> None:
        """Load a file written by `save` (validated by `read_file`)."""
        tensors, metadata = self.read_file(path)
        device = self.keys.device if self.keys.device.type != "meta" else torch.device("cpu")
        self.set_entries(
            tensors["keys"].to(device),
            tensors["base_logits"].to(device),
            tensors["labels"].to(device),
            tensors["example_ids"].to(device),
            fingerprint=metadata["fingerprint"],
            layer=metadata["layer"],
        )
