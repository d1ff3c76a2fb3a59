"""An independent reference for the ResMem equations: numpy (float64) plus plain torch hooks.

Nothing here imports resmem, so the tests compare the library against a separate implementation.
"""

from __future__ import annotations

import numpy as np
import torch


def np_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_residuals(logits: np.ndarray, labels: np.ndarray, temperature: float) -> np.ndarray:
    """`onehot(y) - softmax(logits / T)`, `(N, C)`."""
    num_classes = logits.shape[1]
    return np.eye(num_classes)[labels] - np_softmax(np.asarray(logits, np.float64) / temperature)


def np_knn(query_keys: np.ndarray, memory_keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force plain (not squared) L2 distances; the k nearest `(distances, ids)`, each `(B, k)`."""
    q = np.asarray(query_keys, np.float64)
    m = np.asarray(memory_keys, np.float64)
    d = np.sqrt(((q[:, None, :] - m[None, :, :]) ** 2).sum(axis=-1))  # (B, N)
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]  # (B, k)
    return np.take_along_axis(d, ids, axis=1), ids


def np_resmem(query_keys, query_logits, memory_keys, memory_logits, memory_labels, k, sigma, temperature):
    """Paper eq. 3. Returns `(scores, residual)`, each `(B, C)` float64."""
    distances, ids = np_knn(query_keys, memory_keys, k)
    w = np_softmax(-distances / sigma)  # (B, k) = exp(-d/sigma) normalised
    r = np_residuals(memory_logits, memory_labels, temperature)  # (N, C)
    r_knn = (w[:, :, None] * r[ids]).sum(axis=1)  # (B, C)
    return np_softmax(np.asarray(query_logits, np.float64) / temperature) + r_knn, r_knn


def hooked_forward(model: torch.nn.Module, layer: str, pixel_values) -> tuple[np.ndarray, np.ndarray]:
    """Run `model` once with a plain torch hook on `layer` (`"name"` or `"name:input"`).

    Returns `(keys (B, D), logits (B, C))` as float64 numpy arrays.
    """
    take_input = layer.endswith(":input")
    name = layer[: -len(":input")] if take_input else layer
    module = dict(model.named_modules())[name]
    seen = {}
    if take_input:
        handle = module.register_forward_pre_hook(lambda mod, args: seen.__setitem__("z", args[0].detach().clone()))
    else:
        handle = module.register_forward_hook(lambda mod, args, out: seen.__setitem__("z", out.detach().clone()))
    try:
        with torch.no_grad():
            logits = model(pixel_values=torch.as_tensor(pixel_values)).logits
    finally:
        handle.remove()
    return seen["z"].double().numpy(), logits.double().numpy()
