"""Key variants for classifier memories: normalised keys and a locally adaptive sigma.

Two `ResMemConfig` options, both off by default (the paper's method, bit-identical):

- `key_normalization`: the space the k-NN search runs in. `"none"` (raw keys `z`), `"l2"` (`z / ||z||`, keys and
  queries on the unit sphere) or `"standardize"` (`(z - mean) / std` per dimension, with `mean` and `std` of the
  memory's keys computed once at `build_memory` and stored in `config.key_statistics`, so a reload and a later
  `add_to_memory` use the same statistics), or `"whiten"` (PCA whitening, `(z - mean) @ W` with
  `W = V / sqrt(lambda)` over the principal components of the memory's keys whose variance is above
  `WHITEN_MIN_RATIO * lambda_max`, so the search distance is the Mahalanobis distance of the memory's key
  distribution on its non-degenerate subspace; `config.key_statistics = {"mean", "projection"}`, `D * r` numbers,
  fine for CNN features, large in config.json for 512+ dimensions). The memory stores the normalised keys and records its key space
  (`key_space_id`): a memory whose space differs from the config's is refused (at load and at every search),
  never searched with queries from another space.
- `sigma_mode`: `"absolute"` (paper: `w_i = softmax_i(-d_i / sigma)`) or `"relative"`:
  `w_i = softmax_i(-d_i / (sigma * d_k(x)))`, `d_k(x)` the query's k-th (largest used, finite) neighbour distance,
  clamped below at `RELATIVE_SIGMA_EPS`; `sigma` is then a multiple of each query's own neighbourhood radius.

Every function here is pure tensor code; the wrappers call them (`modeling_image.py`, `memory.py`, `tuning.py`).
"""

from __future__ import annotations

import hashlib
import math

import torch

SIGMA_MODES = ("absolute", "relative")
KEY_NORMALIZATIONS = ("none", "l2", "standardize", "whiten")
STATISTICS_MODES = ("standardize", "whiten")  # the modes whose statistics are fitted on the memory's keys
# d_k(x) is clamped at this before dividing: a query whose k neighbours all sit at distance 0 gets uniform weights.
RELATIVE_SIGMA_EPS = 1e-12
# `"l2"`: norms below this are treated as this (a zero key stays zero instead of becoming NaN), as torch's F.normalize.
L2_EPS = 1e-12
# `"standardize"`: a dimension whose std over the memory is below this (constant, e.g. a dead ReLU) is only centred
# (its std is stored as 1): dividing by ~0 would blow up any query that differs there.
MIN_STD = 1e-8
# `"whiten"`: principal components with variance <= this times the largest are dropped: the memory has (numerically)
# no spread there, and dividing by ~0 would let any query's deviation in such a direction swamp the distance.
WHITEN_MIN_RATIO = 1e-6


def check_sigma_mode(value, task: str | None = None) -> None:
    if value not in SIGMA_MODES:
        raise ValueError(
            f"sigma_mode must be one of {SIGMA_MODES}, got {value!r}. Set e.g. `model.config.sigma_mode = \"absolute\"`."
        )
    if value != "absolute" and task == "causal-lm":
        raise ValueError(
            "sigma_mode='relative' is implemented for classifiers (image, text, audio) only; a causal LM uses "
            "sigma_mode='absolute'."
        )


def check_key_normalization(value, task: str | None = None) -> None:
    if value not in KEY_NORMALIZATIONS:
        raise ValueError(
            f"key_normalization must be one of {KEY_NORMALIZATIONS}, got {value!r}. Set e.g. "
            "`model.config.key_normalization = \"l2\"` and rebuild the memory with `model.build_memory(dataset)`."
        )
    if value != "none" and task == "causal-lm":
        raise ValueError(
            "key_normalization is implemented for classifiers (image, text, audio) only; a causal LM uses "
            "key_normalization='none'."
        )


def check_key_statistics(stats) -> None:
    """`None`, `{"mean": [D floats], "std": [D floats > 0]}` or `{"mean": [D], "projection": [D rows of r floats]}`
    (what `fit_key_statistics` writes)."""
    if stats is None:
        return
    ok = isinstance(stats, dict) and isinstance(stats.get("mean"), (list, tuple)) and len(stats) == 2
    if ok and isinstance(stats.get("std"), (list, tuple)):
        mean, std = list(stats["mean"]), list(stats["std"])
        ok = len(mean) == len(std) > 0 and all(_is_finite_number(v) for v in mean + std) and all(v > 0 for v in std)
    elif ok and isinstance(stats.get("projection"), (list, tuple)):
        mean, rows = list(stats["mean"]), list(stats["projection"])
        ok = len(mean) == len(rows) > 0 and all(isinstance(r, (list, tuple)) and len(r) == len(rows[0]) > 0 for r in rows)
        ok = ok and all(_is_finite_number(v) for v in mean + [v for r in rows for v in r])
    else:
        ok = False
    if not ok:
        raise ValueError(
            "key_statistics must be None, {'mean': [...], 'std': [...]} (equal lengths, finite, std > 0) or "
            "{'mean': [D], 'projection': [D rows of r]}, as `model.build_memory(dataset)` writes them with "
            "key_normalization='standardize' / 'whiten': rebuild the memory instead of editing them."
        )


def _is_finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ---------------------------------------------------------------------------------------------------- normalisation
def _float64_chunks(keys: torch.Tensor, rows: int = 1 << 16):
    """Row blocks `(<= rows, D)` of `keys` in float64: the sums stay exact-ish without a float64 copy of a large
    memory (1M x 512 keys would take 4 GB)."""
    for start in range(0, keys.shape[0], rows):
        yield keys[start : start + rows].detach().double()


def fit_key_statistics(keys: torch.Tensor, mode: str = "standardize") -> dict:
    """Statistics of the memory's keys `(N, D)` for `mode` (float64 sums, stored float32).

    `"standardize"`: per-dimension mean and population std, `{"mean": [D], "std": [D]}`; a std below `MIN_STD` is
    stored as 1. `"whiten"`: mean and the whitening projection `W = V_r / sqrt(lambda_r)` `(D, r)` of the population
    covariance's eigenpairs with `lambda > WHITEN_MIN_RATIO * lambda_max` (largest first), `{"mean": [D],
    "projection": [D rows of r]}`. JSON-ready: float32 values as Python floats, so a save/load round trip gives the
    same float32 tensors.
    """
    n = max(keys.shape[0], 1)
    mean = sum(chunk.sum(dim=0) for chunk in _float64_chunks(keys)) / n  # (D,)
    if mode == "whiten":
        covariance = sum((c - mean).T @ (c - mean) for c in _float64_chunks(keys)) / n  # (D, D), two passes
        eigenvalues, vectors = torch.linalg.eigh(covariance)  # (D,), (D, D) ascending
        keep = eigenvalues > WHITEN_MIN_RATIO * eigenvalues.max().clamp_min(0)  # (D,)
        if not keep.any():
            raise ValueError("key_normalization='whiten' needs memory keys that vary (all keys are equal): use 'none'.")
        projection = (vectors[:, keep] / eigenvalues[keep].sqrt()).flip(1)  # (D, r), largest variance first
        return {"mean": mean.float().tolist(), "projection": projection.float().tolist()}
    std = (sum(((c - mean) ** 2).sum(dim=0) for c in _float64_chunks(keys)) / n).sqrt()  # (D,) population std
    std = torch.where(std < MIN_STD, torch.ones_like(std), std)
    return {"mean": mean.float().tolist(), "std": std.float().tolist()}


def _statistics_tensors(stats: dict, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(mean (D,), std (D,) or projection (D, r))` as float32 tensors on `like`'s device."""
    mean = torch.tensor(stats["mean"], dtype=torch.float32, device=like.device)  # (D,)
    std = torch.tensor(stats["std" if "std" in stats else "projection"], dtype=torch.float32, device=like.device)
    if mean.shape[0] != like.shape[-1]:
        raise ValueError(
            f"config.key_statistics hold {mean.shape[0]} dimensions but the keys have {like.shape[-1]}: they belong to "
            "another layer or model. Rebuild the memory with `model.build_memory(dataset)`."
        )
    return mean, std


def normalize_keys(keys: torch.Tensor, mode: str, stats: dict | None = None) -> torch.Tensor:
    """Keys or queries `(B, D)` in the search space of `mode` (float32).

    `"none"` returns `keys` itself (no copy, no cast: the default path is untouched). `"l2"`: `z / max(||z||, L2_EPS)`.
    `"standardize"`: `(z - mean) / std`; `"whiten"`: `(z - mean) @ projection` -> `(B, r)`; both with `stats` from
    [`fit_key_statistics`] of that mode (required).
    """
    if mode == "none":
        return keys
    z = keys.float()  # (B, D)
    if mode == "l2":
        return z / z.norm(dim=-1, keepdim=True).clamp_min(L2_EPS)  # (B, D)
    if mode in STATISTICS_MODES:
        if stats is None or ("std" in stats) != (mode == "standardize"):
            raise ValueError(
                f"key_normalization={mode!r} needs the memory's key statistics (config.key_statistics) of that mode, "
                "which `model.build_memory(dataset)` computes: rebuild the memory."
            )
        mean, scale = _statistics_tensors(stats, z)
        return (z - mean) / scale if mode == "standardize" else (z - mean) @ scale  # (B, D) or (B, r)
    raise ValueError(f"key_normalization must be one of {KEY_NORMALIZATIONS}, got {mode!r}.")


def key_space_id(mode: str, stats: dict | None = None) -> str:
    """The name of a key space, recorded by the memory: `"none"`, `"l2"`, or `"standardize:<digest>"` /
    `"whiten:<digest>"` (a SHA-256 prefix of the float32 statistics, so a memory normalised with other statistics
    is told apart)."""
    if mode not in STATISTICS_MODES:
        return mode
    if stats is None:
        return f"{mode}:(no statistics)"
    h = hashlib.sha256()
    for name in ("mean", "std", "projection"):
        if name in stats:
            h.update(torch.tensor(stats[name], dtype=torch.float32).numpy().tobytes())
    return f"{mode}:{h.hexdigest()[:16]}"


def describe_key_space(space: str) -> str:
    """`"standardize:<digest>"` -> "key_normalization='standardize' (statistics <digest>)"; else the plain value."""
    if ":" in space:
        mode, digest = space.split(":", 1)
        return f"key_normalization={mode!r} (statistics {digest})"
    return f"key_normalization={space!r}"


def check_memory_key_space(memory_space: str, config, error: type[Exception] = ValueError) -> None:
    """Refuse a memory whose keys live in another space than the config's (`key_normalization`, statistics)."""
    expected = key_space_id(config.key_normalization, config.key_statistics)
    if memory_space != expected:
        raise error(
            f"The memory's keys were stored with {describe_key_space(memory_space)} but the config asks for "
            f"{describe_key_space(expected)}: queries and keys would live in different spaces. Rebuild the memory with "
            f"`model.build_memory(dataset)` (or set config.key_normalization back to {memory_space.split(':')[0]!r})."
        )


# ---------------------------------------------------------------------------------------------------- sigma
def kth_distance(distances: torch.Tensor) -> torch.Tensor:
    """`d_k(x)`: each row's largest finite distance (a slot the index could not fill is `inf` and not used),
    clamped below at `RELATIVE_SIGMA_EPS`. `(B, k)` -> `(B, 1)`."""
    d = distances.float()
    finite = torch.where(torch.isfinite(d), d, torch.zeros_like(d))  # (B, k)
    return finite.amax(dim=-1, keepdim=True).clamp_min(RELATIVE_SIGMA_EPS)  # (B, 1)


__all__ = [
    "KEY_NORMALIZATIONS",
    "RELATIVE_SIGMA_EPS",
    "SIGMA_MODES",
    "STATISTICS_MODES",
    "check_key_normalization",
    "check_memory_key_space",
    "check_sigma_mode",
    "fit_key_statistics",
    "key_space_id",
    "kth_distance",
    "normalize_keys",
]
