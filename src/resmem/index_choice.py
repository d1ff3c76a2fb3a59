"""Choose a search index by measured cost and quality: what `config.index = "auto"` uses once measured.

`measure_index_choice` tries candidate indexes (IVF with a few `nprobe` values, HNSW, a PCA
transform to D/4 before IVF) against exact search and picks the first (cheapest first) that keeps
>= `min_kept` of the exact ResMem predictions and of the exact ResMem gain and searches >= `min_speedup`
times faster than exact; else `"exact"`. Two kinds of queries:

- validation queries (`model.tune`, with `config.index == "auto"`): the queries' own keys, base logits
  and labels, measured at the tuned `k`, `sigma`, `T` (`measured_on="validation"`);
- held-out memory entries (`build_memory` when no validation data exists yet): a seeded sample of the
  memory's own entries, each query's own entry left out of its neighbours (`measured_on="memory (held out)"`).

Every candidate is searched through the memory's own `search` (the forward's path: the numpy tail,
exact-distance recomputation for PCA / compressed indexes, `rerank_factor`), so the measured time and
predictions are the forward's. The record (`config.index_choice`, saved in config.json) holds every
measurement and the choice; `active_index_choice` says whether the forward uses it (only with
`config.index == "auto"` and a memory of about the size it was measured on), and the memory then
resolves `"auto"` to the chosen spec (`MemoryStore.index`).
"""

from __future__ import annotations

import math
import time

import torch

from .index import build_index
from .residuals import neighbour_weights, resmem_scores, weighted_residual

# Below this many entries `build_memory` does not measure (exact search of a batch is already cheap).
AUTO_MEASURE_MIN_ENTRIES = 16_384
# A candidate must search at least this many times faster than exact, and keep this share of exact's
# predictions and gain, to be chosen.
MIN_SPEEDUP = 1.5
MIN_KEPT = 0.99
# A measured choice is used while the memory holds within this factor of the entries it was measured on.
SIZE_TOLERANCE = 0.1
# Queries whose `(q, k, C)` residuals are formed at once when scoring a candidate.
_CHUNK = 1024


def default_candidates(num_entries: int, dim: int) -> list[tuple[str, dict]]:
    """IVF at faiss's `4 sqrt(N)` lists with 5 nprobe values, HNSW32 at 2 efSearch values, and PCA to D/4 before
    IVF (plain and re-ranked); cheapest first within each family. Variants of one spec share one trained index."""
    nlist = max(4, 2 ** round(math.log2(4 * math.sqrt(num_entries))))
    out = [(f"IVF{nlist},Flat", {"nprobe": p}) for p in (4, 8, 16, 32, 64) if p < nlist]
    out += [("HNSW32", {"efSearch": 64}), ("HNSW32", {"efSearch": 128})]
    if dim >= 32:
        out.append((f"PCA{dim // 4},IVF{nlist},Flat", {"nprobe": 16}))
        # PCA ranks candidates in D/4 dimensions; re-ranking 4k of them by exact distance recovers most of exact's top-k.
        out.append((f"PCA{dim // 4},IVF{nlist},Flat", {"nprobe": 16, "rerank_factor": 4}))
    return out


def _drop_own(d: torch.Tensor, ids: torch.Tensor, self_ids: torch.Tensor, k: int):
    """From a `k + 1` search, drop each query's own entry (or the farthest when it was not found) -> `(Q, k)` each."""
    own = ids == self_ids[:, None].to(ids.device)
    drop = torch.where(own.any(1), own.float().argmax(1), torch.full_like(self_ids, k).to(ids.device))  # (Q,)
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[torch.arange(len(ids)), drop] = False
    return d[keep].view(-1, k), ids[keep].view(-1, k)


def _predictions(memory, d, ids, base_logits, sigma, temperature, sigma_mode: str = "absolute") -> torch.Tensor:
    """ResMem's argmax (paper eq. 3) from the neighbours `(Q, k)`, as the forward computes it (either sigma mode) -> `(Q,)`."""
    out = []
    for start in range(0, len(ids), _CHUNK):
        dd, ii = d[start : start + _CHUNK], ids[start : start + _CHUNK]
        w = torch.nan_to_num(neighbour_weights(dd, sigma, sigma_mode), nan=0.0)  # (q, k); a query with no neighbour: none
        residual = weighted_residual(w, memory.neighbour_residuals(ii, temperature).to(w.device))  # (q, C)
        out.append(resmem_scores(base_logits[start : start + _CHUNK].to(w.device), residual, temperature).argmax(-1))
    return torch.cat(out)


def measure_on_queries(
    memory,
    queries: torch.Tensor,
    base_logits: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    sigma: float,
    temperature: float,
    candidates: list[tuple[str, dict]] | None = None,
    self_ids: torch.Tensor | None = None,
    min_kept: float = MIN_KEPT,
    repeats: int = 2,
    min_speedup: float = MIN_SPEEDUP,
    measured_on: str = "validation",
    sigma_mode: str = "absolute",
) -> tuple[dict, torch.Tensor]:
    """Measure exact search and every candidate on given queries; choose.

    Args:
        memory: a classifier memory in RAM ([`ResidualMemory`]).
        queries: `(Q, D)` keys of the queries; base_logits `(Q, C)`; labels `(Q,)`.
        self_ids: `(Q,)` memory entry of each query (held-out memory entries: searched with `k + 1`, own
            entry dropped), or `None` for outside queries (validation).
    Returns:
        `(record, predictions)`: the record (see [`measure_index_choice`]) and the `(Q,)` ResMem predictions
        with the chosen index (exact's when `"exact"` is chosen). The chosen index is left attached to the
        memory, so the next forward does not build it again.
    """
    k = min(int(k), len(memory) - (1 if self_ids is not None else 0))
    labels = labels.to(base_logits.device)
    base_acc = (base_logits.argmax(-1) == labels).float().mean().item()
    built = {}

    def evaluate(spec, params):
        if spec not in built:  # one trained index per spec: its nprobe / efSearch / rerank variants share it
            built[spec] = build_index(memory.keys, spec)
        index = built[spec]
        memory.attach_index(index, source=f"the {spec!r} candidate")  # `search` then applies `params` to it
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            if self_ids is None:
                d, ids = memory.search(queries, k, spec, params)  # (Q, k) each, the forward's path
            else:
                d, ids = _drop_own(*memory.search(queries, k + 1, spec, params), self_ids, k)
            times.append(time.perf_counter() - t0)
        pred = _predictions(memory, d, ids, base_logits, sigma, temperature, sigma_mode).to(labels.device)
        return min(times), pred, ids

    exact_s, exact_pred, exact_ids = evaluate("exact", None)
    exact_gain = (exact_pred == labels).float().mean().item() - base_acc
    measured, preds = [], {}
    for spec, params in candidates if candidates is not None else default_candidates(len(memory), memory.dim):
        try:
            s, pred, ids = evaluate(spec, params)
        except ValueError as err:  # e.g. too few entries to train this IVF
            measured.append({"spec": spec, "params": dict(params), "error": str(err)[:200]})
            continue
        gain = (pred == labels).float().mean().item() - base_acc
        recall = sum(  # share of exact's neighbours found, in chunks: the (q, k, k) comparison stays small
            (ids[i : i + _CHUNK, :, None] == exact_ids[i : i + _CHUNK, None, :]).any(-1).sum().item()
            for i in range(0, len(ids), _CHUNK)
        ) / max(1, ids.numel())
        preds[len(measured)] = pred
        measured.append({
            "spec": spec, "params": dict(params), "search_s": s, "speedup": exact_s / s,
            "agreement": (pred == exact_pred).float().mean().item(), "gain": gain,
            "gain_kept": gain / exact_gain if exact_gain > 0 else 1.0, "recall": recall,
        })
    # Candidates come cheapest-first by construction (fewer probes first): take the first that keeps the exact
    # predictions and gain (deterministic for a seed) and is clearly faster than exact (the one timed test).
    good = [i for i, m in enumerate(measured) if "error" not in m and m["agreement"] >= min_kept
            and m["gain_kept"] >= min_kept and m["speedup"] >= min_speedup]
    best = measured[good[0]] if good else None
    memory.attach_index(built[best["spec"]] if best else built["exact"])  # the forward reuses it (params set at its search)
    record = {
        "choice": best["spec"] if best else "exact", "params": dict(best["params"]) if best else {},
        "measured_on": measured_on, "queries": int(len(queries)), "memory_entries": len(memory),
        "k": k, "sigma": float(sigma), "temperature": float(temperature),
        "exact_search_s": exact_s, "exact_gain": exact_gain, "base_accuracy": base_acc,
        "min_kept": min_kept, "min_speedup": min_speedup, "measured": measured,
    }
    return record, (preds[good[0]] if good else exact_pred)


def measure_index_choice(
    memory,
    k: int,
    sigma: float,
    temperature: float,
    candidates: list[tuple[str, dict]] | None = None,
    sample: int = 512,
    seed: int = 0,
    min_kept: float = MIN_KEPT,
    repeats: int = 2,
    min_speedup: float = MIN_SPEEDUP,
    sigma_mode: str = "absolute",
) -> dict:
    """Measure candidate indexes on held-out memory entries; choose the first (cheapest) keeping `min_kept` of exact.

    A candidate qualifies when it keeps `min_kept` of the exact predictions and of the exact ResMem gain
    on the held-out entries and searches at least `min_speedup` times faster than exact; else `"exact"`.

    Args:
        memory: a classifier memory in RAM ([`ResidualMemory`]): keys `(N, D)`, base logits `(N, C)`, labels `(N,)`.
        sample: number of held-out query entries (seeded, without replacement).
    Returns:
        `{"choice": spec, "params": {...}, "measured": [per index: spec, params, search_s, speedup,
        agreement (share of exact predictions kept), gain, gain_kept (1.0 when the exact gain is <= 0: then
        only `agreement` tests quality), recall (share of exact neighbours found)], "measured_on", "queries",
        "memory_entries", "k", "sigma", "temperature", "exact_search_s", "exact_gain", "base_accuracy",
        "min_kept", "min_speedup", "seed"}`.
    """
    n = len(memory)
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n, generator=gen)[: min(sample, n)]  # (Q,)
    rows = pick.to(memory.keys.device)
    record, _ = measure_on_queries(
        memory, memory.keys.index_select(0, rows), memory.base_logits.index_select(0, rows).float(),
        memory.labels.index_select(0, rows), k, sigma, temperature, candidates, self_ids=rows, min_kept=min_kept,
        repeats=repeats, min_speedup=min_speedup, measured_on="memory (held out)", sigma_mode=sigma_mode,
    )
    record["seed"] = seed
    return record


# ------------------------------------------------------------------ wiring into a model
def _measurable(model) -> bool:
    """`index="auto"` on a classifier memory in RAM (the LM, regression and on-disk memories keep the size rule)."""
    from .memory import ResidualMemory

    # Under several processes each rank would time the candidates itself and could choose differently: keep the size rule.
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    return model.config.index == "auto" and type(model.memory) is ResidualMemory and len(model.memory) > 1 and not distributed


def active_index_choice(config, num_entries: int) -> tuple[str, dict] | None:
    """`(spec, params)` the forward uses for `index="auto"`, or None (then the size rule of `resolve_spec`).

    A recorded choice applies only with `config.index == "auto"` and while the memory holds within
    `SIZE_TOLERANCE` of the entries it was measured on (an IVF trained for another size, or a memory
    grown far past the measurement, needs a new measurement: `model.tune(validation)`).
    """
    choice = getattr(config, "index_choice", None)
    if getattr(config, "index", "auto") != "auto" or not isinstance(choice, dict) or "choice" not in choice:
        return None
    measured = int(choice.get("memory_entries") or 0)
    if measured <= 0 or abs(num_entries - measured) > SIZE_TOLERANCE * measured:
        return None
    return choice["choice"], dict(choice.get("params") or {})


def sync_index_choice(model) -> None:
    """Hand the config's active choice to the memory, which resolves `"auto"` with it (`MemoryStore.index`)."""
    memory = model.memory
    if hasattr(memory, "auto_index"):
        memory.auto_index = active_index_choice(model.config, len(memory))


def measure_at_build(model) -> None:
    """After `build_memory` (`config.index == "auto"`): drop the old choice and measure on held-out entries.

    Memories below `AUTO_MEASURE_MIN_ENTRIES` keep no choice (the size rule: exact).
    """
    model.config.index_choice = None
    if _measurable(model) and len(model.memory) >= AUTO_MEASURE_MIN_ENTRIES:
        config = model.config
        model.config.index_choice = measure_index_choice(
            model.memory, config.k, config.sigma, config.residual_temperature, min_kept=MIN_KEPT, min_speedup=MIN_SPEEDUP,
            sigma_mode=config.sigma_mode,
        )
    sync_index_choice(model)


def measure_in_tune(model, cache) -> dict:
    """In `tune` (after the best `k`, `sigma`, `T` are set): measure on the validation queries, record the choice.

    Args:
        cache: the tune's `NeighbourCache` with `queries` `(V, D)`, `base_logits` `(V, C)`, `labels` `(V,)`.
    Returns:
        The metrics of the chosen index on the whole validation set (`resmem_accuracy`, `tpr`, `fpr`, `gain`,
        ...), which replace the exact-search row in the recorded evaluation; `{}` when nothing was measured.
    """
    if not _measurable(model) or len(model.memory) < AUTO_MEASURE_MIN_ENTRIES or getattr(cache, "queries", None) is None:
        return {}  # a small memory keeps exact search (the size rule)
    from .scoring import correctness_counts, rates_from_counts

    config = model.config
    record, pred = measure_on_queries(
        model.memory, cache.queries, cache.base_logits.float(), cache.labels, config.k, config.sigma,
        config.residual_temperature, min_kept=MIN_KEPT, min_speedup=MIN_SPEEDUP, measured_on="validation",
        sigma_mode=config.sigma_mode,
    )
    config.index_choice = record
    sync_index_choice(model)
    labels = cache.labels.to(pred.device)
    return rates_from_counts(*correctness_counts(cache.base_logits.argmax(-1).to(pred.device) == labels, pred == labels))


def search_index_setting(config, num_entries: int) -> str | None:
    """The approximate index a measured choice makes the forward use, as `"spec|name=value,..."`; None for exact
    or the size rule (what `resmem.records` compares: an evaluation at another index is not current)."""
    active = active_index_choice(config, num_entries)
    if active is None or active[0] == "exact":
        return None
    spec, params = active
    return spec + ("|" + ",".join(f"{key}={value}" for key, value in sorted(params.items())) if params else "")


def index_choice_text(config, num_entries: int) -> str:
    """Markdown for the model card: the measured choice and its table, or one line on how search is chosen."""
    choice = getattr(config, "index_choice", None)
    if config.index != "auto":
        return f"Search index: `{config.index}` (set explicitly)."
    if not isinstance(choice, dict) or "choice" not in choice:
        return "Search index: `auto`, not measured (exact search below 200,000 entries, IVF above)."
    params = ", ".join(f"{key}={value}" for key, value in (choice.get("params") or {}).items())
    used = active_index_choice(config, num_entries) is not None
    lines = [
        f"Search index: `auto`, measured on {choice.get('queries')} {choice.get('measured_on')} queries at k={choice.get('k')}, "
        f"sigma={choice.get('sigma'):.4g}, T={choice.get('temperature'):.4g} over {choice.get('memory_entries')} entries: "
        f"chosen `{choice['choice']}`{f' ({params})' if params else ''}, the first candidate keeping >= "
        f"{100 * choice.get('min_kept', MIN_KEPT):.0f}% of exact search's predictions and gain at >= "
        f"{choice.get('min_speedup', MIN_SPEEDUP):g}x its speed (exact gain {100 * choice.get('exact_gain', 0):+.2f} points).",
    ]
    if not used:
        lines.append(f"\n**Not in use**: the memory now has {num_entries} entries; `model.tune(validation_data)` measures again.")
    lines += ["", "| candidate | speed-up vs exact | agreement with exact | gain kept | neighbour recall |", "|---|---|---|---|---|"]
    for m in choice.get("measured") or []:
        p = ", ".join(f"{key}={value}" for key, value in (m.get("params") or {}).items())
        name = f"`{m['spec']}`" + (f" ({p})" if p else "")
        if "error" in m:
            lines.append(f"| {name} | not built: {m['error'][:80]} | | | |")
        else:
            lines.append(f"| {name} | {m['speedup']:.2f}x | {100 * m['agreement']:.1f}% | {100 * m['gain_kept']:.1f}% | "
                         f"{100 * m['recall']:.1f}% |")
    return "\n".join(lines)
