"""`TokenResidualMemory`: one entry per token position of the memory text, residuals stored sparse.

For a causal LM the label space is the vocabulary (tens of thousands of items), so storing every
entry's base logits (as `ResidualMemory` does for classifiers) would cost `4 * V` bytes per token.
Instead the residual `onehot(y) - softmax(f(x) / T)` is computed once, at build time and at the
build temperature, and only its `residual_top_m` entries of largest magnitude are kept (float16
values, int32 vocabulary indices). Consequence: `k` and `sigma` can change at any time, but a new
temperature `T` needs `build_memory` again.

The payload (schema `TOKEN_SCHEMA` and the mixin `TokenResiduals`) is shared by the in-RAM
`TokenResidualMemory` and the on-disk `resmem.memory_disk.OnDiskTokenMemory`.
"""

from __future__ import annotations

import hashlib
import json
import math

import torch

from .memory import EditableMemory, MemoryFileError, MemorySchema, _locked
from .residuals import neighbour_weights, sparse_weighted_residual
from .validation import ADD_FIX, FILE_FIX, check_token_entries, parse_token_metadata

TOKEN_MEMORY_FORMAT = "resmem-token-memory"
TOKEN_MEMORY_FORMAT_VERSION = "1"
_TENSORS = ("keys", "values", "indices", "labels", "example_ids", "positions")

TOKEN_SCHEMA = MemorySchema(
    name="token",
    format=TOKEN_MEMORY_FORMAT,
    format_version=TOKEN_MEMORY_FORMAT_VERSION,
    fields=(
        ("keys", torch.float32, 2),
        ("values", torch.float16, 2),
        ("indices", torch.int32, 2),
        ("labels", torch.long, 1),
        ("example_ids", torch.long, 1),
        ("positions", torch.long, 1),
    ),
    optional=frozenset({"indices"}),
    one_entry_per_example=False,
    metadata=("temperature", "vocab_size", "top_m", "tokenizer", "window", "stride"),
    kind="a causal-LM ResMem memory file",
    rebuild_hint="rebuild the memory with `model.build_memory(dataset, tokenizer=...)`",
)


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of a tokenizer's vocabulary (token -> id map): equal iff the ids mean the same tokens."""
    vocab = tokenizer.get_vocab()
    payload = json.dumps(sorted(vocab.items(), key=lambda item: item[1]), ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def token_metadata_strings(temperature, vocab_size, top_m, tokenizer_hash="", window=0, stride=0) -> dict[str, str]:
    """The LM memory's metadata as file-metadata strings (single file, shards and manifest alike)."""
    return {
        "temperature": repr(None if temperature is None else float(temperature)),
        "vocab_size": str(int(vocab_size)),
        "top_m": "" if top_m is None else str(int(top_m)),
        "tokenizer": tokenizer_hash or "",
        "window": str(int(window)),
        "stride": str(int(stride)),
    }


class TokenResiduals:
    """The causal-LM payload: sparse top-m residuals fixed at the build temperature.

    Mixed into a store (in RAM: [`TokenResidualMemory`]; on disk: `OnDiskTokenMemory`); uses only
    `field_rows`, `search` and `_stored`.

    Attributes:
        temperature: build temperature `T` of the stored residuals.
        vocab_size: `V`, the width of the base model's logits.
        top_m: entries kept per residual, `None` for dense.
        tokenizer_hash: `tokenizer_fingerprint` of the tokenizer used at build time ("" if unknown).
        window, stride: the sliding windows the memory text was read with.
    """

    schema = TOKEN_SCHEMA
    temperature: float | None = None
    vocab_size: int = 0
    top_m: int | None = None
    tokenizer_hash: str = ""
    window: int = 0
    stride: int = 0

    @property
    def dense(self) -> bool:
        return not self._stored("indices")

    def _check_content(self, tensors: dict, source: str, error: type[Exception], joining: bool) -> None:
        # finite keys/values, labels and indices in [0, V), indices shaped like values
        fix = FILE_FIX if issubclass(error, MemoryFileError) else ADD_FIX
        entries = {name: tensors.get(name) for name in _TENSORS}
        top_m = self.top_m if joining else "any"
        check_token_entries(entries, self.vocab_size, source, top_m=top_m, dim=self.dim if joining else None, error=error, fix=fix)

    @classmethod
    def _check_file_content(cls, tensors: dict, metadata: dict, source: str) -> None:
        meta = parse_token_metadata(metadata, source, MemoryFileError)
        check_token_entries(tensors, meta["vocab_size"], source, top_m=meta["top_m"], error=MemoryFileError, fix=FILE_FIX)

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

    def _set_token_metadata(self, temperature, vocab_size, top_m, tokenizer_hash="", window=0, stride=0) -> None:
        self.temperature = None if temperature is None else float(temperature)
        self.vocab_size, self.top_m = int(vocab_size), (None if top_m is None else int(top_m))
        self.tokenizer_hash, self.window, self.stride = tokenizer_hash or "", int(window), int(stride)

    def _task_metadata(self) -> dict[str, str]:
        return token_metadata_strings(
            self.temperature, self.vocab_size, self.top_m, self.tokenizer_hash, self.window, self.stride
        )

    def _read_task_metadata(self, meta: dict[str, str]) -> None:
        temperature = meta.get("temperature")
        self._set_token_metadata(
            None if temperature in (None, "", "None") else float(temperature),
            int(meta.get("vocab_size", 0)),
            int(meta["top_m"]) if meta.get("top_m") else None,
            meta.get("tokenizer", ""),
            int(meta.get("window", 0)),
            int(meta.get("stride", 0)),
        )

    def bytes_per_entry(self) -> int:
        """Storage of one entry: key + residual values (+ indices) + label, example id and position."""
        return self._row_bytes() if len(self) else 0

    def nbytes(self) -> int:
        return len(self) * self._row_bytes()

    # ------------------------------------------------------------------ querying
    def check_temperature(self, temperature: float) -> None:
        if self.temperature is not None and not math.isclose(temperature, self.temperature, rel_tol=1e-6):
            raise ValueError(
                f"The memory's residuals were computed at temperature T={self.temperature}, but config.residual_temperature "
                f"is {temperature}. For causal LMs the (sparse) residuals are fixed at build time: set "
                f"`model.config.residual_temperature = {self.temperature}` or call `model.build_memory(...)` again at the new T "
                "(k and sigma can change without a rebuild)."
            )

    def neighbour_values(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stored residuals of the given entries: `(B, k)` ids -> values `(B, k, m)`, indices `(B, k, m)` or None."""
        b, k = ids.shape
        flat = ids.reshape(-1)
        values = self.field_rows("values", flat).view(b, k, -1)  # (B, k, m)
        indices = None if self.dense else self.field_rows("indices", flat).view(b, k, -1)  # (B, k, m)
        return values, indices

    def combine(
        self, distances: torch.Tensor, ids: torch.Tensor, sigma: float, out: torch.Tensor | None = None, rows=None
    ) -> torch.Tensor:
        """`r_kNN = sum_i w_i r_i` from neighbours found by `search`: `(B, k)` each -> `(B, V)` float32.

        With `out` `(n, V)` (and `rows` `(B,)`), the residuals are added into those rows of `out` in place
        and `out` is returned (see `sparse_weighted_residual`).
        """
        values, indices = self.neighbour_values(ids)  # (B, k, m)
        if out is not None:
            values = values.to(out.device)
            indices = None if indices is None else indices.to(out.device)
        weights = neighbour_weights(distances.to(values.device), sigma)  # (B, k)
        return sparse_weighted_residual(weights, values, indices, self.vocab_size, out=out, rows=rows)  # (B, V)

    def neighbour_residuals(self, ids: torch.Tensor, temperature: float) -> torch.Tensor:
        """Dense residuals of the given entries, `(B, k)` ids -> `(B, k, V)` (for inspection; costly)."""
        self.check_temperature(temperature)
        values, indices = self.neighbour_values(ids)
        if indices is None:
            return values.float()
        out = torch.zeros(*ids.shape, self.vocab_size, device=values.device)
        return out.scatter_(2, indices.long(), values.float())

    @_locked
    def residual_for(
        self,
        queries: torch.Tensor,
        k: int,
        sigma: float,
        temperature: float,
        index_spec: str = "auto",
        index_params: dict | None = None,
        out: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ):
        """`r_kNN(x)` for `(B, D)` query keys -> `(B, V)` float32 on the queries' device (`temperature` must be the build T).

        With `out` `(n, V)` float32 (and `rows` `(B,)`), the residuals are added into those rows of `out`.
        """
        self.check_temperature(temperature)
        distances, ids = self.search(queries, k, index_spec, index_params)
        if out is not None:
            return self.combine(distances, ids, sigma, out=out, rows=rows)
        return self.combine(distances, ids, sigma).to(queries.device)


class TokenResidualMemory(TokenResiduals, EditableMemory):
    """Keys `z_t = phi(x)_t` of every stored token position with its sparse residual over the vocabulary.

    Buffers (non-persistent; saved by `save` into their own safetensors file):
        keys: `(N, D)` float32.
        values: `(N, m)` float16 residual values (`m = V` when stored dense).
        indices: `(N, m)` int32 vocabulary ids of `values`; `(0, 0)` when dense.
        labels: `(N,)` int64 next token `y = x_{t+1}`.
        example_ids: `(N,)` int64 source example (row of the dataset the memory was built from).
        positions: `(N,)` int64 position `t` of the entry inside its source example.

    Attributes: see [`TokenResiduals`]. Editing: `add(dict)` / `remove(example_ids)` as for every
    in-RAM memory (an example's entries share its id); `model.add_to_memory(texts, tokenizer=...)`
    embeds new text and hands the entries over.
    """

    @_locked
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
        tensors = dict(zip(_TENSORS, (keys, values, indices, labels, example_ids, positions)))
        # Checked against the new vocabulary before anything changes (`_replace` then checks the layout).
        check_token_entries(tensors, int(vocab_size), "the entries passed to set_token_entries", top_m=top_m)
        self._replace(tensors, fingerprint, layer, "set_token_entries", check_content=False)
        self._set_token_metadata(temperature, vocab_size, top_m, tokenizer_hash, window, stride)

    def token_tensors(self) -> tuple:
        """`(keys, values, indices or None, labels, example_ids, positions)`, the positional args of `set_token_entries`."""
        return (self.keys, self.values, None if self.dense else self.indices, self.labels, self.example_ids, self.positions)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return self.entry_tensors()
