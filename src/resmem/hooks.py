"""Capture the key embedding phi(x) from a named module of the base model.

The base model is never patched: a forward hook (module output) or forward pre-hook (module
input, `"name:input"`) is registered for one call and removed in `finally`.
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

INPUT_SUFFIX = ":input"


def parse_layer(layer: str) -> tuple[str, bool]:
    """Split `"name"` / `"name:input"` into `(module_name, take_input)`."""
    if layer.endswith(INPUT_SUFFIX):
        return layer[: -len(INPUT_SUFFIX)], True
    return layer, False


def resolve_module(model: nn.Module, layer: str) -> nn.Module:
    """Return the module named by `layer`, or raise a `ValueError` listing close matches."""
    name, _ = parse_layer(layer)
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, list(modules), n=5, cutoff=0.5)
    hint = f" Close matches: {close}." if close else ""
    raise ValueError(
        f"Layer {layer!r} is not a module of {type(model).__name__}.{hint} "
        "Pass one of `[name for name, _ in model.named_modules()]`, optionally with the suffix ':input'."
    )


class EmbeddingCapture:
    """Context manager that records the output (or first input) of one module during a forward.

    >>> capture = EmbeddingCapture(base_model, "classifier:input")
    >>> with capture:
    ...     logits = base_model(pixel_values).logits
    >>> capture.value.shape  # (batch, hidden)
    """

    def __init__(self, model: nn.Module, layer: str):
        self.layer = layer
        self.module = resolve_module(model, layer)
        self.take_input = parse_layer(layer)[1]
        self.value: torch.Tensor | None = None
        self._handle = None

    def _on_input(self, module, args, kwargs):
        self.value = _first_tensor(args if args else tuple(kwargs.values()), self.layer)

    def _on_output(self, module, args, output):
        self.value = _first_tensor(output, self.layer)

    def __enter__(self) -> "EmbeddingCapture":
        self.value = None
        if self.take_input:
            self._handle = self.module.register_forward_pre_hook(self._on_input, with_kwargs=True)
        else:
            self._handle = self.module.register_forward_hook(self._on_output)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def get(self) -> torch.Tensor:
        """The captured tensor; raises if the module did not run during the forward."""
        if self.value is None:
            raise ValueError(
                f"Layer {self.layer!r} did not run during the forward pass, so no key embedding was captured. "
                "Pick a module that the base model's forward actually calls."
            )
        return self.value


def _first_tensor(value, layer: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise ValueError(
        f"Layer {layer!r} produced a {type(value).__name__}, not a tensor; name a module whose output "
        "(or, with ':input', whose first input) is a tensor."
    )


def per_example_keys(value: torch.Tensor, batch_size: int, layer: str) -> torch.Tensor:
    """Check that a captured tensor holds one vector per example and return it as float32.

    Args:
        value: captured tensor, expected shape `(batch_size, hidden)`.
    Returns:
        `(batch_size, hidden)` float32 tensor.
    """
    if value.dim() != 2 or value.shape[0] != batch_size:
        raise ValueError(
            f"Layer {layer!r} gives a tensor of shape {tuple(value.shape)}, not one vector per example "
            f"(expected ({batch_size}, hidden)). Name a layer after pooling, e.g. the classifier's input "
            "('<classifier>:input'), or leave `layer=None` for the pre-logit features."
        )
    return value.detach().float()


def default_classifier_layer(model: nn.Module, num_labels: int) -> str:
    """Find the pre-logit features of a classifier from its structure: the input of its output layer.

    The output layer is the one `nn.Linear` with `out_features == num_labels`; when there are
    several (e.g. distillation heads) the caller must name one, since no structural rule tells
    which of them produces the logits.
    """
    heads = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_labels]
    if len(heads) == 1:
        return heads[0] + INPUT_SUFFIX
    if not heads:
        raise ValueError(
            f"Could not find the output layer of {type(model).__name__} (no nn.Linear with {num_labels} outputs). "
            "Pass `layer=` naming the module whose output (or ':input') is the embedding."
        )
    raise ValueError(
        f"{type(model).__name__} has several candidate output layers {heads}; pass e.g. "
        f"`layer='{heads[-1]}{INPUT_SUFFIX}'` to choose the pre-logit features."
    )
