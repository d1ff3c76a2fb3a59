"""Model cards filled at save time from the model itself (settings, memory, data, latest evaluation).

The template is `model_cards/resmem_model_card.md` at the top of the repository, shipped inside the
package as `resmem/model_cards/resmem_model_card.md` (a test keeps the two identical), so an
installed package finds it through `importlib.resources`. It is a Jinja2 template rendered with
`StrictUndefined`: a custom template naming a field that does not exist falls back to the bundled
template, and if that fails too, to a minimal card, with a warning - a save never fails because of
its card.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import warnings

import torch

from .configuration_resmem import TASK_CAUSAL_LM
from .hub import CARD_FILE

TEMPLATE_NAME = "resmem_model_card.md"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

_PIPELINE_TAGS = {TASK_CAUSAL_LM: "text-generation"}
_AUTO_CLASSES = {TASK_CAUSAL_LM: "AutoModelForCausalLM"}
_USAGE_CALLS = {
    TASK_CAUSAL_LM: "out = model.generate(input_ids, max_new_tokens=20)",
}
_DEFAULT_USAGE = "out = model(pixel_values=pixel_values)   # out.scores (paper eq. 3), out.logits, out.base_logits"

_MINIMAL = """---
{card_data}
---

# {model_name}

ResMem model over `{base_model}` (k={k}, sigma={sigma}, residual temperature T={residual_temperature}, {entries} memory entries).

```python
import resmem
from transformers import {auto_class}
model = {auto_class}.from_pretrained("{repo_id}")
```
"""


def template_text(path: str | None = None) -> str:
    """The card template: `path` if given, else the one shipped in the package."""
    if path is not None:
        with open(path, encoding="utf-8") as f:
            return f.read()
    return importlib.resources.files("resmem").joinpath("model_cards", TEMPLATE_NAME).read_text(encoding="utf-8")


def describe_dataset(dataset) -> dict:
    """What identifies a `datasets.Dataset`: builder, config, split, fingerprint, number of rows (JSON-safe).

    Anything else (token-id lists or tensors handed to a causal LM's `build_memory`) is described
    by its type and length only.
    """
    import datasets

    if not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        described = {"type": type(dataset).__name__}
        try:
            described["num_rows"] = len(dataset)
        except TypeError:
            pass
        return described
    info = getattr(dataset, "info", None)
    described = {
        "builder_name": getattr(info, "builder_name", None),
        "config_name": getattr(info, "config_name", None),
        "dataset_name": getattr(info, "dataset_name", None),
        "split": str(dataset.split) if getattr(dataset, "split", None) is not None else None,
        "fingerprint": getattr(dataset, "_fingerprint", None),
    }
    try:
        described["num_rows"] = len(dataset)
    except TypeError:  # streaming datasets
        described["num_rows"] = None
    return {key: value for key, value in described.items() if value is not None}


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _memory_data_text(info: dict | None) -> str:
    if not info:
        return "Not recorded (the memory was loaded or built without dataset information)."
    name = info.get("dataset_name") or info.get("builder_name") or (f"a {info['type']}" if "type" in info else "a local dataset")
    parts = [f"- Dataset: `{name}`"]
    for key, label in (("config_name", "Config"), ("split", "Split"), ("num_rows", "Rows"), ("fingerprint", "Fingerprint")):
        if info.get(key) not in (None, ""):
            parts.append(f"- {label}: `{info[key]}`")
    return "\n".join(parts)


def _evaluation_text(ev: dict | None) -> str:
    if not ev:
        return "No evaluation recorded yet: run `model.tune(val_dataset, ...)` or `resmem.analysis.evaluate_model(model, dataset)` before saving."
    data = ev.get("dataset") or {}
    where = data.get("dataset_name") or data.get("builder_name") or "a local dataset"
    split = ev.get("split") or data.get("split")
    lines = [
        f"Measured by `{ev.get('source', 'evaluate')}` on {ev.get('num_examples', '?')} {ev.get('unit') or 'examples'} of `{where}`"
        + (f" (split `{split}`)" if split else "")
        + f" with k={ev.get('k')}, sigma={ev.get('sigma')}, T={ev.get('temperature')}.",
        "",
        "| Base accuracy | ResMem accuracy | TPR | FPR | Gain |",
        "|---|---|---|---|---|",
        f"| {_pct(ev.get('base_accuracy'))} | {_pct(ev.get('resmem_accuracy'))} | {_pct(ev.get('tpr'))} "
        f"| {_pct(ev.get('fpr'))} | {_pct(ev.get('gain'))} |",
    ]
    if ev.get("unit") == "token positions":
        lines[2] = "| Base next-token accuracy | ResMem next-token accuracy | TPR | FPR | Gain |"
    if ev.get("base_ppl") is not None:
        ppl = f"Perplexity: base {ev['base_ppl']:.2f}, ResMem (clamp) {ev.get('ppl_clamp', float('nan')):.2f}"
        if ev.get("ppl_mixture") is not None:
            ppl += f", ResMem mixture (lambda={ev.get('mixture_lambda')}) {ev['ppl_mixture']:.2f}"
        lines += ["", ppl + "."]
    if str(ev.get("source", "")).startswith("tune"):
        lines += ["", "These numbers come from the split the hyperparameters were tuned on; expect a test split to score lower."]
    return "\n".join(lines)


def eval_results(ev: dict | None, pipeline_tag: str) -> list | None:
    """The latest evaluation as Hub `model-index` entries (`huggingface_hub.EvalResult`), or None.

    One entry per metric the evaluation measured: ResMem accuracy (next-token accuracy for a language
    model), the base model's accuracy under its own name, and the perplexities of a language model.
    """
    from huggingface_hub import EvalResult

    if not ev or ev.get("resmem_accuracy") is None:
        return None
    data = ev.get("dataset") or {}
    dataset = data.get("dataset_name") or data.get("builder_name") or "local"
    common = dict(task_type=pipeline_tag, dataset_type=dataset, dataset_name=dataset,
                  dataset_config=data.get("config_name"), dataset_split=ev.get("split") or data.get("split"))
    language_model = ev.get("unit") == "token positions"
    what = "next-token accuracy" if language_model else "accuracy"
    metrics = [("accuracy", f"ResMem {what}", ev["resmem_accuracy"]),
               ("accuracy", f"Base model {what}", ev.get("base_accuracy"))]
    if language_model:
        metrics += [("perplexity", "Base model perplexity", ev.get("base_ppl")),
                    ("perplexity", "ResMem perplexity (clamp)", ev.get("ppl_clamp")),
                    ("perplexity", f"ResMem perplexity (mixture, lambda={ev.get('mixture_lambda')})", ev.get("ppl_mixture"))]
    try:
        return [EvalResult(metric_type=kind, metric_name=name, metric_value=round(float(value), 6), **common)
                for kind, name, value in metrics if value is not None] or None
    except (TypeError, ValueError) as err:  # a save never fails because of its card's metadata
        warnings.warn(f"The model card's model-index was left out: {err}", stacklevel=2)
        return None


def card_fields(model, repo_id: str | None = None, tags: list[str] | None = None) -> dict:
    """Every field the template may use, from the model's config, memory and recorded metadata."""
    from huggingface_hub import ModelCardData

    from . import __version__

    config = model.config
    base_config = model.base.config
    base_name = getattr(base_config, "_name_or_path", "") or getattr(model.base, "name_or_path", "") or ""
    base_is_hub = bool(_REPO_ID.match(base_name)) and not os.path.exists(base_name)
    memory = model.memory
    stored = [getattr(memory, name, None) for name in ("keys", "base_logits", "values", "indices", "labels", "example_ids", "positions")]
    memory_bytes = int(sum(t.numel() * t.element_size() for t in stored if isinstance(t, torch.Tensor)))
    task = config.task
    pipeline_tag = _PIPELINE_TAGS.get(task, task)
    all_tags = ["resmem", "residual-memorization", "knn", pipeline_tag] + [t for t in (tags or []) if t]
    data_info = getattr(config, "memory_dataset", None) or {}
    datasets = None
    if _REPO_ID.match(str(data_info.get("dataset_name") or "")):
        datasets = [data_info["dataset_name"]]
    model_name = repo_id.split("/")[-1] if repo_id else f"ResMem {base_config.model_type}"
    card_data = ModelCardData(
        library_name="transformers",
        tags=list(dict.fromkeys(all_tags)),
        base_model=base_name if base_is_hub else None,
        pipeline_tag=pipeline_tag,
        datasets=datasets,
        model_name=model_name,
        eval_results=eval_results(getattr(config, "last_evaluation", None), pipeline_tag),
    )
    return {
        "card_data": card_data.to_yaml(),
        "model_name": model_name,
        "repo_id": repo_id or "path/to/this/folder-or-org/name",
        "library_version": __version__,
        "task": task,
        "base_model": base_name or base_config.model_type,
        "base_model_type": base_config.model_type,
        "layer": config.layer,
        "k": config.k,
        "sigma": config.sigma,
        "residual_temperature": config.residual_temperature,
        "temperature": config.residual_temperature,  # the former name, for custom templates written before the rename
        "memory": {
            "num_entries": len(memory),
            "dim": memory.dim,
            "bytes": memory_bytes,
            "bytes_human": _human_bytes(memory_bytes),
        },
        "memory_data": _memory_data_text(data_info),
        "evaluation": _evaluation_text(getattr(config, "last_evaluation", None)),
        "auto_class": _AUTO_CLASSES.get(task, "AutoModelForImageClassification"),
        "usage_call": _USAGE_CALLS.get(task, _DEFAULT_USAGE),
    }


def render_card(model, template: str | None = None, repo_id: str | None = None, tags: list[str] | None = None) -> str:
    """The model card text. `template`: path of a custom Jinja2 template (default: the bundled one)."""
    import jinja2

    fields = card_fields(model, repo_id=repo_id, tags=tags)
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    candidates = [template, None] if template is not None else [None]
    for candidate in candidates:
        try:
            return env.from_string(template_text(candidate)).render(**fields)
        except (jinja2.TemplateError, OSError) as err:
            where = candidate or f"the bundled {TEMPLATE_NAME}"
            warnings.warn(f"Model card template {where} could not be rendered ({err}); falling back.", stacklevel=3)
    return _MINIMAL.format(
        entries=fields["memory"]["num_entries"],
        **{key: fields[key] for key in ("card_data", "model_name", "base_model", "k", "sigma", "residual_temperature", "auto_class", "repo_id")},
    )


def write_card(model, path: str, template: str | None = None, repo_id: str | None = None, tags: list[str] | None = None) -> str:
    """Render the card and write it to `path` (normally `<folder>/README.md`)."""
    text = render_card(model, template=template, repo_id=repo_id, tags=tags)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


__all__ = ["CARD_FILE", "card_fields", "describe_dataset", "render_card", "template_text", "write_card"]
