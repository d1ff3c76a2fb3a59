"""`TokenResidualMemory`: one entry per token position of the memory text, residuals stored sparse.

For a causal LM the label space is the vocabulary (tens of thousands of items), so storing every
entry's base logits (as `ResidualMemory` does for classifiers) would cost `4 * V` bytes per token.
Instead the residual `onehot(y) - softmax(f(x) / T)` is computed once, at build time and at the
build temperature, and only its `residual_top_m` entries of largest magnitude are kept (float16
values, int32 vocabulary indices). Consequence: `k` and `sigma` can change at any time, but a new
temperature `T` needs `build_memory` again.
"""

from __future__ import annotations

import hashlib
import json
import math

import torch
from safetensors.torch import save_file

from .memory import MemoryFileError, ResidualMemory, open_memory_file
from .residuals import neighbour_weights, sparse_weighted_residual

TOKEN_MEMORY_FORMAT = "resmem-token-memory"
TOKEN_MEMORY_FORMAT_VERSION = "1"
_TENSORS = ("keys", "values", "indices", "labels", "example_ids", "positions")


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of a tokenizer's vocabulary (token -> id map): equal iff the ids mean the same tokens."""
    vocab = tokenizer.get_vocab()
    payload = json.dumps(sorted(vocab.items(), key=lambda item: item[1]), ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


class TokenResidualMemory(ResidualMemory):
    """Keys `z_t = phi(x)_t` of every stored token position with its sparse residual over the vocabulary.

    Buffers (non-persistent; saved by `save` into their own safetensors file):
        keys: `(N, D)` float32.
        values: `(N, m)` float16 residual values (`m = V` when stored dense).
        indices: `(N, m)` int32 vocabulary ids of `values`; `(0, 0)` when dense.
        labels: `(N,)` int64 next token `y = x_{t+1}`.
        example_ids: `(N,)` int64 source example (row of the dataset the memory was built from).
        positions: `(N,)` int64 position `t` of the entry inside its source example.

    Attributes:
        temperature: build temperature `T` of the stored residuals.
        vocab_size: `V`, the width of the base model's logits.
        top_m: entries kept per residual, `None` for dense.
        tokenizer_hash: `tokenizer_fingerprint` of the tokenizer used at build time ("" if unknown).
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("values", torch.empty(0, 0, dtype=torch.float16), persistent=False)
        self.register_buffer("indices", torch.empty(0, 0, dtype=torch.int32), persistent=False)
        self.register_buffer("positions", torch.empty(0, dtype=torch.long), persistent=False)
        self.temperature: float | None = None
        self.vocab_size: int = 0
        self.top_m: int | None = None
        self.tokenizer_hash: str = ""
        self.window: int = 0
        self.stride: int = 0

    @property
    def dense(self) -> bool:
        return self.indices.numel() == 0

    def set_token_entries(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        indices: torch.Tensor | None,
        labels: torch.Tensor,
        example_ids: torch.Tensor,
        positions: torch.Tensor,
        *,
        fingerprint: str,
        layer: str,
        temperature: float,
        vocab_size: int,
        top_m: int | None,
        tokenizer_hash: str = "",
        window: int = 0,
        stride: int = 0,
    ) -> None:
        """Replace the memory's content (shapes as in the class docstring)."""
        n = keys.shape[0]
        rows = [values.shape[0], labels.shape[0], example_ids.shape[0], positions.shape[0]]
        if indices is not None:
            rows.append(indices.shape[0])
        if any(r != n for r in rows):
            raise ValueError("keys, values, indices, labels, example_ids and positions must have the same number of rows.")
        self.keys = keys.float().contiguous()
        self.values = values.to(torch.float16).contiguous()
        self.indices = (
            indices.to(torch.int32).contiguous()
            if indices is not None
            else torch.empty(0, 0, dtype=torch.int32, device=keys.device)
        )
        self.labels = labels.long().contiguous()
        self.example_ids = example_ids.long().contiguous()
        self.positions = positions.long().contiguous()
        self.base_logits = torch.empty(0, 0, device=keys.device)
        self.fingerprint, self.layer = fingerprint, layer
        self.temperature, self.vocab_size, self.top_m = float(temperature), int(vocab_size), top_m
        self.tokenizer_hash, self.window, self.stride = tokenizer_hash or "", int(window), int(stride)
        self._index = None

    def token_tensors(self) -> tuple:
        """`(keys, values, indices or None, labels, example_ids, positions)`, the positional args of `set_token_entries`."""
        return (self.keys, self.values, None if self.dense else self.indices, self.labels, self.example_ids, self.positions)

    def token_metadata(self) -> dict:
        """The keyword args of `set_token_entries`."""
        return dict(
            fingerprint=self.fingerprint,
            layer=self.layer,
            temperature=self.temperature,
            vocab_size=self.vocab_size,
            top_m=self.top_m,
            tokenizer_hash=self.tokenizer_hash,
            window=self.window,
            stride=self.stride,
        )

    def set_entries(self, *args, **kwargs):  # the classifier layout does not apply here
        raise TypeError("TokenResidualMemory stores sparse residuals: use `set_token_entries`.")

    def bytes_per_entry(self) -> int:
        """Storage of one entry: key + residual values (+ indices) + label, example id and position."""
        if len(self) == 0:
            return 0
        per_row = [t.element_size() * (t[0].numel() if t.dim() > 1 else 1) for t in self._tensors().values() if t.numel()]
        return int(sum(per_row))

    def nbytes(self) -> int:
        return int(sum(t.numel() * t.element_size() for t in self._tensors().values()))

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in _TENSORS}

    # ------------------------------------------------------------------ querying
    def check_temperature(self, temperature: float) -> None:
        if self.temperature is not None and not math.isclose(temperature, self.temperature, rel_tol=1e-6):
            raise ValueError(
                f"The memory's residuals were computed at temperature T={self.temperature}, but config.temperature "
                f"is {temperature}. For causal LMs the (sparse) residuals are fixed at build time: set "
                f"`model.config.temperature = {self.temperature}` or call `model.build_memory(...)` again at the new T "
                "(k and sigma can change without a rebuild)."
            )

    def neighbour_values(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stored residuals of the given entries: `(B, k)` ids -> values `(B, k, m)`, indices `(B, k, m)` or None."""
        b, k = ids.shape
        flat = ids.reshape(-1)
        # index_select copies whole rows: several times faster than advanced indexing (same values).
        values = self.values.index_select(0, flat).view(b, k, -1)  # (B, k, m)
        indices = None if self.dense else self.indices.index_select(0, flat).view(b, k, -1)  # (B, k, m)
        return values, indices

    def combine(self, distances: torch.Tensor, ids: torch.Tensor, sigma: float) -> torch.Tensor:
        """`r_kNN = sum_i w_i r_i` from neighbours found by `search`: `(B, k)` each -> `(B, V)` float32."""
        weights = neighbour_weights(distances, sigma)  # (B, k)
        values, indices = self.neighbour_values(ids)  # (B, k, m)
        return sparse_weighted_residual(weights, values, indices, self.vocab_size)  # (B, V)

    def neighbour_residuals(self, ids: torch.Tensor, temperature: float) -> torch.Tensor:
        """Dense residuals of the given entries, `(B, k)` ids -> `(B, k, V)` (for inspection; costly)."""
        self.check_temperature(temperature)
        values, indices = self.neighbour_values(ids)
        if indices is None:
            return values.float()
        out = torch.zeros(*ids.shape, self.vocab_size, device=values.device)
        return out.scatter_(2, indices.long(), values.float())

    def residual_for(
        self,
        queries: torch.Tensor,
        k: int,
        sigma: float,
        temperature: float,
        index_spec: str = "auto",
        index_params: dict | None = None,
    ):
        """`r_kNN(x)` for `(B, D)` query keys -> `(B, V)` float32 (`temperature` must be the build temperature)."""
        self.check_temperature(temperature)
        distances, ids = self.search(queries, k, index_spec, index_params)
        return self.combine(distances, ids, sigma)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str, index_path: str | None = None) -> None:
        """Write the memory to one safetensors file (tensors + metadata, never pickle), and a trained
        approximate index to `index_path` (see `ResidualMemory.save`)."""
        metadata = {
            "format": TOKEN_MEMORY_FORMAT,
            "format_version": TOKEN_MEMORY_FORMAT_VERSION,
            "fingerprint": self.fingerprint or "",
            "layer": self.layer or "",
            "num_entries": str(len(self)),
            "temperature": repr(self.temperature),
            "vocab_size": str(self.vocab_size),
            "top_m": "" if self.top_m is None else str(self.top_m),
            "tokenizer": self.tokenizer_hash,
            "window": str(self.window),
            "stride": str(self.stride),
        }
        self._save_index(index_path, metadata)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self._tensors().items()}
        save_file(tensors, path, metadata=metadata)

    @staticmethod
    def read_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Read and validate a token memory file; raise `MemoryFileError` naming the fix if it is unusable."""
        tensors, metadata = open_memory_file(
            path,
            TOKEN_MEMORY_FORMAT,
            "rebuild the memory with `model.build_memory(dataset, tokenizer=...)`",
            "a causal-LM ResMem memory file",
        )
        n = int(metadata.get("num_entries", -1))
        if set(tensors) != set(_TENSORS) or any(
            t.shape[0] != n for name, t in tensors.items() if not (name == "indices" and t.numel() == 0)
        ):
            raise MemoryFileError(
                f"The memory file {path} is inconsistent: expected tensors {list(_TENSORS)} with {n} rows, found "
                f"{ {k: tuple(v.shape) for k, v in tensors.items()} }. Save the model again."
            )
        return tensors, metadata

    def load(self, path: str, index_path: str | None = None, mmap_index: bool = True) -> None:
        """Load a file written by `save` (validated by `read_file`) and its saved index, if any."""
        tensors, meta = self.read_file(path)
        device = self.keys.device if self.keys.device.type != "meta" else torch.device("cpu")
        t = {name: v.to(device) for name, v in tensors.items()}
        self.set_token_entries(
            t["keys"],
            t["values"],
            t["indices"] if t["indices"].numel() else None,
            t["labels"],
            t["example_ids"],
            t["positions"],
            fingerprint=meta["fingerprint"],
            layer=meta["layer"],
            temperature=float(meta["temperature"]),
            vocab_size=int(meta["vocab_size"]),
            top_m=int(meta["top_m"]) if meta.get("top_m") else None,
            tokenizer_hash=meta.get("tokenizer", ""),
            window=int(meta.get("window", 0)),
            stride=int(meta.get("stride", 0)),
        )
        self._load_index(index_path, meta, mmap_index)
