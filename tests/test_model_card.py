"""Model cards: numbers per split with what they may be used for, Hub metadata, template fallback, shipped
template; a save updates a user's README.md instead of replacing it and keeps files it does not own."""

from __future__ import annotations

import os

import pytest
from conftest import make_base, make_pixel_dataset
from huggingface_hub import ModelCard
from test_hub import hub_calls  # noqa: F401  (a fixture: the Hub's HTTP calls, recorded)

from resmem import ResMemWrapper
from resmem.analysis import evaluate_model
from resmem.model_card import TEMPLATE_NAME, render_card, template_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def model():
    m = ResMemWrapper.from_base(make_base("resnet", seed=5), k=3, sigma=0.5, temperature=1.5)
    m.build_memory(make_pixel_dataset(30, seed=5), batch_size=30)
    return m


def test_build_memory_records_the_dataset_and_resets_the_evaluation(model):
    info = model.config.memory_dataset
    assert info["num_rows"] == 30 and info["fingerprint"]
    model.config.last_evaluation = {"resmem_accuracy": 1.0}
    evaluate_model(model, make_pixel_dataset(16, seed=9), batch_size=16, split="test")
    assert set(model.config.evaluations) == {"unnamed", "test"}
    model.build_memory(make_pixel_dataset(20, seed=6), batch_size=20)
    assert model.config.last_evaluation is None and not model.config.evaluations
    assert model.config.memory_dataset["num_rows"] == 20


def test_saved_card_holds_the_last_evaluation(model, tmp_path):
    result = evaluate_model(model, make_pixel_dataset(16, seed=9), batch_size=16, split="test")
    model.save_pretrained(tmp_path / "m")
    card = ModelCard.load(tmp_path / "m" / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-classification"
    assert "resmem" in card.data.tags
    text = card.text
    for key in ("base_accuracy", "resmem_accuracy", "tpr", "fpr", "gain"):
        assert f"{100 * result[key]:.2f}%" in text, key
    assert "16 examples" in text and "split `test`" in text
    assert "| k (neighbours) | 3 |" in text and "| T (residual temperature) | 1.5 |" in text
    assert "| Memory entries | 30 |" in text and "(30 entries" not in text
    assert f"({30 * (16 + 5) * 4 + 2 * 30 * 8} bytes)" in text  # keys + logits float32, labels + ids int64
    assert "pip install resmem-hf" in text and "import resmem" in text
    assert "classifier.1:input" in text
    # The evaluation survives a reload and a second save.
    reloaded = ResMemWrapper.from_pretrained(tmp_path / "m")
    assert reloaded.config.last_evaluation["resmem_accuracy"] == result["resmem_accuracy"]


def test_base_model_metadata_only_for_hub_ids(model):
    model.base.config._name_or_path = "some-org/tiny-resnet"
    assert "base_model: some-org/tiny-resnet" in render_card(model)
    model.base.config._name_or_path = "/local/path/to/model"
    assert "base_model:" not in render_card(model)


def test_template_with_a_missing_field_falls_back(model, tmp_path):
    broken = tmp_path / "card.md"
    broken.write_text("---\n{{ card_data }}\n---\n# {{ model_name }} {{ no_such_field }}\n")
    with pytest.warns(UserWarning, match="no_such_field"):
        model.save_pretrained(tmp_path / "m", model_card_template=str(broken))
    text = (tmp_path / "m" / "README.md").read_text()
    assert "## Evaluation" in text  # the bundled template took over


def test_unrenderable_bundled_template_still_saves(model, tmp_path, monkeypatch):
    import resmem.model_card as mc

    monkeypatch.setattr(mc, "template_text", lambda path=None: "{{ missing }}")
    with pytest.warns(UserWarning, match="falling back"):
        model.save_pretrained(tmp_path / "m")
    text = (tmp_path / "m" / "README.md").read_text()
    assert "k=3, sigma=0.5, residual temperature T=1.5, 30 memory entries" in text
    assert ResMemWrapper.from_pretrained(tmp_path / "m").config.k == 3


def test_card_can_be_skipped(model, tmp_path):
    model.save_pretrained(tmp_path / "m", model_card=False)
    assert not (tmp_path / "m" / "README.md").exists()


def test_packaged_template_is_the_top_level_one():
    with open(os.path.join(ROOT, "model_cards", TEMPLATE_NAME), encoding="utf-8") as f:
        assert template_text() == f.read(), "copy model_cards/ into src/resmem/model_cards/ after editing the template"


def test_card_metadata_has_a_model_index_with_the_measured_numbers(model, tmp_path):
    assert "model-index" not in render_card(model)  # nothing measured yet: no numbers in the metadata
    result = evaluate_model(model, make_pixel_dataset(16, seed=9), batch_size=16, split="test")
    model.save_pretrained(tmp_path / "m")
    card = ModelCard.load(tmp_path / "m" / "README.md")
    by_name = {r.metric_name: r for r in card.data.eval_results}
    assert by_name["ResMem accuracy"].metric_value == pytest.approx(result["resmem_accuracy"])
    assert by_name["Base model accuracy"].metric_value == pytest.approx(result["base_accuracy"])
    for r in card.data.eval_results:
        assert (r.task_type, r.dataset_split, r.metric_type) == ("image-classification", "test", "accuracy")


def test_language_model_card_reports_next_token_accuracy_and_perplexities():
    from huggingface_hub import ModelCardData

    from resmem.model_card import eval_results

    ev = {"unit": "token positions", "base_accuracy": 0.3, "resmem_accuracy": 0.35, "base_ppl": 40.0,
          "ppl_clamp": 80.0, "ppl_mixture": 35.5, "mixture_lambda": 0.75, "split": "validation",
          "dataset": {"dataset_name": "some-org/corpus"}, "source": "tune"}
    test = {"unit": "token positions", "base_accuracy": 0.28, "resmem_accuracy": 0.3, "base_ppl": 42.0, "ppl": 39.0,
            "distribution": "mixture", "mixture_lambda": 0.75, "split": "test",
            "dataset": {"dataset_name": "some-org/corpus", "split": "test"}, "source": "evaluate"}
    results = eval_results({"validation": ev, "test": test}, "text-generation")
    tuned = " (settings chosen on this split)"
    values = {(r.dataset_split, r.metric_name): r.metric_value for r in results}
    assert values == {
        ("validation", "ResMem next-token accuracy" + tuned): 0.35, ("validation", "Base model next-token accuracy" + tuned): 0.3,
        ("validation", "Base model perplexity" + tuned): 40.0, ("validation", "ResMem perplexity (clamp)" + tuned): 80.0,
        ("validation", "ResMem perplexity (mixture, lambda=0.75)" + tuned): 35.5,
        ("test", "ResMem next-token accuracy"): 0.3, ("test", "Base model next-token accuracy"): 0.28,
        ("test", "Base model perplexity"): 42.0, ("test", "ResMem perplexity (mixture, lambda=0.75)"): 39.0,
    }
    assert {r.dataset_name for r in results} == {"some-org/corpus"}
    yaml = ModelCardData(model_name="m", eval_results=results).to_yaml()
    assert "model-index" in yaml and "perplexity" in yaml


# ------------------------------------------------------------------ splits
def _card(folder) -> ModelCard:
    return ModelCard.load(os.path.join(folder, "README.md"))


def _section_of(text: str, title: str) -> str:
    """The text of the card's `### <title>` sub-section."""
    start = text.index(title)
    end = text.find("\n### ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_card_labels_each_split_and_shows_the_test_result_next_to_validation(model, tmp_path):
    tuned = model.tune(make_pixel_dataset(20, seed=8), k=[2, 3], sigma=[0.5], temperature=[1.5], set_best=True)
    best = tuned.best
    test = evaluate_model(model, make_pixel_dataset(16, seed=9), batch_size=16, split="test")
    assert set(model.config.evaluations) == {"validation", "test"}
    model.save_pretrained(tmp_path / "m")
    card = _card(tmp_path / "m")
    validation = _section_of(card.text, "### Split `validation`: used to choose the settings")
    held_out = _section_of(card.text, "### Split `test`: held out")
    assert f"| {100 * best['base_accuracy']:.2f}% | {100 * best['accuracy']:.2f}% |" in validation
    assert "20 examples" in validation and "overstate" in validation
    assert f"| {100 * test['base_accuracy']:.2f}% | {100 * test['resmem_accuracy']:.2f}% |" in held_out
    assert "16 examples" in held_out and "not used to choose the settings" in held_out
    assert "No held-out result" not in card.text
    by_split = {}
    for r in card.data.eval_results:
        by_split.setdefault(r.dataset_split, {})[r.metric_name] = r.metric_value
    assert by_split["test"]["ResMem accuracy"] == pytest.approx(test["resmem_accuracy"])
    assert by_split["validation"]["ResMem accuracy (settings chosen on this split)"] == pytest.approx(best["accuracy"])
    # Both survive a reload; the latest is still readable as last_evaluation.
    reloaded = ResMemWrapper.from_pretrained(tmp_path / "m")
    assert reloaded.config.evaluations == model.config.evaluations
    assert reloaded.config.last_evaluation["split"] == "test"


def test_validation_only_card_asks_for_a_held_out_result(model):
    model.tune(make_pixel_dataset(20, seed=8), k=[2, 3], set_best=True)
    text = render_card(model)
    assert "used to choose the settings" in text
    assert 'No held-out result is recorded: measure one on a test split with `resmem.evaluate(model, test_data, split="test")`' in text


def test_evaluating_the_tuning_data_again_is_not_called_held_out(model):
    val = make_pixel_dataset(20, seed=8)
    model.tune(val, k=[2, 3], set_best=True)
    evaluate_model(model, val, batch_size=20, split="dev")  # the same rows under another split name
    evaluate_model(model, make_pixel_dataset(30, seed=5), batch_size=30, split="train")  # the memory's own data
    evaluate_model(model, val, batch_size=20, split="validation")  # replaces tune's record of the same data
    assert "tune" not in model.config.evaluations["validation"]["source"]
    text = render_card(model)
    assert "### Split `dev`: used to choose the settings" in text
    assert "### Split `validation`: used to choose the settings" in text
    assert "### Split `train`: the data the memory was built from (not held out)" in text
    assert "No held-out result is recorded" in text


def test_a_tune_that_changes_the_settings_drops_results_measured_at_the_old_ones(model):
    evaluate_model(model, make_pixel_dataset(16, seed=9), batch_size=16, split="test")  # at k=3
    # A tune that picks the same settings keeps the test result ...
    model.tune(make_pixel_dataset(20, seed=8), k=[3], sigma=[0.5], temperature=[1.5], set_best=True)
    assert set(model.config.evaluations) == {"validation", "test"}
    # ... one that changes them drops it: it was measured at k=3.
    model.tune(make_pixel_dataset(20, seed=8), k=[2], sigma=[0.5], temperature=[1.5], set_best=True)
    assert set(model.config.evaluations) == {"validation"} and model.config.evaluations["validation"]["k"] == 2
    assert "### Split `test`" not in render_card(model)


def test_numbers_at_other_settings_are_left_out_of_the_card(model):
    evaluate_model(model, make_pixel_dataset(16, seed=9), batch_size=16, split="test")  # at k=3
    assert "model-index" in render_card(model)
    model.config.k = 5  # changed by hand after the evaluation
    text = render_card(model)
    assert "model-index" not in text and "### Split `test`" not in text
    assert "Left out: the evaluation on split `test` was measured at other settings (k=3, sigma=0.5, T=1.5" in text


def test_model_record_evaluation_records_numbers_computed_elsewhere(model, tmp_path):
    data = make_pixel_dataset(12, seed=3)
    numbers = {"base_accuracy": 0.5, "resmem_accuracy": 0.75, "tpr": 0.25, "fpr": 0.0, "gain": 0.25, "num_examples": 12}
    record = model.record_evaluation(numbers, split="test", dataset=data, source="my benchmark")
    assert record["dataset"]["fingerprint"] == data._fingerprint and record["k"] == 3
    text = render_card(model)
    assert "### Split `test`: held out" in text and "Measured by `my benchmark` on 12 examples" in text
    assert "| 50.00% | 75.00% | 25.00% | 0.00% | 25.00% |" in text
    with pytest.raises(ValueError, match=r"measured at \{'k': 7\}.*model\.config\.k"):
        model.record_evaluation({**numbers, "k": 7}, split="test")


def test_old_config_with_last_evaluation_loads_and_shows(model, tmp_path):
    import json

    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    assert "last_evaluation" not in config  # written once, as `evaluations`
    config.pop("evaluations", None)
    config["last_evaluation"] = {  # as resmem-hf 0.1.0 wrote it
        "base_accuracy": 0.5, "resmem_accuracy": 0.625, "tpr": 0.25, "fpr": 0.125, "gain": 0.125, "num_examples": 8,
        "k": 3, "sigma": 0.5, "temperature": 1.5, "source": "evaluate", "split": "test", "dataset": {"num_rows": 8},
    }
    path.write_text(json.dumps(config))
    loaded = ResMemWrapper.from_pretrained(tmp_path / "m")
    assert set(loaded.config.evaluations) == {"test"}
    assert loaded.config.last_evaluation["resmem_accuracy"] == 0.625
    text = render_card(loaded)
    assert "### Split `test`: held out" in text and "| 50.00% | 62.50% | 25.00% | 12.50% | 12.50% |" in text


# ------------------------------------------------------------------ datasets
def test_datasets_are_described_by_what_identifies_them(tmp_path):
    import datasets

    from resmem.records import describe_dataset

    folder = tmp_path / "pixels"
    make_pixel_dataset(30, seed=5).save_to_disk(str(folder))
    data = datasets.load_from_disk(str(folder))
    model = ResMemWrapper.from_base(make_base("resnet", seed=5), k=3)
    model.build_memory(data, batch_size=30)
    info = model.config.memory_dataset
    assert info["path"] == str(folder) and info["num_rows"] == 30 and info["fingerprint"] == data._fingerprint
    text = render_card(model)
    assert "a local dataset" not in text
    assert f"- Dataset: the dataset saved in `{folder}`" in text and f"- Fingerprint (`datasets`): `{data._fingerprint}`" in text
    texts = tmp_path / "corpus.txt"
    texts.write_text("one line\nanother line\n")
    loaded = datasets.load_dataset("text", data_files=str(texts), split="train", cache_dir=str(tmp_path / "cache"))
    assert describe_dataset(loaded) == {"builder_name": "text", "config_name": "default", "split": "train",
                                        "fingerprint": loaded._fingerprint, "num_rows": 2}
    assert describe_dataset([[1, 2], [3]]) == {"type": "list", "num_rows": 2}


# ------------------------------------------------------------------ an existing README.md
SECTION_BEGIN, SECTION_END = "<!-- resmem:begin", "<!-- resmem:end -->"  # the markers of the part a save rewrites
USER_README = """---
license: mit
tags:
- mine
---
# My ResMem model

Trained on my photos; see my blog.
"""


def test_a_users_readme_is_kept_and_updated(model, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "README.md").write_text(USER_README)
    model.save_pretrained(folder)
    text = (folder / "README.md").read_text()
    card = ModelCard.load(folder / "README.md")
    assert "# My ResMem model\n\nTrained on my photos; see my blog.\n" in card.text
    assert card.text.index("Trained on my photos") < card.text.index(SECTION_BEGIN) < card.text.index(SECTION_END)
    assert card.data.license == "mit" and card.data.library_name == "transformers"
    assert card.data.tags[0] == "mine" and "resmem" in card.data.tags
    assert "No evaluation at these settings is recorded" in text and "model-index" not in text
    # A second save after an evaluation: the user's text once, the section replaced, the numbers in the metadata.
    (folder / "README.md").write_text(text + "\nA line the user added below the section.\n")
    result = evaluate_model(model, make_pixel_dataset(16, seed=9), batch_size=16, split="test")
    model.save_pretrained(folder)
    again = ModelCard.load(folder / "README.md")
    assert again.text.count("Trained on my photos") == 1 and again.text.count(SECTION_BEGIN) == 1
    assert again.text.rstrip().endswith("A line the user added below the section.")
    assert "No evaluation at these settings is recorded" not in again.text
    assert f"| {100 * result['base_accuracy']:.2f}% | {100 * result['resmem_accuracy']:.2f}% |" in again.text
    assert again.data.license == "mit" and {r.dataset_split for r in again.data.eval_results} == {"test"}


def test_a_readme_written_by_resmem_is_regenerated(model, tmp_path):
    evaluate_model(model, make_pixel_dataset(16, seed=9), batch_size=16, split="test")
    model.save_pretrained(tmp_path / "m")
    assert "model-index" in (tmp_path / "m" / "README.md").read_text()
    model.config.k = 7  # the test result no longer applies: its model-index entry must go too
    model.save_pretrained(tmp_path / "m")
    text = (tmp_path / "m" / "README.md").read_text()
    assert text.count(SECTION_BEGIN) == 1 and text.count("## Settings") == 1
    assert "model-index" not in text and "model_name" not in text
    assert "| k (neighbours) | 7 |" in text and "| k (neighbours) | 3 |" not in text
    assert text == render_card(model)
    # A card of an earlier version (no markers) is regenerated too, not kept as a user's text.
    old = "\n".join(line for line in render_card(model).splitlines() if "resmem:" not in line) + "\n"
    (tmp_path / "m" / "README.md").write_text(old.replace("| k (neighbours) | 7 |", "| k (neighbours) | 3 |"))
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "README.md").read_text() == render_card(model)


def test_files_a_save_does_not_own_survive_it(model, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    mine = {"model_notes.txt": "my notes", "modeling_extra.py": "X = 1\n", "models.md": "list", "resmem_notes.txt": "n"}
    for name, text in mine.items():
        (folder / name).write_text(text)
    stale = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
             "pytorch_model.bin", "resmem_index.faiss"]
    for name in stale:
        (folder / name).write_bytes(b"an earlier save's weights")
    model.save_pretrained(folder)
    names = set(os.listdir(folder))
    assert {name: (folder / name).read_text() for name in mine} == mine
    assert not names & set(stale)
    assert {"config.json", "model.safetensors", "resmem_memory.safetensors", "README.md"} <= names
    assert ResMemWrapper.from_pretrained(folder).config.k == 3


def test_owned_file_names():
    from resmem.hub import is_owned_file

    owned = ["config.json", "generation_config.json", "model.safetensors", "model-00001-of-00003.safetensors",
             "model.safetensors.index.json", "model.fp16.safetensors", "model.safetensors.index.fp16.json",
             "pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json",
             "resmem_memory.safetensors", "resmem_index.faiss", "resmem_memory.index.json", "resmem_memory-00003.safetensors"]
    kept = ["model_notes.txt", "modeling_extra.py", "model.py", "models", "model.safetensors.bak", "README.md",
            "resmem_notes.txt", "tokenizer.json", "my_model.safetensors", "config.json.orig"]
    assert [n for n in owned if not is_owned_file(n)] == [] and [n for n in kept if is_owned_file(n)] == []


# ------------------------------------------------------------------ packaging
def test_pyproject_declares_what_the_code_imports_and_writes_the_version_once():
    import re
    import tomllib

    import resmem

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    declared = " ".join(project["project"]["dependencies"] + sum(project["project"]["optional-dependencies"].values(), []))
    sources = ""
    for folder, _, files in os.walk(os.path.join(ROOT, "src", "resmem")):
        sources += "".join(open(os.path.join(folder, n), encoding="utf-8").read() for n in files if n.endswith(".py"))
    assert re.search(r"^\s*import jinja2", sources, re.M) and "jinja2" in declared  # ModelCard.from_template needs it
    assert "scikit-learn" not in declared and "sklearn" not in sources  # declared but never used before
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "resmem.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", resmem.__version__)


def test_language_model_records_depend_on_the_distribution_mode():
    from types import SimpleNamespace

    from resmem.records import record_evaluation

    config = SimpleNamespace(k=4, sigma=0.5, residual_temperature=1.0, task="causal-lm", distribution="clamp",
                             mixture_lambda=0.5, memory_size=10, evaluations=None)
    model = SimpleNamespace(config=config, memory=range(10))
    numbers = {"unit": "token positions", "base_accuracy": 0.3, "resmem_accuracy": 0.4, "base_ppl": 40.0, "ppl": 90.0}
    record_evaluation(model, {**numbers, "distribution": "clamp"}, split="test")
    config.mixture_lambda = 0.25  # not used in the clamp mode: the test result still holds
    record_evaluation(model, numbers, split="validation", source="tune (accuracy)")
    assert set(config.evaluations) == {"test", "validation"} and "mixture_lambda" not in config.evaluations["test"]
    config.distribution = "mixture"  # a tune that switches to the mixture: the clamp perplexity no longer applies
    record_evaluation(model, {**numbers, "ppl": 38.0}, split="validation", source="tune (accuracy)")
    assert set(config.evaluations) == {"validation"} and config.evaluations["validation"]["mixture_lambda"] == 0.25
    record_evaluation(model, {**numbers, "ppl": 37.0, "distribution": "mixture", "mixture_lambda": 0.25}, split="test")
    config.mixture_lambda = 0.75
    record_evaluation(model, {**numbers, "ppl": 36.0}, split="validation", source="tune (accuracy)")
    assert set(config.evaluations) == {"validation"}
    with pytest.raises(ValueError, match="distribution"):
        record_evaluation(model, {**numbers, "distribution": "clamp"}, split="test")


def test_a_readme_without_metadata_or_with_broken_metadata_keeps_its_text(model, tmp_path):
    from resmem.model_card import merge_card

    generated = render_card(model)
    plain = merge_card(generated, "# Notes\n\nNo metadata here.\n")
    card = ModelCard(plain)
    assert card.text.startswith("# Notes\n\nNo metadata here.\n") and card.data.library_name == "transformers"
    broken = "---\nlicense: [mit\n---\n# Notes\n"
    with pytest.warns(UserWarning, match="metadata could not be parsed"):
        kept = merge_card(generated, broken)
    assert kept.startswith(broken) and kept.count(SECTION_BEGIN) == 1
    with pytest.warns(UserWarning, match="metadata could not be parsed"):
        assert merge_card(generated, kept) == kept  # saving again changes nothing


def test_push_to_hub_updates_the_repos_readme(model, tmp_path, hub_calls, monkeypatch):
    from huggingface_hub import HfApi
    from test_hub import REPO_ID

    remote = tmp_path / "remote-README.md"
    remote.write_text(USER_README)
    hub_calls.remote = {"README.md": str(remote)}
    model.push_to_hub(REPO_ID)
    card = ModelCard(hub_calls.commits[0]["files"]["README.md"].decode())
    assert "Trained on my photos; see my blog." in card.text and card.text.count(SECTION_BEGIN) == 1
    assert card.data.license == "mit" and "resmem" in card.data.tags
    assert remote.read_text() == USER_README

    def unreachable(api, repo_id, filename, **kw):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(HfApi, "hf_hub_download", unreachable)
    with pytest.raises(OSError, match="Could not read the README.md of .* Nothing was uploaded"):
        model.push_to_hub(REPO_ID)
    assert len(hub_calls.commits) == 1
