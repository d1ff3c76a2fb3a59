"""Model cards filled at save time from the model itself (settings, memory, data, evaluations per split).

The template is `model_cards/resmem_model_card.md` at the top of the repository, shipped inside the
package as `resmem/model_cards/resmem_model_card.md` (a test keeps the two identical), so an
installed package finds it through `importlib.resources`. It is rendered with
`huggingface_hub.ModelCard.from_template`; a custom template naming a field that does not exist
falls back to the bundled template, and if that fails too, to a minimal card, with a warning - a
save never fails because of its card.

Every number of the card says which split it comes from and what it may be used for: `tune`'s
validation numbers are labelled "used to choose the settings", a result of `resmem.evaluate(model,
test_data, split="test")` as held out (see `resmem.records`). Numbers measured at other settings
than the saved ones are left out.

A save never replaces a user's README.md: the card's text sits between `<!-- resmem:begin ... -->`
and `<!-- resmem:end -->`, and a save rewrites only that part and the metadata keys it owns (see
[`merge_card`]).
"""

from __future__ import annotations

import importlib.resources
import os
import re
import warnings

import torch

from .atomic import write_text_atomic
from .configuration_resmem import TASK_AUDIO_CLASSIFICATION, TASK_CAUSAL_LM, TASK_TEXT_CLASSIFICATION
from .hub import CARD_FILE
from .records import (  # noqa: F401  (describe_dataset: importable from here as before)
    UNNAMED_SPLIT,
    chose_settings,
    current_settings,
    dataset_label,
    describe_dataset,
    measured_at_current_settings,
)

TEMPLATE_NAME = "resmem_model_card.md"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

_PIPELINE_TAGS = {TASK_CAUSAL_LM: "text-generation"}  # other tasks: the task name is the Hub's pipeline tag
_AUTO_CLASSES = {
    TASK_CAUSAL_LM: "AutoModelForCausalLM",
    TASK_TEXT_CLASSIFICATION: "AutoModelForSequenceClassification",
    TASK_AUDIO_CLASSIFICATION: "AutoModelForAudioClassification",
}
_USAGE_CALLS = {
    TASK_CAUSAL_LM: "out = model.generate(input_ids, max_new_tokens=20)",
    TASK_TEXT_CLASSIFICATION: "out = model(**tokenizer(texts, padding=True, return_tensors=\"pt\"))   # out.scores (paper eq. 3), out.logits",
    TASK_AUDIO_CLASSIFICATION: "out = model(**feature_extractor(arrays, sampling_rate=16000, return_tensors=\"pt\"))   # out.scores, out.logits",
}
_DEFAULT_USAGE = "out = model(pixel_values=pixel_values)   # out.scores (paper eq. 3), out.logits, out.base_logits"

# Markers of the part of README.md a save rewrites; text outside them (a user's own) is kept.
SECTION_BEGIN = "<!-- resmem:begin: written by save_pretrained; text between these markers is replaced at each save -->"
SECTION_END = "<!-- resmem:end -->"

_MINIMAL = """# {model_name}

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
    parts = [f"- Dataset: {dataset_label(info)}"]
    if not any(info.get(key) for key in ("type", "builder_name", "dataset_name", "path")):
        parts[0] += " (built in Python, not loaded from files: its fingerprint identifies it)"
    for key, label in (("builder_name", "Builder"), ("config_name", "Config"), ("split", "Split"), ("num_rows", "Rows"),
                       ("fingerprint", "Fingerprint (`datasets`)"), ("path", "Folder (`load_from_disk`)")):
        if info.get(key) not in (None, ""):
            parts.append(f"- {label}: `{info[key]}`")
    if info.get("augmentation"):  # resmem.augmentation: two entries per image
        parts.append(f"- Augmented memory: `{info['augmentation']}` (each image and its flipped copy, same example id)")
    residual = info.get("residual_model")
    if isinstance(residual, dict) and "cross_fitted" in residual:  # several models, one per fold
        models = ", ".join(f"fold {i}: `{m.get('class')}` `{m.get('name_or_path') or ''}` (`{str(m.get('fingerprint', ''))[:19]}`)"
                           for i, m in enumerate(residual["cross_fitted"]))
        parts.append(f"- Residuals cross-fitted by column `{residual.get('fold_column')}`, not from the base: {models}")
    elif isinstance(residual, dict):  # out-of-sample residuals: stored logits from another model
        name = f" `{residual['name_or_path']}`" if residual.get("name_or_path") else ""
        parts.append(f"- Residuals from another model: `{residual.get('class')}`{name} (weights fingerprint "
                     f"`{str(residual.get('fingerprint', ''))[:19]}`), not the base: out-of-sample residuals")
    return "\n".join(parts)


# ------------------------------------------------------------------ evaluations
SELECTION, HELD_OUT, MEMORY_DATA = "selection", "held-out", "memory"
_ROLE_TITLES = {
    HELD_OUT: "held out",
    SELECTION: "used to choose the settings",
    MEMORY_DATA: "the data the memory was built from (not held out)",
}
# Suffix of a model-index metric name by role: the Hub shows the name, so it must say what the number is.
_ROLE_METRIC_SUFFIX = {HELD_OUT: "", SELECTION: " (settings chosen on this split)", MEMORY_DATA: " (memory's own data)"}
_HOW_TO_RECORD = (
    'measure one on a test split with `resmem.evaluate(model, test_data, split="test")`, or record numbers computed '
    'elsewhere with `model.record_evaluation(result, split="test", dataset=test_data)`, then save again'
)


def _fingerprint(record: dict) -> str | None:
    data = record.get("dataset")
    return data.get("fingerprint") if isinstance(data, dict) else None


def evaluation_roles(evaluations: dict | None, memory_info: dict | None = None) -> dict[str, str]:
    """`{split: role}`: `"selection"` for numbers `tune` chose the settings on (or on the same data, by fingerprint),
    `"memory"` for the data the memory was built from, `"held-out"` otherwise."""
    records = {key: r for key, r in (evaluations or {}).items() if isinstance(r, dict)}
    tuned = {_fingerprint(r) for r in records.values() if chose_settings(r)} - {None}
    memory_fp = (memory_info or {}).get("fingerprint")
    roles = {}
    for key, record in records.items():
        fp = _fingerprint(record)
        if chose_settings(record) or (fp is not None and fp in tuned):
            roles[key] = SELECTION
        elif fp is not None and fp == memory_fp:
            roles[key] = MEMORY_DATA
        else:
            roles[key] = HELD_OUT
    return roles


def current_evaluations(config, settings: dict) -> tuple[dict, dict]:
    """`(current, stale)`: the recorded evaluations measured at `settings`, and the others (left out of the card)."""
    current, stale = {}, {}
    for key, record in (getattr(config, "evaluations", None) or {}).items():
        if isinstance(record, dict):
            (current if measured_at_current_settings(record, settings) else stale)[key] = record
    return current, stale


def _settings_text(record: dict) -> str:
    text = f"k={record.get('k')}, sigma={record.get('sigma')}, T={record.get('temperature')}"
    if record.get("distribution"):
        text += f", distribution={record['distribution']}"
        if record["distribution"] == "mixture":
            text += f" (lambda={record.get('mixture_lambda')})"
        elif record["distribution"] == "knn-lm":
            text += f" (lambda={record.get('mixture_lambda')}, knn_temperature={record.get('knn_temperature')})"
        elif record["distribution"] == "adaptive":
            text += f" (lambda_max={record.get('adaptive_lambda_max')}, tau={record.get('adaptive_tau')}"
            if record.get("adaptive_gate", "exp") != "exp":
                text += f", logistic gate at d0={record.get('adaptive_d0')}"
            if record.get("adaptive_prediction", "mixture") != "mixture":
                text += f", prediction={record.get('adaptive_prediction')}"
            text += ")"
    for key in ("sigma_mode", "key_normalization", "query_augmentation"):  # variants: recorded only when not the paper's
        if record.get(key):
            text += f", {key}={record[key]}"
    if record.get("search_index"):  # index="auto" with a measured approximate index
        text += f", search index `{record['search_index']}`"
    return text


def _record_text(record: dict, role: str, has_selection: bool) -> list[str]:
    split = record.get("split") or UNNAMED_SPLIT
    data = record.get("dataset")
    unit = record.get("unit") or "examples"
    split_text = "an unnamed split" if split == UNNAMED_SPLIT else f"split `{split}`"
    where = f"on {record.get('num_examples', '?')} {unit}" + (f" of {dataset_label(data)}" if data else "")
    lines = [f"### {split_text[0].upper() + split_text[1:]}: {_ROLE_TITLES[role]}", ""]
    lines.append(f"Measured by `{record.get('source', 'evaluate')}` {where} ({split_text}) with {_settings_text(record)}.")
    details = [f"{data['num_rows']} rows" if data.get("num_rows") is not None else None,
               f"fingerprint `{data['fingerprint']}`" if data.get("fingerprint") else None,
               f"folder `{data['path']}`" if data.get("path") else None] if data else []
    if any(details):
        lines.append(f"Data: {', '.join(d for d in details if d)}.")
    if role == SELECTION:
        lines.append("The settings were chosen to do best on these data, so these numbers overstate what to expect "
                     "on new data.")
    elif role == MEMORY_DATA:
        lines.append("These are the data the memory was built from: ResMem recalls its own training examples, so "
                     "these numbers say nothing about new data.")
    elif has_selection:
        lines.append("These data were not used to choose the settings.")
    if split == UNNAMED_SPLIT:
        lines.append('No split was named: pass `split="test"` (or the split\'s name) when evaluating.')
    if record.get("mse") is not None:  # a regressor (resmem.regression): errors and R^2, not accuracies
        lines += ["", "| Base MSE | ResMem MSE | Base MAE | ResMem MAE | Base R^2 | ResMem R^2 |", "|---|---|---|---|---|---|",
                  "| " + " | ".join(f"{record.get(key, float('nan')):.6g}" for key in
                                    ("base_mse", "mse", "base_mae", "mae", "base_r2", "r2")) + " |"]
        return lines
    header = "| Base accuracy | ResMem accuracy | TPR | FPR | Gain |"
    if unit == "token positions":
        header = "| Base next-token accuracy | ResMem next-token accuracy | TPR | FPR | Gain |"
    lines += ["", header, "|---|---|---|---|---|",
              f"| {_pct(record.get('base_accuracy'))} | {_pct(record.get('resmem_accuracy'))} | {_pct(record.get('tpr'))} "
              f"| {_pct(record.get('fpr'))} | {_pct(record.get('gain'))} |"]
    if record.get("base_ppl") is not None:
        if record.get("ppl") is not None:  # resmem.evaluate: the configured distribution only
            mode = record.get("distribution") or "clamp"
            mode += f", lambda={record.get('mixture_lambda')}" if mode in ("mixture", "knn-lm") else ""
            ppl = f"Perplexity: base {record['base_ppl']:.2f}, ResMem ({mode}) {record['ppl']:.2f}"
        else:  # tune's grid: both modes
            ppl = f"Perplexity: base {record['base_ppl']:.2f}, ResMem (clamp) {record.get('ppl_clamp', float('nan')):.2f}"
            if record.get("ppl_mixture") is not None:
                ppl += f", ResMem mixture (lambda={record.get('mixture_lambda')}) {record['ppl_mixture']:.2f}"
        lines += ["", ppl + "."]
    return lines


def evaluation_text(config, settings: dict) -> str:
    """The card's evaluation section: one sub-section per split, each saying where its numbers come from."""
    current, stale = current_evaluations(config, settings)
    roles = evaluation_roles(current, getattr(config, "memory_dataset", None))
    order = {HELD_OUT: 0, SELECTION: 1, MEMORY_DATA: 2}
    lines = []
    if not current:
        lines.append(f"No evaluation at these settings is recorded: {_HOW_TO_RECORD}. `model.tune(val_data, ...)` "
                     "records its validation numbers (those it chose the settings on).")
    else:
        lines.append(f"Every number below was measured at this model's settings ({_settings_text(settings)}).")
        has_selection = SELECTION in roles.values()
        for key in sorted(current, key=lambda key: (order[roles[key]], key)):
            lines += [""] + _record_text(current[key], roles[key], has_selection)
        if HELD_OUT not in roles.values():
            lines += ["", f"No held-out result is recorded: {_HOW_TO_RECORD}."]
    for key, record in sorted(stale.items()):
        lines += ["", f"Left out: the evaluation on split `{key}` was measured at other settings "
                      f"({_settings_text(record)}, {record.get('memory_entries', '?')} memory entries) than this model's; "
                      "evaluate again to show it."]
    return "\n".join(lines)


def _dataset_ids(data: dict | None) -> tuple[str, str]:
    """`(dataset_type, dataset_name)` of a model-index entry: the Hub id when known, else the builder or "local"."""
    data = data or {}
    name = data.get("dataset_name") or data.get("builder_name")
    if not name and data.get("path"):
        name = os.path.basename(str(data["path"]).rstrip("/"))
    name = name or data.get("type") or "local"
    return name, name


def eval_results(evaluations: dict | None, pipeline_tag: str, memory_info: dict | None = None) -> list | None:
    """The evaluations as Hub `model-index` entries (`huggingface_hub.EvalResult`), one set per split, or None.

    `evaluations`: `{split: record}` (only those measured at the model's settings; see [`current_evaluations`]).
    Per split: ResMem accuracy (next-token accuracy for a language model), the base model's accuracy and the
    perplexities of a language model, with `dataset_split` set; the metric names of numbers `tune` chose the
    settings on say so.
    """
    from huggingface_hub import EvalResult

    if evaluations and "resmem_accuracy" in evaluations:  # a single record, as earlier versions passed
        evaluations = {evaluations.get("split") or UNNAMED_SPLIT: evaluations}
    roles = evaluation_roles(evaluations, memory_info)
    results = []
    for key in sorted(evaluations or {}):
        ev = evaluations[key]
        if not isinstance(ev, dict) or ev.get("resmem_accuracy") is None:
            continue
        data = ev.get("dataset") if isinstance(ev.get("dataset"), dict) else {}
        dataset_type, dataset_name = _dataset_ids(data)
        common = dict(task_type=pipeline_tag, dataset_type=dataset_type, dataset_name=dataset_name,
                      dataset_config=data.get("config_name"), dataset_split=ev.get("split") or key)
        suffix = _ROLE_METRIC_SUFFIX[roles[key]]
        language_model = ev.get("unit") == "token positions"
        what = "next-token accuracy" if language_model else "accuracy"
        metrics = [("accuracy", f"ResMem {what}", ev["resmem_accuracy"]),
                   ("accuracy", f"Base model {what}", ev.get("base_accuracy"))]
        if language_model:
            mode = ev.get("distribution") or "clamp"
            mode += f", lambda={ev.get('mixture_lambda')}" if mode in ("mixture", "knn-lm") else ""
            metrics += [("perplexity", "Base model perplexity", ev.get("base_ppl")),
                        ("perplexity", f"ResMem perplexity ({mode})", ev.get("ppl")),
                        ("perplexity", "ResMem perplexity (clamp)", ev.get("ppl_clamp")),
                        ("perplexity", f"ResMem perplexity (mixture, lambda={ev.get('mixture_lambda')})", ev.get("ppl_mixture"))]
        try:
            results += [EvalResult(metric_type=kind, metric_name=name + suffix, metric_value=round(float(value), 6), **common)
                        for kind, name, value in metrics if value is not None]
        except (TypeError, ValueError) as err:  # a save never fails because of its card's metadata
            warnings.warn(f"The model card's model-index left out split {key!r}: {err}", stacklevel=2)
    return results or None


def _index_choice_text(config, num_entries: int) -> str:
    from .index_choice import index_choice_text  # the measured choice of index="auto" and its table

    return index_choice_text(config, num_entries)


def card_fields(model, repo_id: str | None = None, tags: list[str] | None = None) -> tuple:
    """`(card_data, fields)`: the card's Hub metadata (`huggingface_hub.ModelCardData`) and every other field the
    template may use, from the model's config, memory and recorded evaluations."""
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
    settings = current_settings(model)
    current, _ = current_evaluations(config, settings)
    hub_datasets = [d.get("dataset_name") for d in [data_info] + [r.get("dataset") or {} for r in current.values()]]
    hub_datasets = list(dict.fromkeys(d for d in hub_datasets if _REPO_ID.match(str(d or ""))))
    model_name = repo_id.split("/")[-1] if repo_id else f"ResMem {base_config.model_type}"
    results = eval_results(current, pipeline_tag, data_info)
    card_data = ModelCardData(
        library_name="transformers",
        tags=list(dict.fromkeys(all_tags)),
        base_model=base_name if base_is_hub else None,
        pipeline_tag=pipeline_tag,
        datasets=hub_datasets or None,
        model_name=model_name if results else None,  # the name of the model-index; the Hub takes the repo's otherwise
        eval_results=results,
    )
    roles = evaluation_roles(current, data_info)
    fields = {
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
        "search_index": _index_choice_text(config, len(memory)),
        "evaluation": evaluation_text(config, settings),
        # For custom templates: the records shown, each with its "role" ("held-out", "selection", "memory").
        "evaluations": [{**current[key], "role": roles[key]} for key in sorted(current)],
        "auto_class": _AUTO_CLASSES.get(task, "AutoModelForImageClassification"),
        "usage_call": _USAGE_CALLS.get(task, _DEFAULT_USAGE),
    }
    return card_data, fields


# ------------------------------------------------------------------ rendering
def _check_fields(text: str, known: set[str]) -> None:
    """Raise `jinja2.UndefinedError` naming the fields a template uses that the card does not have (the template
    engine of `ModelCard.from_template` would render them as empty text without a word)."""
    import jinja2
    import jinja2.meta

    missing = sorted(jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(text)) - known)
    if missing:
        raise jinja2.UndefinedError(f"the template uses fields the card does not have: {', '.join(map(repr, missing))}")


def _section(body: str) -> str:
    return f"{SECTION_BEGIN}\n{body.strip()}\n{SECTION_END}\n"


def _join(card_data_yaml: str, body: str) -> str:
    header = f"---\n{card_data_yaml.strip()}\n---\n" if card_data_yaml.strip() else ""
    return header + body


def render_card(model, template: str | None = None, repo_id: str | None = None, tags: list[str] | None = None) -> str:
    """The model card text, its body between the resmem markers. `template`: path of a custom Jinja2 template
    (default: the bundled one), rendered with `huggingface_hub.ModelCard.from_template`."""
    import jinja2
    import yaml  # a dependency of huggingface_hub: the card's metadata is parsed with it
    from huggingface_hub import ModelCard

    card_data, fields = card_fields(model, repo_id=repo_id, tags=tags)
    known = set(fields) | set(card_data.to_dict()) | {"card_data"}
    candidates = [template, None] if template is not None else [None]
    for candidate in candidates:
        try:
            text = template_text(candidate)
            _check_fields(text, known)
            card = ModelCard.from_template(card_data, template_str=text, **fields)
            return _join(card.data.to_yaml(), _section(card.text))
        except (jinja2.TemplateError, OSError, ValueError, yaml.YAMLError) as err:  # ValueError, YAMLError: bad metadata
            where = candidate or f"the bundled {TEMPLATE_NAME}"
            warnings.warn(f"Model card template {where} could not be rendered ({err}); falling back.", stacklevel=3)
    body = _MINIMAL.format(
        entries=fields["memory"]["num_entries"],
        **{key: fields[key] for key in ("model_name", "base_model", "k", "sigma", "residual_temperature", "auto_class", "repo_id")},
    )
    return _join(card_data.to_yaml(), _section(body))


# ------------------------------------------------------------------ a README that is already there
_SECTION = re.compile(r"<!-- resmem:begin\b.*?-->.*?<!-- resmem:end -->\n?", re.DOTALL)
# Metadata keys a card sets; the user's other keys (license, language, ...) are kept as they are.
_OWNED_KEYS = ("library_name", "pipeline_tag", "base_model")


def _is_resmem_card_without_markers(card) -> bool:
    """A card written by a resmem-hf version before the markers: regenerated whole, like one with them."""
    return "resmem" in (getattr(card.data, "tags", None) or []) and "Built with `resmem-hf`" in card.text


def merge_card(generated: str, existing: str | None) -> str:
    """The README to write when the folder already has one (`existing`, its text): keep the user's text.

    * The YAML metadata: the user's keys are kept; `library_name`, `pipeline_tag` and `base_model` are set
      from the model, `tags` and `datasets` gain the model's, and the `model-index` entries this library writes
      (metric names starting "ResMem " or "Base model ") are replaced by the current ones, others kept.
    * The text: the part between `<!-- resmem:begin ... -->` and `<!-- resmem:end -->` is replaced; a README
      without the markers gets the section appended after the user's text; a card an earlier resmem-hf
      version wrote (no markers) is replaced.
    A README whose metadata cannot be parsed keeps it untouched (with a warning) and only gets the section.
    """
    if not existing or not existing.strip():
        return generated
    from huggingface_hub import ModelCard

    new = ModelCard(generated, ignore_metadata_errors=True)
    section = _SECTION.search(new.text).group(0)
    import yaml

    try:
        old = ModelCard(existing, ignore_metadata_errors=True)
    except (ValueError, yaml.YAMLError) as err:
        warnings.warn(f"The existing README.md's metadata could not be parsed ({err}): it is kept as it is; only the "
                      "resmem section is updated.", stacklevel=3)
        return _replace_section(existing, section)
    if _SECTION.search(old.text) is None and _is_resmem_card_without_markers(old):
        body = section
    else:
        body = _replace_section(old.text, section)
    data = old.data
    order = list(data.to_dict())
    for key in _OWNED_KEYS:
        value = getattr(new.data, key, None)
        if value is not None:
            setattr(data, key, value)
    for key in ("tags", "datasets"):
        merged = list(dict.fromkeys(_as_list(getattr(data, key, None)) + _as_list(getattr(new.data, key, None))))
        setattr(data, key, merged or None)
    theirs = [r for r in (getattr(data, "eval_results", None) or [])
              if not str(r.metric_name).startswith(("ResMem ", "Base model "))]
    ours = getattr(new.data, "eval_results", None) or []
    data.eval_results = (theirs + ours) or None
    if ours:  # the model-index's name
        data.model_name = new.data.model_name
    elif not theirs:  # no model-index left: no name of one either
        data.model_name = None
    return _join(data.to_yaml(original_order=order), body)


def _as_list(value) -> list:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _replace_section(text: str, section: str) -> str:
    if _SECTION.search(text):
        return _SECTION.sub(lambda _: section, text, count=1)
    return text.rstrip() + "\n\n" + section


def download_hub_card(repo_id: str, token=None, revision: str | None = None, cache_dir: str | None = None) -> str | None:
    """Path of a downloaded copy of a Hub repo's README.md (to merge into, see [`merge_card`]), or None if it has none.

    Raises:
        OSError: the README could not be read (network, permissions): nothing is uploaded, so the repo's
            README is never replaced because it could not be read.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    try:
        return HfApi(token=token).hf_hub_download(repo_id, CARD_FILE, revision=revision, cache_dir=cache_dir)
    except (EntryNotFoundError, RevisionNotFoundError):  # a new repo or branch: no README to keep
        return None
    except Exception as err:
        raise OSError(
            f"Could not read the README.md of {repo_id} to keep its text in the new model card ({err}). Nothing was "
            "uploaded; try again when the Hub is reachable."
        ) from err


def write_card(
    model,
    path: str,
    template: str | None = None,
    repo_id: str | None = None,
    tags: list[str] | None = None,
    existing: str | None = None,
) -> str:
    """Render the card and write it to `path` (normally `<folder>/README.md`), to a temporary name first.

    Args:
        existing: path of the README this one replaces (the save folder's `README.md`): its text outside the
            resmem section and its other metadata are kept (see [`merge_card`]).
    """
    text = render_card(model, template=template, repo_id=repo_id, tags=tags)
    if existing is not None and os.path.isfile(existing):
        with open(existing, encoding="utf-8") as f:
            text = merge_card(text, f.read())
    write_text_atomic(path, text)
    return path


__all__ = [
    "CARD_FILE",
    "SECTION_BEGIN",
    "SECTION_END",
    "card_fields",
    "describe_dataset",
    "download_hub_card",
    "eval_results",
    "evaluation_text",
    "merge_card",
    "render_card",
    "template_text",
    "write_card",
]
