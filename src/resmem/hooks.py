"""Capture the key embedding phi(x) from a named module of the base model.

The base model is never patched: a forward hook (module output) or forward pre-hook (module
input, `"name:input"`) is registered for one call and removed in `finally`.

Thread safety: hooks live on the (shared) module, so while one thread's capture is active every
other thread's forward through that module calls its hook too. Each hook therefore records only
calls made by the thread that entered the capture, so that threads sharing one model (a server's
workers) never see each other's activations.
"""

from __future__ import annotations

import difflib
import threading

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

    Only forwards run by the thread that entered the capture are recorded; other threads' forwards
    through the same module are ignored. One capture serves one forward at a time (create one per
    call to use a model from several threads).
    """

    def __init__(self, model: nn.Module, layer: str):
        self.layer = layer
        self.module = resolve_module(model, layer)
        self.take_input = parse_layer(layer)[1]
        self.value: torch.Tensor | None = None
        self._handle = None
        self._thread: int | None = None  # ident of the thread whose forward this capture records

    def _on_input(self, module, args, kwargs=None):
        # `kwargs=None`: torch may call a pre-hook without kwargs when another thread removes it mid-call
        # (it checks the with-kwargs flag after the removal), so the hook must accept both forms.
        if threading.get_ident() == self._thread:
            self.value = _first_tensor(args if args else tuple((kwargs or {}).values()), self.layer)

    def _on_output(self, module, args, output):
        if threading.get_ident() == self._thread:
            self.value = _first_tensor(output, self.layer)

    def __enter__(self) -> "EmbeddingCapture":
        if self._handle is not None:
            raise RuntimeError(
                f"This EmbeddingCapture of {self.layer!r} is already active (in another thread or an enclosing "
                "forward); create one capture per forward call."
            )
        self.value = None
        self._thread = threading.get_ident()
        if self.take_input:
            self._handle = self.module.register_forward_pre_hook(self._on_input, with_kwargs=True)
        else:
            self._handle = self.module.register_forward_hook(self._on_output)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._thread = None

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


def per_token_keys(value: torch.Tensor, batch_size: int, seq_len: int, layer: str) -> torch.Tensor:
    """Check that a captured tensor holds one vector per token and return it as float32.

    Args:
        value: captured tensor, expected shape `(batch_size, seq_len, hidden)` (or flattened
            `(batch_size * seq_len, hidden)`, as some blocks, e.g. OPT's, reshape before their MLP).
    Returns:
        `(batch_size, seq_len, hidden)` float32 tensor.
    """
    if value.dim() == 2 and value.shape[0] == batch_size * seq_len:
        value = value.view(batch_size, seq_len, -1)
    if value.dim() != 3 or value.shape[0] != batch_size or value.shape[1] != seq_len:
        raise ValueError(
            f"Layer {layer!r} gives a tensor of shape {tuple(value.shape)}, not one vector per token "
            f"(expected ({batch_size}, {seq_len}, hidden)). Name a module inside a decoder block whose output is "
            "the hidden state, or leave `layer=None` for the last block's pre-MLP normalisation."
        )
    return value.detach().float()


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def decoder_blocks(model: nn.Module, num_layers: int | None = None) -> tuple[str, nn.ModuleList]:
    """The `nn.ModuleList` of decoder blocks: same-class modules, `num_layers` of them when known (else the longest)."""
    candidates = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1 and any(True for _ in m.parameters())
    ]
    if num_layers is not None:
        exact = [c for c in candidates if len(c[1]) == num_layers]
        candidates = exact or candidates
    if not candidates:
        raise ValueError(
            f"Could not find the decoder blocks of {type(model).__name__} (no nn.ModuleList of identical blocks). "
            "Pass `layer=` naming the module whose output is the key embedding."
        )
    return max(candidates, key=lambda c: (len(c[1]), -c[0].count(".")))


def default_decoder_key_layer(model: nn.Module, hidden_size: int | None = None, num_layers: int | None = None) -> str:
    """Find the last decoder block's pre-MLP, post-normalisation hidden state (the paper's LM key) from structure.

    One probe forward records, in the last block, the output of every normalisation module and which
    of those outputs some other module of the block consumes as input. The pre-MLP norm is the last
    (in execution order) normalisation whose `(batch, seq, hidden)` output feeds another module:
    GPT-2 `ln_2`, Llama/Mistral/Qwen `post_attention_layernorm`, Gemma 2/3 `pre_feedforward_layernorm`
    (their `post_*` norms feed only residual additions), and the single shared norm of parallel blocks.
    The probe's hooks ignore forwards run by other threads (see the module docstring).
    """
    blocks_name, blocks = decoder_blocks(model, num_layers)
    prefix = f"{blocks_name}.{len(blocks) - 1}"
    block = blocks[-1]
    norms = {name: m for name, m in block.named_modules() if name and _is_norm(m)}
    if not norms:
        raise ValueError(
            f"The last decoder block {prefix} of {type(model).__name__} has no normalisation module; "
            "pass `layer=` naming the module whose output is the key embedding."
        )
    outputs: dict[str, torch.Tensor] = {}
    order: list[str] = []
    consumed: set[str] = set()
    thread = threading.get_ident()  # the probe's own forward; other threads' forwards are ignored

    def on_norm(name):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor) and threading.get_ident() == thread:
                outputs[name] = output
                order.append(name)

        return hook

    def on_input(name):
        def hook(module, args, kwargs=None):  # kwargs=None: see EmbeddingCapture._on_input
            if threading.get_ident() != thread:
                return
            tensors = [t for t in list(args) + list((kwargs or {}).values()) if isinstance(t, torch.Tensor)]
            for norm_name, out in outputs.items():
                if name.startswith(norm_name + ".") or name == norm_name:
                    continue
                if any(t is out or (t.numel() == out.numel() and t.data_ptr() == out.data_ptr()) for t in tensors):
                    consumed.add(norm_name)

        return hook

    handles = []
    try:
        for name, m in block.named_modules():
            if not name:
                continue
            if name in norms:
                handles.append(m.register_forward_hook(on_norm(name)))
            handles.append(m.register_forward_pre_hook(on_input(name), with_kwargs=True))
        vocab = getattr(model.get_input_embeddings(), "num_embeddings", 2)
        device = next(model.parameters()).device
        probe = (torch.arange(8, device=device) % vocab).unsqueeze(0)  # (1, 8)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(input_ids=probe, use_cache=False)
        finally:
            model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    hidden_size = hidden_size or (outputs[order[0]].shape[-1] if order else None)
    found = [
        n
        for n in dict.fromkeys(order)
        if n in consumed and outputs[n].shape[-1] == hidden_size and outputs[n].numel() == probe.numel() * hidden_size
    ]
    if not found:
        raise ValueError(
            f"No normalisation module of {prefix} feeds another module with a (batch, seq, {hidden_size}) tensor; "
            f"pass `layer=` explicitly (normalisations found: {sorted(norms)})."
        )
    return f"{prefix}.{found[-1]}"


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
