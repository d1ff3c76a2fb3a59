"""Model cards: real numbers from the last evaluation, Hub metadata, template fallback, shipped template."""

from __future__ import annotations

import os

import pytest
from conftest import make_base, make_pixel_dataset
from huggingface_hub import ModelCard

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
    model.build_memory(make_pixel_dataset(20, seed=6), batch_size=20)
    assert model.config.last_evaluation is None and model.config.memory_dataset["num_rows"] == 20


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
    results = eval_results(ev, "text-generation")
    values = {r.metric_name: r.metric_value for r in results}
    assert values == {"ResMem next-token accuracy": 0.35, "Base model next-token accuracy": 0.3,
                      "Base model perplexity": 40.0, "ResMem perplexity (clamp)": 80.0,
                      "ResMem perplexity (mixture, lambda=0.75)": 35.5}
    assert {r.dataset_name for r in results} == {"some-org/corpus"}
    yaml = ModelCardData(model_name="m", eval_results=results).to_yaml()
    assert "model-index" in yaml and "perplexity" in yaml
