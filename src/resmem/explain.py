"""Explanations: which training examples moved a ResMem prediction, and by how much.

ResMem's prediction is `argmax scores(x)` with `scores(x) = softmax(f(x) / T) + sum_i w_i r_i`
(paper eq. 3), so the k nearest memory entries change the predicted class's score by exactly
`sum_i w_i r_i[c]`, where `c` is the predicted class (or token). Each neighbour's *contribution*
`w_i * r_i[c]` is therefore an exact, additive attribution of the memory's part of that score: the
contributions of the k neighbours sum to `out.residual[..., c]`.

Three layers:

- the forward (`model(..., output_neighbors=True)`) returns per query the neighbours of the search it
  already does (never a second search): `neighbor_ids`, `neighbor_distances`, `neighbor_weights`,
  `neighbor_contributions` (plus `neighbor_residuals`, `neighbor_labels` and, for causal LMs,
  `neighbor_positions`), shapes `(B, k)` for image classifiers and `(B, K, k)` for causal LMs. The
  helpers here (`classifier_residual_and_neighbors`, `token_neighbor_tensors`, `neighbor_fields`)
  are what the forwards call;
- `explain(model, inputs, dataset=None, top=5)` (also `model.explain(...)`) turns them into
  [`Explanation`] records: the `top` neighbours by |contribution|, with the training rows when the
  dataset the memory was built from is given;
- `plot_explanation(explanations, path, dataset=...)` draws the paper's Figure 2 (a query image, then
  its nearest training images with label, weight and residual) as a PNG.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .residuals import neighbour_weights, weighted_residual

# ---------------------------------------------------------------------------------------------------- forward helpers


def classifier_residual_and_neighbors(
    memory, queries: torch.Tensor, k: int, sigma: float, temperature: float, index_spec: str, index_params: dict | None,
    sigma_mode: str = "absolute",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`memory.residual_for(...)` plus the neighbours it used, from ONE search (image classifiers).

    The residual is computed by the same steps as `ClassifierResiduals.residual_for` (same values, bitwise).

    Args:
        memory: a classifier memory (`ResidualMemory` or `OnDiskClassifierMemory`).
        queries: `(B, D)` key embeddings.
    Returns:
        `(residual (B, C), neighbours)`: `neighbours` holds `distances` `(B, k)` (plain L2, `inf` for a slot the
        index could not fill), `weights` `(B, k)`, `residuals` `(B, k, C)` (each neighbour's residual at `T`),
        `example_ids` `(B, k)` and `labels` `(B, k)`.
    """
    with memory._lock:  # search and gather see the same memory even if another thread edits it
        distances, entries = memory.search(queries, k, index_spec, index_params)  # (B, k) each
        weights = torch.nan_to_num(neighbour_weights(distances, sigma, sigma_mode), nan=0.0)  # (B, k); no neighbour -> 0
        residuals = memory.neighbour_residuals(entries, temperature).to(weights.device)  # (B, k, C)
        flat = entries.reshape(-1)
        example_ids = memory.field_rows("example_ids", flat).view(entries.shape)  # (B, k)
        labels = memory.field_rows("labels", flat).view(entries.shape)  # (B, k)
    residual = weighted_residual(weights, residuals)  # (B, C)
    neighbours = {
        "distances": distances,
        "weights": weights,
        "residuals": residuals,
        "example_ids": example_ids,
        "labels": labels,
    }
    return residual.to(queries.device), neighbours


def token_neighbor_tensors(
    memory, entries: torch.Tensor, weights: torch.Tensor, distances: torch.Tensor | None, rows: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """The neighbours of a causal-LM forward's search (`ResMemForCausalLM.resmem_outputs`), for explanations.

    Args:
        memory: a token memory.
        entries: `(n, k)` memory rows of each position's neighbours (0 where the position was not searched).
        weights: `(n, k)` their weights (0 where not searched).
        distances: `(n', k)` distances of the searched positions, or `None` when none was searched.
        rows: `(n',)` which of the `n` positions were searched (`None`: all).
    Returns:
        `distances` `(n, k)` (`inf` where not searched), `weights`, `example_ids`, `positions`, `labels`
        `(n, k)`, and the stored residuals `values` `(n, k, m)`, `indices` `(n, k, m)` or `None` (dense).
    """
    n, k = entries.shape
    device = weights.device
    full = torch.full((n, k), float("inf"), dtype=torch.float32, device=device)  # (n, k)
    if distances is not None:
        if rows is None:
            full = distances.to(device, torch.float32)
        else:
            full[rows.to(device)] = distances.to(device, torch.float32)
    flat = entries.reshape(-1)
    values, indices = memory.neighbour_values(entries)  # (n, k, m) each
    return {
        "distances": full,
        "weights": weights,
        "example_ids": memory.field_rows("example_ids", flat).view(n, k).to(device),
        "positions": memory.field_rows("positions", flat).view(n, k).to(device),
        "labels": memory.field_rows("labels", flat).view(n, k).to(device),
        "values": values.to(device),
        "indices": None if indices is None else indices.to(device),
    }


def predicted_residuals(neighbours: dict, predicted: torch.Tensor) -> torch.Tensor:
    """Each neighbour's residual at the predicted class / token: `(n, k)` float32.

    Args:
        neighbours: `residuals` `(n, k, C)` (classifiers), or `values` `(n, k, m)` with `indices` `(n, k, m)`
            or `None` (causal LMs: the stored sparse top-m residual, so a token outside an entry's top m has 0).
        predicted: `(n,)` int64 predicted class / token per query.
    """
    if "residuals" in neighbours:
        dense = neighbours["residuals"]  # (n, k, C)
    else:
        dense, indices = neighbours["values"], neighbours["indices"]  # (n, k, m)
        if indices is not None:
            # Top-m indices of one entry are distinct: at most one slot matches the predicted token.
            hit = indices.long() == predicted.view(-1, 1, 1).to(indices.device)  # (n, k, m)
            return (dense.float() * hit).sum(dim=-1)  # (n, k); 0 when the token is not stored
    pred = predicted.view(-1, 1, 1).to(dense.device).expand(dense.shape[0], dense.shape[1], 1)  # (n, k, 1)
    return dense.float().gather(-1, pred).squeeze(-1)  # (n, k)


def neighbor_fields(neighbours: dict, predicted: torch.Tensor, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The output fields of `output_neighbors=True`, reshaped to `shape + (k,)`.

    Slots without a neighbour (a padded LM position, an approximate index that found fewer than k) have
    distance `inf`, weight 0, contribution 0 and example id, label and position `-1`.

    Args:
        neighbours: from `classifier_residual_and_neighbors` or `token_neighbor_tensors`, `n` rows.
        predicted: `(n,)` predicted class / token (`argmax` of the ResMem scores) per query or position.
        shape: the leading shape of the output (`(B,)` or `(B, K)`), with `prod(shape) == n`.
    Returns:
        `neighbor_ids`, `neighbor_distances`, `neighbor_weights`, `neighbor_residuals`,
        `neighbor_contributions` (`weight * residual[predicted]`), `neighbor_labels` (and `neighbor_positions`
        for LMs), each `shape + (k,)`.
    """
    distances = neighbours["distances"].float()  # (n, k)
    weights = neighbours["weights"].float().to(distances.device)  # (n, k)
    found = torch.isfinite(distances)  # (n, k)
    residual = predicted_residuals(neighbours, predicted).to(distances.device)  # (n, k)
    residual = residual.masked_fill(~found, 0.0)
    k = distances.shape[-1]
    out = {
        "neighbor_ids": neighbours["example_ids"].to(distances.device).masked_fill(~found, -1),
        "neighbor_distances": distances,
        "neighbor_weights": weights,
        "neighbor_residuals": residual,
        "neighbor_contributions": weights * residual,
        "neighbor_labels": neighbours["labels"].to(distances.device).masked_fill(~found, -1),
    }
    if "positions" in neighbours:
        out["neighbor_positions"] = neighbours["positions"].to(distances.device).masked_fill(~found, -1)
    return {name: t.reshape(*shape, k) for name, t in out.items()}


# ---------------------------------------------------------------------------------------------------- explain()


@dataclass
class Neighbor:
    """One memory entry among a query's k nearest, and what it did to the predicted class's score.

    Attributes:
        example_id: the entry's `example_ids` value (its row in the dataset the memory was built from).
        distance: plain L2 distance from the query's key (in the memory's key space, `config.key_normalization`).
        weight: `softmax(-d / sigma)` over the k neighbours (`sigma * d_k` with `config.sigma_mode="relative"`).
        residual: the entry's residual at the predicted class / token (LMs: the stored top-m value, 0 if absent).
        contribution: `weight * residual`, its share of `residual` at the predicted class.
        label: the entry's label (images) or next token (causal LMs).
        label_name: `config.id2label[label]` (images) or the decoded token (LMs, with `tokenizer=`).
        position: LMs: the entry's token position in its example; `None` for images.
        row: `dataset[example_id]` when `explain` got the dataset, else `None`.
    """

    example_id: int
    distance: float
    weight: float
    residual: float
    contribution: float
    label: int
    label_name: str | None = None
    position: int | None = None
    row: Any = field(default=None, repr=False)


@dataclass
class Explanation:
    """Why ResMem predicted what it did for one query (images) or one token position (causal LMs).

    Attributes:
        query: index of the query in the batch.
        position: LMs: the position whose next-token prediction is explained; `None` for images.
        predicted, predicted_label: ResMem's prediction (argmax of `scores`) and its name / decoded token.
        base_predicted, base_predicted_label: the base model's prediction (argmax of `base_logits`) and its name.
        score: `scores[predicted]`; base_probability: `softmax(base_logits / T)[predicted]`.
        residual: `residual[predicted]`, the sum of ALL k neighbours' contributions (`score - base_probability`).
        neighbors: the `top` neighbours by |contribution|, largest first (ties: nearest first).
        pixel_values: images: the query's `(C, H, W)` input, for `plot_explanation`.
    """

    query: int
    position: int | None
    predicted: int
    predicted_label: str | None
    base_predicted: int
    base_predicted_label: str | None
    score: float
    base_probability: float
    residual: float
    neighbors: list[Neighbor] = field(default_factory=list)
    pixel_values: torch.Tensor | None = field(default=None, repr=False)


def _check_top(top) -> int:
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be an integer >= 1 (neighbours per explanation), got {top!r}.")
    return top


def _as_inputs(model, inputs, read_kwargs: dict | None = None) -> dict:
    """`inputs` as forward keyword arguments: a tensor is the model's main input (`pixel_values` / `input_ids`);
    a `datasets.Dataset` of a classifier is read the way `build_memory` reads it (one batch of all its rows)."""
    if isinstance(inputs, torch.Tensor):
        return {model.main_input_name: inputs}
    if isinstance(inputs, Mapping):  # a dict, a tokenizer's BatchEncoding, an image processor's BatchFeature
        return dict(inputs)
    if hasattr(inputs, "column_names") and hasattr(model, "_batch_reader") and hasattr(model, "_base_inputs"):
        n = len(inputs)
        if n == 0:
            raise ValueError("explain() got an empty dataset: pass the rows to explain.")
        reader = model._batch_reader(n, **(read_kwargs or {}))
        return model._base_inputs(next(iter(reader(inputs))))
    raise TypeError(
        f"explain() takes a tensor of {model.main_input_name} or a dict of forward inputs (e.g. a tokenizer's or "
        f"image processor's output with return_tensors='pt'), got {type(inputs).__name__}."
    )


def _lm_positions(positions, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(queries (P,), positions (P,))` to explain, from `positions` and the kept positions' mask `(B, K)` bool."""
    b, kept = mask.shape
    if positions == "last":  # each query's last real token: the prediction of its next token
        if not mask.any(dim=1).all():
            raise ValueError("explain() got a query whose attention_mask is all 0: it has no position to explain.")
        last = kept - 1 - mask.flip(-1).long().argmax(dim=-1)  # (B,)
        return torch.arange(b), last.cpu()
    if positions == "all":
        queries, where = mask.nonzero(as_tuple=True)  # (P,) each, in (query, position) order
        return queries.cpu(), where.cpu()
    chosen = torch.as_tensor([positions] if isinstance(positions, int) else list(positions), dtype=torch.long)
    if chosen.dim() != 1 or chosen.numel() == 0 or ((chosen < -kept) | (chosen >= kept)).any():
        raise ValueError(
            f"positions must be 'last', 'all', or integer positions in [-{kept}, {kept}) of the kept logits, "
            f"got {positions!r}."
        )
    chosen = chosen % kept  # (p,)
    queries = torch.arange(b).repeat_interleave(chosen.numel())  # (B*p,)
    return queries, chosen.repeat(b)


def _dataset_rows(dataset, example_ids: list[int]) -> dict[int, Any]:
    """`{example id: dataset[example id]}` for the distinct ids (one `select` for a `datasets.Dataset`)."""
    wanted = sorted({i for i in example_ids if i >= 0})
    if not wanted:
        return {}
    try:
        length = len(dataset)
    except TypeError as err:
        raise TypeError(
            "explain(dataset=...) needs a map-style dataset with a length (a datasets.Dataset or a list), not a "
            "streaming one: the neighbours are looked up by row number."
        ) from err
    if wanted[-1] >= length:
        raise ValueError(
            f"Neighbour example id {wanted[-1]} is outside the dataset ({length} rows): pass the training dataset the "
            "memory was built from (its example ids are row numbers in it), or no dataset."
        )
    if hasattr(dataset, "select"):
        rows = dataset.select(wanted)
        return dict(zip(wanted, (rows[i] for i in range(len(wanted)))))
    return {i: dataset[i] for i in wanted}


def explain(
    model,
    inputs,
    dataset=None,
    top: int = 5,
    positions="last",
    tokenizer=None,
    **forward_kwargs,
) -> list[Explanation]:
    """The training examples that moved each prediction most, with the numbers behind it.

    Runs ONE forward with `output_neighbors=True` and ranks each query's k neighbours by |contribution|, the
    contribution being `w_i * r_i[c]` for the predicted class (or token) `c`: the contributions of all k
    neighbours add up to `residual[c]`, i.e. `score - base_probability`.

    Args:
        model: a ResMem image classifier or causal LM with a memory.
        inputs: `pixel_values` `(B, C, H, W)` / `input_ids` `(B, T)`, a dict of forward inputs (e.g. a
            tokenizer's output with `attention_mask`), or (classifiers) a `datasets.Dataset` of the rows to explain,
            read like `build_memory` reads data (`image_processor=` / `transform=` / `label_column=` as keywords).
        dataset: the training dataset the memory was built from; each neighbour's row `dataset[example_id]`
            is attached as `Neighbor.row`.
        top: neighbours kept per explanation (at most k).
        positions: causal LMs only: `"last"` (default: each query's last real token, i.e. the prediction of the
            next token), `"all"` (every non-padded position), or integer position(s) of the kept logits.
        tokenizer: causal LMs: decodes the predicted and the neighbours' next tokens into `label_name`.
        forward_kwargs: more forward arguments (e.g. `logits_to_keep`).
    Returns:
        A list of [`Explanation`]: one per query (images; LMs with `positions="last"`), else one per
        (query, position) in that order.

    Example:

    ```python
    >>> for e in model.explain(pixel_values, dataset=train_ds, top=3):
    ...     print(e.predicted_label, [(n.example_id, round(n.contribution, 3)) for n in e.neighbors])
    ```
    """
    top = _check_top(top)
    read_keys = ("label_column", "image_column", "image_processor", "transform", "text_column", "feature_extractor",
                 "audio_column")  # how a classifier reads a Dataset given as `inputs`
    read_kwargs = {key: forward_kwargs.pop(key) for key in read_keys if key in forward_kwargs}
    if tokenizer is not None and hasattr(inputs, "column_names") and model.config.task != "causal-lm":
        read_kwargs["tokenizer"] = tokenizer
    kwargs = {**_as_inputs(model, inputs, read_kwargs), **forward_kwargs}
    is_lm = model.main_input_name == "input_ids"
    with torch.no_grad():
        out = model(**kwargs, output_neighbors=True, return_dict=True)
    contributions = out.neighbor_contributions  # (B, k) or (B, K, k)
    if is_lm:
        b, kept = contributions.shape[:2]
        mask = kwargs.get("attention_mask")
        mask = torch.ones(b, kept, dtype=torch.bool) if mask is None else mask[:, -kept:].bool().cpu()
        qs, ps = _lm_positions(positions, mask)  # (P,) each

        def pick(t):  # (B, K, ...) -> (P, ...)
            return t[qs.to(t.device), ps.to(t.device)]
    else:
        qs, ps = torch.arange(contributions.shape[0]), None

        def pick(t):  # (B, ...) -> (P, ...)
            return t[qs.to(t.device)]

    scores, base_logits = pick(out.scores).float(), pick(out.base_logits).float()
    # `residual[c]` is the sum of all k contributions; the dense residual is absent with output_residual=False.
    residual = pick(out.residual) if out.residual is not None else None
    predicted = scores.argmax(dim=-1)  # (P,)
    base_probability = torch.softmax(base_logits / model.config.residual_temperature, dim=-1)  # (P, C)
    take = predicted.unsqueeze(-1)  # (P, 1)
    fields = {name: pick(getattr(out, name)) for name in _FIELDS if getattr(out, name, None) is not None}
    n = min(top, fields["neighbor_contributions"].shape[-1])
    # Largest |contribution| first; ties (e.g. the zeros of tokens outside sparse residuals) stay nearest first,
    # the search's order, because the sort is stable.
    order = fields["neighbor_contributions"].abs().sort(dim=-1, descending=True, stable=True).indices[..., :n]  # (P, n)
    ranked = {name: t.gather(-1, order.to(t.device)).cpu().tolist() for name, t in fields.items()}  # (P, n) lists
    per_query = {
        "predicted": predicted.cpu().tolist(),
        "base_predicted": base_logits.argmax(dim=-1).cpu().tolist(),
        "score": scores.gather(-1, take).squeeze(-1).cpu().tolist(),
        "base_probability": base_probability.gather(-1, take).squeeze(-1).cpu().tolist(),
        "residual": (
            residual.float().gather(-1, take.to(residual.device)).squeeze(-1)
            if residual is not None
            else fields["neighbor_contributions"].sum(dim=-1)
        ).cpu().tolist(),
    }
    rows = _dataset_rows(dataset, [i for ids in ranked["neighbor_ids"] for i in ids]) if dataset is not None else {}
    name_of = _namer(model, tokenizer)
    pixels = kwargs.get("pixel_values") if not is_lm else None
    explanations = []
    for p, (q, pos) in enumerate(zip(qs.tolist(), ps.tolist() if ps is not None else [None] * len(qs))):
        neighbors = [
            Neighbor(
                example_id=ranked["neighbor_ids"][p][j],
                distance=ranked["neighbor_distances"][p][j],
                weight=ranked["neighbor_weights"][p][j],
                residual=ranked["neighbor_residuals"][p][j],
                contribution=ranked["neighbor_contributions"][p][j],
                label=ranked["neighbor_labels"][p][j],
                label_name=name_of(ranked["neighbor_labels"][p][j]),
                position=ranked["neighbor_positions"][p][j] if is_lm else None,
                row=rows.get(ranked["neighbor_ids"][p][j]),
            )
            for j in range(n)
            if ranked["neighbor_ids"][p][j] >= 0  # a slot the search could not fill is no neighbour
        ]
        explanations.append(
            Explanation(
                query=q,
                position=pos,
                predicted=per_query["predicted"][p],
                predicted_label=name_of(per_query["predicted"][p]),
                base_predicted=per_query["base_predicted"][p],
                base_predicted_label=name_of(per_query["base_predicted"][p]),
                score=per_query["score"][p],
                base_probability=per_query["base_probability"][p],
                residual=per_query["residual"][p],
                neighbors=neighbors,
                pixel_values=None if pixels is None else pixels[q].detach().cpu(),
            )
        )
    return explanations


_FIELDS = (
    "neighbor_ids",
    "neighbor_distances",
    "neighbor_weights",
    "neighbor_residuals",
    "neighbor_contributions",
    "neighbor_labels",
    "neighbor_positions",
)


def _namer(model, tokenizer):
    """Class id -> name (`config.id2label`; a causal LM: the decoded token with `tokenizer`, else `None`)."""
    if model.main_input_name == "input_ids":
        if tokenizer is None:
            return lambda i: None
        return lambda i: tokenizer.decode([i]) if i >= 0 else None
    id2label = getattr(model.config, "id2label", None) or {}
    return lambda i: str(id2label.get(i, id2label.get(str(i), i))) if i >= 0 else None


# ---------------------------------------------------------------------------------------------------- plot


def _image_array(image):
    """A displayable `(H, W, 3)` or `(H, W)` array from a PIL image, or a `(C, H, W)` / `(H, W, C)` array or tensor."""
    import numpy as np

    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float64)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise ValueError(f"Cannot draw an image of shape {array.shape}: expected (H, W), (C, H, W) or (H, W, C).")
    low, high = array.min(), array.max()  # normalised pixels: stretch to [0, 1] for display
    return (array - low) / (high - low) if high > low else np.zeros_like(array)


def _pick_image_column(row: Mapping, image_column: str | None) -> str:
    if image_column is not None:
        if image_column not in row:
            raise ValueError(f"The dataset rows have no column {image_column!r}; they have {sorted(row)}.")
        return image_column
    for name in ("image", "img", "pixel_values"):
        if name in row:
            return name
    raise ValueError(f"No image column found in the dataset rows ({sorted(row)}): pass image_column='...'.")


def plot_explanation(
    explanation,
    path: str,
    dataset=None,
    image_column: str | None = None,
    query_images=None,
    max_queries: int = 8,
    title: str | None = None,
) -> str:
    """Draw explanations of an image classifier as a PNG grid, like the paper's Figure 2.

    One row per query: the query image (titled with ResMem's and the base model's predictions), then its
    neighbours by |contribution| (each titled with its label, weight `w` and residual `r` at the predicted
    class). Needs matplotlib (`pip install 'resmem-hf[plots]'`), imported lazily with the Agg backend; the
    file is written to a temporary name and renamed.

    Args:
        explanation: an [`Explanation`] or a list of them (from `model.explain` on an image classifier).
        path: the PNG file to write.
        dataset: the training dataset the memory was built from (not needed when `explain` got `dataset=`).
        image_column: the column holding the images (default: `image`, `img` or `pixel_values`).
        query_images: the queries' original images (one per explanation), shown instead of the normalised
            `pixel_values`.
        max_queries: rows drawn at most.
    Returns:
        `path`.
    """
    from .plots import _pyplot, _save_png

    explanations = [explanation] if isinstance(explanation, Explanation) else list(explanation)
    if not explanations:
        raise ValueError("plot_explanation got no explanation: pass model.explain(...)'s result.")
    if any(e.position is not None for e in explanations):
        raise ValueError("plot_explanation draws image classifiers' explanations; these come from a causal LM.")
    explanations = explanations[:max_queries]
    missing = [n.example_id for e in explanations for n in e.neighbors if n.row is None]
    rows = _dataset_rows(dataset, missing) if missing and dataset is not None else {}
    if missing and dataset is None:
        raise ValueError(
            "plot_explanation needs the neighbours' images: pass dataset= (the training dataset the memory was built "
            "from), or call model.explain(..., dataset=train_ds) first."
        )
    plt = _pyplot()
    columns = 1 + max(len(e.neighbors) for e in explanations)
    fig, axes = plt.subplots(
        len(explanations), columns, figsize=(1.9 * columns, 2.3 * len(explanations)), squeeze=False,
        constrained_layout=True,
    )
    for r, e in enumerate(explanations):
        query = query_images[r] if query_images is not None else e.pixel_values
        ax = axes[r][0]
        if query is not None:
            ax.imshow(_image_array(query), cmap="gray")
        base = e.base_predicted_label if e.base_predicted != e.predicted else None
        ax.set_title(
            f"query {e.query}\nResMem: {e.predicted_label}" + (f"\nbase: {base}" if base is not None else ""), fontsize=8
        )
        for c in range(1, columns):
            ax = axes[r][c]
            ax.axis("off")
            if c - 1 >= len(e.neighbors):
                continue
            n = e.neighbors[c - 1]
            row = n.row if n.row is not None else rows[n.example_id]
            ax.imshow(_image_array(row[_pick_image_column(row, image_column)]), cmap="gray")
            ax.set_title(f"#{n.example_id} {n.label_name}\nw={n.weight:.2f} r={n.residual:+.2f}", fontsize=8)
        axes[r][0].set_xticks([])
        axes[r][0].set_yticks([])
    if title:
        fig.suptitle(title)
    return _save_png(fig, path)
