"""`ResMemForCausalLM`: token-level residual memory over any `AutoModelForCausalLM`, with `generate`."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, GenerationMixin
from transformers.modeling_utils import slice_logits_to_keep
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import can_return_tuple, logging

from .configuration_resmem import validate_hyperparameters
from .data import dataset_length
from .data_lm import check_window, token_sequences, window_batches
from .distributed import DistributedBuild, gather_chunks, process_info, progress_bar, sum_stats
from .hooks import EmbeddingCapture, default_decoder_key_layer, per_token_keys
from .hub import base_fingerprint
from .memory_lm import TokenResidualMemory, tokenizer_fingerprint
from .modeling_resmem import ResMemWrapper
from .residuals import (
    mixture_log_probs,
    neighbour_weights,
    resmem_scores,
    resmem_scores_and_logits,
    scores_to_logits,
    sparse_weighted_residual,
    top_m_by_magnitude,
)
from .validation import check_batch_size

logger = logging.get_logger(__name__)

_UNSET = object()


@dataclass
class ResMemCausalLMOutput(CausalLMOutputWithPast):
    """Output of [`ResMemForCausalLM`]: transformers' `CausalLMOutputWithPast` plus ResMem's fields; `K` is the
    number of positions kept (`logits_to_keep`).

    Args:
        loss: mean negative log-likelihood of the next tokens of `labels` under `logits`.
        logits: `(B, K, V)` log-probabilities: `log(renormalise(clamp(scores, score_floor)))`
            (`distribution="clamp"`), the base-mixture (`distribution="mixture"`) or the kNN-LM
            (`distribution="knn-lm"`, then `scores` is that distribution and `residual = scores - softmax(base_logits)`);
            see [`ResMemConfig`] and `resmem.knn_lm`.
        cache: the base model's KV cache (transformers 5 `Cache`), for `generate`.
        hidden_states, attentions: passed through from the base model when requested.
        scores: `(B, K, V)` paper eq. 3, `softmax(base_logits / T) + residual`.
        base_logits: `(B, K, V)` the base model's logits.
        residual: `(B, K, V)` weighted residual of the k nearest memory entries (0 at padded positions).
        neighbor_ids, neighbor_positions, neighbor_distances, neighbor_weights, neighbor_contributions: `(B, K, k)`,
            only with `output_neighbors=True`: each position's neighbours' `example_ids` and token positions, plain
            L2 distances, weights `softmax(-d / sigma)` and contributions `weight * residual[predicted token]`
            (the stored top-m value, 0 when the token is not among the entry's top m; they sum to
            `residual[predicted token]`); also `neighbor_residuals` (each neighbour's residual at the predicted
            token) and `neighbor_labels` (its next token). Padded positions: ids -1, distances inf, weights 0.

    `to_tuple()` (and `return_dict=False`) keep this order and skip `None` fields: as for any transformers
    causal LM, `[0]` is the loss when labels are given and the cache follows the logits.
    """

    scores: torch.FloatTensor | None = None
    base_logits: torch.FloatTensor | None = None
    residual: torch.FloatTensor | None = None
    neighbor_ids: torch.LongTensor | None = None
    neighbor_positions: torch.LongTensor | None = None
    neighbor_distances: torch.FloatTensor | None = None
    neighbor_weights: torch.FloatTensor | None = None
    neighbor_contributions: torch.FloatTensor | None = None
    neighbor_residuals: torch.FloatTensor | None = None
    neighbor_labels: torch.LongTensor | None = None


class ResMemForCausalLM(ResMemWrapper, GenerationMixin):
    r"""
    ResMem over any `AutoModelForCausalLM`: every token position of the memory text is an entry
    (key = hidden state at `t`, label = token `t + 1`), residuals over the vocabulary stored sparse.

    Keys default to the last decoder block's pre-MLP, post-normalisation hidden state, found from the
    model's structure. Residuals are computed at build time at `config.residual_temperature`; `k` and `sigma`
    can change afterwards, `temperature` needs a rebuild.

    Example:

    ```python
    >>> import resmem
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> base = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M")
    >>> tok = AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M")
    >>> model = resmem.ResMemWrapper.from_base(base, k=50, sigma=1.0, temperature=1.0)
    >>> model.build_memory(train_dataset, tokenizer=tok)          # a "text" column
    >>> out = model(**tok(["The capital of France is"], return_tensors="pt"))
    >>> out.scores.shape                                          # (1, seq, vocab)
    >>> model.generate(**tok(["Once upon"], return_tensors="pt"), max_new_tokens=20)
    ```
    """

    main_input_name = "input_ids"
    _supports_cache_class = True

    def __init__(self, config, base_model=None):
        super().__init__(config, base_model=base_model)
        self.memory = TokenResidualMemory()
        # The generation config comes from the base, so its sampling settings (temperature, top_p, ...) carry
        # over; one built from the ResMem config has only defaults (ResMem's T, `residual_temperature`, is not read).
        if base_model is not None and getattr(base_model, "generation_config", None) is not None:
            self.generation_config = copy.deepcopy(base_model.generation_config)
        else:
            self.generation_config = GenerationConfig.from_model_config(config.get_text_config(decoder=True))

    # ------------------------------------------------------------------ construction / delegation
    @classmethod
    def auto_class_for_base(cls):
        return AutoModelForCausalLM

    @classmethod
    def default_layer(cls, base_model, config) -> str:
        text = base_model.config.get_text_config(decoder=True)
        return default_decoder_key_layer(
            base_model, getattr(text, "hidden_size", None), getattr(text, "num_hidden_layers", None)
        )

    @classmethod
    def can_generate(cls) -> bool:
        return True

    def get_input_embeddings(self):
        return self.base.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.base.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.base.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.base.set_output_embeddings(value)

    @property
    def vocab_size(self) -> int:
        return self.base.get_output_embeddings().weight.shape[0]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, tokenizer=None, **kwargs):
        """As [`ResMemWrapper.from_pretrained`]; with `tokenizer=`, also check that the memory was built with it."""
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if tokenizer is not None:
            model.check_tokenizer(tokenizer)
        return model

    def _load_memory(self, path_or_repo, hub_kwargs, check_fingerprint):
        super()._load_memory(path_or_repo, hub_kwargs, check_fingerprint)
        if len(self.memory) and self.memory.vocab_size != self.vocab_size:
            from .memory import MemoryFileError

            raise MemoryFileError(
                f"The memory in {path_or_repo} covers a vocabulary of {self.memory.vocab_size} tokens, but the base "
                f"model's has {self.vocab_size}: it was built for another model. Rebuild it with `model.build_memory`."
            )

    # ------------------------------------------------------------------ checks
    def check_tokenizer(self, tokenizer) -> None:
        """Raise a `ValueError` if `tokenizer` cannot feed this model or differs from the memory's tokenizer."""
        if len(tokenizer) > self.vocab_size:
            raise ValueError(
                f"The tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {self.vocab_size}: it is "
                "not this model's tokenizer. Load it from the same checkpoint as the base model."
            )
        if len(self.memory) and self.memory.tokenizer_hash:
            if tokenizer_fingerprint(tokenizer) != self.memory.tokenizer_hash:
                raise ValueError(
                    "The memory was built with another tokenizer (its vocabulary fingerprint differs), so its token "
                    "ids mean different tokens. Use the tokenizer the memory was built with, or rebuild the memory."
                )

    def _check_ready(self) -> None:
        if len(self.memory) == 0:
            raise ValueError(
                "The memory is empty: call `model.build_memory(texts, tokenizer=...)` before the forward pass or "
                "`generate` (or load a saved ResMem model)."
            )
        super()._check_ready()
        self.memory.check_temperature(self.config.residual_temperature)

    def _resolve_top_m(self, residual_top_m) -> int | None:
        m = self.config.residual_top_m if residual_top_m is _UNSET else residual_top_m
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= self.vocab_size):
            raise ValueError(
                f"residual_top_m must be an integer in [1, {self.vocab_size}] (the vocabulary size) or None for dense "
                f"residuals, got {m!r} (paper: 128)."
            )
        return m

    def _max_positions(self) -> int | None:
        text = self.base.config.get_text_config(decoder=True)
        return getattr(text, "max_position_embeddings", None)

    def _pad_token_id(self, tokenizer, pad_token_id):
        """Padding id for batching windows: explicit, else the tokenizer's (or base config's) pad, else its eos.

        Padded positions are masked and never stored, so any id works; `None` (no pad and no eos token)
        makes batching windows of different lengths fail with an error naming the fix.
        """
        if pad_token_id is not None:
            return pad_token_id
        source = tokenizer if tokenizer is not None else self.base.config.get_text_config(decoder=True)
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(source, name, None)
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if value is not None:
                return value
        return None

    # ------------------------------------------------------------------ memory
    def _example_progress(self, batches, data, stats: dict, desc: str, info=None, progress: bool = True):
        """Yield `batches` (from `memory_batches(..., stats=stats)`) while a bar counts the examples read.

        The bar's total is the number of examples when `data` has a length (a `Dataset`, a list, a tensor),
        so it shows an ETA; a streaming dataset gets a count without total. Main process only.
        """
        bar = progress_bar(total=dataset_length(data), desc=desc, unit="example", info=info, progress=progress)
        shown = 0  # examples the bar has counted (a disabled bar has no `.n`)
        try:
            for item in batches:
                bar.update(stats.get("examples", 0) - shown)  # windows are batched across examples
                shown = stats.get("examples", 0)
                yield item
            bar.update(stats.get("examples", 0) - shown)
        finally:
            bar.close()

    def _sample_queries(
        self, data, sample_size, generator, tokenizer=None, text_column: str = "text", batch_size: int = 8,
        window: int | None = None, stride: int | None = None, max_tokens: int | None = None, progress: bool = False,
    ) -> torch.Tensor:
        """Keys `(S, D)` of a seeded uniform sample of up to `sample_size` token positions of `data`.

        One pass over the text (evaluated positions, as in `evaluate_lm`; stops after `max_tokens`): every
        position gets a random priority from `generator` and the `sample_size` lowest are kept, batch by
        batch, so memory stays O(sample_size * D).
        """
        kept = torch.empty(0, 0)
        priorities = torch.empty(0)
        seen = 0
        stats: dict = {}
        was_training = self.training
        self.eval()
        try:
            batches = self.memory_batches(data, tokenizer, text_column, None, batch_size, window, stride, stats=stats)
            for _, queries, _ in self._example_progress(batches, data, stats, "ResMem sigma scale", progress=progress):
                drawn = torch.rand(queries.shape[0], generator=generator)  # (n,)
                pool = queries.float() if kept.numel() == 0 else torch.cat([kept, queries.float()])  # (S + n, D)
                priorities = torch.cat([priorities, drawn])  # (S + n,)
                order = priorities.topk(min(sample_size, priorities.numel()), largest=False).indices  # (S,)
                kept, priorities = pool[order.to(pool.device)], priorities[order]
                seen += queries.shape[0]
                if max_tokens is not None and seen >= max_tokens:
                    break
        finally:
            self.train(was_training)
        return kept

    def memory_batches(
        self,
        data,
        tokenizer=None,
        text_column: str = "text",
        attention_mask: torch.Tensor | None = None,
        batch_size: int = 8,
        window: int | None = None,
        stride: int | None = None,
        pad_token_id: int | None = None,
        stats: dict | None = None,
        first_example: int = 0,
    ):
        """Yield `(batch, queries, base_logits)` for the entries of `data`: one base forward per batch of windows.

        `queries` `(n, D)` and `base_logits` `(n, V)` cover the batch's entries (`batch.store_mask`), in row-major order.
        Used by `build_memory` and the evaluation (`resmem.evaluation_lm`). `first_example`: the example id of
        the first row of `data` (a process's shard of a larger dataset).
        """
        check_batch_size(batch_size)
        window = self.config.window if window is None else window
        stride = self.config.stride if stride is None else stride
        check_window(window, stride, self._max_positions())
        if tokenizer is not None:
            self.check_tokenizer(tokenizer)
        sequences = token_sequences(data, tokenizer, text_column, attention_mask, self.vocab_size, first_id=first_example)
        pad = self._pad_token_id(tokenizer, pad_token_id)
        capture = EmbeddingCapture(self.base, self.config.layer)
        for batch in window_batches(sequences, window, stride, batch_size, pad, stats):
            if not batch.store_mask.any():
                continue
            ids = batch.input_ids.to(self.device)
            with capture:
                out = self.base(input_ids=ids, attention_mask=batch.attention_mask.to(self.device), use_cache=False)
            hidden = per_token_keys(capture.get(), ids.shape[0], ids.shape[1], self.config.layer)  # (B, T, D)
            store = batch.store_mask.to(self.device)
            yield batch, hidden[store], out.logits[store].float()  # (n, D), (n, V)

    @torch.inference_mode()
    def build_memory(
        self,
        data,
        tokenizer=None,
        text_column: str = "text",
        attention_mask: torch.Tensor | None = None,
        batch_size: int = 8,
        window: int | None = None,
        stride: int | None = None,
        residual_top_m=_UNSET,
        pad_token_id: int | None = None,
        chunk_size: int = 1024,
        accelerator=None,
        progress: bool = True,
    ) -> TokenResidualMemory:
        """Store every token position of `data` that has a next token (key, sparse residual, label, source id).

        Args:
            data: `datasets.Dataset` with a `text_column` (pass `tokenizer`) or `input_ids` (+ `attention_mask`)
                column, a list of strings, a list of token-id lists, or a `(B, T)` `input_ids` tensor (+ `attention_mask`).
            tokenizer: the base model's tokenizer (needed for text; its vocabulary is checked and recorded).
            batch_size: windows per forward pass.
            window, stride: sliding windows (defaults: `config.window`, `config.stride`, paper 256/192).
            residual_top_m: entries kept per residual (default `config.residual_top_m`, paper 128; `None` = dense).
            pad_token_id: padding id for batching windows of different lengths (default: the tokenizer's).
            chunk_size: entries whose residuals are computed at once (bounds the `(chunk, V)` temporaries).
            accelerator: an `accelerate.Accelerator` (or `PartialState`) to split the examples over its processes;
                detected from `torch.distributed` when omitted. Every process must pass the same data (checked
                first: a mismatch raises the same `ValueError` on every process); each embeds a contiguous shard of
                examples and every process ends with the full memory, entry for entry the one-process memory (on
                CPU bit for bit; on GPUs the keys may differ in the last bits, because windows share batches with
                other windows than in one process, as with another `batch_size`). Save with
                `model.save_pretrained(folder, is_main_process=accelerator.is_main_process)`.
            progress: show a progress bar over examples, with a total when `data` has a length (main process
                only; also hidden by `transformers.utils.logging.disable_progress_bar()`).
        Returns:
            The filled [`TokenResidualMemory`]; texts shorter than 2 tokens are skipped (count logged and kept
            in `model.memory_stats`). An exception leaves the previous memory untouched.
        """
        memories = self.build_memories(
            data,
            [float(self.config.residual_temperature)],
            tokenizer=tokenizer,
            text_column=text_column,
            attention_mask=attention_mask,
            batch_size=batch_size,
            window=window,
            stride=stride,
            residual_top_m=residual_top_m,
            pad_token_id=pad_token_id,
            chunk_size=chunk_size,
            accelerator=accelerator,
            progress=progress,
        )
        built = next(iter(memories.values()))
        memory = self.memory if isinstance(self.memory, TokenResidualMemory) else TokenResidualMemory()  # replaces an on-disk one
        memory.set_token_entries(*built.token_tensors(), **built.token_metadata())
        self.memory = memory
        self._record_build(data)
        self.config.residual_top_m = built.top_m
        self.config.window, self.config.stride = built.window, built.stride
        return self.memory

    @torch.inference_mode()
    def build_memories(
        self,
        data,
        temperatures: list[float],
        tokenizer=None,
        text_column: str = "text",
        attention_mask: torch.Tensor | None = None,
        batch_size: int = 8,
        window: int | None = None,
        stride: int | None = None,
        residual_top_m=_UNSET,
        pad_token_id: int | None = None,
        chunk_size: int = 1024,
        accelerator=None,
        progress: bool = True,
    ) -> dict[float, TokenResidualMemory]:
        """One memory per temperature from a single pass of the base model (they share the key tensor).

        For tuning `T` without re-running the base model; arguments as in `build_memory`, which is this
        method with `[config.residual_temperature]`. `self.memory` is left unchanged.

        Under several processes each rank reads a contiguous shard of the examples (a text's windows stay on
        one rank) and the entries are gathered in rank order, which is the one-process order. The progress bar
        (main process) counts examples, with an ETA when the data has a length.
        """
        top_m = self._resolve_top_m(residual_top_m)
        window = self.config.window if window is None else window
        stride = self.config.stride if stride is None else stride
        temps = [float(t) for t in temperatures]
        for t in temps:
            validate_hyperparameters(1, 1.0, t)
        info = process_info(accelerator)
        parts = {name: [] for name in ("keys", "labels", "example_ids", "positions")}
        values = {t: [] for t in temps}
        indices = {t: [] for t in temps}
        stats: dict = {"skipped": 0, "windows": 0, "tokens_forward": 0, "examples": 0}
        was_training = self.training
        self.eval()
        # Same data on every rank (checked before any work), then every step exchanges ok/error flags: an
        # exception on one rank (a bad token id in its shard, say) stops every rank instead of leaving one waiting.
        # Settings that shape the gathered rows (and the entries) must agree too.
        settings = {"temperatures": temps, "top_m": top_m, "window": window, "stride": stride, "text_column": text_column}
        with DistributedBuild(info, data, attention_mask, what="causal-LM memory build", settings=settings) as build:
            data, first_row, attention_mask = build.shard(data, attention_mask)  # all of it in one process
            bar = progress_bar(
                total=dataset_length(data), desc="Building ResMem memory", unit="example", info=info, progress=progress
            )
            shown = 0  # examples the bar has counted (a disabled bar has no `.n`)
            try:
                batches = self.memory_batches(
                    data, tokenizer, text_column, attention_mask, batch_size, window, stride, pad_token_id, stats,
                    first_example=first_row,  # ids of the whole dataset, in error messages too
                )
                for entries, residual in self._entries_of(batches, temps, top_m, chunk_size):
                    bar.update(stats["examples"] - shown)  # examples read so far (windows are batched across them)
                    shown = stats["examples"]
                    for name, part in parts.items():
                        part.append(entries[name])
                    for t, (v, i) in residual.items():
                        values[t].append(v)
                        if i is not None:
                            indices[t].append(i)
                bar.update(stats["examples"] - shown)
            finally:
                bar.close()
                self.train(was_training)
            if info.distributed:
                stats = sum_stats(stats, build)
            entries = sum(build.sync(sum(k.shape[0] for k in parts["keys"]), step="entries"))  # over every rank
            if not entries:
                raise ValueError(
                    f"No memory entries: every text is shorter than 2 tokens ({stats.get('skipped', 0)} skipped). "
                    "A causal-LM memory needs texts with at least one next token."
                )
            if stats.get("skipped") and info.is_main_process:
                logger.warning(f"build_memory skipped {stats['skipped']} text(s) shorter than 2 tokens (no next token).")
            # (N, ...) in one-process order: this rank's rows, then (several processes) every rank's in rank order.
            cat = {name: gather_chunks(p, info, build, name) for name, p in parts.items()}
            values = {t: gather_chunks(values[t], info, build, f"values T={t}") for t in temps}
            if top_m is not None:
                indices = {t: gather_chunks(indices[t], info, build, f"indices T={t}") for t in temps}
        cat = {name: p.to(self.device) for name, p in cat.items()}
        common = dict(
            fingerprint=base_fingerprint(self.base),
            layer=self.config.layer,
            vocab_size=self.vocab_size,
            top_m=top_m,
            tokenizer_hash=tokenizer_fingerprint(tokenizer) if tokenizer is not None else "",
            window=window,
            stride=stride,
        )
        memories = {}
        for t in temps:
            memory = TokenResidualMemory()
            memory.set_token_entries(
                cat["keys"],
                values[t].to(self.device),
                indices[t].to(self.device) if top_m is not None else None,
                cat["labels"],
                cat["example_ids"],
                cat["positions"],
                temperature=t,
                **common,
            )
            memories[t] = memory
        self.memory_stats = {**stats, "entries": len(cat["keys"]), "bytes_per_entry": memories[temps[0]].bytes_per_entry()}
        return memories

    def _entries_of(self, batches, temperatures: list[float], top_m: int | None, chunk_size: int):
        """Turn `memory_batches` output into entries: for each batch of windows, `(entries, residuals)`.

        `entries`: `keys` `(n, D)`, `labels`, `example_ids` (source row of each entry), `positions` `(n,)`;
        `residuals`: `{T: (values (n, m) float16, indices (n, m) int32 or None when dense)}`, computed
        `chunk_size` entries at a time (bounds the `(chunk, V)` temporaries). Raises on NaN/inf keys or logits.
        """
        for batch, keys, logits in batches:
            store = batch.store_mask
            labels = batch.labels[store].to(self.device)  # (n,)
            if not torch.isfinite(keys).all() or not torch.isfinite(logits).all():
                raise ValueError(
                    f"Layer {self.config.layer!r} or the logits contain NaN/inf; check the model's dtype or pick "
                    "another layer."
                )
            residuals = {}
            for t in temperatures:
                chunks = [
                    sparse_residuals(logits[s : s + chunk_size], labels[s : s + chunk_size], t, top_m)
                    for s in range(0, keys.shape[0], chunk_size)
                ]
                residuals[t] = (
                    torch.cat([v for v, _ in chunks]),
                    None if top_m is None else torch.cat([i for _, i in chunks]),
                )
            entries = {
                "keys": keys,
                "labels": labels,
                "example_ids": batch.example_ids.unsqueeze(1).expand_as(store)[store],
                "positions": batch.positions[store],
            }
            yield entries, residuals

    @torch.inference_mode()
    def token_entry_batches(
        self,
        data,
        temperature: float,
        top_m: int | None,
        tokenizer=None,
        text_column: str = "text",
        attention_mask: torch.Tensor | None = None,
        batch_size: int = 8,
        window: int | None = None,
        stride: int | None = None,
        pad_token_id: int | None = None,
        chunk_size: int = 1024,
        stats: dict | None = None,
        progress: bool = True,
    ):
        """Yield the memory entries of `data` one batch of windows at a time (never all at once), on the CPU.

        Each item is a dict for `TokenResidualMemory.add` / `MemoryWriter.add_entries`: `keys` `(n, D)` float32,
        `values` `(n, m)` float16 and `indices` `(n, m)` int32 (absent when `top_m` is None: dense), `labels`,
        `example_ids` (the source row of each entry in `data`) and `positions` `(n,)` int64.
        Arguments as in `build_memory`; residuals at `temperature`, sparsified to `top_m`.
        """
        was_training = self.training
        self.eval()
        stats = stats if stats is not None else {}
        try:
            batches = self.memory_batches(
                data, tokenizer, text_column, attention_mask, batch_size, window, stride, pad_token_id, stats
            )
            batches = self._example_progress(batches, data, stats, "Embedding ResMem entries", progress=progress)
            for entries, residual in self._entries_of(batches, [temperature], top_m, chunk_size):
                values, indices = residual[temperature]
                entries = {name: t.cpu() for name, t in entries.items()}
                entries["keys"], entries["values"] = entries["keys"].float(), values.cpu()
                if indices is not None:
                    entries["indices"] = indices.cpu()
                yield entries
        finally:
            self.train(was_training)

    @torch.inference_mode()
    def add_to_memory(
        self,
        data,
        tokenizer=None,
        example_ids=None,
        text_column: str = "text",
        attention_mask: torch.Tensor | None = None,
        batch_size: int = 8,
        pad_token_id: int | None = None,
        chunk_size: int = 1024,
    ) -> TokenResidualMemory:
        """Embed `data` and append its token entries to the memory (the model embeds, the memory stores).

        The new entries use the memory's own build settings (temperature, `residual_top_m`, window,
        stride; an empty memory takes them from the config), so the result equals a memory built
        on the old and the new data together. Remove them again with `remove_from_memory(ids)`.

        Args:
            data: as for `build_memory` (texts with `tokenizer`, token-id lists, a `datasets.Dataset`, ...).
            example_ids: one id per example (row) of `data`; every token entry of row r gets
                `example_ids[r]`. Default: numbered after the largest id in the memory. Ids must be new.
        Returns:
            The memory, `len(model.memory)` grown by the new entries.
        """
        from .memory_disk import OnDiskMemory

        memory = self.memory
        if isinstance(memory, OnDiskMemory):
            memory.add(data)  # raises: read-only, naming the fixes
        self._check_memory_fingerprint_for_edit()
        empty = len(memory) == 0
        temperature = float(self.config.residual_temperature) if empty else memory.temperature
        top_m = self._resolve_top_m(_UNSET) if empty else memory.top_m
        window = self.config.window if empty or not memory.window else memory.window
        stride = self.config.stride if empty or not memory.stride else memory.stride
        stats: dict = {}
        parts = list(
            self.token_entry_batches(
                data, temperature, top_m, tokenizer, text_column, attention_mask, batch_size, window, stride,
                pad_token_id, chunk_size, stats,
            )
        )
        if not parts:
            raise ValueError(
                f"No memory entries: every text is shorter than 2 tokens ({stats.get('skipped', 0)} skipped). "
                "A causal-LM memory needs texts with at least one next token."
            )
        entries = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        entries["example_ids"] = self._new_example_ids(entries["example_ids"], example_ids)
        if empty:
            memory.set_token_entries(
                entries["keys"].to(self.device), entries["values"].to(self.device),
                entries["indices"].to(self.device) if "indices" in entries else None,
                entries["labels"].to(self.device), entries["example_ids"].to(self.device),
                entries["positions"].to(self.device),
                fingerprint=base_fingerprint(self.base), layer=self.config.layer, temperature=temperature,
                vocab_size=self.vocab_size, top_m=top_m,
                tokenizer_hash=tokenizer_fingerprint(tokenizer) if tokenizer is not None else "",
                window=window, stride=stride,
            )
        else:
            memory.add(entries)  # checked by the memory (`_check_entries`): widths, layout, new ids
        self.config.memory_size = len(memory)
        return memory

    @torch.inference_mode()
    def build_memory_on_disk(
        self,
        data,
        folder: str,
        tokenizer=None,
        text_column: str = "text",
        attention_mask: torch.Tensor | None = None,
        batch_size: int = 8,
        window: int | None = None,
        stride: int | None = None,
        residual_top_m=_UNSET,
        pad_token_id: int | None = None,
        chunk_size: int = 1024,
        shard_size: int | None = None,
        shard_bytes: int = 128 * 2**20,
    ):
        """Like `build_memory`, for memories larger than RAM: entries go to safetensors shards in `folder`
        as each batch of windows is embedded (never all in RAM), and the memory is then memory-mapped.

        Args:
            data: as for `build_memory`; a streaming `datasets.IterableDataset` works (read once, in order).
            folder: output folder (must not hold a memory yet).
            shard_size: entries per shard; default: as many as fit in `shard_bytes` (RAM holds at most one
                shard's entries while writing).
            other arguments: as for `build_memory`.
        Returns:
            The `OnDiskTokenMemory` now in `model.memory`. Search it with an approximate index for large
            memories (`config.index="auto"` picks IVF from 200,000 entries); exact search scans the shards.
            One process only (a multi-process build writes from one rank: not supported yet).
        """
        from .memory_disk import MemoryWriter, OnDiskMemory
        from .memory_lm import TOKEN_SCHEMA, token_metadata_strings

        top_m = self._resolve_top_m(residual_top_m)
        window = self.config.window if window is None else window
        stride = self.config.stride if stride is None else stride
        temperature = float(self.config.residual_temperature)
        validate_hyperparameters(1, 1.0, temperature)
        metadata = token_metadata_strings(
            temperature, self.vocab_size, top_m, tokenizer_fingerprint(tokenizer) if tokenizer is not None else "",
            window, stride,
        )
        writer = MemoryWriter(
            folder, base_fingerprint(self.base), self.config.layer, shard_size=shard_size or 1, schema=TOKEN_SCHEMA,
            metadata=metadata,
        )
        stats: dict = {}
        batches = self.token_entry_batches(
            data, temperature, top_m, tokenizer, text_column, attention_mask, batch_size, window, stride,
            pad_token_id, chunk_size, stats,
        )
        for entries in batches:
            if shard_size is None and writer.num_entries == writer._pending_rows == 0:
                row_bytes = sum(t.element_size() * (t.shape[1] if t.dim() > 1 else 1) for t in entries.values())
                writer.shard_size = max(1, shard_bytes // row_bytes)
            writer.add_entries(entries)
        if stats.get("skipped"):
            logger.warning(f"build_memory_on_disk skipped {stats['skipped']} text(s) shorter than 2 tokens (no next token).")
        if writer.num_entries + writer._pending_rows == 0:
            raise ValueError(
                f"No memory entries: every text is shorter than 2 tokens ({stats.get('skipped', 0)} skipped). "
                "A causal-LM memory needs texts with at least one next token."
            )
        writer.close()
        self.memory = OnDiskMemory.open(folder)
        self._record_build(data)
        self.config.residual_top_m = top_m
        self.config.window, self.config.stride = window, stride
        self.memory_stats = {**stats, "entries": len(self.memory), "bytes_per_entry": self.memory.bytes_per_entry()}
        return self.memory

    # ------------------------------------------------------------------ tuning
    def tune(
        self,
        val_data,
        tokenizer=None,
        k=None,
        sigma=None,
        mixture_lambda=None,
        objective: str = "accuracy",
        max_fpr: float = 0.05,
        temperature=None,
        **kwargs,
    ):
        """Grid-search `k`, `sigma` (and `mixture_lambda`) on validation text from ONE base pass.

        Sets the best values on `self.config`, including `config.distribution` ("clamp", or "mixture" with the
        best `mixture_lambda`, whichever has the lower validation perplexity; default lambda grid
        `resmem.evaluation_lm.DEFAULT_LAMBDAS`), records the evaluation for the model card and returns a
        [`resmem.tuning.TuneResult`]. `sigma="auto"` searches `sigma_scale(val_data) * (0.25, 0.5, 1, 2, 4)`;
        `progress=False` hides the bars. `temperature` is not tunable without a rebuild (the residuals are
        stored at the build T): use `build_memories(data, temperatures)`. See [`resmem.tuning_lm.tune_lm`].

        Example:

        ```python
        >>> result = model.tune(val_texts, tokenizer=tok, k=[10, 50], sigma=[0.5, 1.0], mixture_lambda=[0.25, 0.5])
        >>> result.best["k"] == model.config.k
        True
        ```
        """
        from .tuning_lm import tune_lm

        return tune_lm(
            self, val_data, tokenizer, k, sigma, mixture_lambda, objective, max_fpr, temperature=temperature, **kwargs
        )

    # ------------------------------------------------------------------ forward
    def prepare_inputs_for_generation(self, *args, **kwargs):
        """As `GenerationMixin`'s, plus `output_residual=False`: `generate` reads only `logits`."""
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        inputs.setdefault("output_residual", False)
        return inputs

    def resmem_outputs(
        self,
        base_logits: torch.Tensor,
        queries: torch.Tensor,
        valid: torch.Tensor | None = None,
        output_residual: bool = True,
        neighbors: dict | None = None,
    ):
        """ResMem `(scores, logits, residual)` from base logits `(..., V)` and their queries `(n, D)`, `n = prod(...)`.

        `valid` `(n,)` bool skips the kNN search at padded positions (their residual is 0). With
        `output_residual=False` the returned residual is `None` (not materialised). A `neighbors` dict receives the
        neighbours of this search (`resmem.explain.token_neighbor_tensors`), for `output_neighbors=True`.

        Cost (why it is built this way): the kNN search and the gather of the `k * m` stored values run
        for the searched positions only; the `(n, V)` work is done chunk by chunk on cache-resident rows
        by [`resmem.residuals.resmem_scores_and_logits`] (one softmax, a scatter-add of the weighted values
        straight into it, the logits in place), writing each output once. A dense residual (zeros plus the
        same scatter, in the same chunks) is made only when asked. The scores equal `softmax(f(x) / T) + residual` up to
        float32 summation order (within ~1e-7).
        """
        config = self.config
        self.memory.check_temperature(config.residual_temperature)
        shape = base_logits.shape
        flat_logits = base_logits.reshape(-1, shape[-1])  # (n, V)
        n, v = flat_logits.shape
        device = flat_logits.device
        rows = valid.nonzero().squeeze(1) if valid is not None and not bool(valid.all()) else None
        q = queries if rows is None else queries[rows]
        if config.distribution == "knn-lm":  # the kNN-LM of the same memory's next tokens (resmem.knn_lm)
            from .knn_lm import knn_lm_outputs

            scores, logits, residual = knn_lm_outputs(self.memory, config, flat_logits, q, rows, output_residual)
            return scores.view(shape), logits.view(shape), None if residual is None else residual.view(shape)
        with self.memory._lock:  # search and gather see the same memory even if another thread edits it
            k = self.memory.effective_k(config.k) if q.shape[0] else 1
            weights = torch.zeros(n, k, dtype=torch.float32, device=device)  # (n, k): 0 = no residual
            ids = torch.zeros(n, k, dtype=torch.long, device=device)  # (n, k)
            d1 = torch.full((n,), float("inf"), device=device)  # (n,) nearest distance ("adaptive"); inf: no search
            if q.shape[0]:
                distances, found = self.memory.search(q, k, config.index, config.index_params)  # (n', k)
                w = neighbour_weights(distances, config.sigma).to(device)  # (n', k)
                if rows is None:
                    weights, ids, d1 = w, found.to(device), distances[:, 0].float().to(device)
                else:
                    weights[rows.to(device)], ids[rows.to(device)] = w, found.to(device)
                    d1[rows.to(device)] = distances[:, 0].float().to(device)
            values, indices = self.memory.neighbour_values(ids)  # (n, k, m) each
            if neighbors is not None:  # explanations: the neighbours of this one search
                from .explain import token_neighbor_tensors

                neighbors.update(token_neighbor_tensors(self.memory, ids, weights, distances if q.shape[0] else None, rows))
        values = values.to(device)
        indices = None if indices is None else indices.to(device)
        if torch.is_grad_enabled() and (flat_logits.requires_grad or weights.requires_grad):
            # Autograd (e.g. a loss on ResMem's logits): the fused path writes into preallocated outputs, which
            # autograd cannot follow, so compose the same values from differentiable steps.
            residual = sparse_weighted_residual(weights, values, indices, v)  # (n, V)
            scores = resmem_scores(flat_logits, residual, config.residual_temperature)  # (n, V)
            if config.distribution == "adaptive":  # the distance-gated mixture (resmem.adaptive_mixture)
                from .adaptive_mixture import adaptive_outputs

                scores, logits, residual = adaptive_outputs(
                    scores, flat_logits, d1, config.adaptive_lambda_max, config.adaptive_tau, output_residual,
                    config.adaptive_gate, config.adaptive_d0, config.adaptive_prediction,
                )
                return scores.view(shape), logits.view(shape), None if residual is None else residual.view(shape)
            if config.distribution == "mixture":
                logits = mixture_log_probs(scores, flat_logits, config.mixture_lambda)
            else:
                logits = scores_to_logits(scores, config.score_floor)
            return scores.view(shape), logits.view(shape), residual.view(shape) if output_residual else None
        if config.distribution == "adaptive":  # ResMem scores, then the distance-gated mixture (resmem.adaptive_mixture)
            from .adaptive_mixture import adaptive_outputs

            scores, _ = resmem_scores_and_logits(
                flat_logits, weights, values, indices, config.residual_temperature, "clamp", config.score_floor
            )  # (n, V)
            scores, logits, residual = adaptive_outputs(
                scores, flat_logits, d1, config.adaptive_lambda_max, config.adaptive_tau, output_residual,
                config.adaptive_gate, config.adaptive_d0, config.adaptive_prediction,
            )
            return scores.view(shape), logits.view(shape), None if residual is None else residual.view(shape)
        residual = torch.empty(n, v, dtype=torch.float32, device=device) if output_residual else None  # (n, V)
        scores, logits = resmem_scores_and_logits(
            flat_logits, weights, values, indices, config.residual_temperature, config.distribution,
            config.score_floor, config.mixture_lambda, residual=residual,
        )  # (n, V) each; `residual` filled chunk by chunk
        return scores.view(shape), logits.view(shape), None if residual is None else residual.view(shape)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        past_key_values=None,
        output_residual: bool = True,
        output_neighbors: bool = False,
        **kwargs,
    ) -> ResMemCausalLMOutput:
        """
        Args:
            input_ids: `(B, T)` token ids (or `inputs_embeds` `(B, T, D)`).
            attention_mask: `(B, T_past + T)`; with left padding and no `position_ids`, positions are
                derived from it (`cumsum - 1`), as `generate` does, so padded rows match unpadded ones.
            cache / past_key_values: the base model's KV cache (transformers 5 name: `cache`).
            labels: `(B, T)` next-token targets as in HF causal LMs (shifted inside; -100 ignored); the loss is
                transformers' causal-LM loss (`self.loss_function`, which also takes `num_items_in_batch` and
                `shift_labels`) on `logits`.
            logits_to_keep: as in HF causal LMs (`0` = all positions, `n` = last `n`, or a tensor of
                positions); the kNN search runs only for these positions.
            output_residual: return the dense `(B, K, V)` `residual`; `False` leaves it `None` and saves one
                `(B, K, V)` buffer plus its scatter (`generate` passes `False`: it reads only `logits`). The
                other fields are the same either way.
            output_neighbors: also return each kept position's k neighbours (`neighbor_*` fields, `(B, K, k)`),
                taken from the forward's own search; off by default (then nothing extra is computed).
            return_dict: `False` returns `to_tuple()` (default `config.return_dict`).
        Returns:
            [`ResMemCausalLMOutput`] with dense `(B, K, V)` `scores`, `logits`, `base_logits`, `residual`.
        """
        self._check_ready()
        self._warn_if_training()
        if cache is None:
            cache = past_key_values
        seq_len = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2 and not attention_mask.all():
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -seq_len:]
        base_kwargs = dict(kwargs)
        for name, value in (("output_hidden_states", output_hidden_states), ("output_attentions", output_attentions)):
            if value is not None:
                base_kwargs[name] = value
        capture = EmbeddingCapture(self.base, self.config.layer)
        with capture:
            base_out = self.base(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **base_kwargs,
            )
        hidden = per_token_keys(capture.get(), batch, seq_len, self.config.layer)  # (B, T, D)
        base_logits = base_out.logits  # (B, K, V)
        queries = slice_logits_to_keep(hidden, logits_to_keep).reshape(-1, hidden.shape[-1])  # (B*K, D)
        valid = None
        if attention_mask is not None and attention_mask.dim() == 2:
            current = attention_mask[:, -seq_len:].unsqueeze(-1)  # (B, T, 1)
            valid = slice_logits_to_keep(current, logits_to_keep).reshape(-1).bool()  # (B*K,)
        found = {} if output_neighbors else None
        scores, logits, residual = self.resmem_outputs(base_logits, queries, valid, output_residual, neighbors=found)
        neighbors = {}
        if output_neighbors:
            from .explain import neighbor_fields

            neighbors = neighbor_fields(found, scores.argmax(dim=-1).reshape(-1), scores.shape[:-1])  # (B, K, k) each
        loss = None
        if labels is not None:
            if logits.shape[:2] != labels.shape:
                raise ValueError("labels need the logits of every position: call with logits_to_keep=0.")
            # `logits` are log-probabilities (each row's logsumexp is 0), so this cross-entropy is their NLL.
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1], **kwargs)
        return ResMemCausalLMOutput(
            loss=loss,
            logits=logits,
            scores=scores,
            base_logits=base_logits,
            residual=residual,
            cache=getattr(base_out, "cache", None),
            hidden_states=getattr(base_out, "hidden_states", None),
            attentions=getattr(base_out, "attentions", None),
            **neighbors,
        )


def sparse_residuals(logits: torch.Tensor, labels: torch.Tensor, temperature: float, top_m: int | None):
    """Residuals `onehot(y) - softmax(logits / T)` of `(n, V)` logits, sparsified to `top_m` by magnitude.

    Returns `(values (n, m) float16, indices (n, m) int32)` or `(values (n, V) float16, None)` when dense.
    """
    from .residuals import residuals

    values, indices = top_m_by_magnitude(residuals(logits, labels, temperature), top_m)  # (n, m)
    return values.to(torch.float16), None if indices is None else indices.to(torch.int32)
